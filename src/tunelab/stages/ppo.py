"""RLHF's third step: optimise the policy against a reward model with PPO (`trl.experimental.ppo`,
TRL 1.12; pinned until tunelab owns its PPO).

The policy starts from `model` (usually `${sft}`; an adapter is merged first); the reference is a
frozen copy of it (with `lora:`, the policy with its adapter switched off); `reward_model` is a
reward stage's classifier (`${reward}`); the value model starts from `value_model`, by default
the reward model. Prompts come from `data` (`prompt_column`), tokenized and left-padded for
generation. `training` is TRL's `PPOConfig`; tunelab sets `stop_token: eos` unless the recipe
says otherwise, so responses end where the policy stops, as the reward model was trained, and
`num_sample_generations: 0` (TRL prints ten tables of samples otherwise).

Every step logs the reward-model score, KL to the reference, entropy and value loss (also in
`log_history.json`, plotted in report.md). A NaN/inf loss or score, or KL past `kl_limit`, stops
the run with one line naming the step and the last good checkpoint.

The loop is `tunelab.ppo_trainer.ResumablePPOTrainer`: TRL's algorithm with checkpoints that
hold the value model too, a prompt order fixed by the seed, and `--resume` that continues from the
newest checkpoint; it runs on every process of `tunelab launch` (each rank answers its slice of
every rollout batch, with its own sampling seed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.stages import Context, StageResult, StageSpec

PRODUCES_MODEL = True
RANKS = "all"  # every process rolls out and trains on its slice of each batch
SECTIONS = {
    "model": "policy to optimise: usually ${sft} (adapter folders are merged first)",
    "reward_model": "reward model: ${reward} or a folder/hub id of a classifier with num_labels=1",
    "value_model": "where the value model starts (default: the reward model)",
    "data": "prompts: datasets.load_dataset arguments",
    "prompt_column": "column holding the prompts (default: prompt); plain text or chat messages",
    "training": "trl.experimental.ppo.PPOConfig fields (learning_rate, total_episodes, kl_coef, response_length, ...)",
    "lora": "peft.LoraConfig fields: train a LoRA policy (the reference is the policy without its adapter)",
    "kl_limit": "stop when the KL to the reference passes this value (objective/kl); NaN always stops",
    "chat_template": "prompts through the model's chat template: true (default, when it has one), false, or a template",
    "system": "system prompt for chat-templated prompts",
}
# PPOConfig fields used by TRL's example script, not by the trainer: the recipe names these models.
NOT_TRAINER_KEYS = ("sft_model_path", "reward_model_path")
# Responses end at EOS, as the reward model saw them; TRL's 10 sample tables per run would flood the console.
DEFAULTS = {"stop_token": "eos", "num_sample_generations": 0}


def _args(spec: StageSpec, ctx: Context):
    from trl.experimental.ppo import PPOConfig

    from tunelab.training import training_args

    where = f"{spec.where}.training"
    values = dict(spec.cfg.get("training") or {})
    for key in NOT_TRAINER_KEYS:
        if key in values:
            raise TunelabError(f"'{where}.{key}' is not used by the trainer: set the stage's `model:`/`reward_model:`")
    return training_args(PPOConfig, {**DEFAULTS, **values}, where, spec.out_dir, ctx.seed)


def _kl_limit(spec: StageSpec) -> float | None:
    value = spec.cfg.get("kl_limit")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise TunelabError(f"'{spec.where}.kl_limit' must be a positive number, got {value!r}")
    return value


def _prompts(spec: StageSpec):
    from tunelab.data import load_split, require_columns

    if "data" not in spec.cfg:
        raise TunelabError(f"'{spec.where}' has no `data:`: name a dataset of prompts for the policy to answer")
    column = spec.cfg.get("prompt_column", "prompt")
    ds = load_split(spec.cfg["data"], f"{spec.where}.data", "train")
    require_columns(ds, [column], f"{spec.where}.data", "prompts; set prompt_column")
    return ds, column


def _reward_spec(spec: StageSpec, ctx: Context, key: str) -> dict[str, Any] | None:
    """`reward_model` / `value_model` as from_pretrained arguments (None while its stage is pending)."""
    return reward_model_spec(spec.cfg[key], ctx, f"{spec.where}.{key}")


def reward_model_spec(value: Any, ctx: Context, where: str) -> dict[str, Any] | None:
    """A reward model named by a recipe (folder, hub id, ${stage}, or mapping), checked to be one."""
    from tunelab.hub import local_path
    from tunelab.models import model_spec, resolve_spec
    from tunelab.recipe import REF

    mspec = model_spec(value, where)
    if ctx.checking and ctx.is_pending(mspec["path"]):
        ref = REF.match(mspec["path"].strip()).group(1)
        if ctx.kinds.get(ref, "reward") != "reward":
            raise TunelabError(
                f"'{where}' is ${{{ref}}}, a `{ctx.kinds[ref]}` stage, not a reward model: "
                "name a `reward` stage (a sequence classifier with num_labels=1)"
            )
        return None
    if "gguf_file" in mspec:
        raise TunelabError(f"'{where}' is a GGUF file, a causal LM: a reward model is a classifier (a `reward` stage)")
    mspec = resolve_spec({**mspec, "path": ctx.resolve_ref(mspec["path"])}, where)
    check_reward_model(mspec["path"], where, local_path(mspec["path"]))
    return mspec


def check_reward_model(path: str, where: str, folder: Path | None) -> None:
    """A reward model is a sequence classifier with one output; say so before anything loads."""
    import json

    from tunelab.models import is_adapter

    if folder is None or is_adapter(path):
        return  # a hub id, or a reward adapter (checked on load)
    config = json.loads((folder / "config.json").read_text())
    arch = (config.get("architectures") or ["?"])[0]
    labels = len(config.get("id2label") or {}) or config.get("num_labels", 2)
    if not arch.endswith("ForSequenceClassification") or labels != 1:
        raise TunelabError(
            f"'{where}' is '{path}', a {arch}"
            + (f" with {labels} labels" if arch.endswith("Classification") else "")
            + ", not a reward model (a sequence classifier with num_labels=1): train one with a `reward` stage"
        )


def _check_tokenizers(spec: StageSpec, ctx: Context) -> None:
    from tunelab.models import same_tokenizer, tokenizer_origin

    policy = tokenizer_origin(spec.cfg["model"], ctx, f"{spec.where}.model")
    for key in ("reward_model", "value_model"):
        if key in spec.cfg:
            other = tokenizer_origin(spec.cfg[key], ctx, f"{spec.where}.{key}")
            if not same_tokenizer(policy, other):
                raise TunelabError(
                    f"'{spec.where}.{key}' uses a different tokenizer ({other}) from the policy ({policy}): PPO "
                    "scores the policy's token ids with it, so both need the same one; train the reward model "
                    "from the policy's model (reward stage `model: ${sft}`)"
                )


def check(spec: StageSpec, ctx: Context) -> None:
    from tunelab.chat import check_chat_data, setting, system_prompt
    from tunelab.models import stage_model
    from tunelab.preflight import check_model
    from tunelab.stages.sft import _lora

    args = _args(spec, ctx)
    setting(spec.cfg, spec.where), system_prompt(spec.cfg, spec.where)
    _kl_limit(spec)
    lora = _lora(spec.cfg.get("lora"), f"{spec.where}.lora")
    stage_model(spec, ctx, "the policy to optimise (usually ${sft})")
    check_model(spec, ctx, lora)
    if "reward_model" not in spec.cfg:
        raise TunelabError(
            f"'{spec.where}' has no `reward_model:`: PPO optimises a reward model's score; "
            "add a `reward` stage and set `reward_model: ${reward}`"
        )
    for key in ("reward_model", "value_model"):
        if key in spec.cfg:
            _reward_spec(spec, ctx, key)
    _check_tokenizers(spec, ctx)
    ds, column = _prompts(spec)
    check_chat_data(ds, (column,), spec, ctx)
    _check_batches(spec, args, len(ds))


def _check_batches(spec: StageSpec, args: Any, n: int) -> None:
    """The batch arithmetic TRL checks only once the models are loaded, and an empty epoch it never checks."""
    from tunelab.distributed import world

    size = world()[1]
    local = args.per_device_train_batch_size * args.gradient_accumulation_steps
    where = f"{spec.where}.training"
    if local % args.num_mini_batches:
        raise TunelabError(
            f"'{where}': per_device_train_batch_size x gradient_accumulation_steps = {local} is not a multiple "
            f"of num_mini_batches={args.num_mini_batches}"
        )
    batch = local * size
    if n < batch:
        on = f" x {size} processes" if size > 1 else ""
        raise TunelabError(
            f"'{spec.where}.data' has {n} prompts, fewer than one rollout batch of {batch} "
            f"(per_device_train_batch_size x gradient_accumulation_steps{on}): add prompts or lower the batch size"
        )


def _tokenized(ds, column: str, tokenizer):
    """Prompts as `input_ids` only, which is what PPOTrainer's collator pads."""

    def encode(row):
        prompt = row[column]
        if isinstance(prompt, list):  # chat messages
            return {"input_ids": tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)}
        return {"input_ids": tokenizer(prompt, add_special_tokens=False)["input_ids"]}

    return ds.map(encode, remove_columns=ds.column_names)


