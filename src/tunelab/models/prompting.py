"""Prompting and batched generation, shared by the eval stage, `tunelab chat` and `tunelab.generate`.

`Prompting` turns raw prompts into what a model reads (few-shot examples, a template around the
prompt, and for a tokenizer with a chat template, chat turns rendered with the generation prompt);
`generate` answers many prompts in length-sorted, left-padded batches.
"""

from __future__ import annotations

from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.models.chat_templates import messages, render, use_template


class Prompting:
    """How raw prompts become what a model reads: few-shot examples, a template around the prompt,
    and, for a tokenizer with a chat template, chat turns (system, shots as earlier turns, the
    prompt as the user turn) rendered with the generation prompt."""

    def __init__(self, template: str, shots: list[tuple[str, str]], separator: str, chat: bool | str, system: Any):
        self.template, self.shots, self.separator, self.chat, self.system = template, shots, separator, chat, system

    def build(self, tokenizer: Any, prompts: list[str], where: str) -> tuple[list[str], bool]:
        """(texts, templated): templated texts hold their special tokens, so tokenize them without adding more."""

        if use_template(tokenizer, self.chat):
            return [render(tokenizer, t, where, i) for i, t in enumerate(self.conversations(prompts))], True
        if self.system is not None:
            raise TunelabError(
                f"'{where}.system' is set, but the model's tokenizer has no chat template to put it in: "
                "drop `system:` or give `chat_template:`"
            )
        return self.plain(prompts), False

    def conversations(self, prompts: list[str]) -> list[list[dict[str, str]]]:
        """Each prompt as chat turns (system, the shots as earlier turns, the prompt): what a server renders
        with its own template."""
        shots = [(self.template.format(prompt=q), a.strip()) for q, a in self.shots]
        return [messages(self.template.format(prompt=p), self.system, shots) for p in prompts]

    def plain(self, prompts: list[str]) -> list[str]:
        """Each prompt as plain text after the shots, for a model read without a chat template."""
        prefix = "".join(self.template.format(prompt=q) + a + self.separator for q, a in self.shots)
        return [prefix + self.template.format(prompt=p) for p in prompts]


def generate(
    model, tokenizer, prompts: list[str], config, batch_size: int, templated: bool = False, think: str | None = None
) -> list[str]:
    """Batched generation: left padding, prompts sorted by length so batches waste little.

    Chat-templated prompts carry their special tokens already (a BOS among them, for templates that
    write one), so they are tokenized without adding more. With `think` (an end-of-reasoning marker
    such as `</think>`), the marker stays in the text even where it is a special token, so that
    `strip_reasoning` can find it.
    """
    import torch

    tokenizer.padding_side = "left"
    special = not templated
    lengths = [len(ids) for ids in tokenizer(prompts, add_special_tokens=special)["input_ids"]]
    order = sorted(range(len(prompts)), key=lambda i: lengths[i])
    outputs: list[str] = [""] * len(prompts)
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = config.eos_token_id or tokenizer.eos_token_id
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        batch = [prompts[i] for i in idx]
        enc = tokenizer(batch, return_tensors="pt", padding=True, add_special_tokens=special).to(model.device)
        with torch.no_grad():
            out = model.generate(**enc, generation_config=config, tokenizer=tokenizer)
        new = out[:, enc["input_ids"].shape[1] :]
        texts = tokenizer.batch_decode(new, skip_special_tokens=True)
        if think is not None:
            texts = [keep_marker(tokenizer, row.tolist(), text, think) for row, text in zip(new, texts, strict=True)]
        for i, text in zip(idx, texts, strict=True):
            outputs[i] = text
    return outputs


def keep_marker(tokenizer, ids: list[int], text: str, think: str) -> str:
    """`text` with the reasoning marker put back where decoding skipped it as a special token."""
    marker = tokenizer.convert_tokens_to_ids(think)
    if not isinstance(marker, int) or marker == tokenizer.unk_token_id or marker not in ids or think in text:
        return text
    last = len(ids) - 1 - ids[::-1].index(marker)
    head = tokenizer.decode(ids[:last], skip_special_tokens=True)
    return head + think + tokenizer.decode(ids[last + 1 :], skip_special_tokens=True)


def strip_reasoning(text: str, think: str | None) -> str:
    """What follows the last end-of-reasoning marker (the harness's rule); the whole text without one."""
    return text.split(think)[-1].lstrip() if think else text
