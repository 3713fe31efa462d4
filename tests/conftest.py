"""Shared fixtures: tiny models trained in seconds, offline, from the bundled data, each made once per
session. What tests share besides fixtures (settings, data slices, recipe builders) is in tests/helpers.py."""

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
if "TUNELAB_TESTS_TMPDIR" not in os.environ:  # once per session, even if this file is imported again
    _OWNED = tempfile.mkdtemp(prefix="tl-")  # short: socket paths under tmp_path must fit AF_UNIX's 108 bytes
    atexit.register(shutil.rmtree, _OWNED, ignore_errors=True)
    os.environ["TMPDIR"] = os.environ["TUNELAB_TESTS_TMPDIR"] = _OWNED
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again

import pytest  # noqa: E402

import tunelab  # noqa: E402
from tests.helpers import SMOLLM2, TINY_VISION, pretrain_stage, reward_stage, run_stages  # noqa: E402


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


@pytest.fixture(scope="session")
def reward_model(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path) -> Path:
    """A tiny reward model (3 steps on the preference pairs): trained once for the RLHF, alignment and
    fault-tolerance tests, which only read it."""
    out = tmp_path_factory.mktemp("reward")
    return run_stages(out, {"reward": reward_stage(str(tiny_lm))}).outputs["reward"]


@pytest.fixture(scope="session")
def tiny_text_lm(tmp_path_factory: pytest.TempPathFactory, smollm2: Path) -> Path:
    """A 2-layer Llama from a config, with SmolLM2's tokenizer (ChatML template): a language tower in seconds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("tiny-text") / "lm"
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory: pytest.TempPathFactory, tiny_text_lm: Path) -> Path:
    from tunelab.vision.models import build_llava

    return build_llava({"path": str(tiny_text_lm)}, tmp_path_factory.mktemp("tiny-vlm") / "vlm", TINY_VISION)
