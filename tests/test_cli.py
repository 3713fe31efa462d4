"""The CLI end to end: fast help, list/cp/env, the quickstart, overwrite and resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.helpers import CORPUS, TINY_LLAMA, tiny_training
from tunelab.cli.app import app

runner = CliRunner()
TUNELAB = [sys.executable, "-m", "tunelab.cli.app"]


def test_help_imports_no_heavy_library() -> None:
    code = (
        "import sys, tunelab.cli.app;"
        "print([m for m in ('torch', 'transformers', 'trl', 'datasets', 'peft') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    help_out = subprocess.run([*TUNELAB, "--help"], capture_output=True, text=True, check=True)
    for command in ("run", "validate", "list", "cp", "env", "merge"):
        assert command in help_out.stdout


def test_list_and_cp(tmp_path: Path) -> None:
    listed = runner.invoke(app, ["list"])
    assert listed.exit_code == 0 and "quickstart" in listed.output
    copied = runner.invoke(app, ["cp", "quickstart", str(tmp_path)])
    assert copied.exit_code == 0, copied.output
    assert (tmp_path / "quickstart.yaml").read_text().startswith("# ")
    again = runner.invoke(app, ["cp", "quickstart", str(tmp_path)])
    assert again.exit_code == 2 and "exists" in again.output
    bad = runner.invoke(app, ["cp", "quickstrat", str(tmp_path / "x.yaml")])
    assert bad.exit_code == 2 and "did you mean 'quickstart'" in bad.output


def test_env() -> None:
    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0
    assert "transformers" in result.output and "device" in result.output and "unreachable" in result.output


def test_copied_recipe_runs_from_another_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bundled data paths resolve even when the recipe is copied out of the repo."""
    runner.invoke(app, ["cp", "quickstart", str(tmp_path / "mine.yaml")])
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["validate", "mine.yaml"])
    assert result.exit_code == 0, result.output


QUICK = [
    "training.max_steps=3",
    "training.save_strategy=no",
    "training.report_to=none",
    "pretrain.config.hidden_size=64",
    "pretrain.config.intermediate_size=128",
    "pretrain.config.num_hidden_layers=2",
    "pretrain.data.split=train[:64]",
    "sft.data=recipes/data/arith_qa",
    "eval.data.split=test[:8]",
    "harness.limit=8",
]


def test_quickstart_runs_then_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "qs"
    result = runner.invoke(app, ["run", "quickstart", f"output_dir={out}", *QUICK])
    assert result.exit_code == 0, result.output
    assert "run completed" in result.output and "pretrained" in result.output and "exact_match" in result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"pretrain", "sft", "eval", "harness"}
    assert set(metrics["eval"]) == {"pretrained", "sft"} and metrics["eval"]["sft"]["examples"] == 8
    assert metrics["harness"]["sft"]["examples"] == 16  # 8 of each task
    assert {"tunelab_arith/exact_match,first-number", "tunelab_arith_mc/acc"} <= set(metrics["harness"]["sft"])
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    assert (out / "sft" / "adapter_config.json").exists() and (out / "eval" / "predictions-sft.jsonl").exists()

    again = runner.invoke(app, ["run", "quickstart", f"output_dir={out}", *QUICK])
    assert again.exit_code == 2 and "finished run" in again.output
    resumed = runner.invoke(app, ["run", "quickstart", f"output_dir={out}", *QUICK, "--resume"])
    assert resumed.exit_code == 0 and resumed.output.count("skipped") == 4


def test_interrupted_run_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tmp_path / "pre.yaml"
    training = tiny_training(max_steps=150, save_strategy="steps", save_steps=10, logging_steps=50)
    recipe.write_text(
        yaml.safe_dump(
            {
                "output_dir": str(out),
                "stages": {
                    "pretrain": {
                        "stage": "pretrain",
                        "data": CORPUS,
                        "tokenizer": {"vocab_size": 300},
                        "config": TINY_LLAMA,
                        "training": training,
                    }
                },
            }
        )
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [*TUNELAB, "run", str(recipe)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    deadline = time.time() + 120
    while not list((out / "pretrain").glob("checkpoint-*/trainer_state.json")) and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    time.sleep(0.2)  # the signal may land mid-save of a later checkpoint: resume must skip a torn one
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "continue it with --resume" in output
    manifest = json.loads((out / "run.json").read_text())
    assert manifest["status"] == "interrupted" and manifest["stages"]["pretrain"]["status"] == "interrupted"
    assert json.loads((out / "pretrain" / "stage.json").read_text())["status"] == "interrupted"

    changed = runner.invoke(app, ["run", str(recipe), "--resume", "training.learning_rate=0.5"])
    assert changed.exit_code == 2 and "recipe changed since it was interrupted" in changed.output
    # Its checkpoints hold one process's RNG state and data position: 2 processes cannot continue them.
    wider = runner.invoke(app, ["launch", "--num-processes", "2", str(recipe), "--resume"])
    assert wider.exit_code == 2, wider.output
    assert "cannot resume stage 'pretrain' on 2 process(es): it was interrupted running on 1" in wider.output
    assert "resume with `tunelab run ... --resume`, or pass --overwrite" in wider.output

    resumed = subprocess.run([*TUNELAB, "run", str(recipe), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    stage = json.loads((out / "pretrain" / "stage.json").read_text())
    assert stage["status"] == "completed" and stage["metrics"]["global_step"] == 150
    assert 10 <= stage["metrics"]["resumed_from_step"] < 150
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
