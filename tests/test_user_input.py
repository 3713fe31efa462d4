"""User input never gets a traceback: each case below is one line naming the problem and the fix
(exit code 2), an `interrupted` (130), or, for tunelab's own bugs, one line naming the traceback file (1)."""

from __future__ import annotations

import json
import math
import shutil
import signal
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

import tunelab
from tests.helpers import CORPUS, QA_TRAIN, TINY_LLAMA, fails, tiny_training, write
from tunelab.cli.app import app

runner = CliRunner()


def sft(model: str, **extra) -> dict:
    return {"stage": "sft", "model": model, "data": QA_TRAIN, "training": tiny_training(), **extra}


def text_recipe(tmp_path: Path, text: str, name: str = "recipe.yaml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


# --- A. tracebacks on user input, and a hang ------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("stage: eval\n1: x\n", r"line 2, column 1: key '1' is read by YAML as 1 \(int\), not a name: quote it"),
        ("stages:\n  yes: {stage: eval}\n", r"key 'yes' is read by YAML as True \(bool\), not a name: quote it"),
        ("stages:\n  null: {stage: eval}\n", r"key 'null' is read by YAML as None \(NoneType\), not a name"),
        ("stage: eval\ngeneration: {1: 2}\n", r"key '1' is read by YAML as 1"),
    ],
)
def test_integer_and_boolean_keys(tmp_path: Path, text: str, message: str) -> None:
    fails(["validate", text_recipe(tmp_path, text)], message)
    with pytest.raises(tunelab.TunelabError, match=r"key True \(bool\) in 'stages' is not a name: quote it"):
        tunelab.recipe_from_dict({"stages": {True: {"stage": "eval"}}})


@pytest.mark.parametrize(
    ("section", "value", "message"),
    [
        ("stage", ["sft"], r"'stage' is \['sft'\] \(list\); set it to one stage kind: pretrain, sft"),
        ("training", 5, r"'stages.sft.training' is 5 \(int\), not a mapping of keys: write it like `training: \{"),
        ("lora", [1], r"'stages.sft.lora' is \[1\] \(list\), not a mapping.*\(or remove it for full fine-tuning\)"),
        ("lora", True, r"'stages.sft.lora' is True \(bool\), not a mapping of keys: write it like `lora: \{r: 8"),
        ("quantization", "4bit", r"'stages.sft.quantization' is '4bit' \(str\), not a mapping"),
    ],
)
def test_sections_of_the_wrong_shape(tmp_path: Path, section: str, value: object, message: str) -> None:
    fails(["validate", str(write(tmp_path, sft("some/model", **{section: value})))], message)


