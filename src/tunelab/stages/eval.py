"""Evaluate one or more models by greedy (or configured) generation on a dataset split.

`models` maps labels to models (`before: ${pretrain}`, `after: ${sft}`), so a
pipeline shows the effect of a stage side by side; `model` is the one-model
form. `generation` is `transformers.GenerationConfig`. Each model's answers
go to `predictions-LABEL.jsonl` with a per-example score.

Metrics are `evaluate` modules (tunelab ships them, so they work offline; see
`tunelab.metrics`), computed on each answer's first non-empty line against the
reference: `exact_match` (with its normalisation options), `bleu`, `chrf`,
`rouge`. A metric is a name or `{name: {option: value}}`.

Diffusion pipelines (a `diffusion_train` stage, or a folder with model_index.json) are evaluated
by sampling (`sampling:`, the settings of `diffusion_sample`) and scoring the images against the
held-out real images of `data` with `frechet_distance` (see `tunelab.diffusion.quality`): Fréchet
distance in the feature space of a small classifier trained on `classifier_data` (default: the
same dataset's train split), its confidence, and the spread of predicted classes.

With a `choices` column (or `choices_column:`), eval scores multiple choice by log-likelihood, as
lm-evaluation-harness does for MMLU-style tasks (see `tunelab.evaluation.loglik`): each choice's
log-probability after the prompt (through the chat template where the model has one); `acc` and
`acc_norm` (normalised by the choice's length), the reference being the right choice's index
(`label` by default) or its text. `think_end_token:` scores generated answers on what follows the
model's reasoning (`</think>`).

With `reward_model:` (a reward stage's output), each prompt + output is also scored by that
reward model, as PPO scores it, and `reward_mean` is reported per model: the number RLHF
optimises, next to the exact match it is meant to improve.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tunelab.core.errors import TunelabError, unknown_key
from tunelab.core.runs import write_atomic
from tunelab.data.datasets import fingerprint, load_split, require_columns
from tunelab.evaluation import image_eval
from tunelab.evaluation.answers import answer, matches
from tunelab.evaluation.image_eval import IMAGE_METRICS
from tunelab.evaluation.loglik import evaluate, gold
from tunelab.metrics import SHIPPED, check_name
from tunelab.metrics import load as load_metric
from tunelab.models.chat import check_length, context_length, generation_config
from tunelab.models.chat_templates import setting, system_prompt
from tunelab.models.loading import load_causal_lm
from tunelab.models.plan import plan_generation
from tunelab.models.prompting import Prompting, generate, strip_reasoning
from tunelab.models.quant import check_cpu_shapes, quant_config
from tunelab.models.reward_functions import reward_model_spec
from tunelab.models.spec import labelled_models, model_config, model_spec, resolve_spec
from tunelab.models.tokenizers import check_tokenizer, load_tokenizer
from tunelab.stages import Context, Metrics, Stage, StageResult, StageSpec
from tunelab.vision.prompting import check as vision_check
from tunelab.vision.prompting import run as vision_run
from tunelab.vision.prompting import vision_mode

SECTIONS = {
    "model": "model to evaluate: hub id, folder, adapter folder, or ${stage}",
    "models": "several models to compare, as {label: model}",
    "data": "evaluation data: datasets.load_dataset arguments (default split: test)",
    "prompt_column": "column holding the prompt (default: prompt)",
    "reference_column": "column holding the reference answer (default: completion; with choices: label)",
    "choices_column": "column of answer choices: score each by log-likelihood (acc, acc_norm); default: choices",
    "think_end_token": "end-of-reasoning marker (e.g. </think>): answers are taken from what follows it",
    "generation": "transformers.GenerationConfig fields (max_new_tokens, do_sample, num_beams, ...)",
    "batch_size": "prompts generated together (left-padded, sorted by length); default 32",
    "metrics": "evaluate metrics on the answers: exact_match, bleu, chrf, rouge (name or {name: options})",
    "quantization": "transformers.BitsAndBytesConfig fields: evaluate the model loaded in 4 or 8 bits",
    "fewshot": "k-shot prompting: {k: 3, data: {path, split} (default: data's path, split train), separator}",
    "prompt_template": 'format string around each prompt, e.g. "{prompt} Let\'s think step by step."',
    "answer_pattern": "regex whose first group is the answer in the output (chain of thought); default: first line",
    "reward_model": "a reward model (${reward} or folder) that scores prompt + output: reward_mean per model",
    "chat_template": "prompts through each model's chat template: true (default, if it has one), false, or a template",
    "system": "system prompt for chat-templated prompts (few-shot examples become earlier turns)",
    "sampling": "diffusion pipelines: diffusion_sample settings (scheduler, num_inference_steps, num_images, seed)",
    "classifier_data": "diffusion: labelled images the feature classifier trains on (default: data's train split)",
    "image_column": "diffusion: column holding the images (default: image)",
    "label_column": "diffusion: column holding integer class labels in classifier_data (default: label)",
}
IMAGE_KEYS = ("sampling", "classifier_data", "image_column", "label_column")
TEXT_KEYS = (
    "prompt_column",
    "choices_column",
    "think_end_token",
    "reference_column",
    "generation",
    "quantization",
    "fewshot",
    "prompt_template",
    "answer_pattern",
    "reward_model",
    "batch_size",
    "chat_template",
    "system",
)
FEWSHOT_KEYS = ("k", "data", "separator")
GENERATION_METRICS = ("exact_match", "bleu", "chrf", "rouge")  # shipped metrics that score text against text
MULTI_REFERENCE = ("bleu", "chrf")
GENERATION_DEFAULTS = {"max_new_tokens": 16, "do_sample": False}
GENERATION_ONLY = ("generation", "metrics", "answer_pattern", "reward_model", "think_end_token")


def _models(spec: StageSpec) -> dict[str, Any]:

    return labelled_models(spec.cfg, spec.where)


def _generation(spec: StageSpec):

    return generation_config(spec.cfg.get("generation") or {}, f"{spec.where}.generation", GENERATION_DEFAULTS)


def _metrics(spec: StageSpec) -> list[tuple[str, dict[str, Any]]]:
    """(name, options) of each metric; names checked against the shipped ones (or the Hub when online)."""

    where = f"{spec.where}.metrics"
    entries = spec.cfg.get("metrics", ["exact_match"])
    entries = [entries] if isinstance(entries, (str, dict)) else entries
    if not isinstance(entries, list) or not entries:
        raise TunelabError(f"'{where}' must list metrics, e.g. [exact_match, bleu]")
    out = []
    for entry in entries:
        if isinstance(entry, dict) and len(entry) == 1:
            name, options = next(iter(entry.items()))
        else:
            name, options = entry, {}
        check_name(name, where)
        if name in SHIPPED and name not in GENERATION_METRICS + IMAGE_METRICS:
            raise TunelabError(
                f"'{where}': '{name}' does not score generated text against a reference; "
                f"generation metrics: {', '.join(GENERATION_METRICS)}"
            )
        if not isinstance(options, dict):
            raise TunelabError(f"'{where}.{name}' options must be a mapping, got {options!r}")
        out.append((name, options))
    return out


def exact_match_options(scorers: list[tuple[str, dict[str, Any], Any]]) -> dict[str, Any]:
    """The normalisation options of `exact_match` in `metrics:` (none when it is not listed)."""
    return next((dict(options) for name, options, _ in scorers if name == "exact_match"), {})


def _metric_names(spec: StageSpec) -> list[str] | None:
    """The names in `metrics:` (None when absent: each path has its default)."""
    return [name for name, _ in _metrics(spec)] if "metrics" in spec.cfg else None


def _options(spec: StageSpec) -> tuple[str, str, int]:
    cfg = spec.cfg
    prompt = cfg.get("prompt_column", "prompt")
    reference = cfg.get("reference_column", "completion")
    batch = cfg.get("batch_size", 32)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise TunelabError(f"'{spec.where}.batch_size' must be a positive integer, got {batch!r}")
    return prompt, reference, batch


def _data(spec: StageSpec, prompt: str, reference: str):
    """(dataset, reference column, choices column or None: multiple choice when there is one)."""

    if "data" not in spec.cfg:
        raise TunelabError(f"'{spec.where}' has no `data:`: name the dataset (and split) to evaluate on")
    ds = load_split(spec.cfg["data"], f"{spec.where}.data", "test")
    require_columns(ds, [prompt], f"{spec.where}.data", "prompts to answer; set prompt_column")
    choices = spec.cfg.get("choices_column", "choices" if "choices" in ds.column_names else None)
    if choices is not None:
        require_columns(ds, [choices], f"{spec.where}.data", "answer choices; set choices_column")
        for key in GENERATION_ONLY:
            if key in spec.cfg:
                raise TunelabError(
                    f"'{spec.where}.{key}' applies to generated answers; this eval scores choices by "
                    f"log-likelihood (its data has a '{choices}' column): remove `{key}`"
                )
        if "reference_column" not in spec.cfg:
            reference = "label" if "label" in ds.column_names else reference
    require_columns(ds, [reference], f"{spec.where}.data", "reference answers; set reference_column")
    if choices is not None:
        from tunelab.evaluation.loglik import check_choices

        check_choices(ds, choices, reference, f"{spec.where}.data")
    return ds, reference, choices


def _image_mode(spec: StageSpec, ctx: Context) -> bool:
    """True for an eval of diffusion pipelines; one line for a mix, or for keys of the other kind."""
    models = _models(spec)
    flags = {label: image_eval.is_diffusion(v, ctx) for label, v in models.items()}
    if len(set(flags.values())) > 1:
        raise TunelabError(f"'{spec.where}' mixes diffusion pipelines and language models; use one eval stage each")
    images = next(iter(flags.values()))
    for key in TEXT_KEYS if images else IMAGE_KEYS:
        if key in spec.cfg:
            kind = "language models" if images else "diffusion pipelines"
            raise TunelabError(f"'{spec.where}.{key}' applies to {kind}; these models are not")
    return images


def _vision(spec: StageSpec, ctx: Context) -> bool:

    return vision_mode(spec, ctx, _models(spec))


def _vision_check(spec: StageSpec, ctx: Context) -> None:

    prompt, reference, _ = _options(spec)
    _metrics(spec)
    _generation(spec)
    prompting, _ = _prompting(spec, ctx, prompt, reference)
    vision_check(spec, ctx, _models(spec), prompt, reference, prompting.template, prompting.system)


def _vision_run(spec: StageSpec, ctx: Context) -> StageResult:

    prompt, reference, batch_size = _options(spec)
    scorers = [(name, options, load_metric(name, f"{spec.where}.metrics")) for name, options in _metrics(spec)]
    prompting, pattern = _prompting(spec, ctx, prompt, reference)
    return vision_run(
        spec,
        ctx,
        _models(spec),
        prompt,
        reference,
        batch_size,
        scorers,
        _generation(spec),
        pattern,
        prompting.template,
        prompting.system,
        MULTI_REFERENCE,
    )


def _check_text(spec: StageSpec, ctx: Context) -> None:

    prompt, reference, _ = _options(spec)
    quant = quant_config(spec.cfg.get("quantization"), f"{spec.where}.quantization")
    ds, reference, choices = _data(spec, prompt, reference)
    if choices is None:
        _metrics(spec)
        _generation(spec)
        _think_token(spec)
    prompting, _ = _prompting(spec, ctx, prompt, reference, choices)
    first = [str(p) for p in ds.select(range(min(2, len(ds))))[prompt]]
    for label, value in _models(spec).items():
        where = f"{spec.where}.models.{label}" if "models" in spec.cfg else f"{spec.where}.model"
        mspec = model_spec(value, where)
        tokenizer = None
        if not ctx.is_pending(mspec["path"]):
            resolved = resolve_spec({**mspec, "path": ctx.resolve_ref(mspec["path"])}, where, materialize=False)
            tokenizer_path = resolved.get("gguf_file", resolved["path"])
            check_tokenizer(tokenizer_path, where)
            tokenizer = load_tokenizer(tokenizer_path)
            prompting.build(tokenizer, first, where)  # the template renders the first rows
        config = model_config(value, ctx, where)
        if choices is None:
            check_length(_generation(spec), config, f"{spec.where}.generation")
        elif tokenizer is not None:
            _check_choice_lengths(ds, prompt, choices, tokenizer, context_length(config), f"{spec.where}.data")
        if config is not None and quant is not None:
            check_cpu_shapes(config, spec.cfg["quantization"], f"{spec.where}.quantization")
    _reward_model(spec, ctx)


def _check_choice_lengths(ds: Any, prompt: str, choices: str, tokenizer: Any, limit: int | None, where: str) -> None:
    """Each prompt with its longest choice fits the model (a 400 KB choice is a forward pass over 100K tokens and
    logits of tens of GiB). A token holds at least one byte, so only rows longer in bytes than the limit are
    tokenized."""
    if limit is None:
        return
    for i, (text, options) in enumerate(zip(ds[prompt], ds[choices], strict=True)):
        longest = max((str(c) for c in options), key=len, default="")
        if len(str(text).encode()) + len(longest.encode()) <= limit:
            continue
        tokens = len(tokenizer(str(text) + longest, add_special_tokens=False)["input_ids"])
        if tokens > limit:
            raise TunelabError(
                f"'{where}' row {i}: the prompt with its longest choice is {tokens} tokens, more than the model reads "
                f"(max_position_embeddings {limit}): shorten it, or drop the row"
            )


def _reward_model(spec: StageSpec, ctx: Context) -> dict[str, Any] | None:
    """The `reward_model:` as from_pretrained arguments (None when absent or its stage is pending)."""
    if spec.cfg.get("reward_model") is None:
        return None

    return reward_model_spec(spec.cfg["reward_model"], ctx, f"{spec.where}.reward_model")


def _prompting(
    spec: StageSpec, ctx: Context, prompt_col: str, ref_col: str, choices_col: str | None = None
) -> tuple[Prompting, str | None]:
    """(prompt builder, answer pattern) from fewshot / prompt_template / answer_pattern / chat settings."""

    cfg = spec.cfg
    template = cfg.get("prompt_template", "{prompt}")
    if not isinstance(template, str) or "{prompt}" not in template:
        raise TunelabError(f"'{spec.where}.prompt_template' must be a string containing {{prompt}}, got {template!r}")
    pattern = cfg.get("answer_pattern")
    if pattern is not None:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise TunelabError(f"'{spec.where}.answer_pattern' is not a valid regex: {exc}") from None
    shots: list[tuple[str, str]] = []
    separator = "\n\n"
    fewshot = cfg.get("fewshot")
    if fewshot is not None:
        where = f"{spec.where}.fewshot"
        if not isinstance(fewshot, dict) or not isinstance(fewshot.get("k"), int) or fewshot["k"] < 1:
            raise TunelabError(f"'{where}' needs `k:` (a positive integer), e.g. {{k: 3}}")
        for key in fewshot:
            if key not in FEWSHOT_KEYS:
                raise unknown_key(where, key, FEWSHOT_KEYS, "keys of fewshot")
        base = spec.cfg["data"]
        source = fewshot.get("data", {"path": base if isinstance(base, str) else base["path"], "split": "train"})
        shots_ds = load_split(source, f"{where}.data", "train")
        require_columns(
            shots_ds,
            [prompt_col, ref_col, *([choices_col] if choices_col else [])],
            f"{where}.data",
            "examples to show",
        )
        k = fewshot["k"]
        if len(shots_ds) < k:
            raise TunelabError(f"'{where}': k={k} examples asked for, but '{where}.data' has only {len(shots_ds)}")
        picked = shots_ds.shuffle(seed=ctx.seed).select(range(k))  # deterministic: the recipe's seed
        separator = fewshot.get("separator", separator)
        if choices_col is None:
            shots = [(str(row[prompt_col]), str(row[ref_col])) for row in picked]
        else:  # multiple choice: an example's answer is its right choice
            from tunelab.evaluation.loglik import gold

            shots = [
                (str(row[prompt_col]), row[choices_col][gold(row[ref_col], row[choices_col], where)]) for row in picked
            ]
    chat = setting(cfg, spec.where)
    return Prompting(template, shots, separator, chat, system_prompt(cfg, spec.where)), pattern


def _run_text(spec: StageSpec, ctx: Context) -> StageResult:
    from transformers import set_seed

    prompt_col, ref_col, batch_size = _options(spec)
    quant = quant_config(spec.cfg.get("quantization"), f"{spec.where}.quantization")
    ds, ref_col, choices_col = _data(spec, prompt_col, ref_col)
    if choices_col is not None:
        return _run_choices(spec, ctx, ds, prompt_col, ref_col, choices_col, quant)
    scorers = [(name, options, load_metric(name, f"{spec.where}.metrics")) for name, options in _metrics(spec)]
    same = exact_match_options(scorers)  # each row's exact_match is scored as metrics.json's is
    config = _generation(spec)
    think = _think_token(spec)
    prompting, pattern = _prompting(spec, ctx, prompt_col, ref_col)
    raw = [str(p) for p in ds[prompt_col]]
    references = [str(r).strip() for r in ds[ref_col]]
    metrics: dict[str, Any] = {}
    files: dict[str, str] = {}
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    rspec = _reward_model(spec, ctx)
    if rspec is not None:
        from tunelab.models.chat_templates import reward_texts, setting
        from tunelab.models.reward_models import load_sequence_classifier

        reward_model, reward_tokenizer = load_sequence_classifier(rspec), load_tokenizer(rspec["path"])
        chat = setting(spec.cfg, spec.where)
    for label, value in _models(spec).items():
        mspec = model_spec(value, f"{spec.where}.models.{label}")
        mspec = resolve_spec({**mspec, "path": ctx.resolve_ref(mspec["path"])}, f"{spec.where}.models.{label}")
        set_seed(ctx.seed)
        tokenizer = load_tokenizer(mspec["path"])
        model = load_causal_lm(mspec, quantization=quant, merge_adapter=quant is None)
        model.eval()
        prompts, templated = prompting.build(tokenizer, raw, f"{spec.where}.models.{label}")
        how = "through its chat template" if templated else "as plain text"
        print(f"   {label}: prompts {how}; the first reads:\n{_indent(prompts[0])}", flush=True)
        texts = generate(model, tokenizer, prompts, config, batch_size, templated, think)
        answers = [answer(strip_reasoning(t, think), pattern) for t in texts]
        scores = [float(matches(a, r, **same)) for a, r in zip(answers, references, strict=True)]
        metrics[label] = {}
        for name, options, scorer in scorers:
            refs = [[r] for r in references] if name in MULTI_REFERENCE else references
            result = scorer.compute(predictions=answers, references=refs, **options)
            metrics[label].update({k: float(v) for k, v in result.items() if isinstance(v, (int, float))})
        metrics[label]["examples"] = len(scores)
        rows = [
            {"prompt": p, "output": t, "answer": a, "reference": r, "exact_match": s}
            for p, t, a, r, s in zip(prompts, texts, answers, references, scores, strict=True)
        ]
        if rspec is not None:
            from tunelab.models.reward_models import reward_scores

            rewards = reward_scores(reward_model, reward_tokenizer, reward_texts(reward_tokenizer, raw, texts, chat))
            metrics[label]["reward_mean"] = sum(rewards) / len(rewards)
            for row, value in zip(rows, rewards, strict=True):
                row["reward"] = value
        path = spec.out_dir / f"predictions-{label}.jsonl"
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
        files[f"predictions-{label}"] = str(path)
    return StageResult(metrics=metrics, files=files, fingerprints={"data": fingerprint(ds)})


def _think_token(spec: StageSpec) -> str | None:
    value = spec.cfg.get("think_end_token")
    if value is not None and (not isinstance(value, str) or not value.strip()):
        raise TunelabError(f"'{spec.where}.think_end_token' must be the text that ends the reasoning, e.g. </think>")
    return value


def _run_choices(spec: StageSpec, ctx: Context, ds, prompt_col: str, ref_col: str, choices_col: str, quant):
    """Multiple choice: each model's log-likelihood of every choice after each prompt (tunelab.evaluation.loglik)."""
    from transformers import set_seed

    _, _, batch_size = _options(spec)
    raw = [str(p) for p in ds[prompt_col]]
    choices = [list(c) for c in ds[choices_col]]
    golds = [gold(r, c, f"{spec.where}.data") for r, c in zip(ds[ref_col], choices, strict=True)]
    # Few-shot examples show the right choice as their answer.
    prompting, _ = _prompting(spec, ctx, prompt_col, ref_col, choices_col)
    metrics: dict[str, Any] = {}
    files: dict[str, str] = {}
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    for label, value in _models(spec).items():
        where = f"{spec.where}.models.{label}" if "models" in spec.cfg else f"{spec.where}.model"
        mspec = resolve_spec(
            {**model_spec(value, where), "path": ctx.resolve_ref(model_spec(value, where)["path"])}, where
        )
        set_seed(ctx.seed)
        tokenizer = load_tokenizer(mspec["path"])
        model = load_causal_lm(mspec, quantization=quant, merge_adapter=quant is None).eval()
        prompts, templated = prompting.build(tokenizer, raw, where)
        how = "through its chat template" if templated else "as plain text"
        print(f"   {label}: prompts {how}; the first reads:\n{_indent(prompts[0])}", flush=True)
        metrics[label], rows = evaluate(model, tokenizer, prompts, choices, golds, batch_size, templated)
        path = spec.out_dir / f"predictions-{label}.jsonl"
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
        files[f"predictions-{label}"] = str(path)
    return StageResult(metrics=metrics, files=files, fingerprints={"data": fingerprint(ds)})


