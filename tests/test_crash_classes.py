"""Crash classes: a user's code that exits, data values of the wrong type past the first rows, models of
the wrong kind, machine conditions, and the Python API. Each is one line (exit 2 for input, 1 for a bug)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

import tunelab
from tests.helpers import fails, tiny_training, write
from tunelab.cli.app import app

runner = CliRunner()
ROOT = Path(__file__).parents[1]
QA = {"path": str(ROOT / "recipes/data/arith_qa"), "split": "train[:8]"}


def one_line(result, code: int) -> str:
    """The single non-empty output line of a CLI call that exited with `code`."""
    output = result.output.strip()
    lines = [line for line in output.splitlines() if line.strip()]
    assert result.exit_code == code, f"{result.exit_code}: {output}\n{result.exception!r}"
    assert "Traceback" not in output, output
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    return lines[0]


# --- 1. the CLI's last guard --------------------------------------------------------------------


EXITING_REWARD = """import sys

def at_once(completions, **kwargs):
    sys.exit(3)

def in_training(completions, trainer_state=None, **kwargs):
    if trainer_state is not None:  # validate's probe passes None; the trainer passes its state
        sys.exit("bye")
    return [0.0 for _ in completions]
"""


@pytest.fixture
def exiting_reward(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    (tmp_path / "exiting_reward.py").write_text(EXITING_REWARD)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("exiting_reward", None)
    return tmp_path


def grpo(model: str, reward: str, **training) -> dict:
    return {
        "stage": "grpo",
        "model": model,
        "data": {"path": str(ROOT / "recipes/data/arith_qa"), "split": "train[:8]"},
        "rewards": [reward],
        "training": {
            "max_steps": 1,
            "per_device_train_batch_size": 4,
            "num_generations": 4,
            "max_completion_length": 4,
            "logging_steps": 1,
            "save_strategy": "no",
            "report_to": "none",
            **training,
        },
    }


def test_reward_function_calling_sys_exit_at_validate(exiting_reward: Path, tiny_lm: Path) -> None:
    recipe = write(exiting_reward, {"stages": {"grpo": grpo(str(tiny_lm), "exiting_reward:at_once")}})
    fails(
        ["validate", str(recipe)],
        r"'stages.grpo.rewards\[0\]': reward function 'exiting_reward:at_once' called sys.exit\(3\), which would "
        r"end the run: return a score",
    )


def test_reward_function_calling_sys_exit_during_the_run(exiting_reward: Path, tiny_lm: Path) -> None:
    recipe = write(exiting_reward, {"stages": {"grpo": grpo(str(tiny_lm), "exiting_reward:in_training")}})
    result = runner.invoke(app, ["run", str(recipe)])
    errors = ["error: " + line.split("error: ", 1)[1] for line in result.output.splitlines() if "error: " in line]
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert errors == [
        "error: 'stages.grpo.rewards[0]': reward function 'exiting_reward:in_training' called sys.exit('bye'), "
        "which would end the run: return a score (or None) for each completion, or raise an exception to stop "
        "with its message"
    ], result.output


def test_sys_exit_from_other_code_is_one_line_naming_where(monkeypatch: pytest.MonkeyPatch) -> None:
    import tunelab.pipeline

    def exits(*args, **kwargs):
        sys.exit(4)

    monkeypatch.setattr(tunelab.pipeline, "check", exits)
    line = one_line(runner.invoke(app, ["validate", "quickstart"]), 1)
    assert line.startswith("error: internal error in tunelab (sys.exit(4) was called in exits ("), line
    file = Path(line.split("the full traceback is in ")[1].split(":")[0])
    assert "SystemExit: 4" in file.read_text()
    file.unlink()


def test_abort_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    import typer

    import tunelab.pipeline

    def aborts(*args, **kwargs):
        raise typer.Abort()

    monkeypatch.setattr(tunelab.pipeline, "check", aborts)
    result = runner.invoke(app, ["validate", "quickstart"])
    assert result.exit_code == 1 and result.output.strip() == "aborted", (result.output, result.exception)


# --- 2. data values of the wrong type past the rows validate reads --------------------------------


def rows_file(tmp_path: Path, rows: list[dict], name: str = "data.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


PAIRS = [{"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no"} for i in range(12)]
PROMPTS = [{"prompt": f"Q{i}?", "completion": " 1"} for i in range(12)]


def row9(rows: list[dict], **values) -> list[dict]:
    """`rows` with row 9 (after the rows validate's probes read) changed."""
    return [{**row, **values} if i == 9 else row for i, row in enumerate(rows)]


@pytest.mark.parametrize(
    ("stage", "rows", "message"),
    [
        ("kto", row9(PAIRS, chosen=5), r"column 'chosen' mixes types \(row 9 is 5, int\): every row must hold text"),
        ("kto", row9(PAIRS, rejected=None), r"column 'rejected' is null \(missing\) in 1 row\(s\), the first row 9"),
        ("orpo", [{**r, "chosen": 3} for r in PAIRS], r"column 'chosen' holds integers \(e.g. row 0 is 3\)"),
        ("orpo", row9(PAIRS, chosen=""), r"column 'chosen' is blank in 1 row\(s\), the first row 9"),
        ("cpo", row9(PAIRS, chosen=None), r"column 'chosen' is null \(missing\) in 1 row\(s\), the first row 9"),
        ("cpo", [{**r, "chosen": ["a", "b"]} for r in PAIRS], "column 'chosen' holds lists of strings, not chat"),
        ("grpo", row9(PROMPTS, prompt=7), r"column 'prompt' mixes types \(row 9 is 7, int\)"),
        ("grpo", row9(PROMPTS, prompt=" "), r"column 'prompt' is blank in 1 row\(s\), the first row 9"),
        ("rloo", row9(PROMPTS, prompt=None), r"column 'prompt' is null \(missing\) in 1 row\(s\), the first row 9"),
        ("rloo", [{**r, "prompt": None} for r in PROMPTS], r"column 'prompt' is null \(missing\) in every row"),
    ],
)
def test_data_values_of_the_wrong_type_in_any_row(
    tmp_path: Path, tiny_lm: Path, stage: str, rows: list[dict], message: str
) -> None:
    cfg = {"stage": stage, "model": str(tiny_lm), "data": rows_file(tmp_path, rows)}
    if stage in ("grpo", "rloo"):
        cfg["rewards"] = ["tunelab.rewards:exact_match"]
    fails(["validate", str(write(tmp_path, {"stages": {stage: cfg}}))], rf"'stages.{stage}.data' {message}")


def test_kto_labels_checked_in_every_row(tmp_path: Path, tiny_lm: Path) -> None:
    rows = [{"prompt": f"Q{i}?", "completion": " 1", "label": i % 2 == 0} for i in range(12)]

    def validate(data: list[dict]) -> list[str]:
        cfg = {"stage": "kto", "model": str(tiny_lm), "data": rows_file(tmp_path, data)}
        return ["validate", str(write(tmp_path, {"stages": {"kto": cfg}}))]

    fails(validate(row9(rows, label="yes")), r"column 'label' holds str values \('yes'\): KTO labels are true")
    fails(validate(row9(rows, completion=None)), r"column 'completion' is null \(missing\) in 1 row\(s\), the first")
    fails(validate([{**r, "label": True} for r in rows]), "every 'label' is true: KTO learns from desirable and")


# --- 3. models of the wrong kind --------------------------------------------------------------------


@pytest.fixture(scope="module")
def classifier(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path) -> Path:
    """The tiny LM's backbone under a one-output classification head: a reward model's shape."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    config = AutoConfig.from_pretrained(tiny_lm)
    config.num_labels = 1
    path = tmp_path_factory.mktemp("classifier") / "reward"
    LlamaForSequenceClassification(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_lm).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def llava(tmp_path_factory: pytest.TempPathFactory, tiny_lm: Path) -> Path:
    from tests.helpers import TINY_VISION
    from tunelab.vision.models import build_llava

    return build_llava({"path": str(tiny_lm)}, tmp_path_factory.mktemp("llava") / "vlm", TINY_VISION)


IMAGE_TEXT = r"is an image\+text model \(LlavaForConditionalGeneration\): {role} a text-only causal LM"
CLASSIFIER = r"is a classifier \(LlamaForSequenceClassification, like a reward model\), not a causal LM: {role} a"


@pytest.mark.parametrize("stage", ["kto", "orpo", "cpo"])
@pytest.mark.parametrize("kind", ["llava", "classifier"])
def test_policy_of_the_wrong_kind(tmp_path: Path, request: pytest.FixtureRequest, stage: str, kind: str) -> None:
    model = request.getfixturevalue(kind)
    cfg = {"stage": stage, "model": str(model), "data": {"path": str(ROOT / "recipes/data/arith_pref")}}
    message = (IMAGE_TEXT if kind == "llava" else CLASSIFIER).format(role=f"the {stage} stage trains")
    fails(["validate", str(write(tmp_path, {"stages": {stage: cfg}}))], rf"'stages.{stage}.model' {message}")


@pytest.mark.parametrize("kind", ["llava", "classifier"])
def test_teacher_and_harness_model_of_the_wrong_kind(
    tmp_path: Path, request: pytest.FixtureRequest, tiny_lm: Path, kind: str
) -> None:
    model = request.getfixturevalue(kind)
    message = IMAGE_TEXT if kind == "llava" else CLASSIFIER
    distill = {"stage": "distill", "model": str(tiny_lm), "teacher": str(model), "data": QA}
    fails(
        ["validate", str(write(tmp_path, {"stages": {"distill": distill}}))],
        "'stages.distill.teacher' " + message.format(role="the teacher of a distill stage is"),
    )
    fails(
        ["eval", str(model), "--tasks", "tunelab_arith_mc", "--output-dir", str(tmp_path / "eval")],
        "'stages.eval.model' " + message.format(role="lm_eval scores"),
    )
    assert not (tmp_path / "eval").exists()


def test_a_reward_stage_named_as_a_policy(tmp_path: Path, tiny_lm: Path) -> None:
    stages = {
        "reward": {"stage": "reward", "model": str(tiny_lm), "data": {"path": str(ROOT / "recipes/data/arith_pref")}},
        "kto": {"stage": "kto", "model": "${reward}", "data": {"path": str(ROOT / "recipes/data/arith_pref")}},
    }
    fails(
        ["validate", str(write(tmp_path, {"stages": stages}))],
        r"'stages.kto.model' is \$\{reward\}, a `reward` stage, which makes a classifier, not a causal LM: the kto",
    )


# --- 4. machine conditions ----------------------------------------------------------------------------


def sft(model: Path, **training) -> dict:
    return {"stage": "sft", "model": str(model), "data": QA, "training": tiny_training(**training)}


def test_run_folder_whose_lock_cannot_be_opened(tmp_path: Path, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import builtins

    from tunelab.core import runs

    def read_only(file, *args, **kwargs):
        if str(file).endswith(runs.LOCK):
            raise PermissionError(13, "Permission denied", str(file))  # a read-only file or mount, even for root
        return builtins.open(file, *args, **kwargs)

    monkeypatch.setattr(runs, "open", read_only, raising=False)
    recipe = write(tmp_path, {"stages": {"sft": sft(tiny_lm)}})
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert result.output.strip().splitlines()[-1] == (  # after the run's header line
        f"error: '{tmp_path / 'out' / runs.LOCK}': Permission denied (file permissions, or a read-only mount): fix "
        "its permissions, or choose another path (another output_dir for a run folder)"
    )


@pytest.mark.parametrize(
    "error",
    [
        OSError(28, "No space left on device", "/runs/x/sft/checkpoint-2/optimizer.pt"),
        RuntimeError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left" })'),
    ],
)
def test_disk_that_fills_during_a_run(monkeypatch: pytest.MonkeyPatch, error: Exception) -> None:
    import tunelab.pipeline

    def fills(*args, **kwargs):
        raise error

    monkeypatch.setattr(tunelab.pipeline, "check", fills)
    line = one_line(runner.invoke(app, ["validate", "quickstart"]), 2)
    where = " writing '/runs/x/sft/checkpoint-2/optimizer.pt'" if isinstance(error, OSError) else ""
    assert line == (
        f"error: the disk is full{where} (No space left on device): free space there, or choose an output_dir on "
        "another disk; a run it stopped is marked failed: continue it with --resume"
    )


def test_disk_plan_in_units_that_show_it(tmp_path: Path, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 2 * 10**6, 2 * 10**6))
    recipe = write(tmp_path, {"stages": {"sft": sft(tiny_lm, save_strategy="steps", save_steps=1)}})
    fails(
        ["validate", str(recipe)],
        r"output_dir '.*': 2 MB free, but the run plans \d+(\.\d+)? MB of checkpoints, models and logs "
        r"\(most in stage 'sft': \d+(\.\d+)? MB\)",
    )


def test_chat_on_a_closed_stdin_an_empty_prompt_and_two_quantizations(tiny_lm: Path) -> None:
    import os
    import subprocess

    closed = subprocess.run(
        [sys.executable, "-m", "tunelab.cli.app", "chat", str(tiny_lm)],
        preexec_fn=lambda: os.close(0),  # `tunelab chat MODEL <&-`
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert closed.returncode == 0 and "Traceback" not in closed.stderr, closed.stderr
    assert closed.stderr.strip().splitlines()[-1] == (
        "stdin is closed: nothing to chat about (give --prompt TEXT for one answer)"
    )
    fails(["chat", str(tiny_lm), "--prompt", " "], "--prompt is empty: give the text for the model to answer")
    fails(["chat", str(tiny_lm), "--load-in-4bit", "--load-in-8bit"], "--load-in-4bit and --load-in-8bit are both")


# --- 5. the Python API ------------------------------------------------------------------------------


def test_chat_after_validate_twice_in_one_process(tmp_path: Path, tiny_lm: Path) -> None:
    """README's order: validate (which imports every stage and what they use), then chat, then chat again."""
    import importlib

    assert tunelab.validate("quickstart", overrides=[f"output_dir={tmp_path / 'q'}"]) == "new"
    importlib.import_module("tunelab.models.chat_templates")
    first = tunelab.chat(tiny_lm, "1 + 1 =", max_new_tokens=2)
    second = tunelab.chat(str(tiny_lm), "1 + 1 =", max_new_tokens=2)
    assert isinstance(first, str) and first == second  # greedy: the same reply
    assert callable(tunelab.chat) and callable(tunelab.generate)


def test_no_submodule_hides_an_api_function() -> None:
    """Importing `tunelab.NAME` sets the package's attribute NAME to the module: no API function may share it."""
    import importlib.util

    clashes = [name for name in tunelab.__all__ if importlib.util.find_spec(f"tunelab.{name}") is not None]
    assert clashes == []


def test_generate_takes_one_string_as_one_prompt(tiny_lm: Path) -> None:
    one = tunelab.generate(str(tiny_lm), "hello", max_new_tokens=2)
    assert isinstance(one, str)
    assert tunelab.generate(str(tiny_lm), ["hello"], max_new_tokens=2) == [one]
    assert tunelab.generate(str(tiny_lm), [], max_new_tokens=2) == []


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda m: tunelab.chat(m, 5), r"prompt must be a string \(the text for the model to answer\), not 5 \(int\)"),
        (lambda m: tunelab.chat(m, None), r"prompt must be a string .*not None \(NoneType\)"),
        (lambda m: tunelab.chat(m, ["a"]), r"prompt must be a string .*not \['a'\] \(list\)"),
        (lambda m: tunelab.chat(m, " "), "prompt is empty: give the text for the model to answer"),
        (lambda m: tunelab.chat(m, "hi", history="hi"), r"history must be a list of \{'role': ..., 'content': ...}"),
        (lambda m: tunelab.chat(5, "hi"), r"model must be a model folder, .* \(a string or a Path\), not 5 \(int\)"),
        (lambda m: tunelab.chat(None, "hi"), r"model must be .*not None \(NoneType\)"),
        (lambda m: tunelab.generate(m, None), r"prompts must be a list of strings \(or one string\), not None"),
        (lambda m: tunelab.generate(m, 5), r"prompts must be a list of strings \(or one string\), not 5 \(int\)"),
        (lambda m: tunelab.generate(m, ["a", 1]), r"prompts\[1\] must be a string .*not 1 \(int\)"),
        (lambda m: tunelab.generate(m, ["a"], batch_size=0), r"batch_size must be a positive integer, not 0"),
        (lambda m: tunelab.merge(5, "out"), r"adapter_dir must be the folder of a LoRA adapter .*not 5 \(int\)"),
        (lambda m: tunelab.merge(m, None), r"out_dir must be the folder to save the merged model in .*not None"),
        (lambda m: tunelab.validate("quickstart", from_stage=5), r"from_stage must be the name of a stage .*not 5"),
    ],
)
def test_api_arguments_of_the_wrong_type(tiny_lm: Path, call, message: str) -> None:
    with pytest.raises(tunelab.TunelabError, match=message):
        call(str(tiny_lm))