def test_binary_recipe_and_dev_null(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00binary")
    fails(["validate", str(path)], r"is not UTF-8 text \(byte 0x89 at offset 0\): .* save it as UTF-8")
    fails(["validate", "/dev/null"], "recipe '/dev/null' is empty: it needs at least a `stage:` or `stages:`")
    fails(["validate", str(tmp_path)], "is a folder, not a YAML file: name the .yaml file inside it")


def test_paths_longer_than_the_os_allows(tmp_path: Path, tiny_lm: Path) -> None:
    long = "a" * 300
    fails(["validate", str(tmp_path / f"{long}.yaml")], "the recipe path has a file name of 305 bytes, longer than")
    recipe = str(write(tmp_path, sft(str(tiny_lm))))
    fails(["validate", recipe, f"output_dir={tmp_path}/{long}"], r"'output_dir' has a file name of 300 bytes.*shorter")
    fails(["validate", recipe, f"data.path={tmp_path}/{long}.jsonl"], r"'stages.sft.data.path' has a file name of 306")
    fails(["validate", recipe, f"data={'x/' * 3000}"], r"'stages.sft.data' is a path of 6000 characters, longer than")
    fails(["validate", recipe, f"model={long}"], r"'stages.sft.model' has a file name of 300 bytes")


def test_pretrain_config_rejected_by_its_class(tmp_path: Path) -> None:
    config = {**TINY_LLAMA, "hidden_size": 100, "num_attention_heads": 3, "num_key_value_heads": 3}
    path = write(tmp_path, {"stage": "pretrain", "data": CORPUS, "config": config})
    fails(
        ["validate", str(path)],
        r"'stages.pretrain.config' is rejected by LlamaConfig: The hidden size \(100\) is not a multiple of the "
        r"number of attention heads \(3\)",
    )


def test_deepspeed_without_deepspeed(tmp_path: Path, tiny_lm: Path) -> None:
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed here")
    fails(
        ["validate", str(write(tmp_path, sft(str(tiny_lm)))), "training.deepspeed=x.json"],
        r"'stages.sft.training.deepspeed' needs the `deepspeed` package, which is not installed: "
        r"pip install 'tunelab\[deepspeed\]', or remove `deepspeed:`",
    )


def test_compare_on_metrics_that_are_not_a_mapping(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "metrics.json").write_text("[1, 2]")
    fails(["compare", str(tmp_path / "a")], r"metrics.json' holds a JSON list, not \{stage: \{metric: value\}\}")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.json").write_text(json.dumps({"sft": [1, 2]}))
    fails(["compare", str(tmp_path / "b")], r"stage 'sft' holds '\[1, 2\]', not \{metric: value\}")


def test_cp_to_a_read_only_place_or_under_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "file.txt").write_text("a file")
    fails(["cp", "quickstart", str(tmp_path / "file.txt" / "q.yaml")], r"is a file, not a folder; choose another")

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied")  # a read-only mount, even for root

    monkeypatch.setattr(shutil, "copyfile", read_only)
    fails(["cp", "quickstart", str(tmp_path / "q.yaml")], "Permission denied; choose a destination you can write to")


def test_alias_bomb_answers_at_once(tmp_path: Path) -> None:
    # ~600 bytes, 9^9 values once expanded: the `${stage}` scan of a section used to walk them all.
    lines = ['  l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"  l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]" for i in range(1, 9)]
    text = "\n".join(["stage: eval", "model: m", "data: d", "generation:", *lines, ""])

    class Slow(BaseException):
        pass

    def too_slow(signum, frame):
        raise Slow

    previous = signal.signal(signal.SIGALRM, too_slow)
    signal.setitimer(signal.ITIMER_REAL, 10)
    try:
        start = time.monotonic()
        fails(["validate", text_recipe(tmp_path, text)], "expands to more than 200000 values")
        assert time.monotonic() - start < 1
        with pytest.raises(tunelab.TunelabError, match="expands to more than"):
            tunelab.validate(text_recipe(tmp_path, text, "again.yaml"))
    except Slow:
        pytest.fail("validate of a YAML alias bomb still runs after 10 s")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    fails(["validate", text_recipe(tmp_path, "stage: eval\nmodel: &a [*a]\n", "loop.yaml")], "contains itself")


def test_duplicate_keys_are_an_error(tmp_path: Path) -> None:
    text = "stages:\n  a: {stage: eval, model: m, data: d}\n  b: {stage: eval, model: m, data: d}\n  a: {stage: eval}\n"
    fails(
        ["validate", text_recipe(tmp_path, text)],
        r"at line 4, column 3: duplicate key 'a' \(first at line 2\): YAML keeps only the last one; rename or remove",
    )


def test_internal_error_is_one_line_naming_the_traceback_file(monkeypatch: pytest.MonkeyPatch) -> None:
    import tunelab.pipeline

    def bug(*args, **kwargs):
        raise ZeroDivisionError("a bug in tunelab")

    monkeypatch.setattr(tunelab.pipeline, "check", bug)
    result = runner.invoke(app, ["validate", "quickstart"])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and len(lines) == 1, result.output
    assert lines[0].startswith("error: internal error in tunelab (ZeroDivisionError: a bug in tunelab)"), lines
    file = Path(lines[0].split("the full traceback is in ")[1].split(":")[0])
    assert "Traceback" in file.read_text() and "a bug in tunelab" in file.read_text()
    file.unlink()


# --- B. wrong messages and silently accepted values ----------------------------------------------


def test_ctrl_c_during_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    import tunelab.pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tunelab.pipeline, "check", interrupted)
    result = runner.invoke(app, ["validate", "quickstart"])
    assert result.exit_code == 130
    assert result.output.strip() == "interrupted", result.output


