"""KTO, ORPO, CPO/SimPO, RLOO and on-policy distillation: a few real steps on the tiny Llama and on
SmolLM2, outputs reloaded with transformers and peft, the logged numbers checked, bad input named first."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.helpers import (
    PREF_TEST,
    PREF_TRAIN,
    QA_TEST,
    QA_TRAIN,
    SMOLLM2,
    fails,
    grpo_stage,
    run_stages,
    tiny_training,
    write,
)

ONLINE = grpo_stage("", "")["training"]  # two steps of 4 prompts x 4 completions, as grpo's tests


def preference(kind: str, model: str, **training) -> dict:
    return {
        "stage": kind,
        "model": model,
        "data": PREF_TRAIN,
        "eval_data": PREF_TEST,
        "training": tiny_training(max_steps=3, learning_rate=1e-3, max_length=128, **training),
    }


def changed(before: Path, after: Path) -> float:
    """Largest absolute change of any weight between two saved full models."""
    a = AutoModelForCausalLM.from_pretrained(before).state_dict()
    b = AutoModelForCausalLM.from_pretrained(after).state_dict()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_kto_orpo_cpo_simpo_train_and_save_full_models(tmp_path: Path, tiny_lm: Path) -> None:
    stages = {
        "kto": preference("kto", str(tiny_lm)),
        "orpo": preference("orpo", str(tiny_lm)),
        "simpo": preference("cpo", str(tiny_lm), loss_type="simpo", cpo_alpha=0.0),
    }
    result = run_stages(tmp_path, stages)
    for name in stages:
        folder = result.outputs[name]
        assert (folder / "model.safetensors").exists() and not (folder / "adapter_config.json").exists()
        assert changed(tiny_lm, folder) > 0, name  # it trained
        metrics = result.metrics[name]
        assert metrics["global_step"] == 3 and "eval_loss" in metrics, (name, metrics)
    # KTO's pairs were unpaired into good and bad rows: both kinds of reward are logged and evaluated.
    assert {"eval_rewards/chosen", "eval_rewards/rejected", "eval_kl"} <= set(result.metrics["kto"])
    assert 0 <= result.metrics["orpo"]["eval_rewards/accuracies"] <= 1
    history = json.loads((result.outputs["orpo"] / "log_history.json").read_text())
    assert all("log_odds_ratio" in h for h in history if "loss" in h)
    # SimPO: with cpo_alpha 0 CPO drops its likelihood term, so the logged NLL is zero.
    history = json.loads((result.outputs["simpo"] / "log_history.json").read_text())
    assert all(h["nll_loss"] == 0.0 for h in history if "nll_loss" in h)
    report = (tmp_path / "run" / "report.md").read_text()
    assert "eval_rewards/margins" in report  # KTO's declared summary reaches the report's table


def test_kto_on_unpaired_rows_with_lora_saves_an_adapter(tmp_path: Path, tiny_lm: Path) -> None:
    rows = [json.loads(line) for line in Path("recipes/data/arith_pref/train.jsonl").read_text().splitlines()[:16]]
    unpaired = [{"prompt": r["prompt"], "completion": r[k], "label": k == "chosen"} for r in rows for k in PAIRS]
    path = tmp_path / "kto.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in unpaired))
    stage = preference("kto", str(tiny_lm)) | {"data": str(path), "lora": {"r": 4, "target_modules": ["q_proj"]}}
    del stage["eval_data"]
    result = run_stages(tmp_path, {"kto": stage})
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), result.outputs["kto"])
    weights = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert weights and any(p.abs().sum() > 0 for p in weights)  # lora_B starts at zero: it trained


PAIRS = ("chosen", "rejected")


def test_rloo_with_a_python_reward_and_a_reward_model(
    tmp_path: Path,
    tiny_lm: Path,
    reward_model: Path,
) -> None:
    rewards = ["tunelab.rewards:exact_match", str(reward_model)]
    stage = {"stage": "rloo", "model": str(tiny_lm), "data": QA_TRAIN, "rewards": rewards}
    result = run_stages(tmp_path, {"rloo": stage | {"training": dict(ONLINE, beta=0.05)}})
    metrics, folder = result.metrics["rloo"], result.outputs["rloo"]
    assert metrics["global_step"] == 2 and math.isfinite(metrics["first_reward"] + metrics["last_reward"])
    history = json.loads((folder / "log_history.json").read_text())
    logged = [h for h in history if "reward" in h]
    assert logged and all("rewards/exact_match/mean" in h and "kl" in h for h in logged)
    assert all(f"rewards/{reward_model.name}/mean" in h for h in logged)
    assert all(0 <= h["rewards/exact_match/mean"] <= 1 for h in logged)
    assert changed(tiny_lm, folder) > 0


def test_online_reference_is_the_starting_model_when_it_was_an_adapter(tmp_path: Path, tiny_lm: Path) -> None:
    """With beta > 0, TRL rebuilds the reference from config._name_or_path; after a merged SFT adapter that
    would be the base before SFT. tunelab hands the trainer the starting weights instead."""
    sft = {
        "stage": "sft",
        "model": str(tiny_lm),
        "data": QA_TRAIN,
        "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"]},
        "training": tiny_training(max_steps=3, learning_rate=5e-2),
    }
    rloo = {"stage": "rloo", "model": "${sft}", "data": QA_TRAIN, "rewards": ["tunelab.rewards:numeric"]}
    result = run_stages(tmp_path, {"sft": sft, "rloo": rloo | {"training": dict(ONLINE, beta=0.05, max_steps=1)}})
    history = json.loads((result.outputs["rloo"] / "log_history.json").read_text())
    # At the first step the policy is the reference: the KL estimate is exactly zero.
    assert [h["kl"] for h in history if "kl" in h][0] == pytest.approx(0.0, abs=1e-6)


def test_distill_trains_the_student_on_its_own_answers_against_the_teacher(tmp_path: Path, tiny_lm: Path) -> None:
    """The student is the tiny model after two SFT steps, the teacher the tiny model: the divergence is above
    zero from the first step, and the student moves. A student identical to its teacher sits at the
    objective's minimum: zero loss and an exactly zero gradient (TRL 1.16's fused divergence; TRL 1.12's
    rounding left a 1e-8 gradient that Adam scaled up to a full step)."""
    training = {k: v for k, v in ONLINE.items() if k != "num_generations"} | {"max_completion_length": 6}
    student = {
        "stage": "sft",
        "model": str(tiny_lm),
        "data": QA_TRAIN,
        "training": tiny_training(max_steps=2, learning_rate=5e-2),
    }
    distill = {"stage": "distill", "teacher": str(tiny_lm), "data": QA_TRAIN, "training": training}
    stages = {
        "student": student,
        "distill": distill | {"model": "${student}", "eval_data": QA_TEST},
        "same": distill | {"model": str(tiny_lm), "training": training | {"max_steps": 1}},
    }
    result = run_stages(tmp_path, stages)
    metrics, folder = result.metrics["distill"], result.outputs["distill"]
    losses = [h["loss"] for h in json.loads((folder / "log_history.json").read_text()) if "loss" in h]
    assert losses[0] > 0 and metrics["eval_loss"] > 0 and changed(result.outputs["student"], folder) > 0
    same = [h for h in json.loads((result.outputs["same"] / "log_history.json").read_text()) if "loss" in h][0]
    assert same["loss"] == pytest.approx(0.0, abs=1e-6) and same["grad_norm"] == pytest.approx(0.0, abs=1e-6)


def smollm2_stages(steps: int) -> dict:
    lora = {"r": 4, "target_modules": ["q_proj", "v_proj"]}
    short = {
        "max_steps": steps,
        "per_device_train_batch_size": 2,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "learning_rate": 1e-4,
    }
    pairs = {"path": "recipes/data/arith_pref", "split": "train[:8]"}
    prompts = {"path": "recipes/data/arith_qa", "split": "train[:8]"}
    online = {**short, "num_generations": 2, "max_completion_length": 4}
    stages = {
        "kto": {"stage": "kto", "model": SMOLLM2, "data": pairs, "lora": lora, "training": {**short, "max_length": 96}},
        "orpo": {
            "stage": "orpo",
            "model": SMOLLM2,
            "data": pairs,
            "lora": lora,
            "training": {**short, "max_length": 96},
        },
        "simpo": {
            "stage": "cpo",
            "model": SMOLLM2,
            "data": pairs,
            "lora": lora,
            "training": {**short, "max_length": 96, "loss_type": "simpo", "cpo_alpha": 0.0},
        },
        "rloo": {
            "stage": "rloo",
            "model": SMOLLM2,
            "data": prompts,
            "lora": lora,
            "rewards": ["tunelab.rewards:numeric"],
            "training": online,
        },
        "distill": {
            "stage": "distill",
            "model": SMOLLM2,
            "teacher": SMOLLM2,
            "data": prompts,
            "lora": lora,
            "training": {**short, "max_completion_length": 4},
        },
    }
    return stages


def check_adapters(result, stages: dict, smollm2: Path, steps: int) -> None:
    for name in stages:
        folder = result.outputs[name]
        assert json.loads((folder / "adapter_config.json").read_text())["r"] == 4
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(smollm2), folder)
        assert model.config.tie_word_embeddings
        assert all(torch.isfinite(p).all() for n, p in model.named_parameters() if "lora_" in n)
        assert result.metrics[name]["global_step"] == steps


def test_kto_and_rloo_on_smollm2_with_lora(tmp_path: Path, smollm2: Path) -> None:
    """The real model's ChatML template, tokenizer and tied embeddings: KTO's pairs unpaired through the
    template, RLOO sampling through it (one step each; all five new trainers in the slow test below)."""
    stages = {k: v for k, v in smollm2_stages(1).items() if k in ("kto", "rloo")}
    check_adapters(run_stages(tmp_path, stages), stages, smollm2, 1)


@pytest.mark.slow
def test_new_stages_on_smollm2_with_lora(tmp_path: Path, smollm2: Path) -> None:
    """Each new trainer on the real model with LoRA, 2 steps: kto, orpo, cpo (SimPO), rloo, distill."""
    stages = smollm2_stages(2)
    check_adapters(run_stages(tmp_path, stages), stages, smollm2, 2)


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (
            {"stage": "kto", "data": PREF_TRAIN, "training": {"per_device_train_batch_size": 1}},
            r"per_device_train_batch_size' is 1: KTO estimates its KL term",
        ),
        ({"stage": "kto", "data": QA_TRAIN}, "is not KTO data: it needs prompt, completion and label"),
        (
            {"stage": "cpo", "data": PREF_TRAIN, "training": {"loss_type": "dpo"}},
            "loss_type' is 'dpo'; expected one of sigmoid, hinge",
        ),
        ({"stage": "orpo", "data": QA_TRAIN}, "is not preference data"),
        (
            {
                "stage": "rloo",
                "data": QA_TRAIN,
                "rewards": ["tunelab.rewards:exact_match"],
                "training": {"use_vllm": True},
            },
            "use_vllm' is true, but this machine has no CUDA GPU",
        ),
        (
            {
                "stage": "grpo",
                "data": QA_TRAIN,
                "rewards": ["tunelab.rewards:exact_match"],
                "training": {"use_vllm": True, "vllm_mode": "colocate"},
            },
            "vLLM generates on GPUs only",
        ),
        ({"stage": "rloo", "data": QA_TRAIN}, "has no `rewards:`"),
        ({"stage": "distill", "data": QA_TRAIN}, "has no `teacher:`"),
        ({"stage": "distill", "data": QA_TRAIN, "teacher": SMOLLM2}, "vocabulary of 49152 tokens and the student 300"),
        (
            {"stage": "distill", "data": QA_TRAIN, "teacher": "x", "training": {"teacher_model_name_or_path": "x"}},
            "is not read by the trainer: set `teacher:`",
        ),
    ],
)
def test_bad_input_is_named_before_anything_loads(tmp_path: Path, tiny_lm: Path, stage: dict, message: str) -> None:
    recipe = {"stages": {"s": {"model": str(tiny_lm), **stage}}}
    fails(["validate", str(write(tmp_path, recipe))], message)
