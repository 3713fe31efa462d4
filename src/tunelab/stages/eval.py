"""Evaluate one or more models by greedy (or configured) generation on a dataset split.

`models` maps labels to models (`before: ${pretrain}`, `after: ${sft}`), so a
pipeline shows the effect of a stage side by side; `model` is the one-model
form. `generation` is `transformers.GenerationConfig`. Each model's answers
go to `predictions-LABEL.jsonl` with a per-example score.

Metrics are `evaluate` modules (tunelab ships them, so they work offline; see
`tunelab.metrics`), computed on each answer's first non-empty line against the
reference: `exact_match` (with its normalisation options), `bleu`, `chrf`,
`rouge`. A metric is a name or `{name: {option: value}}`.

With `reward_model:` (a reward stage's output), each prompt + output is also scored by that
reward model, as PPO scores it, and `reward_mean` is reported per model: the number RLHF
optimises, next to the exact match it is meant to improve.
"""

from __future__ import annotations

import json
import re
from typing import Any

from tunelab.errors import TunelabError, unknown_key
from tunelab.stages import Context, StageResult, StageSpec

PRODUCES_MODEL = False
SECTIONS = {
    "model": "model to evaluate: hub id, folder, adapter folder, or ${stage}",
    "models": "several models to compare, as {label: model}",
    "data": "evaluation data: datasets.load_dataset arguments (default split: test)",
    "prompt_column": "column holding the prompt (default: prompt)",
    "reference_column": "column holding the reference answer (default: completion)",
    "generation": "transformers.GenerationConfig fields (max_new_tokens, do_sample, num_beams, ...)",
    "batch_size": "prompts generated together (left-padded, sorted by length); default 32",
    "metrics": "evaluate metrics on the answers: exact_match, bleu, chrf, rouge (name or {name: options})",
    "quantization": "transformers.BitsAndBytesConfig fields: evaluate the model loaded in 4 or 8 bits",
    "fewshot": "k-shot prompting: {k: 3, data: {path, split} (default: data's path, split train), separator}",
    "prompt_template": 'format string around each prompt, e.g. "{prompt} Let\'s think step by step."',
    "answer_pattern": "regex whose first group is the answer in the output (chain of thought); default: first line",
    "reward_model": "a reward model (${reward} or folder) that scores prompt + output: reward_mean per model",
}
FEWSHOT_KEYS = ("k", "data", "separator")
GENERATION_METRICS = ("exact_match", "bleu", "chrf", "rouge")  # shipped metrics that score text against text
MULTI_REFERENCE = ("bleu", "chrf")
GENERATION_DEFAULTS = {"max_new_tokens": 16, "do_sample": False}


def _models(spec: StageSpec) -> dict[str, Any]:
    cfg = spec.cfg
    if ("model" in cfg) == ("models" in cfg):
        raise TunelabError(f"'{spec.where}' needs exactly one of `model:` or `models: {{label: model}}`")
    if "model" in cfg:
        return {"model": cfg["model"]}
    if not isinstance(cfg["models"], dict) or not cfg["models"]:
        raise TunelabError(f"'{spec.where}.models' must map labels to models, e.g. {{before: ${{pretrain}}}}")
    return dict(cfg["models"])


def _generation(spec: StageSpec):
    from transformers import GenerationConfig

    where = f"{spec.where}.generation"
    values = {**GENERATION_DEFAULTS, **(spec.cfg.get("generation") or {})}
    fields = GenerationConfig().to_dict()
    for key in values:
        if key not in fields or key.startswith("_"):
            raise unknown_key(
                where, key, [f for f in fields if not f.startswith("_")], "not a field of transformers.GenerationConfig"
            )
    try:
        config = GenerationConfig(**values)
        config.validate(strict=True)
    except (ValueError, TypeError) as exc:
        raise TunelabError(f"'{where}' is rejected by GenerationConfig: {' '.join(str(exc).split())[:300]}") from None
    return config


