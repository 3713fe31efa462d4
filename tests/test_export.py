"""`tunelab export`: GGUF files written from tunelab's code, read back by transformers (and llama.cpp, slow).

Each supported family is built tiny from its config, with a tokenizer of its kind trained here on the
bundled corpus (byte-level BPE with the family's split pattern, or SentencePiece-style BPE with byte
fallback) and its chat template; each is exported, read back by transformers' GGUF loader, and the
logits compared. SmolLM2-135M-Instruct is the real model.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

import tunelab
from tests.conftest import SMOLLM2
from tunelab.cli import app

ROOT = Path(__file__).resolve().parent.parent

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{% endfor %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else "
    "message['role'] %}{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)


def _corpus() -> list[str]:
    rows = (ROOT / "recipes/data/arith_corpus/train.jsonl").read_text().splitlines()[:400]
    return [json.loads(row)["text"] for row in rows] + ["Write one sentence about the sea. Name three colours."]


def byte_level(split: str | None, specials: list[str], bos: str | None, template: str, **names: str):
    """A byte-level BPE tokenizer (GPT-2 style, or split by `split` first as Llama 3 and Qwen do)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), "isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=400, special_tokens=specials, initial_alphabet=alphabet, show_progress=False))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    out.chat_template = template
    return out


def sentencepiece(kind: str, specials: list[str], template: str):
    """A SentencePiece-style BPE tokenizer with byte fallback (Llama 2 / Mistral layout, or Gemma's)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer, LlamaTokenizer

    tok = Tokenizer(models.BPE(byte_fallback=True))
    if kind == "gemma":
        tok.normalizer = normalizers.Replace(" ", "▁")
    else:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learnt = json.loads(tok.to_str())["model"]
    base = specials + [f"<0x{i:02X}>" for i in range(256)]
    vocab = {t: i for i, t in enumerate(base)}
    for token, _ in sorted(learnt["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learnt["merges"]]
    if kind == "gemma":
        out = GemmaTokenizer(vocab=vocab, merges=merges, additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    else:
        out = LlamaTokenizer(vocab=vocab, merges=merges)
    out.chat_template = template
    return out


LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
CHATML_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "max_position_embeddings": 256,
         "initializer_range": 0.2}


def _llama3():
    from tunelab.exporting.vocab import LLAMA3_SPLIT

    names = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|end_of_text|>"}
    return byte_level(LLAMA3_SPLIT, LLAMA3_SPECIALS, "<|begin_of_text|>", LLAMA3, **names)


def _chatml():
    from tunelab.exporting.vocab import QWEN2_SPLIT

    names = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    return byte_level(QWEN2_SPLIT, CHATML_SPECIALS, None, CHATML, **names)


FAMILIES: dict[str, tuple[dict[str, Any], Any]] = {
    "llama": ({"model_type": "llama", "num_attention_heads": 4, "num_key_value_heads": 2}, _llama3),
    "mistral": (
        {"model_type": "mistral", "num_attention_heads": 4, "num_key_value_heads": 2},
        lambda: sentencepiece("llama", ["<unk>", "<s>", "</s>"], MISTRAL),
    ),
    "qwen2": ({"model_type": "qwen2", "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}, _chatml),
    # transformers' GGUF reader takes Qwen3's head_dim from its config class (128), not from the file
    "qwen3": (
        {"model_type": "qwen3", "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 128, "tie_word_embeddings": True},
        _chatml,
    ),
    # Gemma scales queries by query_pre_attn_scalar, which neither the file nor transformers' reader carries:
    # 256, its config's default and llama.cpp's head_dim rule both
    "gemma2": (
        {"model_type": "gemma2", "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256},
        lambda: sentencepiece("gemma", GEMMA_SPECIALS, GEMMA),
    ),
    "gemma3": (
        {"model_type": "gemma3_text", "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 256, "query_pre_attn_scalar": 256},
        lambda: sentencepiece("gemma", GEMMA_SPECIALS, GEMMA),
    ),
}


def build(family: str, folder: Path) -> Path:
    """A tiny model of `family` with its tokenizer, saved in `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shape, make_tokenizer = FAMILIES[family]
    tokenizer = make_tokenizer()
    vocab = -(-len(tokenizer) // 64) * 64  # padded, as Qwen pads its embedding: the rows past the tokens are unused
    ids = {k: getattr(tokenizer, f"{k}_token_id") for k in ("bos", "eos", "pad")}
    config = AutoConfig.for_model(**{**SHAPE, **shape}, vocab_size=vocab, **{f"{k}_token_id": v for k, v in ids.items()})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {family: build(family, root / family) for family in FAMILIES}
