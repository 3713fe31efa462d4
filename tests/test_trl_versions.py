"""TRL 1.12 -> 1.16: what a recipe written for 1.12 can name that 1.16 renamed, deprecated away or refuses
once the model has loaded is one line at validate, with the new spelling; the lists tunelab keeps are held
to TRL's own source; and the fused LM head TRL 1.16 trains through gives the model's own loss on
tunelab's models (tiny Llama, SmolLM2 from its GGUF file, with LoRA) on the CPU."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import json
import re
from pathlib import Path

import pytest

from tests.helpers import PREF_TRAIN, QA_TRAIN, fails, sft, tiny_training, write
from tunelab.stages.base import import_name
from tunelab.training.trl_changes import LOSS_TYPES, RENAMED_FIELDS, RENAMED_VALUES

FIELDS_112 = json.loads((Path(__file__).parent / "data" / "trl-1.12-config-fields.json").read_text())["fields"]


def test_every_trl_112_field_is_still_there_or_refused_with_its_new_name() -> None:
    """The configs' fields under TRL 1.12 (recorded in tests/data) against the installed TRL: a field that is
    gone must be in tunelab's table, so that an old recipe gets its new name, not "unknown key"."""
    renamed = {field for _, field in RENAMED_FIELDS}
    for path, fields in FIELDS_112.items():
        now = {f.name for f in dataclasses.fields(import_name(path))}
        gone = sorted(set(fields) - now - renamed)
        assert gone == [], f"{path}: TRL removed {gone}; add them to tunelab.training.trl_changes"


def _trainer_loss_types(module: str) -> set[str]:
    """The loss types a TRL trainer's code branches on (`loss_type == "x"`, `loss_type in ["x", ...]`)."""
    source = inspect.getsource(importlib.import_module(module))
    found = set(re.findall(r'loss_type == "(\w+)"', source))
    for group in re.findall(r"loss_type in \[([^\]]*)\]", source):
        found |= set(re.findall(r'"(\w+)"', group))
    return found


def test_loss_type_lists_are_trls() -> None:
    """When TRL adds or drops a loss type, this fails until tunelab's list says the same."""
    assert _trainer_loss_types("trl.trainer.grpo_trainer") == set(LOSS_TYPES["GRPOConfig"])
    assert _trainer_loss_types("trl.trainer.dpo_trainer") == set(LOSS_TYPES["DPOConfig"])
    from trl import SFTConfig

    choices = next(f for f in dataclasses.fields(SFTConfig) if f.name == "loss_type").metadata["choices"]
    renamed = {value for (cls, key, value) in RENAMED_VALUES if (cls, key) == ("SFTConfig", "loss_type")}
    assert set(choices) - renamed == set(LOSS_TYPES["SFTConfig"])


LORA_ON_HEAD = {"r": 4, "target_modules": ["q_proj", "lm_head"]}


@pytest.mark.parametrize(
    ("extra", "override", "message"),
    [
        ({}, "training.loss_type=chunked_nll", "'chunked_nll': TRL 1.16 made it a deprecated alias of nll"),
        ({}, "training.loss_type=focal", r"'focal', which TRL 1\.16\.\d+ does not know: use one of nll, dft"),
        ({}, "training.use_liger_kernel=true", r"use_kernels: true in the stage's `model:`|model: \{path: \.\.\."),
        ({}, "training.router_aux_loss_coef=0.01", "is not a mixture-of-experts model"),
        ({"lora": LORA_ON_HEAD}, "training.max_steps=2", "puts an adapter on the LM head"),
    ],
)
def test_sft_settings_trl_116_renamed_or_refuses(
    tmp_path: Path, tiny_lm: Path, extra: dict, override: str, message: str
) -> None:
    fails(["validate", str(write(tmp_path, sft(str(tiny_lm), **extra))), override], message)