def _metrics(spec: StageSpec) -> list[tuple[str, dict[str, Any]]]:
    """(name, options) of each metric; names checked against the shipped ones (or the Hub when online)."""
    from tunelab.metrics import SHIPPED, check_name

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
        if name in SHIPPED and name not in GENERATION_METRICS:
            raise TunelabError(
                f"'{where}': '{name}' does not score generated text against a reference; "
                f"generation metrics: {', '.join(GENERATION_METRICS)}"
            )
        if not isinstance(options, dict):
            raise TunelabError(f"'{where}.{name}' options must be a mapping, got {options!r}")
        out.append((name, options))
    return out


def _options(spec: StageSpec) -> tuple[str, str, int]:
    cfg = spec.cfg
    prompt = cfg.get("prompt_column", "prompt")
    reference = cfg.get("reference_column", "completion")
    batch = cfg.get("batch_size", 32)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise TunelabError(f"'{spec.where}.batch_size' must be a positive integer, got {batch!r}")
    return prompt, reference, batch


def _data(spec: StageSpec, prompt: str, reference: str):
    from tunelab.data import load_split, require_columns

    if "data" not in spec.cfg:
        raise TunelabError(f"'{spec.where}' has no `data:`: name the dataset (and split) to evaluate on")
    ds = load_split(spec.cfg["data"], f"{spec.where}.data", "test")
    require_columns(ds, [prompt], f"{spec.where}.data", "prompts to answer; set prompt_column")
    require_columns(ds, [reference], f"{spec.where}.data", "reference answers; set reference_column")
    return ds


def check(spec: StageSpec, ctx: Context) -> None:
    from tunelab.hub import resolve_model
    from tunelab.models import check_tokenizer, model_config, model_spec
    from tunelab.quant import check_cpu_shapes, quant_config

    prompt, reference, _ = _options(spec)
    _metrics(spec)
    _generation(spec)
    quant = quant_config(spec.cfg.get("quantization"), f"{spec.where}.quantization")
    for label, value in _models(spec).items():
        where = f"{spec.where}.models.{label}" if "models" in spec.cfg else f"{spec.where}.model"
        mspec = model_spec(value, where)
        if not ctx.is_pending(mspec["path"]):
            check_tokenizer(resolve_model(ctx.resolve_ref(mspec["path"]), where), where)
        config = model_config(value, ctx, where) if quant is not None else None
        if config is not None:
            check_cpu_shapes(config, spec.cfg["quantization"], f"{spec.where}.quantization")
    _data(spec, prompt, reference)
    _prompting(spec, ctx, prompt, reference)
    _reward_model(spec, ctx)


def _reward_model(spec: StageSpec, ctx: Context) -> dict[str, Any] | None:
    """The `reward_model:` as from_pretrained arguments (None when absent or its stage is pending)."""
    if spec.cfg.get("reward_model") is None:
        return None
    from tunelab.stages.ppo import _reward_spec

    return _reward_spec(spec, ctx, "reward_model")


def answer(text: str, pattern: str | None = None) -> str:
    """The answer part of a generation: the first group of `pattern`, else its first non-empty line."""
    if pattern is not None:
        match = re.search(pattern, text)
        return (match.group(1) if match.groups() else match.group(0)).strip() if match else ""
    for line in text.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def _prompting(spec: StageSpec, ctx: Context, prompt_col: str, ref_col: str):
    """(prompt builder, answer pattern) from fewshot / prompt_template / answer_pattern; checked here."""
    from tunelab.data import load_split, require_columns

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
    prefix = ""
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
        shots = load_split(source, f"{where}.data", "train")
        require_columns(shots, [prompt_col, ref_col], f"{where}.data", "examples to show")
        k = fewshot["k"]
        if len(shots) < k:
            raise TunelabError(f"'{where}': k={k} examples asked for, but '{where}.data' has only {len(shots)}")
        picked = shots.shuffle(seed=ctx.seed).select(range(k))  # deterministic: the recipe's seed
        separator = fewshot.get("separator", "\n\n")
        prefix = "".join(template.format(prompt=row[prompt_col]) + str(row[ref_col]) + separator for row in picked)
    return (lambda p: prefix + template.format(prompt=p)), pattern


