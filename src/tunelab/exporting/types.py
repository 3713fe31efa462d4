"""The GGUF types `tunelab export` writes, and which type each tensor gets.

The `gguf` package quantizes in numpy to F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1: those are the
types offered. Which tensors keep more precision follows llama.cpp, so a file written here holds what
llama.cpp's own tools would have written for the same type:

- `convert_hf_to_gguf.py` writes every 1-D tensor, every `*_norm.weight` and every bias as F32, and
  each other tensor at the requested type (token embedding and output included, for f16/bf16/q8_0);
- the 4- and 5-bit types are `llama-quantize`'s, which gives the output matrix (the token embedding
  where it doubles as the output) Q6_K, and Q8_0 where Q6_K's 256-wide blocks do not fit the rows.
  `gguf` cannot write Q6_K, so it is Q8_0 here: a little larger, never less precise.

A quantized type packs each row in blocks (32 values for all of these); a tensor whose rows are not a
multiple of the block is written as F16 instead, as the converter does, and the export says which.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunelab.core.errors import TunelabError


@dataclass(frozen=True)
class GGUFType:
    """One `--type`: the tensor type of most matrices and the file type recorded in the header."""

    name: str
    tensor: str  # gguf.GGMLQuantizationType member name
    file_type: str  # gguf.LlamaFileType member name
    bits: float  # bits per weight of the main tensors, block scales included (for size estimates)

    @property
    def quantized(self) -> bool:
        return self.name not in ("f16", "bf16")


TYPES: dict[str, GGUFType] = {
    t.name: t
    for t in (
        GGUFType("f16", "F16", "MOSTLY_F16", 16),
        GGUFType("bf16", "BF16", "MOSTLY_BF16", 16),
        GGUFType("q8_0", "Q8_0", "MOSTLY_Q8_0", 8.5),
        GGUFType("q4_0", "Q4_0", "MOSTLY_Q4_0", 4.5),
        GGUFType("q4_1", "Q4_1", "MOSTLY_Q4_1", 5),
        GGUFType("q5_0", "Q5_0", "MOSTLY_Q5_0", 5.5),
        GGUFType("q5_1", "Q5_1", "MOSTLY_Q5_1", 6),
    )
}
BLOCK = 32  # values per block of every quantized type above
OUTPUT_BITS = 8.5  # Q8_0: the output matrix of the 4/5-bit types


def gguf_type(value: object, where: str = "--type") -> GGUFType:
    """The type a user named (case-insensitive), or one line listing the types there are."""
    name = str(value).strip().lower()
    if name not in TYPES:
        raise TunelabError(
            f"{where} is {value!r}: GGUF export writes {', '.join(TYPES)} (f16 is lossless to float16 rounding; "
            "q8_0 is the usual quantized choice)"
        )
    return TYPES[name]


def tensor_type(name: str, shape: tuple[int, ...], kind: GGUFType, output: bool) -> tuple[str, str | None]:
    """(GGMLQuantizationType name, a note when it falls back) for the GGUF tensor `name` of `shape`.

    `output` says whether the tensor is the output matrix: `output.weight`, or `token_embd.weight` when
    the model ties its embeddings (llama.cpp then reads the embedding as the output too).
    """
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return "F32", None
    wanted = "Q8_0" if output and kind.name in ("q4_0", "q4_1", "q5_0", "q5_1") else kind.tensor
    if wanted in ("F16", "BF16") or shape[-1] % BLOCK == 0:
        return wanted, None
    return "F16", f"{name} (rows of {shape[-1]}, not a multiple of {BLOCK}) is F16"


def estimate_bytes(params: int, embedding: int, kind: GGUFType, vocab: int) -> int:
    """The file's size, estimated from the parameter count before any weight loads (for the disk check).

    `embedding` is the parameter count of the output matrix (kept at Q8_0 by the 4/5-bit types);
    the vocabulary's strings and merges take about 40 bytes a token.
    """
    main = (params - embedding) * kind.bits / 8
    out = embedding * (OUTPUT_BITS if kind.name in ("q4_0", "q4_1", "q5_0", "q5_1") else kind.bits) / 8
    return int(main + out + 40 * vocab + 2**20)
