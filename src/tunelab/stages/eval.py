"""Evaluate one or more models on held-out data: the `eval` stage and its modes.

`models` maps labels to models (`before: ${pretrain}`, `after: ${sft}`), so a pipeline shows the effect
of a stage side by side; `model` is the one-model form. The stage picks its mode from the models and
the data, so a recipe names only `stage: eval`:

- **diffusion pipelines** (a `diffusion_train` stage, or a folder with model_index.json) are sampled
  (`sampling:`, the settings of `diffusion_sample`) and the images scored against held-out real ones
  with `frechet_distance` (see `tunelab.diffusion.quality`);
- **image+text models** answer prompts holding the row's images (see `tunelab.vision.prompting`);
- **multiple choice**, when the data has a `choices` column (or `choices_column:`): each choice's
  log-likelihood after the prompt, as lm-evaluation-harness scores MMLU-style tasks (`acc`,
  `acc_norm`; see `tunelab.evaluation.loglik`);
- **generated answers** otherwise: greedy (or configured, `generation:` is `transformers.GenerationConfig`)
  generation, scored by `evaluate` metrics shipped with tunelab (`exact_match` with its normalisation
  options, `bleu`, `chrf`, `rouge`) on each answer's first non-empty line, or what `answer_pattern`
  captures, or what follows `think_end_token`. With `reward_model:` each prompt + output is also
  scored by that reward model, as PPO scores it (`reward_mean`): the number RLHF optimises, next to
  the exact match it is meant to improve.

Each mode is a declaration over `ModelsStage` (the per-model loop, checks before any load, predictions
files, plans): the keys it takes, its settings, its data, how it loads and scores one model. A key the
picked mode does not take is refused in one line that says which modes take it.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from tunelab.core.errors import TunelabError, unknown_key
from tunelab.data.datasets import fingerprint, require_columns
from tunelab.data.sources import FORMAT_KEYS, load_data
from tunelab.diffusion.pipelines import load_pipeline, write_images
from tunelab.evaluation import image_eval
from tunelab.evaluation.answers import answer, matches
from tunelab.evaluation.endpoints import Endpoint, check_endpoint, endpoint_spec, request_fields
from tunelab.evaluation.endpoints import answers as answers_of
from tunelab.evaluation.loglik import check_choices, evaluate, gold
from tunelab.metrics import SHIPPED, check_name
from tunelab.metrics import load as load_metric
from tunelab.models.chat import check_length, context_length, generation_config
from tunelab.models.chat_templates import reward_texts, setting, system_prompt
from tunelab.models.loading import load_causal_lm
from tunelab.models.plan import plan_generation
from tunelab.models.prompting import Prompting, generate, strip_reasoning
from tunelab.models.quant import check_cpu_shapes, quant_config
from tunelab.models.reward_functions import reward_model_spec
from tunelab.models.reward_models import load_sequence_classifier, reward_scores
from tunelab.models.spec import model_config
from tunelab.models.tokenizers import check_tokenizer, load_tokenizer
from tunelab.stages import Context, Stage, StageResult, StageSpec
from tunelab.stages.scoring import MODEL_SECTIONS, Entry, ModelsStage, Scored, entries
from tunelab.vision import prompting as vision
from tunelab.vision.models import load_processor

log = logging.getLogger(__name__)

SECTIONS = {
    **MODEL_SECTIONS,
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
TEXT_METRICS = ("exact_match", "bleu", "chrf", "rouge")  # shipped metrics that score text against text
MULTI_REFERENCE = ("bleu", "chrf")
GENERATION_DEFAULTS = {"max_new_tokens": 16, "do_sample": False}
FEWSHOT_KEYS = ("k", "data", "separator")
PROMPT_TOKENS = 512  # planning assumption for prompt length when generation.max_length is not set


def keys(*names: str) -> dict[str, str]:
    """A mode's sections: the named keys of the stage, with their descriptions."""
    return {name: SECTIONS[name] for name in (*MODEL_SECTIONS, *names)}