def test_lora_on_the_head_of_a_model_an_earlier_stage_makes(tmp_path: Path, tiny_lm: Path) -> None:
    """No config to build the skeleton from yet: the name `lm_head` in target_modules says it."""
    first = sft(str(tiny_lm), lora={"r": 4})
    second = {**sft("${first}"), "lora": LORA_ON_HEAD}
    recipe = {"stages": {"first": first, "second": second}}
    fails(["validate", str(write(tmp_path, recipe))], r"stages\.second\.lora' puts an adapter on the LM head")


def test_modules_to_save_lm_head_is_accepted(tmp_path: Path, tiny_lm: Path) -> None:
    """The way the refusal points to: the head trained as a full copy (peft's modules_to_save), which the
    fused head reads through (its gradient is not zero: the fused-head tests below)."""
    from tests.helpers import runner
    from tunelab.cli.app import app

    path = write(tmp_path, sft(str(tiny_lm), lora={"r": 4, "modules_to_save": ["lm_head"]}))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (
            {"stage": "dpo", "data": PREF_TRAIN, "training": tiny_training(loss_type=["sigmoid", "kto"])},
            r"loss_type' is 'kto', which TRL 1\.16\.\d+ does not know: use one of sigmoid, hinge, ipo",
        ),
        (
            {
                "stage": "grpo",
                "data": QA_TRAIN,
                "rewards": ["tunelab.rewards:exact_match"],
                "training": {"loss_type": "ppo", "max_steps": 1},
            },
            r"loss_type' is 'ppo', which TRL 1\.16\.\d+ does not know: use one of grpo, dr_grpo, dapo",
        ),
        (
            {"stage": "kto", "data": PREF_TRAIN, "training": {"use_liger_kernel": True}},
            "use_liger_kernel' is True: TRL 1.16 deprecates it",
        ),
    ],
)
def test_other_stages_refuse_what_trl_116_does_not_take(
    tmp_path: Path, tiny_lm: Path, stage: dict, message: str
) -> None:
    fails(["validate", str(write(tmp_path, {"stages": {"s": {**stage, "model": str(tiny_lm)}}}))], message)


def _fused_against_plain(path: Path, lora: dict) -> tuple[float, float, float]:
    """One batch through TRL's fused LM head and through the model's own forward: (fused loss, plain loss,
    |gradient| of the trainable head copy with modules_to_save, else of the LoRA weights)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import add_fused_lm_head

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))  # as SFTTrainer does, before peft
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    batch = tokenizer(
        ["Mia has 3 pens. She buys 4 more. Now she has 7.", "2 + 5 = 7"], padding=True, return_tensors="pt"
    )
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    fused = model(**batch, labels=labels, fused_lm_head=True)
    fused.loss.backward()
    head = "modules_to_save" if lora.get("modules_to_save") else "lora_"
    grad = sum(float(p.grad.abs().sum()) for n, p in model.named_parameters() if head in n and p.grad is not None)
    with torch.no_grad():
        plain = model(**batch, labels=labels)
    return float(fused.loss), float(plain.loss), grad


@pytest.mark.parametrize(
    "lora",
    [{"r": 4, "target_modules": "all-linear"}, {"r": 4, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}],
)
def test_fused_head_gives_the_models_own_loss_on_the_tiny_llama(tiny_lm: Path, lora: dict) -> None:
    fused, plain, grad = _fused_against_plain(tiny_lm, lora)
    assert fused == pytest.approx(plain, rel=1e-5) and grad > 0


@pytest.mark.slow
def test_fused_head_gives_the_models_own_loss_on_smollm2(smollm2: Path) -> None:
    """SmolLM2-135M-Instruct from its GGUF file (tied embeddings, 49k vocabulary), with LoRA, then with
    the head trained as a full copy."""
    fused, plain, grad = _fused_against_plain(smollm2, {"r": 8, "target_modules": "all-linear"})
    assert fused == pytest.approx(plain, rel=1e-5) and grad > 0
    fused, plain, grad = _fused_against_plain(
        smollm2, {"r": 8, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}
    )
    assert fused == pytest.approx(plain, rel=1e-5) and grad > 0
