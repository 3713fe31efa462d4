"""Group relative policy optimisation with `trl.GRPOTrainer`: sample a group of answers per
prompt, score them with reward functions, and push the policy toward the better ones. No value
model, and rewards can be plain Python.

`rewards` lists the reward functions: `module:function` callables in TRL's form (tunelab ships
`tunelab.rewards:exact_match`, `:numeric` and `:close`), and/or reward models (`${reward}`, a
folder or hub id of a classifier with num_labels=1; scored on prompt + answer + EOS, as the reward
stage trained it). TRL sums them, weighted by `training.reward_weights`. Each callable is imported
and called on the first rows of the data during `tunelab validate`, so one that cannot be
imported or raises fails before training.

`training` is `trl.GRPOConfig`; `lora` and `quantization` as in sft. The reference answers reach
reward functions as `reference`: `reference_column` names the column (default: `reference`, else
`completion`; TRL itself withholds a column named `completion`).
"""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.recipe import REF
from tunelab.stages import Context, StageResult, StageSpec

PRODUCES_MODEL = True
RANKS = "all"  # trains on every process of a distributed run (the Trainer shards the data)
SECTIONS = {
    "model": "policy to train: usually ${sft} (adapter folders are merged first)",
    "data": "prompts (a `prompt` column) and any columns the rewards read: datasets.load_dataset arguments",
    "rewards": "reward functions: module:function callables and/or reward models (${reward}, folder)",
    "reference_column": "column passed to reward functions as `reference` (default: reference, else completion)",
    "training": "trl.GRPOConfig fields (num_generations, max_completion_length, beta, learning_rate, ...)",
    "lora": "peft.LoraConfig fields; omit for full fine-tuning",
    "quantization": "transformers.BitsAndBytesConfig fields: GRPO with QLoRA",
    "kl_limit": "stop when the logged KL to the reference passes this value (needs training.beta > 0)",
    "chat_template": "prompts through the model's chat template: true (default, when it has one), false, or a template",
    "system": "system prompt for chat-templated prompts",
}
PROBE_ROWS = 2


def _args(spec: StageSpec, ctx: Context):
    from trl import GRPOConfig

    from tunelab.training import training_args

    return training_args(GRPOConfig, spec.cfg.get("training"), f"{spec.where}.training", spec.out_dir, ctx.seed)


def _data(spec: StageSpec):
    from tunelab.data import load_split, require_columns

    if "data" not in spec.cfg:
        raise TunelabError(f"'{spec.where}' has no `data:`: name a dataset with a `prompt` column")
    ds = load_split(spec.cfg["data"], f"{spec.where}.data", "train")
    require_columns(ds, ["prompt"], f"{spec.where}.data", "prompts, which GRPOTrainer reads from 'prompt'")
    column = spec.cfg.get("reference_column")
    if column is None:
        column = next((c for c in ("reference", "completion") if c in ds.column_names), None)
    else:
        require_columns(ds, [column], f"{spec.where}.data", "reference answers; set reference_column")
    if column is not None and column != "reference":
        if "reference" in ds.column_names:
            ds = ds.remove_columns("reference")
        ds = ds.rename_column(column, "reference")
    return ds


def _entries(spec: StageSpec) -> list[str]:
    where = f"{spec.where}.rewards"
    entries = spec.cfg.get("rewards")
    if entries is None:
        raise TunelabError(
            f"'{spec.where}' has no `rewards:`: list reward functions (module:function) and/or reward models, "
            "e.g. [tunelab.rewards:exact_match]"
        )
    entries = [entries] if isinstance(entries, str) else entries
    if not isinstance(entries, list) or not entries or not all(isinstance(e, str) for e in entries):
        raise TunelabError(f"'{where}' must be a list of module:function names and/or reward model paths")
    return entries


def is_callable_name(entry: str) -> bool:
    """`package.module:function` (not a path, hub id or ${stage})."""
    module, sep, func = entry.partition(":")
    return bool(sep) and module.replace(".", "").replace("_", "").isalnum() and func.isidentifier()


def import_reward(entry: str, where: str):
    """The callable `module:function` names; the current folder is importable, as with `python -m`."""
    module_name, _, func_name = entry.partition(":")
    if "" not in sys.path and "." not in sys.path:
        sys.path.insert(0, "")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 - a user's module can fail to import in any way
        raise TunelabError(
            f"'{where}' is '{entry}', but module '{module_name}' cannot be imported ({type(exc).__name__}: {exc}); "
            "put it in the current folder or install it"
        ) from None
    func = getattr(module, func_name, None)
    if func is None:
        names = [n for n in dir(module) if not n.startswith("_") and callable(getattr(module, n))]
        from tunelab.errors import closest

        guess = closest(func_name, names)
        raise TunelabError(
            f"'{where}' is '{entry}', but '{module_name}' has no '{func_name}'"
            + (f"; did you mean '{module_name}:{guess}'?" if guess else "")
        )
    if not callable(func):
        raise TunelabError(f"'{where}' is '{entry}', which is not a function")
    return func