# --- parsing shared by the text modes ----------------------------------------------------------------
@dataclass(frozen=True)
class TextSettings:
    """What every mode that prompts a language model reads from its sections."""

    prompt: str
    reference: str
    batch_size: int
    prompting: Prompting
    quantization: Any


def text_settings(spec: StageSpec, ctx: Context, reference: str, choices: str | None = None) -> TextSettings:
    cfg = spec.cfg
    prompt = cfg.get("prompt_column", "prompt")
    batch = cfg.get("batch_size", 32)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise TunelabError(f"'{spec.where}.batch_size' must be a positive integer, got {batch!r}")
    quant = quant_config(cfg.get("quantization"), f"{spec.where}.quantization")
    return TextSettings(prompt, reference, batch, prompting(spec, ctx, prompt, reference, choices), quant)


def prompting(spec: StageSpec, ctx: Context, prompt_col: str, ref_col: str, choices_col: str | None) -> Prompting:
    """The prompt builder from fewshot / prompt_template / chat settings (few-shot rows read here)."""
    cfg = spec.cfg
    template = cfg.get("prompt_template", "{prompt}")
    if not isinstance(template, str) or "{prompt}" not in template:
        raise TunelabError(f"'{spec.where}.prompt_template' must be a string containing {{prompt}}, got {template!r}")
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
        base = cfg["data"]
        same = {"path": base} if isinstance(base, str) else {k: base[k] for k in ("path", *FORMAT_KEYS) if k in base}
        source = fewshot.get("data", {**same, "split": "train"})  # the data's own format, columns and roles
        columns = [prompt_col, ref_col, *([choices_col] if choices_col else [])]
        shots_ds, _ = load_data(source, f"{where}.data", "train", "eval", seed=ctx.seed, own=tuple(columns))
        require_columns(shots_ds, columns, f"{where}.data", "examples to show")
        k = fewshot["k"]
        if len(shots_ds) < k:
            raise TunelabError(f"'{where}': k={k} examples asked for, but '{where}.data' has only {len(shots_ds)}")
        picked = shots_ds.shuffle(seed=ctx.seed).select(range(k))  # deterministic: the recipe's seed
        separator = fewshot.get("separator", separator)
        if choices_col is None:
            shots = [(str(row[prompt_col]), str(row[ref_col])) for row in picked]
        else:  # multiple choice: an example's answer is its right choice
            shots = [(str(r[prompt_col]), r[choices_col][gold(r[ref_col], r[choices_col], where)]) for r in picked]
    return Prompting(template, shots, separator, setting(cfg, spec.where), system_prompt(cfg, spec.where))


def answer_pattern(spec: StageSpec) -> str | None:
    pattern = spec.cfg.get("answer_pattern")
    if pattern is not None:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise TunelabError(f"'{spec.where}.answer_pattern' is not a valid regex: {exc}") from None
    return pattern


def metric_entries(
    spec: StageSpec, allowed: tuple[str, ...], default: list[str], what: str, kind: str
) -> list[tuple[str, dict]]:
    """(name, options) of each metric in `metrics:`; names checked against the shipped ones (or the Hub online)."""
    where = f"{spec.where}.metrics"
    listed = spec.cfg.get("metrics", default)
    listed = [listed] if isinstance(listed, (str, dict)) else listed
    if not isinstance(listed, list) or not listed:
        raise TunelabError(f"'{where}' must list metrics, e.g. [{', '.join(default)}]")
    out = []
    for entry in listed:
        name, options = next(iter(entry.items())) if isinstance(entry, dict) and len(entry) == 1 else (entry, {})
        check_name(name, where)
        if name in SHIPPED and name not in allowed:
            raise TunelabError(f"'{where}': '{name}' does not score {what}; {kind} metrics: {', '.join(allowed)}")
        if not isinstance(options, dict):
            raise TunelabError(f"'{where}.{name}' options must be a mapping, got {options!r}")
        out.append((name, options))
    return out


def text_metrics(spec: StageSpec) -> list[tuple[str, dict]]:
    return metric_entries(spec, TEXT_METRICS, ["exact_match"], "generated text against a reference", "generation")


