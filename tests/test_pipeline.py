"""Pipelines: references between stages, skipping finished stages, rerunning changed ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import tunelab
from tests.helpers import QA_TEST, QA_TRAIN, pretrain_stage, tiny_training


def test_reference_to_a_stage_without_a_model() -> None:
    with pytest.raises(tunelab.TunelabError, match="which produces no model"):
        tunelab.recipe_from_dict(
            {
                "stages": {
                    "ev": {"stage": "eval", "model": "x", "data": QA_TEST},
                    "sft": {"stage": "sft", "model": "${ev}", "data": QA_TRAIN},
                }
            }
        )


def test_resume_skips_unchanged_stages_and_from_reruns_changed_ones(tmp_path: Path) -> None:
    data = {
        "output_dir": str(tmp_path / "run"),
        "stages": {
            "pretrain": pretrain_stage(),
            "sft": {
                "stage": "sft",
                "model": "${pretrain}",
                "data": QA_TRAIN,
                "lora": {"r": 4},
                "training": tiny_training(),
            },
        },
    }
    first = tunelab.run(tunelab.recipe_from_dict(data))
    assert first.skipped == [] and (first.outputs["sft"] / "adapter_config.json").exists()
    pretrain_weights = (first.outputs["pretrain"] / "model.safetensors").read_bytes()

    same = tunelab.run(tunelab.recipe_from_dict(data), resume=True)
    assert same.skipped == ["pretrain", "sft"] and same.metrics == first.metrics

    with pytest.raises(tunelab.TunelabError, match="stage 'sft' finished, and its recipe changed since"):
        tunelab.run(tunelab.recipe_from_dict(data, ["sft.training.max_steps=3"]), resume=True)  # never replaced
    changed = tunelab.run(tunelab.recipe_from_dict(data, ["sft.training.max_steps=3"]), from_stage="sft")
    assert changed.skipped == ["pretrain"]
    assert changed.metrics["sft"]["global_step"] == 3
    assert (changed.outputs["pretrain"] / "model.safetensors").read_bytes() == pretrain_weights

    upstream = tunelab.run(tunelab.recipe_from_dict(data, ["pretrain.training.max_steps=3"]), from_stage="pretrain")
    assert upstream.skipped == []  # a new pretrained model invalidates the SFT built on it


def test_resume_skips_a_checkpoint_torn_by_a_kill(tmp_path: Path) -> None:
    from tunelab.training.safeguards import last_checkpoint

    assert last_checkpoint(tmp_path / "none") is None
    for step, complete in ((10, True), (20, True), (30, False)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "model.safetensors").write_text("x")
        if complete:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    (tmp_path / "checkpoint-40").mkdir()
    (tmp_path / "checkpoint-40" / "trainer_state.json").write_text('{"global_st')  # torn mid-write
    assert last_checkpoint(tmp_path) == str(tmp_path / "checkpoint-20")


def test_resume_notices_a_stage_whose_data_changed(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.jsonl"
    lines = Path("recipes/data/arith_corpus/train.jsonl").read_text().splitlines()
    corpus.write_text("\n".join(lines[:64]) + "\n")
    stage = pretrain_stage()
    stage["data"] = str(corpus)
    data = {"output_dir": str(tmp_path / "run"), "stages": {"pretrain": stage}}
    tunelab.run(tunelab.recipe_from_dict(data))
    assert tunelab.run(tunelab.recipe_from_dict(data), resume=True).skipped == ["pretrain"]
    corpus.write_text("\n".join(lines[64:128]) + "\n")  # same file name, other contents
    with pytest.raises(tunelab.TunelabError, match="stage 'pretrain' finished.*its data or an earlier stage"):
        tunelab.run(tunelab.recipe_from_dict(data), resume=True)
    assert tunelab.run(tunelab.recipe_from_dict(data), from_stage="pretrain").skipped == []
