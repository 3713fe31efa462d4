"""Throughput and MFU in training progress: the FLOPs estimate, the peak, and the stage metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from tests.helpers import QA_TRAIN, TINY_LLAMA, tiny_training
from tunelab.training import throughput


def _tiny(tie: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=300, tie_word_embeddings=tie, **TINY_LLAMA))


def _by_hand(tie: bool) -> int:
    """Llama's matmul weights, counted from the config: attention, MLP, norms, final norm, lm_head."""
    h, inter, layers = TINY_LLAMA["hidden_size"], TINY_LLAMA["intermediate_size"], TINY_LLAMA["num_hidden_layers"]
    head_dim = h // TINY_LLAMA["num_attention_heads"]
    kv = TINY_LLAMA["num_key_value_heads"] * head_dim
    per_layer = h * h + 2 * h * kv + h * h + 3 * h * inter + 2 * h
    return layers * per_layer + h + 300 * h  # lm_head counted whether tied or not; the embedding lookup is not


@pytest.mark.parametrize("tie", [False, True])
def test_matmul_params_leave_out_embeddings_and_lora(tie: bool) -> None:
    from peft import LoraConfig, get_peft_model

    model = _tiny(tie)
    assert throughput.matmul_params(model) == (_by_hand(tie), True)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert throughput.matmul_params(lora) == (_by_hand(tie), False)  # frozen base, LoRA weights left out
    assert throughput.attention_shape(model.config) == (2, 64)


def test_training_flops_formula() -> None:
    n, layers, width = 1000, 2, 64
    # two sequences of 3 and 5 tokens: 8 tokens, squared lengths 9 + 25
    assert throughput.training_flops(n, True, layers, width, 8, 34) == 6 * 1000 * 8 + 12 * 2 * 64 * 34
    assert throughput.training_flops(n, False, layers, width, 8, 34) == 4 * 1000 * 8 + 12 * 2 * 64 * 34


def test_batch_counts_padded_padding_free_and_plain() -> None:
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    tokens, squares = throughput._batch_counts({"input_ids": torch.zeros_like(mask), "attention_mask": mask})
    assert (int(tokens), int(squares)) == (8, 9 + 25)
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])  # the same two rows, flattened
    tokens, squares = throughput._batch_counts({"input_ids": torch.zeros_like(positions), "position_ids": positions})
    assert (int(tokens), int(squares)) == (8, 9 + 25)
    tokens, squares = throughput._batch_counts({"input_ids": torch.zeros(2, 4, dtype=torch.long)})
    assert (int(tokens), int(squares)) == (8, 2 * 16)
    assert throughput._batch_counts({"chosen_input_ids": mask}) is None and throughput._batch_counts([mask]) is None
    counts = [[0, 0], None]
    for value in throughput._batch_counts({"input_ids": mask, "attention_mask": mask.float()}):
        counts[1] = value.long().reshape(1) if counts[1] is None else torch.cat([counts[1], value.long().reshape(1)])
    counts[0] = [1, 2]  # host part (from shapes) adds to the device part
    assert throughput._read(counts) == (9.0, 36.0)


def test_peak_flops(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNELAB_PEAK_FLOPS", "1.5e12")
    assert throughput.peak_flops("cpu") == 1.5e12
    monkeypatch.delenv("TUNELAB_PEAK_FLOPS")
    first = throughput.peak_flops("cpu")
    assert first is not None and 1e8 < first < 1e15
    assert throughput.peak_flops("cpu") == first  # measured once per process
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert throughput.peak_flops("cuda:0", "half") == pytest.approx(989.4e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert throughput.peak_flops("cuda:0", "fp32") == pytest.approx(51.2e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert throughput.peak_flops("cuda:0", "half") is None


def test_sft_run_reports_tokens_per_second_and_mfu(tmp_path: Path, tiny_lm: Path, caplog) -> None:
    import tunelab

    caplog.set_level(logging.INFO, logger="tunelab.progress")  # the API logs its progress lines; the CLI prints them
    stage = {
        "stage": "sft",
        "model": str(tiny_lm),
        "data": QA_TRAIN,
        "lora": {"r": 4},
        "training": tiny_training(max_steps=3, disable_tqdm=True),
    }
    recipe = tunelab.recipe_from_dict({"output_dir": str(tmp_path / "run"), "seed": 0, "stages": {"sft": stage}})
    result = tunelab.run(recipe)
    metrics = result.metrics["sft"]
    assert 0 < metrics["mfu"] < 1 and metrics["tokens_per_second"] > 0
    history = json.loads((result.outputs["sft"] / "log_history.json").read_text())
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 3 and all(0 < h["mfu"] < 1 and h["tokens_per_second"] > 0 for h in steps)
    lines = [line for line in caplog.messages if line.startswith("step ")]
    assert len(lines) == 3 and all(" tok/s " in line and line.endswith("%") and " mfu " in line for line in lines)