def score_answers(
    answers: list[str], references: list[str], metrics: list[tuple[str, dict]], where: str
) -> tuple[dict[str, Any], list[float]]:
    """(the metrics' numbers, each row's exact match scored with the same options as the metric)."""
    same = next((dict(options) for name, options in metrics if name == "exact_match"), {})
    out: dict[str, Any] = {}
    for name, options in metrics:
        refs = [[r] for r in references] if name in MULTI_REFERENCE else references
        result = load_metric(name, f"{where}.metrics").compute(predictions=answers, references=refs, **options)
        out.update({k: float(v) for k, v in result.items() if isinstance(v, (int, float))})
    rows = [float(matches(a, r, **same)) for a, r in zip(answers, references, strict=True)]
    return {**out, "examples": len(rows)}, rows


def show_first(label: str, how: str, text: str, limit: int = 600) -> None:
    """The first prompt exactly as the model reads it: a template surprise shows before the scores."""
    text = text if len(text) <= limit else text[:limit] + " ..."
    shown = "\n".join("     | " + line for line in text.splitlines() or [""])
    log.info("   %s: %s; the first reads:\n%s", label, how, shown)


def check_text_model(spec: StageSpec, ctx: Context, s: TextSettings, first: list[str], entry: Entry) -> Any:
    """The tokenizer loads and renders the first prompts; the quantization fits the model's shapes.
    Returns (config, tokenizer); the tokenizer is None while its stage has not run."""
    tokenizer = None
    if not ctx.is_pending(entry.spec()["path"]):
        resolved = entry.resolved(ctx, materialize=False)
        path = resolved.get("gguf_file", resolved["path"])
        check_tokenizer(path, entry.where)
        tokenizer = load_tokenizer(path)
        s.prompting.build(tokenizer, first, entry.where)
    config = model_config(entry.value, ctx, entry.where)
    if config is not None and s.quantization is not None:
        check_cpu_shapes(config, spec.cfg["quantization"], f"{spec.where}.quantization")
    return config, tokenizer


class TextMode(ModelsStage):
    """What the modes that prompt a language model share: loading it, the data's fingerprint, the plan."""

    def load(self, spec: StageSpec, ctx: Context, s: TextSettings, entry: Entry) -> Any:
        mspec = entry.resolved(ctx)
        tokenizer = load_tokenizer(mspec["path"])
        model = load_causal_lm(mspec, quantization=s.quantization, merge_adapter=s.quantization is None)
        return model.eval(), tokenizer

    def fingerprints(self, spec: StageSpec, s: Any, data: Any) -> dict[str, str]:
        return {"data": fingerprint(data.ds)}

    def plan_tokens(self, spec: StageSpec, s: Any) -> int:
        """Tokens per sequence to plan for: a prompt (and its answer)."""
        return PROMPT_TOKENS

    def plan_model(self, spec: StageSpec, ctx: Context, s: TextSettings, entry: Entry) -> Any:
        config = model_config(entry.value, ctx, entry.where)
        if config is None:
            return None
        quant, dtype = spec.cfg.get("quantization"), entry.spec().get("dtype")
        return plan_generation(spec.name, config, s.batch_size, self.plan_tokens(spec, s), quant, dtype)


def eval_rows(spec: StageSpec, ctx: Context | None, own: tuple[str, ...]) -> Any:
    """`data:` as the text modes read it: a prompt and its reference answer per row (`load_data`, target
    "eval": chats and Alpaca rows become one question and its answer); data holding the columns the stage
    names (`own`) is read as it is."""
    if "data" not in spec.cfg:
        raise TunelabError(f"'{spec.where}' has no `data:`: name the dataset (and split) to evaluate on")
    seed = ctx.seed if ctx is not None else 0
    ds, report = load_data(spec.cfg["data"], f"{spec.where}.data", "test", "eval", seed=seed, own=own)
    if ctx is not None:
        ctx.data_reports[f"{spec.name}.data"] = report
    return ds


