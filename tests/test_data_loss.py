"""Nothing finished is lost: each test is a path that once deleted work, and now must not."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from tests.helpers import QA_TEST, QA_TRAIN, fails, tiny_training
from tunelab.cli.app import app

runner = CliRunner()
CLI = [sys.executable, "-m", "tunelab.cli.app", "run"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
# Long enough that a signal at the first checkpoint comes mid-training; a checkpoint every 2 steps.
LONG = ["sft.training.max_steps=400", "sft.training.save_strategy=steps", "sft.training.save_steps=2"]


def sft_recipe(tmp_path: Path, tiny_lm: Path, out: Path, then_eval: bool = False, lora: bool = True) -> Path:
    stage = {"stage": "sft", "model": str(tiny_lm), "data": QA_TRAIN, "training": tiny_training()}
    stage |= {"lora": {"r": 4}} if lora else {}
    stages = {"sft": stage}
    if then_eval:  # a later stage built on sft's model
        data = {**QA_TEST, "split": "test[:2]"}
        stages["eval"] = {"stage": "eval", "model": "${sft}", "data": data, "generation": {"max_new_tokens": 2}}
    path = tmp_path / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(out), "stages": stages}, sort_keys=False))
    return path


def signal_when(args: list[str], sig: int, ready: Callable[[], bool], prelude: str = "") -> tuple[int, str]:
    """Start the CLI, send `sig` as soon as `ready()` (a file has appeared), return its exit code and output."""
    command = [sys.executable, "-c", prelude + "from tunelab.cli.app import main; main()", *args] if prelude else args
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()[0]  # still running: the signal comes mid-run
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=180)
    return proc.returncode, out


def checkpointed(stage_dir: Path) -> Callable[[], bool]:
    return lambda: any(stage_dir.glob("checkpoint-*/trainer_state.json"))


def hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".replaced-" in p.name)


def status(stage_dir: Path) -> str:
    return json.loads((stage_dir / "stage.json").read_text())["status"]


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


# SIGTERM takes the same restore path as Ctrl-C (~20 s more): `make test-all`; the default suite keeps SIGINT here
# and SIGTERM's own handling in test_fault_tolerance.
@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_interrupting_an_overwrite_puts_the_previous_run_back(tmp_path: Path, tiny_lm: Path, sig: int) -> None:
    """Path 1: Ctrl-C (or SIGTERM) in the first stage of --overwrite used to delete the finished run."""
    recipe, out, weights = finished_run(tmp_path, tiny_lm)
    code, output = signal_when([*CLI, str(recipe), "--overwrite", *LONG], sig, checkpointed(out / "sft"))
    assert code == 128 + sig, output
    assert f"the previous run in {out} was restored" in output and "is back as it was" in output
    assert "--resume" not in output.splitlines()[-1]
    assert (out / "sft" / "adapter_model.safetensors").read_bytes() == weights
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    assert status(out / "sft") == "completed" and not list((out / "sft").glob("checkpoint-*"))
    assert not hidden(tmp_path)


def test_kill_9_during_an_overwrite_then_the_next_command_restores(tmp_path: Path, tiny_lm: Path) -> None:
    """Path 2: kill -9 in the first stage of --overwrite used to leave the old run hidden for good."""
    recipe, out, weights = finished_run(tmp_path, tiny_lm)
    signal_when([*CLI, str(recipe), "--overwrite", *LONG], signal.SIGKILL, checkpointed(out / "sft"))
    assert len(hidden(tmp_path)) == 1  # where the finished run waits
    fails(["validate", str(recipe)], f"the run it was replacing is set aside in '{tmp_path / hidden(tmp_path)[0]}'")
    resumed = runner.invoke(app, ["run", str(recipe), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert f"restored the previous run in '{out}'" in resumed.output
    assert (out / "sft" / "adapter_model.safetensors").read_bytes() == weights
    assert json.loads((out / "run.json").read_text())["status"] == "completed"
    assert not hidden(tmp_path) and not list((out / "sft").glob("checkpoint-*"))


def finished_pipeline(tmp_path: Path, tiny_lm: Path) -> tuple[Path, Path, bytes]:
    out = tmp_path / "run"
    recipe = sft_recipe(tmp_path, tiny_lm, out, then_eval=True)
    done = runner.invoke(app, ["run", str(recipe)])
    assert done.exit_code == 0, done.output
    (out / "sft" / "notes.txt").write_text("mine")  # a user's file in a stage folder
    return recipe, out, (out / "sft" / "adapter_model.safetensors").read_bytes()


def test_an_interrupted_from_puts_the_stage_back_and_keeps_user_files(tmp_path: Path, tiny_lm: Path) -> None:
    """Path 7: --from deleted the stage folder up front (user files too), and an interruption left later
    stages 'completed' on a base that was gone."""
    recipe, out, weights = finished_pipeline(tmp_path, tiny_lm)
    code, output = signal_when([*CLI, str(recipe), "--from", "sft", *LONG], signal.SIGINT, checkpointed(out / "sft"))
    assert code == 130, output
    assert "its previous files were put back" in output
    assert (out / "sft" / "notes.txt").read_text() == "mine"
    assert (out / "sft" / "adapter_model.safetensors").read_bytes() == weights
    assert status(out / "sft") == "completed" and status(out / "eval") == "completed"  # as before the --from
    assert not hidden(out) and not list((out / "sft").glob("checkpoint-*"))


def test_from_replaces_only_what_tunelab_wrote(tmp_path: Path, tiny_lm: Path) -> None:
    """Path 7, run to the end: the stage's files are replaced, the user's stay, nothing is left aside."""
    recipe, out, weights = finished_pipeline(tmp_path, tiny_lm)
    again = runner.invoke(app, ["run", str(recipe), "--from", "sft", "sft.training.learning_rate=0.01"])
    assert again.exit_code == 0, again.output
    assert (out / "sft" / "notes.txt").read_text() == "mine"
    assert (out / "sft" / "adapter_model.safetensors").read_bytes() != weights
    assert status(out / "sft") == "completed" and status(out / "eval") == "completed" and not hidden(out)


def test_kill_9_during_from_marks_later_stages_and_the_next_command_restores(tmp_path: Path, tiny_lm: Path) -> None:
    """Path 7, killed outright: the later stage is no longer 'completed', and the stage comes back."""
    recipe, out, weights = finished_pipeline(tmp_path, tiny_lm)
    signal_when([*CLI, str(recipe), "--from", "sft", *LONG], signal.SIGKILL, checkpointed(out / "sft"))
    assert status(out / "eval") != "completed"  # marked before sft started again
    assert len(hidden(out)) == 1 and (out / "sft" / "notes.txt").read_text() == "mine"
    resumed = runner.invoke(app, ["run", str(recipe), "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert "restored stage 'sft'" in resumed.output
    assert (out / "sft" / "adapter_model.safetensors").read_bytes() == weights
    assert (out / "sft" / "notes.txt").read_text() == "mine"
    assert status(out / "eval") == "completed" and not hidden(out)


# The tokenizer's save waits, once the model's files are written: a kill then tears the stage's final save.
SLOW_TOKENIZER_SAVE = """
import os, pathlib, time
from transformers import tokenization_utils_base as t
def _save(self, *args, **kwargs):
    pathlib.Path(os.environ["SAVING"]).touch()
    time.sleep(600)