def _summary(history: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of the first and last tenth of the logged steps, for the run's metrics."""
    steps = [h for h in history if "objective/scores" in h]
    if not steps:
        return {}
    n = max(1, len(steps) // 10)
    out: dict[str, float] = {}
    for key, name in (("objective/scores", "score"), ("objective/kl", "kl"), ("loss/value_avg", "value_loss")):
        out[f"first_{name}"] = sum(h[key] for h in steps[:n]) / n
        out[f"last_{name}"] = sum(h[key] for h in steps[-n:]) / n
    out["objective/entropy"] = steps[-1]["objective/entropy"]
    return out


def run(spec: StageSpec, ctx: Context) -> StageResult:
    from tunelab.chat import conversational, setting, system_prompt
    from tunelab.data import fingerprint
    from tunelab.models import load_causal_lm, load_sequence_classifier, load_tokenizer, stage_model
    from tunelab.ppo_trainer import ResumablePPOTrainer
    from tunelab.stages.sft import _lora
    from tunelab.training import guarded_train

    args = _args(spec, ctx)
    peft_config = _lora(spec.cfg.get("lora"), f"{spec.where}.lora")
    _check_tokenizers(spec, ctx)
    mspec = stage_model(spec, ctx)
    rspec = _reward_spec(spec, ctx, "reward_model")
    vspec = _reward_spec(spec, ctx, "value_model") if "value_model" in spec.cfg else rspec
    ds, column = _prompts(spec)
    tokenizer = load_tokenizer(mspec["path"])
    tokenizer.padding_side = "left"  # responses are appended after the prompts
    ds = conversational(ds, tokenizer, setting(spec.cfg, spec.where), system_prompt(spec.cfg, spec.where), column)
    policy = load_causal_lm(mspec)
    ref_model = None if peft_config is not None else load_causal_lm(mspec)
    reward_model = load_sequence_classifier(rspec, num_labels=1)
    value_model = load_sequence_classifier(vspec, num_labels=1)
    train_ds = _tokenized(ds, column, tokenizer)
    trainer = ResumablePPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=policy,
        ref_model=ref_model,
        reward_model=reward_model,
        value_model=value_model,
        train_dataset=train_ds,
        eval_dataset=train_ds.select(range(min(len(train_ds), args.per_device_eval_batch_size))),
        peft_config=peft_config,
    )
    metrics = guarded_train(trainer, spec, ctx.resume, _kl_limit(spec), kl_keys=("objective/kl",))
    metrics.update(_summary(trainer.state.log_history))
    trainer.save_model(str(spec.out_dir))
    if trainer.args.should_save:
        tokenizer.padding_side = "right"
        tokenizer.save_pretrained(str(spec.out_dir))
    return StageResult(metrics=metrics, model=spec.out_dir, fingerprints={"data": fingerprint(ds)})


def plan(spec: StageSpec, ctx: Context):
    """Memory plan of PPO: the policy's training, plus the value model trained in full (weights,
    gradients, optimizer states, all saved in every checkpoint), the frozen reward model and, without
    LoRA, the frozen reference. Approximate: rollouts are short, so activations are the policy's."""
    from tunelab.distributed import world
    from tunelab.models import model_config
    from tunelab.plan import _optimizer_bytes, _structure, policy_plan

    args = _args(spec, ctx)
    args.max_length = args.response_length + 128
    plan = policy_plan(spec, ctx, args)
    if plan is None:
        return None
    if args.total_episodes:  # PPO's updates, for the checkpoints the disk check counts
        batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * world()[1]
        plan.steps = -(-args.total_episodes // batch)
    reward_config = model_config(spec.cfg["reward_model"], ctx, f"{spec.where}.reward_model")
    value_config = (
        model_config(spec.cfg["value_model"], ctx, f"{spec.where}.value_model")
        if "value_model" in spec.cfg
        else reward_config
    )
    if reward_config is None or value_config is None:
        return plan  # a reward stage not planned yet: the policy's part
    value = _structure(value_config)[1]
    plan.parts["value_model"] = value * 4.0
    plan.parts["gradients"] = plan.parts.get("gradients", 0.0) + value * 4.0
    plan.parts["optimizer"] = plan.parts.get("optimizer", 0.0) + _optimizer_bytes(args.optim, value, 4, [])
    plan.parts["reward_model"] = _structure(reward_config)[1] * 4.0
    if "lora" not in spec.cfg:
        plan.parts["reference"] = plan.parts["weights"]
    plan.notes.append("value model trained in full in fp32; reward model (and reference) frozen")
    return plan