def load_rows(spec: StageSpec, s: TextSettings, what: str, ctx: Context | None = None, *extra: str) -> Any:
    ds = eval_rows(spec, ctx, (s.prompt, s.reference, *extra))
    require_columns(ds, [s.prompt], f"{spec.where}.data", "prompts to answer; set prompt_column")
    require_columns(ds, [s.reference], f"{spec.where}.data", f"{what}; set reference_column")
    return ds


# --- generated answers -------------------------------------------------------------------------------
@dataclass(frozen=True)
class GenerationSettings(TextSettings):
    generation: Any = None
    metrics: tuple = ()
    pattern: str | None = None
    think: str | None = None
    reward_model: dict[str, Any] | None = None


@dataclass
class Answers:
    """The rows every model answers, and the reward model that scores them all (loaded once, when running)."""

    ds: Any
    raw: list[str]
    references: list[str]
    reward: tuple[Any, Any] | None = None


class GenerationEval(TextMode):
    """Generated answers, scored against references by text metrics (and a reward model, when given)."""

    title = "generated answers"
    endpoints = True  # a served model answers through OpenAI's API: what an application gets is what is scored
    sections = keys(
        "data",
        "prompt_column",
        "reference_column",
        "think_end_token",
        "generation",
        "batch_size",
        "metrics",
        "quantization",
        "fewshot",
        "prompt_template",
        "answer_pattern",
        "reward_model",
        "chat_template",
        "system",
    )

    @classmethod
    def claims(cls, spec: StageSpec, ctx: Context) -> str | None:
        return "this eval scores generated answers"  # the fallback: the last mode asked

    def settings(self, spec: StageSpec, ctx: Context) -> GenerationSettings:
        base = text_settings(spec, ctx, spec.cfg.get("reference_column", "completion"))
        generation = generation_config(
            spec.cfg.get("generation") or {}, f"{spec.where}.generation", GENERATION_DEFAULTS
        )
        think = spec.cfg.get("think_end_token")
        if think is not None and (not isinstance(think, str) or not think.strip()):
            raise TunelabError(
                f"'{spec.where}.think_end_token' must be the text that ends the reasoning, e.g. </think>"
            )
        reward = None
        if spec.cfg.get("reward_model") is not None:
            reward = reward_model_spec(spec.cfg["reward_model"], ctx, f"{spec.where}.reward_model")
        return GenerationSettings(
            **vars(base),
            generation=generation,
            metrics=tuple(text_metrics(spec)),
            pattern=answer_pattern(spec),
            think=think,
            reward_model=reward,
        )

    def data(self, spec: StageSpec, ctx: Context, s: GenerationSettings, running: bool) -> Answers:
        ds = load_rows(spec, s, "reference answers", ctx)
        rows = Answers(ds, [str(p) for p in ds[s.prompt]], [str(r).strip() for r in ds[s.reference]])
        if running and s.reward_model is not None:
            rows.reward = load_sequence_classifier(s.reward_model), load_tokenizer(s.reward_model["path"])
        return rows

    def check_model(self, spec: StageSpec, ctx: Context, s: GenerationSettings, data: Answers, entry: Entry) -> None:
        if entry.endpoint:
            endpoint = self.endpoint(spec, ctx, s, entry)
            check_endpoint(endpoint, entry.where)
            return
        config, _ = check_text_model(spec, ctx, s, data.raw[:2], entry)
        check_length(s.generation, config, f"{spec.where}.generation")

    def endpoint(self, spec: StageSpec, ctx: Context, s: GenerationSettings, entry: Entry) -> Endpoint:
        """A served model, and what the stage asks of it: only settings the API can carry."""
        for key, value in (("quantization", s.quantization), ("chat_template", spec.cfg.get("chat_template"))):
            if value is not None and not isinstance(value, bool):
                raise TunelabError(
                    f"'{spec.where}.{key}' applies to models tunelab loads; '{entry.where}' is served (the server "
                    f"decides its own): remove `{key}`, or score the served ones in a stage of their own"
                )
        request_fields(s.generation, spec.cfg.get("generation") or {}, ctx.seed, f"{spec.where}.generation")
        return endpoint_spec(entry.value, entry.where)

    def load(self, spec: StageSpec, ctx: Context, s: GenerationSettings, entry: Entry) -> Any:
        return self.endpoint(spec, ctx, s, entry) if entry.endpoint else super().load(spec, ctx, s, entry)

    def plan_model(self, spec: StageSpec, ctx: Context, s: GenerationSettings, entry: Entry) -> Any:
        return None if entry.endpoint else super().plan_model(spec, ctx, s, entry)

    def generate(self, spec: StageSpec, ctx: Context, s: GenerationSettings, data: Answers, entry: Entry, model):
        """(prompts as the model reads them, its outputs)."""
        if isinstance(model, Endpoint):
            chat = s.prompting.chat is not False
            prompts = s.prompting.conversations(data.raw) if chat else s.prompting.plain(data.raw)
            how = "messages for its server's chat template" if chat else "plain prompts to /v1/completions"
            show_first(entry.label, how, json.dumps(prompts[0], indent=1) if chat else prompts[0])
            fields = request_fields(
                s.generation, spec.cfg.get("generation") or {}, ctx.seed, f"{spec.where}.generation"
            )
            texts = answers_of(model, prompts, chat, fields, s.batch_size)
            return [p[-1]["content"] if chat else p for p in prompts], texts
        model, tokenizer = model
        prompts, templated = s.prompting.build(tokenizer, data.raw, entry.where)
        how = "prompts through its chat template" if templated else "prompts as plain text"
        show_first(entry.label, how, prompts[0])
        return prompts, generate(model, tokenizer, prompts, s.generation, s.batch_size, templated, s.think)

    def score(self, spec: StageSpec, ctx: Context, s: GenerationSettings, data: Answers, entry: Entry, model) -> Scored:
        prompts, texts = self.generate(spec, ctx, s, data, entry, model)
        answers = [answer(strip_reasoning(t, s.think), s.pattern) for t in texts]
        metrics, exact = score_answers(answers, data.references, list(s.metrics), spec.where)
        rows = [
            {"prompt": p, "output": t, "answer": a, "reference": r, "exact_match": e}
            for p, t, a, r, e in zip(prompts, texts, answers, data.references, exact, strict=True)
        ]
        if data.reward is not None:
            reward_model, reward_tokenizer = data.reward
            chat = setting(spec.cfg, spec.where)
            rewards = reward_scores(
                reward_model, reward_tokenizer, reward_texts(reward_tokenizer, data.raw, texts, chat)
            )
            metrics["reward_mean"] = sum(rewards) / len(rewards)
            for row, value in zip(rows, rewards, strict=True):
                row["reward"] = value
        return Scored(metrics, rows)

    def plan_tokens(self, spec: StageSpec, s: GenerationSettings) -> int:
        given = spec.cfg.get("generation") or {}
        return s.generation.max_length if "max_length" in given else PROMPT_TOKENS + (s.generation.max_new_tokens or 0)


