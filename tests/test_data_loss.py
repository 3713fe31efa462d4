"""Nothing finished is lost: each test is a path that once deleted work, and now must not."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from typer.testing import CliRunner

from tests.conftest import QA_TRAIN, tiny_training
from tunelab.cli import app

runner = CliRunner()


def sft_recipe(tmp_path: Path, tiny_lm: Path, out: Path) -> Path:
    stage = {"stage": "sft", "model": str(tiny_lm), "data": QA_TRAIN, "lora": {"r": 4}, "training": tiny_training()}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(out), "stages": {"sft": stage}}))
    return path


def finished_run(tmp_path: Path, tiny_lm: Path) -> tuple[Path, Path, bytes]:
    out = tmp_path / "run"
    recipe = sft_recipe(tmp_path, tiny_lm, out)
    done = runner.invoke(app, ["run", str(recipe)])
    assert done.exit_code == 0, done.output
    return recipe, out, (out / "sft" / "adapter_model.safetensors").read_bytes()


def test_resume_refuses_a_finished_stage_whose_recipe_changed(tmp_path: Path, tiny_lm: Path) -> None:
    recipe, out, weights = finished_run(tmp_path, tiny_lm)
    for command in ("validate", "run"):
        result = runner.invoke(app, [command, str(recipe), "--resume", "training.learning_rate=0.5"])
        assert result.exit_code == 2, result.output
        assert "stage 'sft' finished, and its recipe changed since" in result.output
        assert "learning_rate" in result.output and "--from sft" in result.output
    assert (out / "sft" / "adapter_model.safetensors").read_bytes() == weights
    again = runner.invoke(app, ["run", str(recipe), "--from", "sft", "training.learning_rate=0.5"])
    assert again.exit_code == 0, again.output  # the way it names works


def test_overwrite_puts_the_old_run_back_when_the_new_one_fails(tmp_path: Path, tiny_lm: Path) -> None:
    recipe, out, weights = finished_run(tmp_path, tiny_lm)
    (out / "notes.txt").write_text("mine")  # not tunelab's: never moved or deleted
    failed = runner.invoke(app, ["run", str(recipe), "--overwrite", "sft.lora.target_modules=[nope]"])
    assert failed.exit_code != 0
    assert (out / "sft" / "adapter_model.safetensors").read_bytes() == weights
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.replaced-")]  # nothing left aside
    replaced = runner.invoke(app, ["run", str(recipe), "--overwrite", "sft.training.learning_rate=0.01"])
    assert replaced.exit_code == 0, replaced.output
    assert (out / "sft" / "adapter_model.safetensors").read_bytes() != weights
    assert (out / "notes.txt").read_text() == "mine"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".run.replaced-")]


def test_overwrite_never_empties_a_folder_tunelab_did_not_make(tmp_path: Path, tiny_lm: Path) -> None:
    out = tmp_path / "thesis"
    (out / "data").mkdir(parents=True)
    (out / "run.json").write_text('{"tool": "other"}')
    (out / "thesis.tex").write_text("chapter 1")
    recipe = sft_recipe(tmp_path, tiny_lm, out)
    result = runner.invoke(app, ["run", str(recipe), "--overwrite"])
    assert result.exit_code == 2 and "holds no tunelab run" in result.output
    assert sorted(p.name for p in out.iterdir()) == ["data", "run.json", "thesis.tex"]
    (out / "run.json").write_text("[1, 2]")  # a JSON list: no run either, and no traceback
    result = runner.invoke(app, ["run", str(recipe), "--overwrite"])
    assert result.exit_code == 2 and "holds no tunelab run" in result.output


def test_merge_leaves_folders_it_did_not_make(tmp_path: Path, tiny_lm: Path) -> None:
    _, out, _ = finished_run(tmp_path, tiny_lm)
    merged = tmp_path / "merged"
    mine = tmp_path / "merged.tmp"
    mine.mkdir()
    (mine / "keep.txt").write_text("mine")
    result = runner.invoke(app, ["merge", str(out / "sft"), str(merged)])
    assert result.exit_code == 0, result.output
    assert (mine / "keep.txt").read_text() == "mine" and (merged / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged.")]  # its own temp folder is gone
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "a.txt").write_text("mine")
    refused = runner.invoke(app, ["merge", str(out / "sft"), str(tmp_path / "notes"), "--overwrite"])
    assert refused.exit_code == 2 and "not a model folder" in refused.output
    assert (tmp_path / "notes" / "a.txt").read_text() == "mine"
    onto_file = runner.invoke(app, ["merge", str(out / "sft"), str(mine / "keep.txt")])
    assert onto_file.exit_code == 2 and "is a file" in onto_file.output


def test_ctrl_c_during_the_checks_of_a_run_claims_no_run(tmp_path: Path, tiny_lm: Path, monkeypatch) -> None:
    from tunelab import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_check", interrupted)
    result = runner.invoke(app, ["run", str(sft_recipe(tmp_path, tiny_lm, tmp_path / "run"))])
    assert result.exit_code == 130
    assert "before the run started: nothing was written" in result.output and "--resume" not in result.output
    assert not (tmp_path / "run").exists()