# --- 6. accepted silently: training on nothing, an inverted objective, paths and launching --------------


@pytest.mark.parametrize(
    ("stage", "override", "message"),
    [
        ("sft", "training.max_length=0", r"'stages.sft.training.max_length' is 0: every example would be cut to"),
        ("grpo", "training.max_completion_length=0", r"'stages.grpo.training.max_completion_length' is 0: every"),
        *[
            (stage, "training.beta=-0.1", rf"'stages.{stage}.training.beta' is -0.1: a negative beta inverts the obj")
            for stage in ("kto", "orpo", "cpo", "grpo", "rloo")
        ],
    ],
)
def test_settings_that_train_on_nothing_or_invert_the_objective(
    tmp_path: Path, tiny_lm: Path, stage: str, override: str, message: str
) -> None:
    data = "recipes/data/arith_qa" if stage in ("sft", "grpo", "rloo") else "recipes/data/arith_pref"
    cfg = {"stage": stage, "model": str(tiny_lm), "data": {"path": str(ROOT / data), "split": "train[:8]"}}
    if stage in ("grpo", "rloo"):
        cfg["rewards"] = ["tunelab.rewards:exact_match"]
    fails(["validate", str(write(tmp_path, {"stages": {stage: cfg}})), override], message)


NAN_REWARD = """import math

def always(completions, **kwargs):
    return [math.nan for _ in completions]

def in_training(completions, trainer_state=None, **kwargs):
    return [0.0 if trainer_state is None else math.nan for _ in completions]
"""