# --- multiple choice ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class ChoiceSettings(TextSettings):
    choices: str = "choices"


@dataclass
class Questions:
    ds: Any
    raw: list[str]
    choices: list[list[str]]
    golds: list[int]


class ChoiceEval(TextMode):
    """Multiple choice by log-likelihood: each choice's log-probability after the prompt (acc, acc_norm)."""

    title = "choices scored by log-likelihood"
    sections = keys(
        "data",
        "prompt_column",
        "reference_column",
        "choices_column",
        "batch_size",
        "quantization",
        "fewshot",
        "prompt_template",
        "chat_template",
        "system",
    )

    @classmethod
    def claims(cls, spec: StageSpec, ctx: Context) -> str | None:
        column = cls.column(spec)
        return (
            None if column is None else f"this eval scores choices by log-likelihood (its data has a '{column}' column)"
        )

    @staticmethod
    def column(spec: StageSpec) -> str | None:
        """The choices column: `choices_column:`, else `choices` when the data has one."""
        if "choices_column" in spec.cfg:
            return spec.cfg["choices_column"]
        if "data" not in spec.cfg:
            return None
        ds = eval_rows(spec, None, ("prompt", "choices"))
        return "choices" if "choices" in ds.column_names else None

    def settings(self, spec: StageSpec, ctx: Context) -> ChoiceSettings:
        column = self.column(spec)
        reference = spec.cfg.get("reference_column")
        if reference is None:
            ds = eval_rows(spec, None, (spec.cfg.get("prompt_column", "prompt"), column))
            reference = "label" if "label" in ds.column_names else "completion"
        return ChoiceSettings(**vars(text_settings(spec, ctx, reference, column)), choices=column)

    def data(self, spec: StageSpec, ctx: Context, s: ChoiceSettings, running: bool) -> Questions:
        ds = load_rows(spec, s, "reference answers", ctx, s.choices)
        require_columns(ds, [s.choices], f"{spec.where}.data", "answer choices; set choices_column")
        check_choices(ds, s.choices, s.reference, f"{spec.where}.data")
        choices = [list(c) for c in ds[s.choices]]
        golds = [gold(r, c, f"{spec.where}.data") for r, c in zip(ds[s.reference], choices, strict=True)]
        return Questions(ds, [str(p) for p in ds[s.prompt]], choices, golds)

    def check_model(self, spec: StageSpec, ctx: Context, s: ChoiceSettings, data: Questions, entry: Entry) -> None:
        config, tokenizer = check_text_model(spec, ctx, s, data.raw[:2], entry)
        if tokenizer is not None:
            check_choice_lengths(data, tokenizer, context_length(config), f"{spec.where}.data")

    def score(self, spec: StageSpec, ctx: Context, s: ChoiceSettings, data: Questions, entry: Entry, model) -> Scored:
        model, tokenizer = model
        prompts, templated = s.prompting.build(tokenizer, data.raw, entry.where)
        show_first(
            entry.label, "prompts through its chat template" if templated else "prompts as plain text", prompts[0]
        )
        metrics, rows = evaluate(model, tokenizer, prompts, data.choices, data.golds, s.batch_size, templated)
        return Scored(metrics, rows)


