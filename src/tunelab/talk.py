"""Talk to a model: `tunelab chat` and `tunelab.chat()` / `tunelab.generate()`.

Any model tunelab can name works: a hub id, a model folder, a LoRA adapter folder (loaded over its
base), a stage folder of a run (the same folders), a GGUF file (`folder/model.gguf`, through its
plain copy). Prompts go through the model's chat template when it has one (`tunelab.chat_templates`), with
the conversation so far; a base model without one continues the plain text. Generation settings
are `transformers.GenerationConfig` fields, checked as in the eval stage.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.chat_templates import messages, render, use_template
from tunelab.errors import TunelabError, unknown_key
from tunelab.hub import configure_offline, local_path
from tunelab.models import load_causal_lm, load_tokenizer, model_spec, resolve_spec
from tunelab.progress import quiet
from tunelab.prompting import Prompting
from tunelab.prompting import generate as batched
from tunelab.quant import quant_config

DEFAULTS = {"max_new_tokens": 256, "do_sample": False}


def generation_config(values: dict[str, Any], where: str, defaults: dict[str, Any] | None = None):
    """A `GenerationConfig` from recipe or command-line values; unknown fields and bad values in one line."""
    from transformers import GenerationConfig

    values = {**(DEFAULTS if defaults is None else defaults), **values}
    fields = [f for f in GenerationConfig().to_dict() if not f.startswith("_")]
    for key in values:
        if key not in fields:
            raise unknown_key(where, str(key), fields, "not a field of transformers.GenerationConfig")
    try:
        config = GenerationConfig(**values)
        config.validate(strict=True)
    except (ValueError, TypeError) as exc:
        raise TunelabError(f"'{where}' is rejected by GenerationConfig: {' '.join(str(exc).split())[:300]}") from None
    return config


def parse_overrides(items: list[str], where: str = "generation") -> dict[str, Any]:
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
        from tunelab.hub import MODEL_FILES

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


def load(ref: str, quantization: dict[str, Any] | None = None):
    """(model, tokenizer) ready to generate: an adapter merged over its base unless the base is quantized."""

    configure_offline()
    quiet()
    spec = model_source(ref)
    quant = quant_config(quantization, "quantization")
    tokenizer = load_tokenizer(spec["path"])
    model = load_causal_lm(spec, quantization=quant, merge_adapter=quant is None)
    return model.eval(), tokenizer


class Chat:
    """A conversation with one model: history, optional system prompt, streamed replies."""

    def __init__(self, model: Any, tokenizer: Any, config: Any, system: str | None = None, template: bool = True):

        self.model, self.tokenizer, self.config, self.system = model, tokenizer, config, system
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


def generate(model: str, prompts: list[str], batch_size: int = 16, system: str | None = None, **generation: Any):
    """Replies to many prompts, batched as the eval stage batches them (through the chat template)."""

    lm, tokenizer = load(model)
    texts, templated = Prompting("{prompt}", [], "", True, system).build(tokenizer, list(prompts), "prompts")
    return batched(lm, tokenizer, texts, generation_config(generation, "generation"), batch_size, templated)