def test_rewards_that_are_all_nan(tmp_path: Path, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "nan_reward.py").write_text(NAN_REWARD)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("nan_reward", None)
    recipe = write(tmp_path, {"stages": {"grpo": grpo(str(tiny_lm), "nan_reward:always")}})
    fails(
        ["validate", str(recipe)],
        r"'stages.grpo.rewards\[0\]': reward 'nan_reward:always' scored every completion NaN on the first 2 rows",
    )
    recipe = write(tmp_path, {"stages": {"grpo": grpo(str(tiny_lm), "nan_reward:in_training")}})
    result = runner.invoke(app, ["run", str(recipe)])
    assert result.exit_code == 2 and "Traceback" not in result.output, result.output
    assert (
        "error: 'stages.grpo.rewards[0]': reward 'nan_reward:in_training' scored every completion NaN at step 0: "
        "the policy would train on no signal" in result.output
    ), result.output


def test_output_dir_tilde_null_and_inside_its_data(
    tmp_path: Path, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    recipe = str(write(tmp_path, {"stages": {"sft": sft(tiny_lm)}}))
    fails(["validate", recipe, "output_dir=~"], r"'output_dir' is null: YAML reads `~`, `null` and an empty value as")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    result = runner.invoke(app, ["validate", recipe, 'output_dir="~/runs/x"'])
    assert result.exit_code == 0 and f"output_dir {tmp_path / 'home' / 'runs' / 'x'} will be" in result.output
    assert tunelab.load_recipe(recipe, ['output_dir="~/runs/x"']).output_dir == tmp_path / "home" / "runs" / "x"
    shutil.copytree(ROOT / "recipes/data/arith_qa", tmp_path / "qa")
    inside = str(write(tmp_path, {"stages": {"sft": {**sft(tiny_lm), "data": str(tmp_path / "qa")}}}))
    fails(
        ["validate", inside, f"output_dir={tmp_path / 'qa' / 'run'}"],
        rf"output_dir '{tmp_path / 'qa' / 'run'}' is inside 'stages.sft.data' \('{tmp_path / 'qa'}'\): the run's",
    )


def test_launch_beyond_the_cores_and_cp_of_a_file_that_is_no_recipe(tmp_path: Path, tiny_lm: Path) -> None:
    import os

    recipe = str(write(tmp_path, {"stages": {"sft": sft(tiny_lm)}}))
    cores = len(os.sched_getaffinity(0))
    fails(
        ["launch", recipe, "--num-processes", "100000", "--dry-run"],
        rf"100000 processes on this machine but it has {cores} CPU core\(s\) for them: lower --num-processes",
    )
    (tmp_path / "notes.txt").write_text("not a recipe")
    fails(["cp", str(tmp_path / "notes.txt"), str(tmp_path / "copy")], "is not a shipped recipe: name one from")
    assert not (tmp_path / "copy").exists()


# --- 7. messages that mislead ------------------------------------------------------------------------


def test_adapter_whose_base_is_gone(tmp_path: Path, tiny_lm: Path) -> None:
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_lm, base)
    stage = {**sft(base), "lora": {"r": 4, "target_modules": "all-linear"}}
    adapter = tunelab.run(tunelab.recipe_from_dict({"output_dir": str(tmp_path / "run"), "stages": {"sft": stage}}))
    folder = adapter.outputs["sft"]
    shutil.rmtree(base)
    message = (
        f"adapter '{folder}' was trained on the base model in '{base}', a folder that no longer exists: put the base "
        f"back there, or set base_model_name_or_path in {folder / 'adapter_config.json'} to where it is"
    )
    assert one_line(runner.invoke(app, ["chat", str(folder), "--prompt", "hi"]), 2) == f"error: {message}"
    kto = {"stage": "kto", "model": str(folder), "data": {"path": str(ROOT / "recipes/data/arith_pref")}}
    fails(["validate", str(write(tmp_path, {"stages": {"kto": kto}}))], message)