def check_choice_lengths(data: Questions, tokenizer: Any, limit: int | None, where: str) -> None:
    """Each prompt with its longest choice fits the model (a 400 KB choice is a forward pass over 100K tokens and
    logits of tens of GiB). A token holds at least one byte, so only rows longer in bytes than the limit are
    tokenized."""
    if limit is None:
        return
    for i, (text, options) in enumerate(zip(data.raw, data.choices, strict=True)):
        longest = max((str(c) for c in options), key=len, default="")
        if len(text.encode()) + len(longest.encode()) <= limit:
            continue
        tokens = len(tokenizer(text + longest, add_special_tokens=False)["input_ids"])
        if tokens > limit:
            raise TunelabError(
                f"'{where}' row {i}: the prompt with its longest choice is {tokens} tokens, more than the model reads "
                f"(max_position_embeddings {limit}): shorten it, or drop the row"
            )


# --- image+text models -------------------------------------------------------------------------------
@dataclass(frozen=True)
class VisionSettings:
    prompt: str
    reference: str
    batch_size: int
    template: str
    system: str | None
    generation: Any
    metrics: tuple
    pattern: str | None


@dataclass
class ImageRows:
    ds: Any
    prompts: list[str]
    references: list[str]
    images: list[list[Any]]


class VisionEval(ModelsStage):
    """Image+text models answering prompts that hold the row's images, scored as generated answers are."""

    title = "image+text models"
    sections = keys(
        "data",
        "prompt_column",
        "reference_column",
        "generation",
        "batch_size",
        "metrics",
        "prompt_template",
        "answer_pattern",
        "chat_template",
        "system",
    )

    @classmethod
    def claims(cls, spec: StageSpec, ctx: Context) -> str | None:
        flags = {e.label: vision.is_vlm(e.value, ctx, e.where) for e in entries(spec)}
        if not any(flags.values()):
            return None
        if not all(flags.values()):
            text = next(label for label, flag in flags.items() if not flag)
            raise TunelabError(
                f"'{spec.where}' mixes image+text models and a text-only one ('{text}'); use one eval stage each"
            )
        return "these models are image+text models"

    def settings(self, spec: StageSpec, ctx: Context) -> VisionSettings:
        if spec.cfg.get("chat_template", True) is not True:
            raise TunelabError(
                f"'{spec.where}.chat_template': image+text models are prompted through their processor's template"
            )
        text = text_settings(spec, ctx, spec.cfg.get("reference_column", "completion"))
        generation = generation_config(
            spec.cfg.get("generation") or {}, f"{spec.where}.generation", GENERATION_DEFAULTS
        )
        template = text.prompting.template
        return VisionSettings(
            text.prompt,
            text.reference,
            text.batch_size,
            template,
            text.prompting.system,
            generation,
            tuple(text_metrics(spec)),
            answer_pattern(spec),
        )

    def data(self, spec: StageSpec, ctx: Context, s: VisionSettings, running: bool) -> ImageRows:
        ds = vision.image_rows(spec.cfg.get("data"), spec.where, s.prompt, s.reference)
        prompts = [s.template.format(prompt=str(p)) for p in ds[s.prompt]]
        return ImageRows(ds, prompts, [str(r).strip() for r in ds[s.reference]], [list(r) for r in ds["images"]])

    def check_model(self, spec: StageSpec, ctx: Context, s: VisionSettings, data: ImageRows, entry: Entry) -> None:
        if ctx.is_pending(entry.spec()["path"]):
            return
        processor = load_processor(entry.resolved(ctx, materialize=False)["path"], entry.where)
        vision.check_rows(processor, data.prompts[:2], data.images[:2], s.system, entry.where, f"{spec.where}.data")

    def load(self, spec: StageSpec, ctx: Context, s: VisionSettings, entry: Entry) -> Any:
        return vision.load(
            {**(entry.value if isinstance(entry.value, dict) else {}), "path": ctx.resolve_ref(entry.path)}, entry.where
        )

    def score(self, spec: StageSpec, ctx: Context, s: VisionSettings, data: ImageRows, entry: Entry, model) -> Scored:
        model, processor = model
        pairs = enumerate(zip(data.prompts, data.images, strict=True))
        texts = [vision.render(processor, vision.turns(p, len(im), s.system), entry.where, i) for i, (p, im) in pairs]
        show_first(entry.label, "image+text prompts through its processor's template", texts[0])
        outputs = vision.generate(model, processor, texts, data.images, s.generation, s.batch_size)
        answers = [answer(t, s.pattern) for t in outputs]
        metrics, exact = score_answers(answers, data.references, list(s.metrics), spec.where)
        rows = [
            {
                "prompt": p,
                "images": [getattr(im, "filename", "") for im in ims],
                "output": t,
                "answer": a,
                "reference": r,
                "exact_match": e,
            }
            for p, ims, t, a, r, e in zip(
                data.prompts, data.images, outputs, answers, data.references, exact, strict=True
            )
        ]
        return Scored(metrics, rows)

    def finish(self, spec: StageSpec, ctx: Context, s: VisionSettings, data: ImageRows, scored: dict[str, Scored]):
        answers = {label: [row["answer"] for row in result.rows or []] for label, result in scored.items()}
        vision.write_samples(spec.out_dir, data.images, data.prompts, data.references, answers)
        return {}

    def fingerprints(self, spec: StageSpec, s: Any, data: ImageRows) -> dict[str, str]:
        return {"data": fingerprint(data.ds.remove_columns("images"))}


