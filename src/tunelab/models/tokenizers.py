"""Tokenizers: checked beside a model, loaded (folder, adapter, GGUF file), trained (byte-level BPE for
`pretrain`), and traced to where they come from, so a pipeline compares two models' tokenizers before the
stages that make them have run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.core.config import check_keys
from tunelab.core.errors import TunelabError
from tunelab.core.hub import local_path
from tunelab.core.refs import REF
from tunelab.models.spec import adapter_base, is_adapter, model_spec, resolve_spec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")


def check_tokenizer(path: str, where: str) -> None:
    """A local model (or adapter and its base) must carry a tokenizer; hub ids are checked on load."""

    if str(path).lower().endswith(".gguf"):
        return
    folders = [path] + ([adapter_base(path)] if is_adapter(path) else [])
    local = [local_path(f) for f in folders]
    if any(p is None for p in local):
        return
    if not any((p / name).exists() for p in local for name in TOKENIZER_FILES):
        raise TunelabError(
            f"'{where}' is '{path}', which has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}): "
            "save the tokenizer beside the model (tokenizer.save_pretrained(folder))"
        )


def load_tokenizer(path: str, **kwargs: Any):
    """The tokenizer of a model or adapter folder (adapter folders may hold their own)."""
    from transformers import AutoTokenizer

    source = path
    if str(path).lower().endswith(".gguf"):  # a GGUF file carries its tokenizer (see tokenizer_origin)
        source, kwargs = str(Path(path).parent), {**kwargs, "gguf_file": Path(path).name}
    elif is_adapter(path) and not Path(path, "tokenizer_config.json").exists():
        source = adapter_base(path)
    try:
        tok = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise TunelabError(f"cannot load a tokenizer from '{source}': {' '.join(str(exc).split())[:200]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


SPECIAL_TOKENS = {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>", "pad_token": "<|pad|>"}


def train_tokenizer(texts, options: dict[str, Any], where: str):
    """A byte-level BPE tokenizer trained on `texts`, wrapped for transformers.

    `options` are the keyword arguments of `tokenizers.trainers.BpeTrainer`.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    options = dict(options)
    options.setdefault("vocab_size", 1024)
    options.setdefault("min_frequency", 2)
    special = list(dict.fromkeys([*SPECIAL_TOKENS.values(), *options.pop("special_tokens", [])]))
    check_keys(options, BpeTrainerArgs, where)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        special_tokens=special, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False, **options
    )
    tokenizer.train_from_iterator(texts, trainer)
    # No chat template: a model pre-trained here is a base model, prompted with plain text (an SFT stage
    # can give it one with `chat_template:`).
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


class BpeTrainerArgs:
    """The keyword arguments of `tokenizers.trainers.BpeTrainer` (a Rust class with no signature), as a
    signature `check_keys` can read: `pretrain` checks its `tokenizer:` section against it at validate."""

    def __init__(
        self,
        vocab_size: int = 30000,
        min_frequency: int = 0,
        limit_alphabet: int | None = None,
        continuing_subword_prefix: str | None = None,
        end_of_word_suffix: str | None = None,
        max_token_length: int | None = None,
    ) -> None: ...


def tokenizer_origin(value: Any, ctx: Any, where: str) -> str:
    """Where the tokenizer of the model `value` names comes from: a folder or hub id, or the stage that makes it.

    Lets a pipeline compare two models' tokenizers before the stages that make them have run.
    """

    spec = model_spec(value, where)
    match = REF.match(spec["path"].strip())
    if match and ctx.is_pending(spec["path"]):
        return ctx.tokenizers.get(match.group(1), f"stage '{match.group(1)}'")
    spec = resolve_spec({**spec, "path": ctx.resolve_ref(spec["path"])}, where, materialize=False)
    if "gguf_file" in spec:
        return spec["gguf_file"]  # the file path; load_tokenizer reads the tokenizer inside it
    path = spec["path"]
    if is_adapter(path) and not Path(path, "tokenizer_config.json").exists():
        path = adapter_base(path)
    return path


def same_tokenizer(a: str, b: str) -> bool:
    """Whether two tokenizer origins (see `tokenizer_origin`) give the same token ids."""
    if a == b:
        return True
    if a.startswith("stage '") or b.startswith("stage '"):
        return False
    first, second = load_tokenizer(a), load_tokenizer(b)
    return first.get_vocab() == second.get_vocab() and first.pad_token_id == second.pad_token_id
