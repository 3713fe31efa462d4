"""Rewards for the RL stages (grpo, rloo, ppo) and for scoring evals: reward functions named as
`module:function` (imported and called on the first rows at validate), and reward models (a sequence
classifier with one output: a `reward` stage's folder, `${reward}`, or a hub id), checked to be one
before anything loads."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

from tunelab.core.errors import TunelabError, closest
from tunelab.core.hub import local_path
from tunelab.core.refs import ref_name
from tunelab.models.chat_templates import messages, render
from tunelab.models.reward_models import load_sequence_classifier, reward_scores
from tunelab.models.spec import is_adapter, model_spec, resolve_spec
from tunelab.models.tokenizers import load_tokenizer

PROBE_ROWS = 2


def reward_entries(spec: Any) -> list[str]:
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
    except SystemExit as exc:
        raise exit_error(entry, where, exc) from None
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
    if all_nan(out):
        raise nan_error(entry, where, f"on the first {len(prompts)} rows of data")


def all_nan(values: Any) -> bool:
    """Every score NaN: no signal at all (None is a reward's "does not apply"; NaN is a broken score)."""
    import math

    values = list(values) if isinstance(values, (list, tuple)) else []
    return bool(values) and all(isinstance(v, float) and math.isnan(v) for v in values)


def nan_error(entry: str, where: str, when: str) -> TunelabError:
    return TunelabError(
        f"'{where}': reward '{entry}' scored every completion NaN {when}: the policy would train on no signal "
        "(or NaN losses); fix the reward (return None for a completion it does not apply to)"
    )


def exit_error(entry: str, where: str, exc: SystemExit) -> TunelabError:
    """A reward function that calls sys.exit would end the whole run with no word: name it instead."""
    call = f"sys.exit({exc.code!r})" if exc.code is not None else "sys.exit()"
    return TunelabError(
        f"'{where}': reward function '{entry}' called {call}, which would end the run: "
        "return a score (or None) for each completion, or raise an exception to stop with its message"
    )


def guarded(func: Any, entry: str, where: str) -> Any:
    """`func` as TRL calls it, with a SystemExit turned into exit_error's one line and a batch scored all NaN
    into nan_error's (named like `func`, so TRL logs it under the same name). Coroutine functions are left
    as they are (TRL awaits them)."""
    import functools
    import inspect

    if inspect.iscoroutinefunction(func):
        return func

    @functools.wraps(func)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            out = func(*args, **kwargs)
        except SystemExit as exc:
            raise exit_error(entry, where, exc) from None
        if all_nan(out):
            step = getattr(kwargs.get("trainer_state"), "global_step", None)
            raise nan_error(entry, where, f"at step {step}" if step is not None else "during training")
        return out

    return call


def check_rewards(spec: Any, ctx: Any, ds: Any) -> list[tuple[str, Any]]:
    """(entry, callable or from_pretrained spec) for each reward; None specs while a stage is pending."""
    out = []
    for i, entry in enumerate(reward_entries(spec)):
        where = f"{spec.where}.rewards[{i}]"
        if is_callable_name(entry):
            func = import_reward(entry, where)
            probe(func, entry, ds, where)
            out.append((entry, guarded(func, entry, where)))
            continue
        out.append((entry, reward_model_spec(entry, ctx, where)))
    return out


def check_reward_templates(rewards: list[tuple[str, Any]], ds: Any, chats: bool, where: str) -> None:
    """With chat prompts, a reward model scores prompt + completion through its own chat template
    (`reward_model_function`): it must have one, and it must render the first row, before the policy loads."""
    if not chats or len(ds) == 0:
        return
    row = ds[0]
    prompt = row["prompt"]
    turns = (messages(prompt) if isinstance(prompt, str) else list(prompt)) + [
        {"role": "assistant", "content": str(row.get("reference") or "")}
    ]
    for i, (entry, value) in enumerate(rewards):
        if callable(value) or value is None:
            continue  # a function, or a reward stage that has not run yet
        tokenizer = load_tokenizer(value["path"])
        if not tokenizer.chat_template:
            raise TunelabError(
                f"'{where}.rewards[{i}]' is '{entry}', a reward model whose tokenizer has no chat template, but the "
                "prompts reach it as chat turns: train the reward model with one (its stage's `chat_template:`), "
                "or set `chat_template: false` on this stage for plain-text prompts"
            )
        render(tokenizer, turns, f"{where}.rewards[{i}]", 0, add_generation_prompt=False)


def reward_model_function(model, tokenizer, name: str):
    """A reward model as a reward function: scores prompt + completion + EOS, like the reward stage trained it."""

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


def reward_model_spec(value: Any, ctx: Any, where: str) -> dict[str, Any] | None:
    """A reward model named by a recipe (folder, hub id, ${stage}, or mapping), checked to be one."""
    mspec = model_spec(value, where)
    if ctx.checking and ctx.is_pending(mspec["path"]):
        ref = ref_name(mspec["path"])
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


def reward_functions(spec: Any, ctx: Any, ds: Any) -> list[Any]:
    """The stage's `rewards:` as TRL's reward functions: callables as they are, reward models loaded (on this
    process's device) and wrapped by `reward_model_function`. Logged as rewards/NAME/mean: a reward model's
    NAME is the stage it came from, or its folder's name."""
    from accelerate import PartialState

    funcs = []
    for entry, value in check_rewards(spec, ctx, ds):
        if callable(value):
            funcs.append(value)
            continue
        model = load_sequence_classifier(value, num_labels=1).to(PartialState().device)
        name = ref_name(entry) or Path(value["path"]).name
        where = f"{spec.where}.rewards[{reward_entries(spec).index(entry)}]"
        funcs.append(guarded(reward_model_function(model, load_tokenizer(value["path"]), name), entry, where))
    return funcs