# --- diffusion pipelines -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ImageSettings:
    sampling: dict[str, Any]
    image_column: str
    label_column: str


class ImageEval(ModelsStage):
    """Diffusion pipelines, sampled and scored against held-out real images in a tunelab-trained feature space."""

    title = "diffusion pipelines"
    sections = keys("data", "metrics", "sampling", "classifier_data", "image_column", "label_column")

    @classmethod
    def claims(cls, spec: StageSpec, ctx: Context) -> str | None:
        flags = {e.label: image_eval.is_diffusion(e.value, ctx) for e in entries(spec)}
        if len(set(flags.values())) > 1:
            raise TunelabError(f"'{spec.where}' mixes diffusion pipelines and language models; use one eval stage each")
        return "these models are diffusion pipelines" if all(flags.values()) else None

    def settings(self, spec: StageSpec, ctx: Context) -> ImageSettings:
        metric_entries(spec, image_eval.IMAGE_METRICS, list(image_eval.IMAGE_METRICS), "generated images", "image")
        models = [(e.path, e.where) for e in entries(spec)]
        sampling = image_eval.sampling(spec.cfg.get("sampling"), f"{spec.where}.sampling", ctx, models)
        return ImageSettings(sampling, spec.cfg.get("image_column", "image"), spec.cfg.get("label_column", "label"))

    def data(self, spec: StageSpec, ctx: Context, s: ImageSettings, running: bool) -> Any:
        if not running:
            image_eval.check_sources(spec.cfg.get("data"), spec.cfg.get("classifier_data"), spec.where)
            return None
        return image_eval.Reference.read(spec.cfg, spec.where, s.sampling, s.image_column, s.label_column, ctx.seed)

    def load(self, spec: StageSpec, ctx: Context, s: ImageSettings, entry: Entry) -> Any:
        import torch

        pipe = load_pipeline(ctx.resolve_ref(entry.path), entry.where)
        return pipe.to("cuda") if torch.cuda.is_available() else pipe

    def score(self, spec: StageSpec, ctx: Context, s: ImageSettings, data: Any, entry: Entry, model) -> Scored:
        images, metrics = data.score(model, spec.out_dir / "classifier", {**s.sampling}, entry.where)
        files = {f"{k}-{entry.label}": v for k, v in write_images(images, spec.out_dir / entry.label).items()}
        return Scored(metrics, None, files)

    def fingerprints(self, spec: StageSpec, s: Any, data: Any) -> dict[str, str]:
        return {"data": fingerprint(data.real)}