def generate(model, tokenizer, prompts: list[str], config, batch_size: int) -> list[str]:
    """Batched generation: left padding, prompts sorted by length so batches waste little."""
    import torch

    tokenizer.padding_side = "left"
    order = sorted(range(len(prompts)), key=lambda i: len(tokenizer(prompts[i])["input_ids"]))
    outputs: list[str] = [""] * len(prompts)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = config.eos_token_id or tokenizer.eos_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        enc = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            out = model.generate(**enc, generation_config=config, tokenizer=tokenizer)
        texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        for i, text in zip(idx, texts, strict=True):
            outputs[i] = text
    return outputs


def run(spec: StageSpec, ctx: Context) -> StageResult:
    from transformers import set_seed

    from tunelab.data import fingerprint
    from tunelab.hub import resolve_model
    from tunelab.metrics import load as load_metric
    from tunelab.models import load_causal_lm, load_tokenizer, model_spec
    from tunelab.quant import quant_config
    from tunelab.runs import write_atomic

    prompt_col, ref_col, batch_size = _options(spec)
    scorers = [(name, options, load_metric(name, f"{spec.where}.metrics")) for name, options in _metrics(spec)]
    config = _generation(spec)
    quant = quant_config(spec.cfg.get("quantization"), f"{spec.where}.quantization")
    ds = _data(spec, prompt_col, ref_col)
    build_prompt, pattern = _prompting(spec, ctx, prompt_col, ref_col)
    prompts = [build_prompt(str(p)) for p in ds[prompt_col]]
    references = [str(r).strip() for r in ds[ref_col]]
    metrics: dict[str, Any] = {}
    files: dict[str, str] = {}
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    rspec = _reward_model(spec, ctx)
    if rspec is not None:
        from tunelab.models import load_sequence_classifier

        reward_model, reward_tokenizer = load_sequence_classifier(rspec), load_tokenizer(rspec["path"])
    for label, value in _models(spec).items():
        mspec = model_spec(value, f"{spec.where}.models.{label}")
        mspec["path"] = resolve_model(ctx.resolve_ref(mspec["path"]), f"{spec.where}.models.{label}")
        set_seed(ctx.seed)
        tokenizer = load_tokenizer(mspec["path"])
        model = load_causal_lm(mspec, quantization=quant, merge_adapter=quant is None)
        model.eval()
        texts = generate(model, tokenizer, prompts, config, batch_size)
        answers = [answer(t, pattern) for t in texts]
        scores = [float(a == r) for a, r in zip(answers, references, strict=True)]
        metrics[label] = {}
        for name, options, scorer in scorers:
            refs = [[r] for r in references] if name in MULTI_REFERENCE else references
            result = scorer.compute(predictions=answers, references=refs, **options)
            metrics[label].update({k: float(v) for k, v in result.items() if isinstance(v, (int, float))})
        metrics[label]["examples"] = len(scores)
        rows = [
            {"prompt": p, "output": t, "answer": answer(t), "reference": r, "exact_match": s}
            for p, t, r, s in zip(prompts, texts, references, scores, strict=True)
        ]
        if rspec is not None:
            from tunelab.models import reward_scores

            plain = [str(p) for p in ds[prompt_col]]
            rewards = reward_scores(reward_model, reward_tokenizer, [p + t for p, t in zip(plain, texts, strict=True)])
            metrics[label]["reward_mean"] = sum(rewards) / len(rewards)
            for row, value in zip(rows, rewards, strict=True):
                row["reward"] = value
        path = spec.out_dir / f"predictions-{label}.jsonl"
        write_atomic(path, "".join(json.dumps(row) + "\n" for row in rows))
        files[f"predictions-{label}"] = str(path)
    return StageResult(metrics=metrics, files=files, fingerprints={"data": fingerprint(ds)})


PROMPT_TOKENS = 512  # planning assumption for prompt length when generation.max_length is not set


def plan(spec: StageSpec, ctx: Context):
    """Memory plan of generation with the largest of the evaluated models."""
    from tunelab.models import model_config, model_spec
    from tunelab.plan import plan_generation

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