t.PreTrainedTokenizerBase.save_pretrained = _save
"""


def test_kill_9_during_a_stage_save_does_not_wedge_the_run(tmp_path: Path, tiny_lm: Path) -> None:
    """Path 8: a kill between the model's config and its tokenizer left a folder every command refused."""
    out = tmp_path / "torn"
    recipe = sft_recipe(tmp_path, tiny_lm, out, then_eval=True, lora=False)
    saving = tmp_path / "saving"
    ENV["SAVING"] = str(saving)
    try:
        signal_when(["run", str(recipe)], signal.SIGKILL, saving.exists, prelude=SLOW_TOKENIZER_SAVE)
    finally:
        del ENV["SAVING"]
    assert (out / "sft" / "config.json").is_file() and not (out / "sft" / "tokenizer.json").exists()  # torn
    for args in (["--from", "sft"], ["--overwrite"]):  # the checks no longer refuse the ways out
        checked = runner.invoke(app, ["validate", str(recipe), *args])
        assert checked.exit_code == 0, (args, checked.output)
    done = runner.invoke(app, ["run", str(recipe), "--resume"])
    assert done.exit_code == 0, done.output
    assert (out / "sft" / "tokenizer.json").is_file() and status(out / "eval") == "completed"


def test_output_dir_inside_a_stage_folder_is_refused(tmp_path: Path, tiny_lm: Path) -> None:
    """Path 6: a run inside another run's stage folder is deleted when that stage runs again."""
    _, out, _ = finished_run(tmp_path, tiny_lm)
    inner = sft_recipe(tmp_path, tiny_lm, out / "sft" / "inner")
    fails(["validate", str(inner)], f"output_dir '{out / 'sft' / 'inner'}' is inside stage folder '{out / 'sft'}'")
    assert not (out / "sft" / "inner").exists()


