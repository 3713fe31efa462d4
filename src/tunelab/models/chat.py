"""Talk to a model: `tunelab chat` and `tunelab.chat()` / `tunelab.generate()`.

Any model tunelab can name works: a hub id, a model folder, a LoRA adapter folder (loaded over its
base), a stage folder of a run (the same folders), a GGUF file (`folder/model.gguf`, through its
plain copy). Prompts go through the model's chat template when it has one (`tunelab.models.chat_templates`), with
the conversation so far; a base model without one continues the plain text. Generation settings
are `transformers.GenerationConfig` fields, checked as in the eval stage.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.core.errors import TunelabError, unknown_key
from tunelab.core.hub import configure_offline, local_path
from tunelab.core.progress import quiet
from tunelab.models.chat_templates import messages, render, use_template
from tunelab.models.loading import load_causal_lm
from tunelab.models.prompting import Prompting
from tunelab.models.prompting import generate as batched
from tunelab.models.quant import quant_config
from tunelab.models.spec import model_spec, resolve_spec
from tunelab.models.tokenizers import load_tokenizer

DEFAULTS = {"max_new_tokens": 256, "do_sample": False}


def generation_config(values: dict[str, Any], where: str, defaults: dict[str, Any] | None = None, strict: bool = True):
    """A `GenerationConfig` from recipe or command-line values; unknown fields and bad values in one line.

    `strict`: also refuse settings generate() only warns about (a sampling field without do_sample); the
    harness passes its `gen_kwargs` to generate(), which takes those."""
    from transformers import GenerationConfig

    values = {**(DEFAULTS if defaults is None else defaults), **values}
    fields = [f for f in GenerationConfig().to_dict() if not f.startswith("_")]
    for key in values:
        if key not in fields:
            raise unknown_key(where, str(key), fields, "not a field of transformers.GenerationConfig")
    try:
        config = GenerationConfig(**values)
        config.validate(strict=strict)
    except (ValueError, TypeError) as exc:
        raise TunelabError(f"'{where}' is rejected by GenerationConfig: {' '.join(str(exc).split())[:300]}") from None
    check_generation(config, where)
    return config


# GenerationConfig accepts these as any number; generate() then fails (or plans petabytes) mid-run.
COUNTS = {  # field: (smallest, largest) whole number
    "max_new_tokens": (1, 2**24),
    "max_length": (1, 2**24),
    "min_new_tokens": (0, 2**24),
    "min_length": (0, 2**24),
    "num_beams": (1, 1024),
    "num_beam_groups": (1, 1024),
    "num_return_sequences": (1, 1024),
    "top_k": (0, 2**24),
    "no_repeat_ngram_size": (0, 2**16),
    "encoder_no_repeat_ngram_size": (0, 2**16),
}


def check_generation(config: Any, where: str) -> None:
    """What transformers only rejects once `generate()` runs (its logits processors check their arguments
    then), or never: sizes that are not whole numbers or are absurd (`num_beams: 1e6`, `max_new_tokens: 1e9`),
    a sampling temperature of 0 or below, top_p, min_p, typical_p outside [0, 1]."""
    for key, (low, high) in COUNTS.items():
        value = getattr(config, key, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            if not (isinstance(value, float) and value.is_integer()):
                raise TunelabError(f"'{where}.{key}' is {value!r}: a whole number is needed, e.g. {max(low, 1)}")
            value = int(value)
            setattr(config, key, value)  # 64.0 (YAML's 6.4e1) means 64
        if not low <= value <= high:
            raise TunelabError(f"'{where}.{key}' is {value}: use a whole number from {low} to {high}")
    if config.do_sample:
        ranges = {
            "temperature": (0.0, None, "above 0 (e.g. 0.7), or do_sample: false for greedy answers"),
            "top_p": (0.0, 1.0, "from 0 to 1 (e.g. 0.9)"),
            "min_p": (0.0, 1.0, "from 0 to 1 (e.g. 0.05)"),
            "typical_p": (0.0, 1.0, "from 0 to 1 (e.g. 0.95)"),
            "epsilon_cutoff": (0.0, 1.0, "from 0 to 1 (e.g. 3e-4)"),
            "eta_cutoff": (0.0, 1.0, "from 0 to 1 (e.g. 3e-4)"),
        }
        for key, (low, high, hint) in ranges.items():
            value = getattr(config, key, None)
            if value is None:
                continue
            bad = not isinstance(value, (int, float)) or isinstance(value, bool) or value != value
            if not bad:
                bad = value <= low if key == "temperature" else not low <= value <= (high or value)
            if bad:
                raise TunelabError(f"'{where}.{key}' is {value!r} with do_sample: true: use a value {hint}")
    penalty = getattr(config, "repetition_penalty", None)
    if penalty is not None and (isinstance(penalty, bool) or not isinstance(penalty, (int, float)) or not penalty > 0):
        raise TunelabError(f"'{where}.repetition_penalty' is {penalty!r}: use a number above 0 (1.0: none)")


def context_length(model_config: Any) -> int | None:
    """The longest sequence the model reads (`max_position_embeddings`, also under `text_config`), if known."""
    for config in (model_config, getattr(model_config, "text_config", None)):
        limit = getattr(config, "max_position_embeddings", None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            return limit
    return None


def check_length(config: Any, model_config: Any, where: str) -> None:
    """`max_new_tokens` (and `max_length`) within what the model reads, where its config says: past it,
    generation fails mid-run, or its plan asks for terabytes of cache."""
    limit = context_length(model_config) if model_config is not None else None
    if limit is None:
        return
    for key in ("max_new_tokens", "max_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > limit:
            raise TunelabError(
                f"'{where}.{key}' is {value}, more than the model reads (max_position_embeddings {limit}): "
                f"use at most {limit}"
            )


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs, values read as YAML (`temperature=0.7`, `do_sample=true`)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TunelabError(f"'{item}' is not key=value (e.g. max_new_tokens=64 temperature=0.7)")
        out[key.strip()] = yaml.safe_load(value)
    return out


def model_source(ref: str, where: str = "model") -> dict[str, Any]:
    """The from_pretrained arguments of what `ref` names; one line when it is no model at all."""

    spec = model_spec(ref, where)
    folder = local_path(spec["path"]) if "gguf_file" not in spec else None
    if folder is not None and folder.is_dir() and (folder / "stage.json").is_file():
        from tunelab.core.hub import MODEL_FILES

        if not any((folder / f).exists() for f in MODEL_FILES):
            raise TunelabError(
                f"'{ref}' is a stage folder without a model (an eval or sampling stage?): "
                "name the folder of a stage that trains one (sft, dpo, grpo, ppo, pretrain)"
            )
    if folder is not None and folder.is_dir() and (folder / "run.json").is_file():
        raise TunelabError(f"'{ref}' is a run folder: name one of its stage folders, e.g. '{Path(ref) / 'sft'}'")
    resolved = resolve_spec(spec, where)
    config = Path(resolved["path"], "config.json")
    if config.is_file():
        import json

        arch = (json.loads(config.read_text()).get("architectures") or [""])[0]
        if arch.endswith(("ForSequenceClassification", "ForTokenClassification")):
            raise TunelabError(f"'{ref}' is a {arch}, which scores text but does not generate it: name a causal LM")
    return resolved


@quiet()
def load(ref: str, quantization: dict[str, Any] | None = None):
    """(model, tokenizer) ready to generate: an adapter merged over its base unless the base is quantized."""

    configure_offline()
    spec = model_source(ref)
    quant = quant_config(quantization, "quantization")
    tokenizer = load_tokenizer(spec["path"])
    model = load_causal_lm(spec, quantization=quant, merge_adapter=quant is None)
    return model.eval(), tokenizer


class Chat:
    """A conversation with one model: history, optional system prompt, streamed replies."""

    def __init__(self, model: Any, tokenizer: Any, config: Any, system: str | None = None, template: bool = True):

        self.model, self.tokenizer, self.config, self.system = model, tokenizer, config, system
        check_length(config, getattr(model, "config", None), "generation")
        self.templated = use_template(tokenizer, template)
        if system is not None and not self.templated:
            raise TunelabError("a system prompt needs a chat template, and this model's tokenizer has none")
        self.history: list[dict[str, str]] = []

    def reset(self, system: str | None = None) -> None:
        self.history = []
        if system is not None:
            self.system = system

    def prompt_text(self, text: str) -> str:
        """What the model reads for the next reply (the template's rendering, or the plain text)."""

        if not self.templated:
            return text
        return render(self.tokenizer, messages(self.history + [{"role": "user", "content": text}], self.system), "chat")

    @quiet()  # each reply: the caller's warning filters are theirs between replies
    def say(self, text: str, on_token: Callable[[str], None] | None = None) -> str:
        """The model's reply to `text`, streamed to `on_token` as it is generated; kept in the history."""
        import torch
        from transformers import TextIteratorStreamer

        prompt = self.prompt_text(text)
        enc = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=not self.templated).to(self.model.device)
        self.config.pad_token_id = self.tokenizer.pad_token_id
        self.config.eos_token_id = self.config.eos_token_id or self.tokenizer.eos_token_id
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failure: list[BaseException] = []

        def work() -> None:
            try:
                with torch.no_grad():
                    self.model.generate(**enc, generation_config=self.config, streamer=streamer)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                failure.append(exc)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            if on_token is not None:
                on_token(piece)
        thread.join()
        if failure:
            raise failure[0]
        reply = "".join(pieces).strip()
        if self.templated:
            self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return reply


@quiet()
def chat(
    model: str,
    prompt: str,
    system: str | None = None,
    history: list[dict[str, str]] | None = None,
    quantization: dict[str, Any] | None = None,
    **generation: Any,
) -> str:
    """One reply from `model` to `prompt` (after `history`, a list of {role, content} turns).

    `generation` are GenerationConfig fields (max_new_tokens=64, do_sample=True, ...). Loads the
    model each call; for many prompts keep a `Chat` (see `load`).
    """
    lm, tokenizer = load(model, quantization)
    session = Chat(lm, tokenizer, generation_config(generation, "generation"), system)
    session.history = list(history or [])
    return session.say(prompt)


@quiet()
def generate(model: str, prompts: list[str], batch_size: int = 16, system: str | None = None, **generation: Any):
    """Replies to many prompts, batched as the eval stage batches them (through the chat template)."""

    lm, tokenizer = load(model)
    texts, templated = Prompting("{prompt}", [], "", True, system).build(tokenizer, list(prompts), "prompts")
    return batched(lm, tokenizer, texts, generation_config(generation, "generation"), batch_size, templated)