def _indent(text: str, limit: int = 600) -> str:
    text = text if len(text) <= limit else text[:limit] + " ..."
    return "\n".join("     | " + line for line in text.splitlines() or [""])


PROMPT_TOKENS = 512  # planning assumption for prompt length when generation.max_length is not set


class Eval(Stage):
    """Evaluate one or more models by greedy (or configured) generation on a dataset split."""

    produces_model = False
    metrics = Metrics()  # per-model metrics: the CLI and report.md show them as a table of their own
    sections = SECTIONS

    def check(self, spec: StageSpec, ctx: Context) -> None:
        if _image_mode(spec, ctx):
            return image_eval.check(spec, ctx, _models(spec), _metric_names(spec))
        if _vision(spec, ctx):  # image+text models: tunelab.vision.prompting
            return _vision_check(spec, ctx)
        _check_text(spec, ctx)

    def run(self, spec: StageSpec, ctx: Context) -> StageResult:
        if _image_mode(spec, ctx):
            return image_eval.run(spec, ctx, _models(spec), _metric_names(spec))
        if _vision(spec, ctx):
            return _vision_run(spec, ctx)
        return _run_text(spec, ctx)

    def plan(self, spec: StageSpec, ctx: Context):
        """Memory plan of generation with the largest of the evaluated models."""

        if _image_mode(spec, ctx) or _vision(spec, ctx):
            return None

        _, _, batch = _options(spec)
        gen = _generation(spec)
        tokens = (
            gen.max_length
            if "max_length" in (spec.cfg.get("generation") or {})
            else PROMPT_TOKENS + (gen.max_new_tokens or 0)
        )
        plans = []
        for label, value in _models(spec).items():
            config = model_config(value, ctx, f"{spec.where}.models.{label}")
            if config is not None:
                dtype = model_spec(value, f"{spec.where}.models.{label}").get("dtype")
                plans.append(plan_generation(spec.name, config, batch, tokens, spec.cfg.get("quantization"), dtype))
        return max(plans, key=lambda p: p.total) if plans else None
