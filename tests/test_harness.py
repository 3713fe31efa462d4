"""lm-evaluation-harness: the lm_eval stage, tunelab's offline tasks, and log-likelihood scoring in eval
that agrees with the harness's own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import tunelab
from tests.helpers import QA_TRAIN, fails, tiny_training, write

pytest.importorskip("lm_eval")

MC_TEST = {"path": "recipes/data/arith_mc", "split": "test[:24]"}


def _harness(model_args: dict, tasks: list[str], include: Path, **kwargs) -> dict:
    """The harness called directly, as a user would, on a folder tunelab wrote."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(include), include_defaults=False)
    return lm_eval.simple_evaluate(
        model="hf", model_args={**model_args, "device": "cpu"}, tasks=tasks, task_manager=manager, **kwargs
    )


def test_bundled_tasks_run_anywhere_from_the_copy_a_run_writes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    from lm_eval.tasks import TaskManager

    from tunelab.evaluation.harness import materialize

    folder = materialize(tmp_path / "tasks")
    copied = yaml.safe_load((folder / "tunelab_arith_mc.yaml").read_text())
    assert all(Path(p).is_absolute() and Path(p).is_file() for p in copied["dataset_kwargs"]["data_files"].values())
    monkeypatch.chdir(tmp_path)  # far from the repository: relative data paths would not resolve here
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    assert {"tunelab_arith", "tunelab_arith_fewshot", "tunelab_arith_cot", "tunelab_arith_mc"} <= set(manager.all_tasks)
    tasks = manager.load(["tunelab"])["tasks"]  # the tag reaches all four
    assert len(tasks) == 4
    mc = tasks["tunelab_arith_mc"]
    doc = mc.eval_docs[0]
    assert len(mc.eval_docs) == 300 and mc.doc_to_choice(doc)[mc.doc_to_target(doc)] == doc["completion"]
    assert tasks["tunelab_arith_fewshot"].config.num_fewshot == 3


@pytest.mark.slow  # 23 s; the harness agreement on tiny models stays in the default suite
def test_eval_choices_agree_with_the_harness_on_smollm2(tmp_path: Path, smollm2: Path) -> None:
    """The same model, the same 12 questions, plain and through the chat template: the same accuracy
    through tunelab's eval and the harness, and the log-likelihood of each of the 48 choices equal to
    float precision."""
    from tunelab.evaluation.harness import materialize

    tasks = materialize(tmp_path / "tasks")
    data = {**MC_TEST, "split": "test[:12]"}
    stages = {
        name: {"stage": "eval", "model": str(smollm2), "data": data, "batch_size": 16, "chat_template": chat}
        for name, chat in (("plain", False), ("chat", True))
    }
    result = tunelab.run(tunelab.recipe_from_dict({"output_dir": str(tmp_path / "run"), "stages": stages}))
    for name, chat in (("plain", False), ("chat", True)):
        ours = result.metrics[name]["model"]
        lines = (result.run_dir / name / "predictions-model.jsonl").read_text().splitlines()
        theirs = _harness(
            {"pretrained": str(smollm2)}, ["tunelab_arith_mc"], tasks, limit=12, batch_size=16, apply_chat_template=chat
        )
        scores = theirs["results"]["tunelab_arith_mc"]
        assert ours["examples"] == 12
        assert ours["acc"] == scores["acc,none"] and ours["acc_norm"] == scores["acc_norm,none"], name
        samples = sorted(theirs["samples"]["tunelab_arith_mc"], key=lambda s: s["doc_id"])
        for row, sample in zip(map(json.loads, lines), samples, strict=True):
            assert row["prompt"] == sample["arguments"][0][0]  # what the model read, character for character
            assert row["logprobs"] == pytest.approx([r[0] for r in sample["filtered_resps"]], abs=2e-4)
    assert "<|im_start|>user" in json.loads(lines[0])["prompt"]  # the chat case went through the template


