"""Record PPO's reference trajectory with TRL 1.12's PPO loop, for tests/test_ppo_parity.py to replay.

    PYTHONPATH=src OMP_NUM_THREADS=1 python tests/data/ppo_reference/record.py

Run it from the repository root, in a venv with TRL 1.12 (the last TRL that ships `trl.experimental.ppo`)
and, for the trainer, a checkout before tunelab's own PPO loop (`git checkout cb109b8 -- src/tunelab/training/
ppo_trainer.py` gives `ResumablePPOTrainer`, TRL 1.12's algorithm with a seeded prompt order; a test of that
checkout proved it equal to TRL's `PPOTrainer` step for step). It writes trl-1.12.json beside itself: for each
case, the settings, every update's logged metrics, and fingerprints of the trained policy (its adapter with
LoRA) and value model (tests/helpers.py: `fingerprint`). The models are built by `ppo_reference_models`
from torch's seeded generator, so the replay needs neither TRL 1.12 nor a trained fixture.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

# Shared by both cases; each case adds its own. The seed is the recipe's `seed:` (args.seed).
COMMON = {"seed": 3, "response_length": 6, "temperature": 0.7, "num_ppo_epochs": 2, "total_episodes": 32}
CASES = {
    # Full fine-tune: 4 updates of 8 prompts, each in 2 mini-batches of 4 (one optimizer step each), rollouts
    # generated and scored in 2 chunks of 4; responses end at EOS, and one without it loses 1.0 of score.
    "full": {
        "settings": {
            **COMMON,
            "per_device_train_batch_size": 8,
            "num_mini_batches": 2,
            "local_rollout_forward_batch_size": 4,
            "learning_rate": 1e-3,
            "kl_coef": 0.1,
            "stop_token": "eos",
            "missing_eos_penalty": 1.0,
        },
        "lora": None,
    },
    # LoRA (the reference is the policy with its adapter off): 4 updates of 8 prompts, one mini-batch made of
    # 2 accumulated micro-batches of 4, whitened rewards, the k3 KL estimator, no stop token.
    "lora": {
        "settings": {
            **COMMON,
            "per_device_train_batch_size": 4,
            "gradient_accumulation_steps": 2,
            "num_mini_batches": 1,
            "local_rollout_forward_batch_size": 8,
            "learning_rate": 1e-2,
            "kl_coef": 0.05,
            "kl_estimator": "k3",
            "whiten_rewards": True,
            "cliprange": 0.1,
            "vf_coef": 0.2,
        },
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
    },
}


def ppo_defaults(config: type) -> dict:
    """Defaults of PPOConfig's own fields and of the TrainingArguments fields it overrides, plus max_grad_norm
    (inherited, but TRL's PPO loop never clipped): what a recipe gets when it leaves them out."""
    import dataclasses

    from transformers import TrainingArguments

    base = {f.name: f.default for f in dataclasses.fields(TrainingArguments)}
    return {
        f.name: f.default
        for f in dataclasses.fields(config)
        if f.name not in base or base[f.name] != f.default or f.name == "max_grad_norm"
    }


def main() -> None:
    import dataclasses

    import peft
    import torch
    import transformers
    import trl
    from safetensors.torch import load_file
    from trl.experimental.ppo import PPOConfig
    from tunelab.training.ppo_trainer import ResumablePPOTrainer

    from tests.helpers import fingerprint, ppo_reference_models, ppo_reference_run

    torch.set_num_threads(1)
    record = {
        "how": "tests/data/ppo_reference/record.py (see its docstring); one process, CPU, torch at 1 thread",
        "recorded_with": {
            "trainer": "tunelab.training.ppo_trainer.ResumablePPOTrainer (TRL 1.12's PPOTrainer algorithm)",
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "ppo_config_fields": sorted(f.name for f in dataclasses.fields(PPOConfig)),
        "ppo_config_defaults": ppo_defaults(PPOConfig),
        "cases": {},
    }
    with tempfile.TemporaryDirectory() as tmp:
        models = ppo_reference_models(Path(tmp))
        record["models"] = {k: fingerprint(load_file(v / "model.safetensors")) for k, v in models.items()}
        for name, case in CASES.items():
            result = ppo_reference_run(ResumablePPOTrainer, PPOConfig, models, case, Path(tmp) / name)
            record["cases"][name] = {**case, **result}
            print(name, [(round(u["objective/scores"], 4), round(u["objective/kl"], 4)) for u in result["updates"]])
    path = Path(__file__).with_name(f"trl-{trl.__version__.rsplit('.', 1)[0]}.json")
    path.write_text(json.dumps(record, indent=1) + "\n")
    print("wrote", path)


if __name__ == "__main__":
    main()
