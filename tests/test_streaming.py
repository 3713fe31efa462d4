"""Streamed data (`streaming: true`): sft and pretrain train from an IterableDataset, `max_steps` is required,
and a run stopped mid-stream resumes at the right position: the same weights as a run never stopped."""

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

import tunelab
from tests.helpers import QA_TEST, SMOLLM2, fails, same, tiny_training, weights, write
from tunelab.core.errors import TunelabError

QA = "recipes/data/arith_qa"


def stream_sft(model: Path, **training) -> dict:
    """A streamed two-source mixture, 10 rows of it: 4-row batches wrap around the stream every 2.5 steps."""
    return {
        "stage": "sft",
        "model": str(model),
        "data": {
            "sources": [{"path": QA, "weight": 3}, {"path": QA, "split": "test", "weight": 1}],
            "streaming": True,
        },
        "lora": {"r": 4, "lora_alpha": 8},
        "training": tiny_training(learning_rate=1e-3, **training),
    }


def short_stream(model: Path, **training) -> dict:
    stage = stream_sft(model, **training)
    stage["data"]["sources"] = [{"path": QA, "samples": 7}, {"path": QA, "split": "test", "samples": 5}]
    stage["data"].update(mix="interleave", stopping="all_exhausted")
    return stage


def _run(tmp_path: Path, name: str, stage: dict, resume: bool = False) -> tunelab.RunResult:
    recipe = tunelab.recipe_from_dict({"output_dir": str(tmp_path / name), "seed": 3, "stages": {"s": stage}})
    return tunelab.run(recipe, resume=resume)


class _Crash(Exception):
    pass


