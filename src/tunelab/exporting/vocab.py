"""A tokenizer as GGUF metadata: the `tokenizer.ggml.*` keys llama.cpp tokenizes with.

GGUF knows two kinds of the BPE tokenizers the exported families use:

- `gpt2`: byte-level BPE (SmolLM2, Llama 3, Qwen). Tokens are stored as transformers spells them
  (bytes mapped to printable characters), with the merges in rank order and a `pre` name telling
  llama.cpp how to split text before merging. The name is recognised from the tokenizer's own
  pre-tokenizer (its split pattern), not guessed: a pattern not listed here is refused, since llama.cpp
  would otherwise split text differently from the model's training;
- `llama`: SentencePiece-style BPE with byte fallback (Llama 2, Mistral, Gemma): tokens with `▁` for
  a space, `<0xNN>` byte tokens, and a score per token, which llama.cpp merges by (best first). The
  scores are the negated merge ranks, so llama.cpp merges in the tokenizer's own order; the merges
  are written too, for transformers' reader.

Token types follow llama.cpp: CONTROL for special tokens, USER_DEFINED for other added tokens, BYTE
for `<0xNN>`, UNKNOWN for the unknown token, UNUSED for rows of the embedding no token uses.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from tunelab.core.errors import TunelabError

# Split patterns of the byte-level tokenizers llama.cpp has a pre-tokenizer for (its names).
_WORDS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|"
_REST = r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = _WORDS + r"\p{N}{1,3}" + _REST  # digits in threes
QWEN2_SPLIT = _WORDS + r"\p{N}" + _REST  # digits one by one
SPLITS = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"}

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
KINDS = (
    "byte-level BPE (gpt2: SmolLM2, Llama 3, Qwen) or SentencePiece-style BPE with byte fallback "
    "(llama: Gemma, Mistral)"
)


@dataclass
class Vocab:
    """What the GGUF file says of the tokenizer."""

    model: str  # "gpt2" or "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    merges: list[str]
    scores: list[float] | None = None
    special: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad -> id
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None
    chat_template: str | None = None


def _parts(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The steps of a pre-tokenizer or normalizer (a `Sequence` flattened), as tokenizer.json has them."""
    if not node:
        return []
    for key in ("pretokenizers", "normalizers"):
        if node.get("type") == "Sequence" and key in node:
            return [p for child in node[key] for p in _parts(child)]
    return [node]


def _byte_level_pre(parts: list[dict[str, Any]]) -> str | None:
    """llama.cpp's name for a byte-level pre-tokenizer, or None when it is not one it knows."""
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        pattern = (parts[0].get("pattern") or {}).get("Regex")
        return SPLITS.get(pattern)
    return None


def _json(tokenizer: Any, where: str) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TunelabError(
            f"'{where}' has a slow (Python) tokenizer, {type(tokenizer).__name__}: GGUF export reads a fast one "
            "(tokenizer.json); save the model's tokenizer with a tokenizers-backed class"
        )
    return json.loads(backend.to_str())