# --- the stage ---------------------------------------------------------------------------------------
MODES: tuple[type[ModelsStage], ...] = (ImageEval, VisionEval, ChoiceEval, GenerationEval)
"""Asked in order; the first that claims the stage's models and data scores them."""


class Eval(Stage):
    """Evaluate one or more models on held-out data, in the mode their kind and the data call for."""

    produces_model = False
    sections = SECTIONS

    def mode(self, spec: StageSpec, ctx: Context) -> ModelsStage:
        """The mode that scores this stage; one line for a key it does not take, naming the modes that do."""
        entries(spec)  # `model:` xor `models:`, labels usable as file names: before any mode looks at them
        for mode in MODES:
            reason = mode.claims(spec, ctx)
            if reason is not None:
                break
        for key in spec.cfg:
            if key in SECTIONS and key not in mode.sections:
                takers = ", ".join(m.title for m in reversed(MODES) if key in m.sections)
                raise TunelabError(f"'{spec.where}.{key}' applies to {takers}; {reason}: remove `{key}`")
        return mode()

    def check(self, spec: StageSpec, ctx: Context) -> None:
        self.mode(spec, ctx).check(spec, ctx)

    def run(self, spec: StageSpec, ctx: Context) -> StageResult:
        return self.mode(spec, ctx).run(spec, ctx)

    def plan(self, spec: StageSpec, ctx: Context) -> Any:
        return self.mode(spec, ctx).plan(spec, ctx)

    def held_out(self, spec: StageSpec, ctx: Context) -> list[tuple[str, Any]]:
        """The prompts the models answer (text modes; images and diffusion have none to compare)."""
        mode = self.mode(spec, ctx)
        if not isinstance(mode, TextMode):
            return []
        data = mode.data(spec, ctx, mode.settings(spec, ctx), running=False)
        return [(f"{spec.where}.data", [{"prompt": p} for p in data.raw])]
