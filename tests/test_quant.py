"""QLoRA and 8-bit LoRA through bitsandbytes on CPU; merge over a quantized base; quantization errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import yaml
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from typer.testing import CliRunner

import tunelab
from tests.helpers import CORPUS, QA_TRAIN, TINY_LLAMA, fails, sft, tiny_training, write
from tunelab.cli.app import app

QLORA = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": "float32"}


def run_sft(tmp_path: Path, model: Path, quantization: dict) -> tunelab.RunResult:
    recipe = tunelab.recipe_from_dict(
        {
            "output_dir": str(tmp_path / "run"),
            "seed": 0,
            "stages": {
                "sft": {
                    "stage": "sft",
                    "model": str(model),
                    "data": QA_TRAIN,
                    "quantization": quantization,
                    "lora": {"r": 8, "lora_alpha": 16, "target_modules": "all-linear"},
                    "training": tiny_training(max_steps=3, learning_rate=1e-2),
                }
            },
        }
    )
    return tunelab.run(recipe)


def logits(model, tokenizer) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**tokenizer("Question: Mia has 3 pens.", return_tensors="pt")).logits.float()


def test_qlora_trains_only_the_adapter_and_merges_in_full_precision(tmp_path: Path, tiny_lm: Path) -> None:
    result = run_sft(tmp_path, tiny_lm, QLORA)
    adapter = result.outputs["sft"]
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(tiny_lm)
    assert not (adapter / "model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(adapter)

    quantized = AutoModelForCausalLM.from_pretrained(
        tiny_lm, quantization_config=BitsAndBytesConfig(**{**QLORA, "bnb_4bit_compute_dtype": torch.float32})
    )
    base_4bit = logits(quantized, tokenizer)
    qlora = logits(PeftModel.from_pretrained(quantized, adapter), tokenizer)
    assert (qlora - base_4bit).abs().max() > 1e-3  # the adapter changed the model

    full_base = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32)
    on_full = logits(PeftModel.from_pretrained(full_base, adapter), tokenizer)
    merged_dir = tmp_path / "merged"
    assert CliRunner().invoke(app, ["merge", str(adapter), str(merged_dir)]).exit_code == 0
    merged = AutoModelForCausalLM.from_pretrained(merged_dir)
    assert merged.dtype == torch.float32 and not hasattr(merged, "quantization_method")
    merged_logits = logits(merged, tokenizer)
    # Exact against the adapter on the full-precision base (what merging computes)...
    torch.testing.assert_close(merged_logits, on_full, atol=1e-5, rtol=1e-5)
    # ...and within the 4-bit quantization error of the adapter as trained.
    quant_error = (on_full - qlora).abs().max().item()
    assert quant_error < 0.25 * on_full.abs().max().item()
    assert (merged_logits.argmax(-1) == qlora.argmax(-1)).float().mean() >= 0.8


def test_8bit_lora_trains(tmp_path: Path, tiny_lm: Path) -> None:
    result = run_sft(tmp_path, tiny_lm, {"load_in_8bit": True})
    assert result.metrics["sft"]["global_step"] == 3
    assert (result.outputs["sft"] / "adapter_model.safetensors").exists()


@pytest.mark.parametrize(
    ("quantization", "message"),
    [
        ({"load_in_4bit": True, "load_in_8bit": True}, "sets both load_in_4bit and load_in_8bit: choose one"),
        ({"bnb_4bit_quant_type": "nf4"}, "quantizes nothing: set load_in_4bit: true"),
        ({"load_in_4bit": True, "bnb_4bit_quant_type": "nf5"}, "expected one of nf4, fp4"),
        ({"load_in_4bit": True, "bnb_4bit_compute_dtype": "float8"}, "expected one of float32, float16, bfloat16"),
        ({"load_in_4bit": True, "bnb_4bit_use_dobule_quant": True}, "did you mean 'bnb_4bit_use_double_quant'"),
    ],
)
def test_bad_quantization_sections(tmp_path: Path, tiny_lm: Path, quantization: dict, message: str) -> None:
    fails(["validate", str(write(tmp_path, sft(str(tiny_lm), quantization=quantization, lora={"r": 4})))], message)


def test_quantization_needs_lora(tmp_path: Path, tiny_lm: Path) -> None:
    fails(["validate", str(write(tmp_path, sft(str(tiny_lm), quantization=QLORA)))], "add a `lora:` section (QLoRA)")


def test_bf16_compute_on_a_gpu_without_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab.models.quant import quant_config

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(tunelab.TunelabError, match="bfloat16, which Tesla T4 cannot compute in: use float16"):
        quant_config({**QLORA, "bnb_4bit_compute_dtype": "bfloat16"}, "stages.sft.quantization")
    assert quant_config({**QLORA, "bnb_4bit_compute_dtype": "float16"}, "q").bnb_4bit_compute_dtype == torch.float16


def test_bitsandbytes_that_cannot_load(tmp_path: Path, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    fails(
        ["validate", str(write(tmp_path, sft(str(tiny_lm), quantization=QLORA, lora={"r": 4})))],
        "needs bitsandbytes, which cannot be loaded here",
    )


def test_layers_the_cpu_4bit_kernel_rejects_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tunelab.models.quant.packed_cpu_kernel", lambda: True)
    odd = {**TINY_LLAMA, "hidden_size": 96, "intermediate_size": 200}
    recipe = {
        "output_dir": str(tmp_path / "out"),
        "stages": {
            "pretrain": {"stage": "pretrain", "data": CORPUS, "config": odd, "training": tiny_training()},
            "sft": {"stage": "sft", "model": "${pretrain}", "data": QA_TRAIN, "quantization": QLORA, "lora": {"r": 4}},
        },
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    line = fails(["validate", str(path)], "4-bit on this CPU needs in_features divisible by 64 and out_features by 32")
    assert "model.layers.0.self_attn.q_proj (96->96)" in line and "multiples of 64" in line
    fine = runner_ok(["validate", str(path), "pretrain.config.hidden_size=64", "pretrain.config.intermediate_size=128"])
    assert "ok:" in fine


def runner_ok(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.output


def test_merge_without_the_base_model(tmp_path: Path) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(tmp_path / "gone")}))
    fails(["merge", str(adapter), str(tmp_path / "out")], "name the base with --base")