def test_broken_jsonl_line_is_named(tmp_path: Path, tiny_lm: Path) -> None:
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "one"}\n{"text": "two"\n{"text": "three"}\n')
    path = write(tmp_path, sft(str(tiny_lm), data=str(data)))
    fails(["validate", str(path)], rf"'{data}' line 2 is not valid JSON \(Expecting ',' delimiter.*fix or remove")


def test_datasets_builder_with_data_files(tmp_path: Path, tiny_lm: Path) -> None:
    data = {"path": "json", "data_files": "recipes/data/arith_qa/train.jsonl", "split": "train[:16]"}
    result = runner.invoke(app, ["validate", str(write(tmp_path, sft(str(tiny_lm), data=data)))])
    assert result.exit_code == 0, result.output
    fails(
        ["validate", str(write(tmp_path, sft(str(tiny_lm), data={"path": "csv", "data_files": "nope.csv"})))],
        "'stages.sft.data.data_files' is 'nope.csv': no such file",
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["training.max_steps=-5"], r"'stages.sft.training.max_steps' is -5, a negative number: set it to 0 or more"),
        (["training.num_train_epochs=-2"], r"'stages.sft.training.num_train_epochs' is -2.0, a negative number"),
        (["training.learning_rate=.nan"], r"'stages.sft.training.learning_rate' is nan: set it to a finite number"),
        (["training.per_device_train_batch_size=0"], r"per_device_train_batch_size' is 0: set it to a positive"),
    ],
)
def test_training_values_out_of_range(tmp_path: Path, args: list[str], message: str) -> None:
    fails(["validate", str(write(tmp_path, sft("some/model"))), *args], message)


def test_negative_counts_on_the_command_line(tmp_path: Path, tiny_lm: Path) -> None:
    path = str(write(tmp_path, sft(str(tiny_lm))))
    fails(["launch", path, "--num-processes", "0", "--dry-run"], "--num-processes is 0: use 1 or more")
    fails(["plan", path, "--devices", "-5"], r"--devices is -5: use the number of devices \(1 or more\)")


def test_launch_dry_run_checks_the_recipe_first(tmp_path: Path, tiny_lm: Path) -> None:
    path = str(write(tmp_path, sft(str(tiny_lm))))
    fails(["launch", path, "training.learnin_rate=1e-4", "--dry-run"], "did you mean 'learning_rate'?")
    result = runner.invoke(app, ["launch", path, "--dry-run"])
    assert result.exit_code == 0 and "accelerate" in result.output, result.output


def test_python_api_takes_what_the_cli_takes(tmp_path: Path) -> None:
    assert tunelab.validate("quickstart", overrides=[f"output_dir={tmp_path / 'q'}"]) == "new"
    with pytest.raises(tunelab.TunelabError, match=r"a recipe must be a mapping \(key: value\), not 5 \(int\)"):
        tunelab.recipe_from_dict(5)
    with pytest.raises(tunelab.TunelabError, match="not None .*: pass a path or a name like 'quickstart'"):
        tunelab.load_recipe(None)
    recipe = tunelab.recipe_from_dict({**sft("m"), "output_dir": tmp_path / "out"})
    assert recipe.output_dir == tmp_path / "out"
    assert yaml.safe_load(recipe.to_yaml())["output_dir"] == str(tmp_path / "out")
    assert math.isfinite(recipe.seed)


def test_usage_errors_are_one_line() -> None:
    fails(["validate", "quickstart", "--nope"], r"No such option: --nope \(see `tunelab validate --help`\)")
    fails(["plan", "quickstart", "--devices", "x"], "Invalid value for '--devices'")