@pytest.mark.parametrize("label", ["../victim/notes", "a/b", "", ".hidden", "x" * 101])
def test_eval_labels_must_be_file_name_parts(tmp_path: Path, tiny_lm: Path, label: str) -> None:
    """Path 5: a label names predictions-LABEL.jsonl; `../victim/notes` wrote outside the run folder."""
    stage = {"stage": "eval", "models": {label: str(tiny_lm)}, "data": QA_TEST}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "run"), "stages": {"eval": stage}}))
    fails(["validate", str(path)], "stages.eval.models' has the label")


def test_merge_overwrite_replaces_only_a_merge_output(tmp_path: Path, tiny_lm: Path) -> None:
    """Path 3: --overwrite emptied any folder with a config.json (a thesis beside a model)."""
    _, out, _ = finished_run(tmp_path, tiny_lm)
    thesis = tmp_path / "thesis"
    (thesis / "data").mkdir(parents=True)
    (thesis / "config.json").write_text("{}")
    (thesis / "thesis.tex").write_text("chapter 1")
    fails(["merge", str(out / "sft"), str(thesis), "--overwrite"], "not a model folder that `tunelab merge` wrote")
    assert sorted(p.name for p in thesis.iterdir()) == ["config.json", "data", "thesis.tex"]
    merged = tmp_path / "merged"
    for args in ([], ["--overwrite"]):  # a merge output: replaced by the next merge
        result = runner.invoke(app, ["merge", str(out / "sft"), str(merged), *args])
        assert result.exit_code == 0, result.output
    (merged / "README.md").write_text("mine")
    fails(["merge", str(out / "sft"), str(merged), "--overwrite"], "holds 'README.md', which `tunelab merge` did not")
    assert (merged / "README.md").read_text() == "mine"


def test_merge_never_lands_on_its_base_its_adapter_or_a_stage(tmp_path: Path, tiny_lm: Path) -> None:
    """Path 4: merging onto the adapter's own base (a run's stage folder) replaced it under the adapter."""
    base_run = tmp_path / "base_run"
    shutil.copytree(tiny_lm.parent, base_run)
    base = base_run / tiny_lm.name
    config = (base / "config.json").read_bytes()
    adapter_run = tmp_path / "run"
    done = runner.invoke(app, ["run", str(sft_recipe(tmp_path, base, adapter_run))])
    assert done.exit_code == 0, done.output
    adapter = adapter_run / "sft"
    fails(["merge", str(adapter), str(base), "--overwrite"], "is the adapter's base model")
    fails(["merge", str(adapter), str(base / "merged")], "is the adapter's base model")
    fails(["merge", str(adapter), str(adapter), "--overwrite"], "is the adapter's folder")
    fails(["merge", str(adapter), str(adapter_run), "--overwrite"], "is the adapter's folder, or holds it")
    (tmp_path / "other").mkdir()
    shutil.copytree(adapter, tmp_path / "other" / "sft")
    fails(["merge", str(tmp_path / "other" / "sft"), str(adapter / "merged")], f"inside stage folder '{adapter}'")
    fails(["merge", str(adapter), str(tmp_path / "other"), "--overwrite"], "holds a stage folder of a tunelab run")
    record = json.loads((tmp_path / "other" / "sft" / "stage.json").read_text())
    (tmp_path / "other" / "sft" / "stage.json").write_text(json.dumps({**record, "status": "running"}))  # killed
    fails(["merge", str(tmp_path / "other" / "sft"), str(tmp_path / "m")], "is a stage that has not finished")
    assert (base / "config.json").read_bytes() == config and (adapter / "adapter_config.json").is_file()


def test_a_set_aside_killed_half_way_is_put_back_whole(tmp_path: Path) -> None:
    """A kill between two renames of a set-aside: the next command puts back what moved, deletes nothing."""
    from tunelab.core import runs

    out = tmp_path / "run"
    (out / "sft" / "checkpoint-2").mkdir(parents=True)
    (out / "sft" / "stage.json").write_text(json.dumps({"status": "completed", "entries": ["checkpoint-2"]}))
    (out / "sft" / "notes.txt").write_text("mine")
    (out / "run.json").write_text(json.dumps({"tool": "tunelab", "status": "completed", "stages": {"sft": {}}}))
    (out / "recipe.yaml").write_text("stages: {}")
    entries = runs.own_entries(out)
    assert entries == ["recipe.yaml", "run.json", "sft/checkpoint-2", "sft/stage.json"]  # not notes.txt
    backup = runs.set_aside(out, entries[:2])  # as if killed after the first two renames
    runs.write_json(backup / runs.BACKUP_INDEX, entries)
    assert runs.recover(out) == [
        f"restored the previous run in '{out}': the --overwrite run that replaced it stopped before its first stage "
        "finished"
    ]
    assert runs.own_entries(out) == entries and (out / "sft" / "notes.txt").read_text() == "mine"
    assert not backup.exists()
