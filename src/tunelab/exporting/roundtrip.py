"""The round trip every export ends with: read the file back and compare its logits with the source's.

The file is read by transformers' GGUF loader (`from_pretrained(folder, gguf_file=...)`), the path
tunelab reads GGUF sources through, on a few fixed prompts rendered through the chat template. Three
figures come out:

- `max_abs_diff` and `top1_agreement`: the file's logits against the source model's, over every
  prompt position. This is what the type cost: float16 rounding for f16, more for the 4-bit types;
- `written_max_abs_diff`: the file's logits against the source model with its weights rounded as the
  file stores them (see `tunelab.exporting.writer`). Rounding aside, this is what the file's names,
  layouts and metadata lose, so it should be float32 noise (~1e-5) for every type: a large value means
  the file is not the model, whatever the type;
- `tokens_agree`: the share of prompts that the file's own tokenizer turns into the same ids.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.models.prompting import Prompting

PROMPTS = (
    "What is 17 + 25?",
    "Write one sentence about the sea.",
    "Name three colours of the rainbow.",
    "Mia has 3 pens. She buys 4 more. How many pens does Mia have now?",
)
WRITTEN_TOLERANCE = 1e-3  # `written_max_abs_diff` above this is not rounding: the round trip warns


@dataclass
class Prompts:
    texts: list[str]
    ids: list[list[int]]
    templated: bool  # rendered by the chat template: tokenized without adding special tokens again


def prompts(tokenizer: Any, system: str | None = None) -> Prompts:
    """The fixed prompts as the model reads them: through its chat template when it has one."""
    texts, templated = Prompting("{prompt}", [], "", True, system if tokenizer.chat_template else None).build(
        tokenizer, list(PROMPTS), "export round trip"
    )
    ids = [tokenizer(text, add_special_tokens=not templated)["input_ids"] for text in texts]
    return Prompts(texts, ids, templated)


def logits(model: Any, ids: list[list[int]]) -> list[Any]:
    """float32 logits of every position of each prompt (one at a time: no padding to get wrong)."""
    import torch

    model.eval()
    with torch.no_grad():
        return [model(torch.tensor([row])).logits[0].float() for row in ids]


def read_back(path: Path) -> tuple[Any, Any]:
    """(model, tokenizer) from the GGUF file, through transformers' own GGUF reader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _name_maps_once():
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return model, tokenizer


@contextlib.contextmanager
def _name_maps_once() -> Iterator[None]:
    """transformers' reader (5.25) builds gguf's tensor name map once per module of the model (~400 times for
    SmolLM2, a third of its loading time); the map depends only on the architecture and the layer count, so
    while it reads, gguf hands back one map per pair. Nothing else changes."""
    import gguf

    original = gguf.get_tensor_name_map
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(original)
    try:
        yield
    finally:
        gguf.get_tensor_name_map = original


def compare(source: list[Any], written: list[Any], read: list[Any], fixed: Prompts, tokenizer: Any) -> dict[str, Any]:
    """The round-trip figures (see the module's docstring)."""
    import torch

    diff = max(float((a - b).abs().max()) for a, b in zip(source, read, strict=True))
    exact = max(float((a - b).abs().max()) for a, b in zip(written, read, strict=True))
    same = sum(int((a.argmax(-1) == b.argmax(-1)).sum()) for a, b in zip(source, read, strict=True))
    positions = sum(len(row) for row in fixed.ids)
    special = not fixed.templated
    agree = sum(
        tokenizer(t, add_special_tokens=special)["input_ids"] == i for t, i in zip(fixed.texts, fixed.ids, strict=True)
    )
    scale = max(float(torch.cat([s.flatten() for s in source]).abs().max()), 1e-12)
    return {
        "max_abs_diff": diff,
        "top1_agreement": same / positions,
        "written_max_abs_diff": exact,
        "logit_scale": scale,
        "tokens_agree": agree / len(fixed.ids),
        "positions": positions,
        "prompts": len(fixed.ids),
    }