def test_streamed_sft_resumes_at_its_position_in_the_stream(
    tmp_path: Path, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that dies after its step-4 checkpoint (past one wrap of the stream) resumes to the weights of the
    run never stopped; one resumed without skipping to its position (`ignore_data_skip`) ends elsewhere."""
    from transformers import TrainerCallback

    from tunelab.training import trainer as trainer_module

    stage = short_stream(tiny_lm, max_steps=6, save_strategy="steps", save_steps=4)
    straight = _run(tmp_path, "straight", stage)
    assert straight.metrics["s"]["global_step"] == 6

    class Crash(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                raise _Crash("stopped after the step-4 checkpoint")

    original = trainer_module.readable_progress

    def crashing(trainer, *args, **kwargs):
        original(trainer, *args, **kwargs)
        trainer.add_callback(Crash())

    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "readable_progress", crashing)
        with pytest.raises(_Crash):
            _run(tmp_path, "stopped", stage)
    assert [p.name for p in (tmp_path / "stopped" / "s").glob("checkpoint-*")] == ["checkpoint-4"]
    resumed = _run(tmp_path, "stopped", stage, resume=True)
    assert resumed.metrics["s"]["resumed_from_step"] == 4
    assert same(weights(tmp_path / "straight" / "s"), weights(tmp_path / "stopped" / "s"), atol=1e-6)

    # The control: the same checkpoint resumed from the stream's start trains on other rows.
    (tmp_path / "blind").mkdir()
    blind = {**stage, "training": {**stage["training"], "ignore_data_skip": True}}
    with monkeypatch.context() as patch:
        patch.setattr(trainer_module, "readable_progress", crashing)
        with pytest.raises(_Crash):
            _run(tmp_path, "blind", blind)
    _run(tmp_path, "blind", blind, resume=True)
    assert not same(weights(tmp_path / "straight" / "s"), weights(tmp_path / "blind" / "s"), atol=1e-6)


def test_streamed_pretrain_trains_its_tokenizer_and_evaluates(tmp_path: Path) -> None:
    from tests.helpers import pretrain_stage

    stage = pretrain_stage(max_steps=3)
    stage["data"] = {"path": "recipes/data/arith_corpus", "streaming": True}
    stage["eval_data"] = {"path": "recipes/data/arith_corpus", "split": "train", "streaming": True, "samples": 8}
    result = _run(tmp_path, "pretrain", stage)
    assert result.metrics["s"]["global_step"] == 3 and result.metrics["s"]["eval_loss"] > 0


CLI = [sys.executable, "-m", "tunelab.cli.app", "run"]


@pytest.mark.slow
def test_sigkill_mid_stream_then_resume_matches_an_uninterrupted_run(tmp_path: Path, tiny_lm: Path) -> None:
    """The real thing: kill -9 once a checkpoint is on disk, `tunelab run --resume`, the same weights."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    stage = stream_sft(tiny_lm, max_steps=30, save_strategy="steps", save_steps=5, logging_steps=5)
    stage["data"]["sources"] = [{"path": QA, "samples": 37}, {"path": QA, "split": "test", "samples": 23}]
    stage["data"]["mix"] = "interleave"  # 46 rows (first_exhausted), read 2.6 times over
    paths = {}
    for name in ("straight", "killed"):
        paths[name] = tmp_path / f"{name}.yaml"
        recipe = {"output_dir": str(tmp_path / name), "seed": 3, "stages": {"s": stage}}
        paths[name].write_text(yaml.safe_dump(recipe))
    subprocess.run([*CLI, str(paths["straight"])], env=env, check=True, capture_output=True)
    proc = subprocess.Popen([*CLI, str(paths["killed"])], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    deadline = time.time() + 180
    stage_dir = tmp_path / "killed" / "s"
    while time.time() < deadline and proc.poll() is None and not any(stage_dir.glob("checkpoint-*/trainer_state.json")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["status"] == "running"
    resumed = subprocess.run([*CLI, str(paths["killed"]), "--resume"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    record = json.loads((stage_dir / "stage.json").read_text())
    assert record["metrics"]["resumed_from_step"] >= 5
    assert same(weights(tmp_path / "straight" / "s"), weights(stage_dir), atol=1e-5)


def test_streaming_bad_input(tmp_path: Path, tiny_lm: Path) -> None:
    """One line at validate: no max_steps; a split slice; a stage that reads its data whole."""
    stage = stream_sft(tiny_lm)
    del stage["training"]["max_steps"]
    path = write(tmp_path, {"stages": {"s": stage}})
    fails(["validate", str(path)], r"'stages.s.data' streams .* set 'stages.s.training.max_steps'")

    stage = stream_sft(tiny_lm)
    stage["data"]["sources"][1]["split"] = "test[:100]"
    path = write(tmp_path, {"stages": {"s": stage}})
    fails(
        ["validate", str(path)],
        r"'stages.s.data.sources\[1\]' \(recipes/data/arith_qa\) streams, and a stream cannot take the split "
        r"slice 'test\[:100\]': use `split: test` with `samples: 100`",
    )

    reward = {
        "stage": "reward",
        "model": str(tiny_lm),
        "data": {"path": "recipes/data/arith_pref", "streaming": True},
        "training": tiny_training(),
    }
    path = write(tmp_path, {"stages": {"r": reward}})
    fails(["validate", str(path)], r"'stages.r.data' streams .* a reward stage reads its data whole: drop streaming")


def test_a_stream_is_never_materialised(tmp_path: Path) -> None:
    """What the stage trains on is an IterableDataset, not a table."""
    import datasets

    from tunelab.data.datasets import load_split

    ds = load_split({"path": QA, "split": "train"}, "data", streaming=True)
    assert isinstance(ds, datasets.IterableDataset)
    with pytest.raises(TunelabError, match="stream cannot take the split slice"):
        load_split(QA_TEST, "data", streaming=True)


@pytest.mark.slow
def test_a_streamed_mixture_of_formats_trains_smollm2(tmp_path: Path, smollm2: Path) -> None:
    """SmolLM2 (the GGUF fixture), LoRA, loss on the assistant's turns: a streamed 2:1 mixture of the bundled
    chats and an Alpaca file, both read as messages, masked as training reads them."""
    alpaca = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": f"Add {i} and 2.", "input": "", "output": str(i + 2)} for i in range(40)]
    alpaca.write_text("".join(json.dumps(r) + "\n" for r in rows))
    training = tiny_training(max_steps=3, per_device_train_batch_size=2, max_length=96, assistant_only_loss=True)
    training.update(gradient_checkpointing=False, learning_rate=1e-3)
    data = {
        "sources": [{"path": "recipes/data/arith_chat", "weight": 2}, {"path": str(alpaca), "weight": 1}],
        "streaming": True,
    }
    stage = {"stage": "sft", "model": dict(SMOLLM2), "data": data, "lora": {"r": 4}, "training": training}
    result = _run(tmp_path, "smol", stage)
    metrics = result.metrics["s"]
    assert metrics["global_step"] == 3 and 0 < metrics["train_loss"] < 20
    record = json.loads((tmp_path / "smol" / "s" / "stage.json").read_text())
    sources = record["data_reports"]["data"]["sources"]
    assert [s["format"] for s in sources] == ["messages", "alpaca"] and [s["rows"] for s in sources] == [None, None]
