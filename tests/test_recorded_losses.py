"""Recorded losses: the first steps of each trainer family, compared with numbers recorded from a known-good run.

A library upgrade that changes training (tokenization, packing, loss masking, initialisation, the
optimizer, a trainer's loss) must show up here as a failing number, not as a silent drift of `make demo`'s
result. The tolerance is well above what another CPU or thread count changes in the first steps (float32
sums in another order, measured below 1e-4 relative) and well below what a real change does (a different
mask or packing moves the first losses by percents).

To re-record after a deliberate change: run this file with TUNELAB_RECORD=1 and paste the printed lists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

import tunelab
from tests.helpers import (
    KIND_TEST,
    KIND_TRAIN,
    PPO_TRAINING,
    PREF_TRAIN,
    QA_TRAIN,
    TINY_VISION,
    ddpm_stage,
    grpo_stage,
    run_stages,
    tiny_training,
)
from tunelab.core.paths import recipes_root
from tunelab.core.runs import read_json

RECORD = bool(os.environ.get("TUNELAB_RECORD"))

# tunelab run quickstart, shrunk: 30 pre-training steps, then 10 LoRA SFT steps, one loss per step.
PRETRAIN = [
    6.0339, 6.051, 5.9045, 5.7287, 5.5907, 5.4678, 5.3492, 5.2178, 5.0614, 4.856,
    4.6228, 4.4857, 4.2367, 4.0515, 3.8163, 3.6268, 3.4781, 3.4319, 3.2165, 3.0205,
    2.9411, 2.7547, 2.5926, 2.4638, 2.3579, 2.2756, 2.1893, 2.1582, 2.1192, 2.1018,
]  # fmt: skip
SFT = [5.7634, 5.8288, 5.6362, 5.7031, 5.6433, 5.4396, 5.3757, 4.7069, 4.8128, 4.3299]
RTOL = 2e-3
# Values are recorded to 4 decimals, and some (a KL, a reward margin, a policy loss) start near zero, where a
# relative tolerance alone would be tighter than the rounding: 2e-4 absolute is two units of the last decimal.
ATOL = 2e-4


def losses(stage_dir: Path, key: str = "loss") -> list[float]:
    history = read_json(stage_dir / "log_history.json", list)
    return [round(row[key], 4) for row in history if key in row]


def test_quickstart_first_losses_are_the_recorded_ones(tmp_path: Path) -> None:
    data = yaml.safe_load((recipes_root() / "quickstart.yaml").read_text())
    stages = {name: data["stages"][name] for name in ("pretrain", "sft")}
    for name, steps in (("pretrain", 30), ("sft", 10)):
        stages[name]["training"].update(max_steps=steps, logging_steps=1, save_strategy="no", report_to="none")
        stages[name]["data"] = str(recipes_root().parent / stages[name]["data"])
    recipe = tunelab.recipe_from_dict({**data, "output_dir": str(tmp_path / "run"), "stages": stages})
    result = tunelab.run(recipe)
    got = {name: losses(result.outputs[name]) for name in stages}
    if RECORD:
        print(got)
    assert got["pretrain"] == pytest.approx(PRETRAIN, rel=RTOL), got["pretrain"]
    assert got["sft"] == pytest.approx(SFT, rel=RTOL), got["sft"]


# --- one case per trainer family ------------------------------------------------------------------
# Each trains the session's tiny models (conftest.py) a few steps with the recipe seed 0 and logs every step.
# RECORDED[family][key] is the per-step value of a log_history key, as TUNELAB_RECORD=1 prints it. The keys
# are the loss and what pins it down where the loss alone cannot: GRPO's loss is 0 on the first steps (its
# advantages sum to zero per group), so its rewards (generation, reward model) and gradient norm are recorded;
# DPO's log-probabilities pin tokenization and masking; grad_norm pins the backward pass.

RECORDED: dict[str, dict[str, list[float]]] = {
    "dpo": {
        "loss": [0.6931, 0.6761, 0.7054, 0.6414],
        "logps/chosen": [-17.2864, -18.7751, -17.4675, -16.6753],
        "logps/rejected": [-17.3345, -17.6771, -15.9293, -17.9004],
        "grad_norm": [0.6796, 0.5475, 0.5405, 0.6926],
    },
    "orpo": {
        "loss": [5.7862, 5.6207, 5.5436, 5.4601],
        "nll_loss": [5.7176, 5.5521, 5.4727, 5.4002],
        "log_odds_ratio": [-0.6865, -0.6861, -0.7089, -0.5993],
        "grad_norm": [1.9801, 1.4969, 1.4925, 1.4621],
    },
    "reward": {
        "loss": [0.692, 0.6875, 0.7015],
        "mean_reward": [-0.081, -0.1894, -0.2765],
        "margin": [0.0023, 0.0116, -0.0163],
        "grad_norm": [0.1498, 0.2398, 0.4609],
    },
    "grpo": {
        "reward": [-0.2364, -0.39, -0.3707],
        "entropy": [5.6917, 5.6909, 5.691],
        "grad_norm": [2.7242, 2.68, 2.634],
    },
    "rloo": {
        "kl": [0.0, 0.007, -0.0124],
        "grad_norm": [0.8159, 0.3489, 0.2886],
    },
    "ppo": {
        "loss/policy_avg": [-0.124, -0.1018, -0.0559],
        "loss/value_avg": [0.0417, 0.0048, 0.0083],
        "objective/scores": [-0.3491, -0.1942, -0.238],
        "objective/kl": [-0.0, 0.1477, -0.2629],
        "policy/approxkl_avg": [0.1092, 0.0277, 0.0045],
    },
    "classify": {
        "loss": [1.1032, 1.0969, 1.1286, 1.1397],
        "grad_norm": [0.4627, 0.2733, 0.556, 0.8822],
    },
    "diffusion_train": {
        "loss": [1.0715, 0.8489, 0.903, 0.8709],
        "grad_norm": [2.6365, 1.4496, 1.2453, 1.0868],
    },
    "vlm_sft": {
        "loss": [5.856, 5.489, 5.3415],
        "grad_norm": [4.2613, 3.3592, 2.9511],
    },
}


def preference(kind: str, model: Path, **training: Any) -> dict[str, Any]:
    return {
        "stage": kind,
        "model": str(model),
        "data": PREF_TRAIN,
        "training": tiny_training(max_steps=4, learning_rate=1e-3, max_length=128, **training),
    }


def family_stage(family: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """The stage of one family, built from the fixtures it needs (only those are made)."""
    fixture = request.getfixturevalue
    if family in ("dpo", "orpo"):
        return preference(family, fixture("tiny_lm"))
    if family in ("grpo", "rloo"):
        stage = grpo_stage(str(fixture("tiny_lm")), str(fixture("reward_model")))
        stage["training"]["max_steps"] = 3
        return {**stage, "stage": family}
    if family == "ppo":
        return {
            "stage": "ppo",
            "model": str(fixture("tiny_lm")),
            "reward_model": str(fixture("reward_model")),
            "data": QA_TRAIN,
            "training": {**PPO_TRAINING, "total_episodes": 12, "learning_rate": 1e-3},
        }
    if family == "classify":
        training = tiny_training(max_steps=4, learning_rate=3e-3, per_device_train_batch_size=16)
        training.pop("max_length")
        return {
            "stage": "classify",
            "model": str(fixture("tiny_encoder")),
            "data": KIND_TRAIN,
            "eval_data": KIND_TEST,
            "labels": ["buy", "give", "total"],
            "training": {**training, "eval_strategy": "no"},
        }
    if family == "diffusion_train":
        stage = ddpm_stage(max_steps=4, logging_steps=1)
        del stage["samples"]
        return stage
    if family == "vlm_sft":
        return {
            "stage": "vlm_sft",
            "model": str(fixture("llava")),
            "data": {"path": "recipes/data/digits_vqa", "split": "train[:16]"},
            "training": tiny_training(max_steps=3, learning_rate=1e-3, max_length=None),
        }
    raise AssertionError(family)


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path) -> Path:
    """A LLaVA built from the tiny LM and a 2-layer vision tower: seconds to build, as the crash tests do."""
    from tunelab.vision.models import build_llava

    return build_llava({"path": str(tiny_lm)}, tmp_path_factory.mktemp("llava") / "vlm", TINY_VISION)


@pytest.mark.parametrize("family", list(RECORDED))
def test_trainer_family_first_steps_are_the_recorded_ones(
    family: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    if family == "reward":  # the session's reward model (helpers.reward_stage, 3 steps) is this family's run
        folder = request.getfixturevalue("reward_model")
    else:
        folder = run_stages(tmp_path, {family: family_stage(family, request)}).outputs[family]
    got = {key: losses(folder, key) for key in RECORDED[family]}
    if RECORD:
        print(f"\n{family}: {got}")
    for key, want in RECORDED[family].items():
        assert got[key] == pytest.approx(want, rel=RTOL, abs=ATOL), (family, key, got[key])
