"""Recorded losses: the quickstart's first steps, compared with numbers recorded from a known-good run.

A library upgrade that changes training (tokenization, packing, loss masking, initialisation, the
optimizer) must show up here as a failing number, not as a silent drift of `make demo`'s result. The
tolerance is well above what another CPU or thread count changes in the first steps (float32 sums in
another order, measured below 1e-4 relative) and well below what a real change does (a different mask or
packing moves the first losses by percents).

To re-record after a deliberate change: run this file with TUNELAB_RECORD=1 and paste the printed lists.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

import tunelab
from tunelab.core.paths import recipes_root
from tunelab.core.runs import read_json

# tunelab run quickstart, shrunk: 30 pre-training steps, then 10 LoRA SFT steps, one loss per step.
PRETRAIN = [
    6.0339, 6.051, 5.9045, 5.7287, 5.5907, 5.4678, 5.3492, 5.2178, 5.0614, 4.856,
    4.6228, 4.4857, 4.2367, 4.0515, 3.8163, 3.6268, 3.4781, 3.4319, 3.2165, 3.0205,
    2.9411, 2.7547, 2.5926, 2.4638, 2.3579, 2.2756, 2.1893, 2.1582, 2.1192, 2.1018,
]  # fmt: skip
SFT = [5.7634, 5.8288, 5.6362, 5.7031, 5.6433, 5.4396, 5.3757, 4.7069, 4.8128, 4.3299]
RTOL = 2e-3


def losses(stage_dir: Path) -> list[float]:
    history = read_json(stage_dir / "log_history.json", list)
    return [round(row["loss"], 4) for row in history if "loss" in row]


def test_quickstart_first_losses_are_the_recorded_ones(tmp_path: Path) -> None:
    data = yaml.safe_load((recipes_root() / "quickstart.yaml").read_text())
    stages = {name: data["stages"][name] for name in ("pretrain", "sft")}
    for name, steps in (("pretrain", 30), ("sft", 10)):
        stages[name]["training"].update(max_steps=steps, logging_steps=1, save_strategy="no", report_to="none")
        stages[name]["data"] = str(recipes_root().parent / stages[name]["data"])
    recipe = tunelab.recipe_from_dict({**data, "output_dir": str(tmp_path / "run"), "stages": stages})
    result = tunelab.run(recipe)
    got = {name: losses(result.outputs[name]) for name in stages}
    if os.environ.get("TUNELAB_RECORD"):
        print(got)
    assert got["pretrain"] == pytest.approx(PRETRAIN, rel=RTOL), got["pretrain"]
    assert got["sft"] == pytest.approx(SFT, rel=RTOL), got["sft"]