def test_lm_eval_stage_scores_before_and_after_sft_and_the_harness_agrees(tmp_path: Path, tiny_lm: Path) -> None:
    """A pipeline (LoRA SFT, then lm_eval on both models); its numbers are what the harness gives when
    run by hand on tunelab's output folders (the adapter through `peft=`)."""
    sft = {
        "stage": "sft",
        "model": str(tiny_lm),
        "data": QA_TRAIN,
        "lora": {"r": 4, "target_modules": "all-linear"},
        "training": tiny_training(learning_rate=5e-3, max_steps=4),
    }
    score = {
        "stage": "lm_eval",
        "models": {"before": str(tiny_lm), "after": "${sft}"},
        "tasks": ["tunelab_arith_mc"],
        "limit": 12,
        "batch_size": 8,
    }
    recipe = tunelab.recipe_from_dict({"output_dir": str(tmp_path / "run"), "stages": {"sft": sft, "score": score}})
    result = tunelab.run(recipe)
    metrics = result.metrics["score"]
    assert set(metrics) == {"before", "after"}
    for label in ("before", "after"):
        assert {"tunelab_arith_mc/acc", "tunelab_arith_mc/acc_norm"} <= set(metrics[label])
        assert metrics[label]["examples"] == 12
    folder = result.run_dir / "score"
    saved = json.loads((folder / "harness-after.json").read_text())
    command = saved["tunelab"]["command"]
    assert f"pretrained={tiny_lm}" in command and f"peft={result.outputs['sft']}" in command
    assert len((folder / "samples-after.jsonl").read_text().splitlines()) == 12
    direct = _harness(
        {"pretrained": str(tiny_lm), "peft": str(result.outputs["sft"])},
        ["tunelab_arith_mc"],
        folder / "tasks",
        limit=12,
        batch_size=8,
    )
    assert direct["results"]["tunelab_arith_mc"]["acc,none"] == metrics["after"]["tunelab_arith_mc/acc"]
    assert direct["results"]["tunelab_arith_mc"]["acc_norm,none"] == metrics["after"]["tunelab_arith_mc/acc_norm"]
    report = (result.run_dir / "report.md").read_text()
    assert "tunelab_arith_mc/acc" in report
    merged = tunelab.merge(result.outputs["sft"], tmp_path / "merged")  # the merged model: pretrained= alone
    direct = _harness({"pretrained": str(merged)}, ["tunelab_arith_mc"], folder / "tasks", limit=12, batch_size=8)
    assert direct["results"]["tunelab_arith_mc"]["acc,none"] == metrics["after"]["tunelab_arith_mc/acc"]


def test_think_end_token_scores_what_follows_the_reasoning(tmp_path: Path, tiny_lm: Path, monkeypatch) -> None:
    """Answers after `</think>` are extracted and scored; the reasoning before it is not."""
    import tunelab.stages.eval as eval_stage

    def reasoned(model, tokenizer, prompts, config, batch_size, templated=False, think=None):
        return ["Two and two ... 99 </think> 21" for _ in prompts]

    monkeypatch.setattr(eval_stage, "generate", reasoned)
    data = {"path": "recipes/data/arith_qa", "split": "test[:1]"}  # its answer is 21
    stages = {
        "with": {"stage": "eval", "model": str(tiny_lm), "data": data, "think_end_token": "</think>"},
        "without": {"stage": "eval", "model": str(tiny_lm), "data": data},
    }
    result = tunelab.run(tunelab.recipe_from_dict({"output_dir": str(tmp_path / "run"), "stages": stages}))
    assert result.metrics["with"]["model"]["exact_match"] == 1.0
    assert result.metrics["without"]["model"]["exact_match"] == 0.0
    row = json.loads((result.run_dir / "with" / "predictions-model.jsonl").read_text().splitlines()[0])
    assert row["answer"] == "21" and "</think>" in row["output"]  # what the model wrote is kept whole


def test_reasoning_marker_survives_decoding_as_a_special_token(smollm2: Path) -> None:
    from transformers import AutoTokenizer

    from tunelab.models.prompting import keep_marker, strip_reasoning

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    ids = tokenizer("I think 3", add_special_tokens=False)["input_ids"]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")  # a special token: skipped when decoding
    ids += [end] + tokenizer(" 21", add_special_tokens=False)["input_ids"]
    text = tokenizer.decode(ids, skip_special_tokens=True)
    assert "<|im_end|>" not in text
    kept = keep_marker(tokenizer, ids, text, "<|im_end|>")
    assert strip_reasoning(kept, "<|im_end|>") == "21"
    assert strip_reasoning("no marker here", "</think>") == "no marker here"


# Bad input: one line, exit 2, at validate.


def _lm_eval(tmp_path: Path, model: Path, **extra) -> Path:
    stage = {"stage": "lm_eval", "model": str(model), "tasks": ["tunelab_arith_mc"], **extra}
    return write(tmp_path, {"stages": {"score": stage}})


def test_unknown_task_suggests_the_closest(tmp_path: Path, tiny_lm: Path) -> None:
    path = _lm_eval(tmp_path, tiny_lm, tasks=["tunelab_arith_mcq"])
    fails(["validate", str(path)], "'tunelab_arith_mcq' is not a harness task: did you mean tunelab_arith_mc")


