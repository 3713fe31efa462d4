"""The memory planner: known figures, sharding arithmetic, and the CLI on a config-only model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from transformers import LlamaConfig
from trl import SFTConfig
from typer.testing import CliRunner

from tests.helpers import QA_TRAIN, tiny_training
from tunelab.cli.app import app
from tunelab.models.plan import plan_generation, plan_training

LLAMA_7B = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
}


def args(**kw) -> SFTConfig:
    return SFTConfig(output_dir="/tmp/tunelab-plan", use_cpu=True, bf16=False, report_to="none", **kw)


def test_7b_weights_match_known_figures() -> None:
    config = LlamaConfig(**LLAMA_7B)
    bf16 = plan_generation("g", config, batch=1, max_tokens=1, load_dtype="bfloat16")
    assert 6.7e9 < bf16.params < 6.8e9
    assert 13.0e9 < bf16.parts["weights"] < 14.0e9  # "about 14 GB at 16 bits"
    nf4 = plan_generation("g", config, 1, 1, {"load_in_4bit": True, "bnb_4bit_use_double_quant": True}, "bfloat16")
    assert 3.5e9 < nf4.parts["weights"] < 4.0e9  # "about 3.5-4 GB at 4 bits"
    plain4 = plan_generation("g", config, 1, 1, {"load_in_4bit": True}, "bfloat16")
    assert nf4.parts["weights"] < plain4.parts["weights"] < 4.3e9  # double quantization saves ~0.3 GB
    int8 = plan_generation("g", config, 1, 1, {"load_in_8bit": True}, "bfloat16")
    assert 6.9e9 < int8.parts["weights"] < 7.2e9
    # KV cache: 2 (k, v) x 32 layers x 4096 x 4096 tokens x 2 bytes = 2 GiB per sequence
    long = plan_generation("g", config, batch=1, max_tokens=4096, load_dtype="bfloat16")
    assert long.parts["kv_cache"] == 2 * 32 * 4096 * 4096 * 2


def test_training_parts_follow_the_method() -> None:
    config = LlamaConfig(**LLAMA_7B)
    full = plan_training("s", "sft", config, args(max_length=512, per_device_train_batch_size=1), load_dtype="bfloat16")
    assert full.trainable == full.params
    assert full.parts["optimizer"] == 2 * full.parts["gradients"] == 2 * full.parts["weights"]
    lora = plan_training(
        "s",
        "sft",
        config,
        args(max_length=512, per_device_train_batch_size=1),
        lora={"r": 16, "target_modules": ["q_proj", "v_proj"]},
        load_dtype="bfloat16",
    )
    assert lora.trainable == 32 * 2 * 16 * (4096 + 4096)  # r x (in + out) on 64 layers
    qlora = plan_training(
        "s",
        "sft",
        config,
        args(max_length=512, per_device_train_batch_size=1, optim="paged_adamw_8bit"),
        lora={"r": 16},
        quantization={"load_in_4bit": True},
        load_dtype="bfloat16",
    )
    assert qlora.parts["weights"] < lora.parts["weights"] / 2
    assert qlora.parts["optimizer"] < 2.1 * qlora.trainable  # two bytes per parameter in 8-bit AdamW
    checkpointed = plan_training(
        "s",
        "sft",
        config,
        args(max_length=512, per_device_train_batch_size=1, gradient_checkpointing=True),
        load_dtype="bfloat16",
    )
    plain = plan_training(
        "s",
        "sft",
        config,
        args(max_length=512, per_device_train_batch_size=1, gradient_checkpointing=False),
        load_dtype="bfloat16",
    )
    assert checkpointed.parts["activations"] < plain.parts["activations"] / 5


def test_sharding_divides_what_each_strategy_shards() -> None:
    config = LlamaConfig(**LLAMA_7B)
    p = plan_training("s", "sft", config, args(max_length=512, per_device_train_batch_size=1), load_dtype="bfloat16")
    w, g, o = p.parts["weights"], p.parts["gradients"], p.parts["optimizer"]
    act = p.parts["activations"] + p.parts["logits"]
    fixed = p.parts["overhead"]
    assert p.total == w + o + fixed + max(g, act)  # gradients fill as activations are freed: the larger counts
    assert p.sharded(4, "ddp") == p.total
    assert abs(p.sharded(4, "zero2") - (w + o / 4 + fixed + max(g / 4, act))) < 1
    assert abs(p.sharded(4, "zero3") - (w / 4 + o / 4 + fixed + max(g / 4, act))) < 1


def test_plan_reads_only_the_config_and_warns_with_fixes(tmp_path: Path) -> None:
    model = tmp_path / "llama-7b"
    model.mkdir()
    (model / "config.json").write_text(
        json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"], "dtype": "bfloat16", **LLAMA_7B})
    )
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    result = CliRunner().invoke(app, ["plan", str(write_recipe(tmp_path, model, data)), "--devices", "8"])
    assert result.exit_code == 0, result.output
    assert "6738.4M parameters" in result.output and "ZeRO-3 / FSDP x8" in result.output
    assert "warning: needs" in result.output and "LoRA instead of full fine-tuning" in result.output


def write_recipe(tmp_path: Path, model: Path, data: Path) -> Path:
    import yaml

    path = tmp_path / "big.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "stage": "sft",
                "model": str(model),
                "data": str(data),
                "training": {"max_length": 1024, "per_device_train_batch_size": 4},
            }
        )
    )
    return path


def test_run_warns_before_loading_when_the_plan_exceeds_the_device(
    tmp_path: Path, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("tunelab.pipeline.device_memory", lambda: ("a 1 MiB device", float(2**20)))
    recipe = {
        "stage": "sft",
        "model": str(tiny_lm),
        "data": QA_TRAIN,
        "training": tiny_training(),
        "output_dir": str(tmp_path / "run"),
    }
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 0, result.output
    warning = result.output.index("warning: stage 'sft' may need")
    assert "a 1 MiB device" in result.output and warning < result.output.index("-- sft (sft)")