def test_attention_prints_the_file_it_writes(tmp_path: Path, tiny_lm: Path) -> None:
    (tmp_path / "folder").mkdir()
    for out, written in [("folder", "folder/attention.png"), ("heat", "heat.png"), ("map.png", "map.png")]:
        result = runner.invoke(app, ["attention", str(tiny_lm), "one two", "--out", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
        assert result.output.strip() == f"attention heatmaps written to {tmp_path / written}"
        assert (tmp_path / written).is_file()
    fails(["attention", str(tiny_lm), "x", "--out", str(tmp_path / "a.jpg")], "ends in .jpg: the heatmaps are a PNG")


def test_vlm_sft_row_without_an_assistant_turn(tmp_path: Path, llava: Path) -> None:
    import shutil

    vqa = tmp_path / "vqa"
    shutil.copytree(ROOT / "recipes/data/digits_vqa/train", vqa / "train")
    rows = [json.loads(line) for line in (ROOT / "recipes/data/digits_vqa/train.jsonl").read_text().splitlines()[:12]]
    rows[9]["messages"] = [turn for turn in rows[9]["messages"] if turn["role"] != "assistant"]
    (vqa / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    readme = "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: train.jsonl\n---\n"
    (vqa / "README.md").write_text(readme)  # the rows' files: not the PNGs beside them
    stage = {"stage": "vlm_sft", "model": str(llava), "data": str(vqa), "training": tiny_training()}
    fails(
        ["validate", str(write(tmp_path, {"stages": {"vlm": stage}}))],
        "'stages.vlm.data' row 9 has no assistant turn: vision SFT learns the assistant's answers",
    )


def test_a_chat_template_that_renders_nothing(tmp_path: Path, tiny_lm: Path) -> None:
    silent = "{% for m in messages %}{% endfor %}"
    chat = {"path": str(ROOT / "recipes/data/arith_chat"), "split": "train[:8]"}
    stage = {**sft(tiny_lm), "data": chat, "chat_template": silent}
    fails(
        ["validate", str(write(tmp_path, {"stages": {"sft": stage}}))],
        "'stages.sft.data': the chat template renders nothing on row 0 (the messages hold text): it must write",
    )
    fails(
        [
            "eval",
            str(tiny_lm),
            str(ROOT / "recipes/data/arith_qa"),
            "--output-dir",
            str(tmp_path / "ev"),
            f"chat_template={silent}",
        ],
        "'stages.eval.model': the chat template renders nothing on row 0",
    )
    assert not (tmp_path / "ev").exists()