def test_unknown_harness_argument(tmp_path: Path, tiny_lm: Path) -> None:
    fails(["validate", str(_lm_eval(tmp_path, tiny_lm, num_fewshots=3))], "did you mean 'num_fewshot'")
    fails(["validate", str(_lm_eval(tmp_path, tiny_lm, limit="all"))], "limit")
    fails(["validate", str(_lm_eval(tmp_path, tiny_lm, batch_size="big"))], "auto")
    fails(["validate", str(_lm_eval(tmp_path, tiny_lm, batch_size="auto"))], "on CPU give a number")
    fails(
        ["validate", str(_lm_eval(tmp_path, tiny_lm, model_args={"peft": "x"}))],
        "about loading the model, which tunelab does",
    )
    fails(["validate", str(_lm_eval(tmp_path, tiny_lm, model_args={"max_lenght": 64}))], "did you mean 'max_length'")


def test_task_yaml_that_does_not_parse(tmp_path: Path, tiny_lm: Path) -> None:
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    (tasks / "broken.yaml").write_text("task: broken\ndoc_to_text: [unclosed\n")
    path = _lm_eval(tmp_path, tiny_lm, include_path=str(tasks))
    fails(["validate", str(path)], "broken.yaml does not parse")


def test_task_whose_hub_dataset_is_not_available_offline(tmp_path: Path, tiny_lm: Path) -> None:
    tasks = tmp_path / "my_tasks"
    tasks.mkdir()
    task = yaml.safe_load((Path("recipes/harness/tunelab_arith_mc.yaml")).read_text())
    task.update(task="hub_task", dataset_path="someone/not-cached-anywhere", tag=[])
    task.pop("dataset_kwargs")
    (tasks / "hub_task.yaml").write_text(yaml.safe_dump(task))
    path = _lm_eval(tmp_path, tiny_lm, include_path=str(tasks), tasks=["hub_task"])
    fails(["validate", str(path)], "reads Hub dataset 'someone/not-cached-anywhere', which is not in the local cache")


def test_harness_not_installed(tmp_path: Path, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    fails(["validate", str(_lm_eval(tmp_path, tiny_lm))], r"pip install 'tunelab\[harness\]'")


def test_choices_of_unequal_types(tmp_path: Path, tiny_lm: Path) -> None:
    data = tmp_path / "mc.jsonl"
    rows = [{"prompt": "Q: 1+1?\nA:", "choices": [" 2", " 3"], "label": 0}, {"prompt": "Q?", "choices": [" 2", 3]}]
    data.write_text("".join(json.dumps({"label": 0, **r}) + "\n" for r in rows))
    stage = {"stage": "eval", "model": str(tiny_lm), "data": {"path": str(data), "split": "train"}}
    path = write(tmp_path, {"stages": {"mc": stage}})
    fails(["validate", str(path)], r"column 'choices' holds int values \(as read: a column whose rows mix numbers")
    stage["generation"] = {"max_new_tokens": 4}
    rows[1]["choices"] = [" 2", " 3"]
    data.write_text("".join(json.dumps({"label": 0, **r}) + "\n" for r in rows))
    fails(["validate", str(write(tmp_path, {"stages": {"mc": stage}}))], "applies to generated answers")


def test_think_end_token_and_the_plan_reach_the_harness(tiny_lm: Path) -> None:
    from tunelab.models.plan import plan_generation
    from tunelab.stages import Context, StageSpec, lm_eval

    cfg = {"stage": "lm_eval", "model": str(tiny_lm), "tasks": "tunelab_arith_mc", "think_end_token": "</think>"}
    spec = StageSpec("score", "lm_eval", cfg, tiny_lm)
    ctx = Context(seed=0, run_dir=tiny_lm)
    s = lm_eval.LmEval().settings(spec, ctx)
    assert s.names == ["tunelab_arith_mc"] and s.model_args == {"think_end_token": "</think>"}
    assert s.args["batch_size"] == lm_eval.DEFAULT_BATCH
    planned = lm_eval.LmEval().plan(spec, ctx)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(tiny_lm).vocab_size
    # log-likelihood scoring keeps every position's logits (and their log-softmax), in float32
    assert planned.parts["logits"] == lm_eval.DEFAULT_BATCH * lm_eval.PROMPT_TOKENS * vocab * 8
    assert plan_generation("g", AutoConfig.from_pretrained(tiny_lm), 4, 64).parts["logits"] == 4 * vocab * 8


def test_stage_keys_are_simple_evaluates_arguments() -> None:
    """The lm_eval stage takes exactly simple_evaluate's arguments (less those tunelab sets itself)."""
    from tunelab.evaluation.harness import OWNED, signature_names
    from tunelab.stages import lm_eval

    assert set(lm_eval.HARNESS) == set(signature_names()) - set(OWNED)