def probe(func, entry: str, ds, where: str) -> None:
    """Call a reward function the way GRPOTrainer will, on the first rows, with the references as answers."""
    rows = ds.select(range(min(PROBE_ROWS, len(ds))))
    prompts = rows["prompt"]
    completions = [str(r) for r in rows["reference"]] if "reference" in rows.column_names else [""] * len(rows)
    columns = {c: rows[c] for c in rows.column_names if c not in ("prompt", "completion", "completion_ids")}
    try:
        out = func(
            prompts=prompts,
            completions=completions,
            completion_ids=[[] for _ in prompts],
            trainer_state=None,
            log_extra=lambda *a, **k: None,
            log_metric=lambda *a, **k: None,
            **columns,
        )
    except Exception as exc:  # noqa: BLE001 - report whatever a user's reward raises, in one line
        message = " ".join(str(exc).split())[:200]
        raise TunelabError(
            f"'{where}': reward function '{entry}' raised {type(exc).__name__}: {message} "
            f"(called on the first {len(prompts)} rows of data with columns {', '.join(columns) or 'none'})"
        ) from None
    if not isinstance(out, (list, tuple)) or len(out) != len(prompts):
        raise TunelabError(
            f"'{where}': reward function '{entry}' must return one number per completion (a list of "
            f"{len(prompts)}), got {type(out).__name__}"
        )
    if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in out):
        raise TunelabError(f"'{where}': reward function '{entry}' returned {list(out)!r}: expected numbers (or None)")


def _check_rewards(spec: StageSpec, ctx: Context, ds) -> list[tuple[str, Any]]:
    """(entry, callable or from_pretrained spec) for each reward; None specs while a stage is pending."""
    from tunelab.stages.ppo import reward_model_spec

    out = []
    for i, entry in enumerate(_entries(spec)):
        where = f"{spec.where}.rewards[{i}]"
        if is_callable_name(entry):
            func = import_reward(entry, where)
            probe(func, entry, ds, where)
            out.append((entry, func))
            continue
        out.append((entry, reward_model_spec(entry, ctx, where)))
    return out


def check(spec: StageSpec, ctx: Context) -> None:
    from tunelab.chat import check_chat_data, setting, system_prompt
    from tunelab.models import stage_model
    from tunelab.preflight import check_model, check_training
    from tunelab.stages.ppo import _kl_limit
    from tunelab.stages.sft import _lora, _quantization

    check_training(_args(spec, ctx), spec)
    setting(spec.cfg, spec.where), system_prompt(spec.cfg, spec.where)
    _kl_limit(spec)
    lora = _lora(spec.cfg.get("lora"), f"{spec.where}.lora")
    _quantization(spec)
    stage_model(spec, ctx)
    check_model(spec, ctx, lora)
    ds = _data(spec)
    check_chat_data(ds, ("prompt",), spec, ctx)
    _check_rewards(spec, ctx, ds)


def reward_model_function(model, tokenizer, name: str):
    """A reward model as a reward function: scores prompt + completion + EOS, like the reward stage trained it."""
    from tunelab.models import reward_scores

    def score(prompts: list[Any], completions: list[Any], **kwargs: Any) -> list[float]:
        if isinstance(prompts[0], list):  # conversational
            texts = [
                tokenizer.apply_chat_template(p + c, tokenize=False) for p, c in zip(prompts, completions, strict=True)
            ]
        else:
            texts = [p + c for p, c in zip(prompts, completions, strict=True)]
        return reward_scores(model, tokenizer, texts)

    score.__name__ = name
    return score


def run(spec: StageSpec, ctx: Context) -> StageResult:
    from accelerate import PartialState
    from trl import GRPOTrainer

    from tunelab.chat import conversational, setting, system_prompt
    from tunelab.data import fingerprint
    from tunelab.models import load_causal_lm, load_sequence_classifier, load_tokenizer, prepare_kbit, stage_model
    from tunelab.stages.ppo import _kl_limit
    from tunelab.stages.sft import _lora, _quantization
    from tunelab.training import guarded_train

    args = _args(spec, ctx)
    peft_config = _lora(spec.cfg.get("lora"), f"{spec.where}.lora")
    quant = _quantization(spec)
    mspec = stage_model(spec, ctx)
    ds = _data(spec)
    funcs = []
    for entry, value in _check_rewards(spec, ctx, ds):
        if callable(value):
            funcs.append(value)
            continue
        model = load_sequence_classifier(value, num_labels=1).to(PartialState().device)
        # Logged as rewards/NAME/mean: the stage it came from, or its folder's name.
        name = entry.strip().strip("${}") if REF.match(entry.strip()) else Path(value["path"]).name
        funcs.append(reward_model_function(model, load_tokenizer(value["path"]), name))
    tokenizer = load_tokenizer(mspec["path"])
    ds = conversational(ds, tokenizer, setting(spec.cfg, spec.where), system_prompt(spec.cfg, spec.where))
    model = prepare_kbit(load_causal_lm(mspec, quantization=quant), quant, args.gradient_checkpointing)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=funcs,
        args=args,
        train_dataset=ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    metrics: dict[str, Any] = guarded_train(trainer, spec, ctx.resume, _kl_limit(spec))
    rewards = [h["reward"] for h in trainer.state.log_history if "reward" in h]
    if rewards:
        n = max(1, len(rewards) // 10)
        metrics.update(first_reward=sum(rewards[:n]) / n, last_reward=sum(rewards[-n:]) / n)
    trainer.save_model(str(spec.out_dir))
    if trainer.args.should_save:  # the main process (several write the same files otherwise)
        tokenizer.save_pretrained(str(spec.out_dir))
    return StageResult(metrics=metrics, model=spec.out_dir, fingerprints={"data": fingerprint(ds)})


def plan(spec: StageSpec, ctx: Context):
    """Memory plan of the policy's training (approximate: generation of num_generations answers per prompt)."""
    from tunelab.plan import policy_plan

    args = _args(spec, ctx)
    args.max_length = (args.max_completion_length or 256) + 128
    return policy_plan(spec, ctx, args)
