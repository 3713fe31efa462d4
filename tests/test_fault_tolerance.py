"""Runs that stop (SIGTERM, SIGKILL) resume to the weights an uninterrupted run ends with; a run folder
has one writer; a disk that cannot hold the run, or a folder that cannot be written, fails first."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import (
    CORPUS,
    PPO_TRAINING,
    PREF_TEST,
    PREF_TRAIN,
    QA_TRAIN,
    TINY_LLAMA,
    fails,
    same,
    tiny_training,
    weights,
)
from tunelab.core import runs

CLI = [sys.executable, "-m", "tunelab.cli.app", "run"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def _recipe(tmp_path: Path, name: str, stage: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / name), "seed": 5, "stages": {"s": stage}}))
    return path


def _stop_after_checkpoint(path: Path, sig: int, stage_dir: Path, first: str = "checkpoint-*") -> int:
    """Start a run, send `sig` once a complete checkpoint (or, with first='', once training) has started."""
    proc = subprocess.Popen([*CLI, str(path)], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    if first:
        deadline = time.time() + 180
        while (
            time.time() < deadline and proc.poll() is None and not list(stage_dir.glob(f"{first}/trainer_state.json"))
        ):
            time.sleep(0.02)
    else:
        for line in proc.stdout:  # the first progress line: training is under way
            seen += line
            if "step " in line and "loss" in line:
                break
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=180)
    return proc.returncode, seen + out


def sft(model: Path, **training) -> dict:
    return {
        "stage": "sft",
        "model": str(model),
        "data": QA_TRAIN,
        "lora": {"r": 4, "lora_alpha": 8},
        "training": tiny_training(learning_rate=1e-3, **training),
    }


def ppo(model: Path, reward: Path, **extra) -> dict:
    training = {**PPO_TRAINING, "total_episodes": 64, "learning_rate": 1e-3, "save_strategy": "steps"}
    return {
        "stage": "ppo",
        "model": str(model),
        "reward_model": str(reward),
        "data": QA_TRAIN,
        "training": {**training, "save_steps": 5},
        **extra,
    }


# PPO's SIGTERM case (55 s) is in `make test-all`; PPO's SIGKILL resume (LoRA) stays in the default suite.
@pytest.mark.parametrize("kind", ["sft", pytest.param("ppo", marks=pytest.mark.slow)])
def test_sigterm_saves_a_checkpoint_and_resume_matches(
    tmp_path: Path, tiny_lm: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    """SIGTERM mid-training: a checkpoint at that step (none was due), status interrupted, exit 143;
    --resume ends with the uninterrupted run's weights."""
    if kind == "sft":
        # 120 steps: the signal comes at the first progress line (step 5), long before the end.
        stage, total = sft(tiny_lm, max_steps=120, save_strategy="steps", save_steps=1000, logging_steps=5), 120
    else:  # 100 updates of 4 prompts
        stage, total = ppo(tiny_lm, request.getfixturevalue("reward_model")), 100
        stage["training"].update(total_episodes=400, save_steps=1000)
    subprocess.run([*CLI, str(_recipe(tmp_path, "straight", stage))], env=ENV, check=True, capture_output=True)
    path = _recipe(tmp_path, "stopped", stage)
    code, out = _stop_after_checkpoint(path, signal.SIGTERM, tmp_path / "stopped" / "s", first="")
    assert code == 143, out
    assert "checkpoint saved" in out and "continue it with --resume" in out
    # off a terminal: a line per log, no progress bars (sft logs every 5 steps, PPO's loop every update)
    assert "\r" not in out and ("step 5/" if kind == "sft" else "step 1/") in out
    saved = list((tmp_path / "stopped" / "s").glob("checkpoint-*"))
    assert len(saved) == 1 and 0 < int(saved[0].name.split("-")[1]) < total, out  # the signal's own checkpoint
    manifest = json.loads((tmp_path / "stopped" / "run.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["stages"]["s"]["status"] == "interrupted"
    resumed = subprocess.run([*CLI, str(path), "--resume"], env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert same(weights(tmp_path / "straight" / "s"), weights(tmp_path / "stopped" / "s"), atol=1e-5)


# The reward model resumes through the same Trainer checkpoints as SFT; PPO's own loop (full and LoRA) is the
# slowest case of the default suite (~90 s): both are in `make test-all`, which keeps that suite under 10 min.
@pytest.mark.parametrize(
    "kind",
    [
        # kill -9 of sft: slow since the default suite passed 10 minutes; SIGTERM -> resume equality of sft stays
        # in it (test_sigterm_saves_a_checkpoint_and_resume_matches), and kill -9 restores in test_data_loss.
        pytest.param("sft", marks=pytest.mark.slow),
        pytest.param("reward", marks=pytest.mark.slow),
        pytest.param("ppo", marks=pytest.mark.slow),
        pytest.param("ppo-lora", marks=pytest.mark.slow),
    ],
)
def test_sigkill_then_resume_matches_an_uninterrupted_run(
    tmp_path: Path, tiny_lm: Path, kind: str, request: pytest.FixtureRequest
) -> None:
    if kind == "sft":
        stage = sft(tiny_lm, max_steps=40, save_strategy="steps", save_steps=5, logging_steps=5)
    elif kind.startswith("ppo"):  # 16 updates of 4 prompts; the value model and data order must resume too
        lora = {"lora": {"r": 4, "target_modules": "all-linear"}} if kind == "ppo-lora" else {}
        stage = ppo(tiny_lm, request.getfixturevalue("reward_model"), **lora)
    else:
        training = tiny_training(max_steps=30, learning_rate=1e-3, max_length=128, save_strategy="steps")
        stage = {"stage": "reward", "model": str(tiny_lm), "data": PREF_TRAIN, "eval_data": PREF_TEST}
        stage["training"] = {**training, "save_steps": 5, "logging_steps": 5}
    subprocess.run([*CLI, str(_recipe(tmp_path, "straight", stage))], env=ENV, check=True, capture_output=True)
    path = _recipe(tmp_path, "killed", stage)
    _stop_after_checkpoint(path, signal.SIGKILL, tmp_path / "killed" / "s")
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["status"] == "running"  # killed: no say
    resumed = subprocess.run([*CLI, str(path), "--resume"], env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    record = json.loads((tmp_path / "killed" / "s" / "stage.json").read_text())
    assert record["metrics"]["resumed_from_step"] >= 5
    assert same(weights(tmp_path / "straight" / "s"), weights(tmp_path / "killed" / "s"), atol=1e-5)
    straight = json.loads((tmp_path / "straight" / "s" / "stage.json").read_text())["metrics"]
    if kind == "reward":
        assert record["metrics"]["pairwise_accuracy"] == straight["pairwise_accuracy"]
    if kind.startswith("ppo"):  # the same rollouts: the same scores and KL, update for update
        logs = [tmp_path / run / "s" / "log_history.json" for run in ("straight", "killed")]
        history = [json.loads(log.read_text()) for log in logs]
        curves = [[(h["episode"], h["objective/scores"], h["objective/kl"]) for h in hist] for hist in history]
        assert len(curves[0]) == 16 and np.allclose(curves[0], curves[1], atol=1e-5), curves
        assert record["metrics"]["last_score"] == pytest.approx(straight["last_score"], abs=1e-5)


def test_a_run_folder_has_one_writer(tmp_path: Path, tiny_lm: Path) -> None:
    """A second process on the same output_dir (or N copies that never formed one distributed run) stops."""
    path = _recipe(tmp_path, "busy", sft(tiny_lm))
    with runs.locked(tmp_path / "busy"):
        fails(["validate", str(path)], "is in use by tunelab (pid")
        fails(["run", str(path), "--overwrite"], "not one distributed run: use `tunelab launch")
    assert runs.lock_holder(tmp_path / "busy") is None  # released when the holder ends


def test_ranks_checking_the_lock_at_once_do_not_see_each_other(tmp_path: Path) -> None:
    """Every rank of one run checks the lock before rank 0 takes it; a check in progress is not a holder."""
    import fcntl

    with runs.locked(tmp_path):  # a finished run leaves its text in the lock file
        pass
    with open(tmp_path / runs.LOCK) as other_rank:
        fcntl.flock(other_rank, fcntl.LOCK_SH | fcntl.LOCK_NB)  # another rank, mid-check
        assert runs.lock_holder(tmp_path) is None


def test_full_disk_fails_before_training(tmp_path: Path, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    import tunelab

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    stage = {
        "stage": "pretrain",
        "data": CORPUS,
        "tokenizer": {"vocab_size": 300},
        "config": dict(TINY_LLAMA),
        "training": tiny_training(max_steps=10, save_strategy="steps", save_steps=5),
    }
    recipe = tunelab.recipe_from_dict({"output_dir": str(tmp_path / "full"), "stages": {"pretrain": stage}})
    message = r"'\S+': 1 KB free, but the run plans \d+(\.\d+)? MB of .* stage 'pretrain'"  # adaptive units
    with pytest.raises(tunelab.TunelabError, match=message):
        tunelab.run(recipe)
    assert not (tmp_path / "full").exists()  # nothing written


def test_unwritable_output_dir(tmp_path: Path, tiny_lm: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"output_dir": "/proc/tunelab-cannot-write", "stages": {"s": sft(tiny_lm)}}))
    fails(["validate", str(path)], "output_dir '/proc/tunelab-cannot-write' cannot be written")


def test_planned_disk_counts_kept_checkpoints() -> None:
    from tunelab.models.plan import StagePlan

    full = StagePlan("a", "train", "full", params=1000, trainable=1000, parts={"weights": 4000.0, "optimizer": 8000.0})
    lora = StagePlan("b", "train", "lora", params=1000, trainable=10, parts={"weights": 4000.0, "optimizer": 80.0})
    stages = {
        "a": {"training": {"max_steps": 100, "save_steps": 10, "save_total_limit": 2}},
        "b": {"training": {"max_steps": 100, "save_steps": 50}},
    }
    ppo = StagePlan("c", "ppo", "full", params=1000, trainable=1000, parts={"weights": 4000.0}, steps=20)
    stages["c"] = {"training": {"total_episodes": 80, "save_steps": 5}}  # no max_steps: 20 updates, planned
    need = runs.planned_disk(stages, [full, lora, ppo])
    assert need == {"a": 2 * 12000 + 4000, "b": 2 * (40 + 80) + 40, "c": 4 * 4000 + 4000}


def test_checkpoints_are_renamed_into_place_and_rotated(tmp_path: Path, tiny_lm: Path) -> None:
    """Each checkpoint is written under .partial/ and renamed when complete; save_total_limit still applies."""
    import tunelab

    stage = sft(tiny_lm, max_steps=6, save_strategy="steps", save_steps=2, save_total_limit=2)
    (tmp_path / "r" / "s" / ".partial" / "checkpoint-99").mkdir(parents=True)  # torn, from an earlier kill
    (tmp_path / "r" / "run.json").write_text('{"tool": "tunelab", "status": "interrupted", "stages": {}}')
    recipe = tunelab.recipe_from_dict({"output_dir": str(tmp_path / "r"), "seed": 5, "stages": {"s": stage}})
    tunelab.run(recipe, resume=True)
    folder = tmp_path / "r" / "s"
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert all((p / "trainer_state.json").is_file() for p in folder.glob("checkpoint-*"))
    assert not list((folder / ".partial").iterdir())  # nothing half-written left, the torn one cleared
