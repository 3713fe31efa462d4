"""GGUF export: a model tunelab can name, written for llama.cpp and Ollama, verified by a round trip.

- `types`: the GGUF types written and which tensors keep more precision (llama.cpp's rules);
- `architectures`: the families written, their metadata keys and tensor changes;
- `vocab`: the tokenizer as `tokenizer.ggml.*` metadata;
- `writer`: the file, through `gguf.GGUFWriter`;
- `roundtrip`: the file read back by transformers and compared with the source;
- `ollama`: the Modelfile;
- `exporter`: the steps in order, checks first (`check`, then `export`).

Heavy libraries (torch, transformers, gguf) are imported inside functions, as everywhere in tunelab.
"""

from __future__ import annotations

from typing import Any

from tunelab.exporting.exporter import ExportResult, Say, check, export
from tunelab.exporting.types import TYPES

__all__ = ["TYPES", "ExportResult", "check", "export", "export_model"]


def export_model(
    model: str | dict[str, Any],
    out: Any,
    type: str = "f16",
    overwrite: bool = False,
    ollama: bool = False,
    system: str | None = None,
    say: Say | None = None,
) -> ExportResult:
    """Check, then export: what `tunelab export` and `tunelab.export` run."""
    return export(check(model, out, type, overwrite, ollama, system), say)