def _merges(raw: list[Any]) -> list[str]:
    """Merges as GGUF stores them, "left right"; a space inside a part is written as U+0120 (as gguf does)."""
    out = []
    for merge in raw:
        pair = merge.split(" ", 1) if isinstance(merge, str) else merge
        out.append(" ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in pair))
    return out


def read_vocab(tokenizer: Any, vocab_size: int, where: str) -> Vocab:
    """The tokenizer's GGUF fields, or one line when it is not a kind GGUF export writes.

    `vocab_size` is the embedding's row count: rows past the tokenizer's tokens become UNUSED
    `[PADn]` tokens, as llama.cpp's converter writes them (Qwen2.5 pads its embedding so)."""
    data = _json(tokenizer, where)
    model = data.get("model") or {}
    pre_parts = _parts(data.get("pre_tokenizer"))
    norm_parts = _parts(data.get("normalizer"))
    kind = model.get("type")
    if kind == "BPE" and any(p.get("type") == "ByteLevel" for p in pre_parts):
        gguf_model, pre = "gpt2", _byte_level_pre(pre_parts)
        if pre is None:
            shown = ", ".join(str(p.get("type")) for p in pre_parts)
            raise TunelabError(
                f"'{where}': its byte-level tokenizer splits text with a pre-tokenizer ({shown}) llama.cpp has no "
                "name for here (known: GPT-2, SmolLM, Llama 3, Qwen2 patterns), so llama.cpp would tokenize "
                "differently; convert it with llama.cpp's convert_hf_to_gguf.py"
            )
    elif kind == "BPE" and model.get("byte_fallback"):
        gguf_model, pre = "llama", "default"
    else:
        raise TunelabError(
            f"'{where}' has a {kind or 'unknown'} tokenizer ({type(tokenizer).__name__}), which GGUF export cannot "
            f"write: it writes {KINDS}"
        )
    if not model.get("merges"):
        raise TunelabError(
            f"'{where}' has a BPE tokenizer without merges ({type(tokenizer).__name__}: a vocabulary only), which "
            "llama.cpp cannot tokenize with: save the model's own tokenizer (tokenizer.json) beside it"
        )
    vocab = tokenizer.get_vocab()
    top = max(vocab.values(), default=-1)
    if top >= vocab_size:
        raise TunelabError(
            f"'{where}': its tokenizer has token id {top}, past the model's {vocab_size} embedding rows: resize the "
            "embedding (model.resize_token_embeddings(len(tokenizer))) and save the model again"
        )
    added = {int(i): t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    unk = getattr(tokenizer, "unk_token_id", None)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
            continue
        text = by_id[i]
        if i in added:
            text = added[i].content
            types.append(CONTROL if added[i].special or i in special_ids else USER_DEFINED)
        elif i == unk and gguf_model == "llama":
            types.append(UNKNOWN)
        elif i in special_ids:
            types.append(CONTROL)
        elif gguf_model == "llama" and BYTE_TOKEN.fullmatch(text):
            types.append(BYTE)
        else:
            types.append(NORMAL)
        tokens.append(text)
    merges = _merges(model.get("merges") or [])
    out = Vocab(gguf_model, pre, tokens, types, merges)
    if gguf_model == "llama":
        out.scores = _scores(tokens, model.get("merges") or [])
        out.add_space_prefix = _space_prefix(pre_parts, norm_parts)
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < vocab_size:
            out.special[name] = token_id
    ids = tokenizer("Hello")["input_ids"]
    out.add_bos = bool(ids) and ids[0] == out.special.get("bos", -1)
    out.add_eos = bool(ids) and ids[-1] == out.special.get("eos", -1)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one
        template = template.get("default")
    out.chat_template = template if isinstance(template, str) else None
    return out


def _scores(tokens: list[str], merges: list[Any]) -> list[float]:
    """A score per token for llama.cpp's SentencePiece merging (highest first): minus the rank of the merge
    that makes the token; tokens no merge makes (characters, bytes, specials) score below every merge."""
    rank: dict[str, int] = {}
    for i, merge in enumerate(merges):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        rank.setdefault(left + right, i)
    floor = -float(len(merges) + 1)
    return [-float(rank[t]) if t in rank else floor for t in tokens]


def _space_prefix(pre_parts: list[dict[str, Any]], norm_parts: list[dict[str, Any]]) -> bool:
    """Whether the tokenizer puts `▁` before the first word (SentencePiece's dummy prefix): Llama 2 and
    Mistral do, Gemma does not."""
    for part in pre_parts:
        if part.get("type") == "Metaspace":
            return part.get("prepend_scheme", "always") in ("first", "always") or bool(part.get("add_prefix_space"))
    return any(p.get("type") == "Prepend" for p in norm_parts)


def write_vocab(writer: Any, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for name, token_id in vocab.special.items():
        getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
