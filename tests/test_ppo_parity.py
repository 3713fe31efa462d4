"""tunelab's PPO trainer reproduces a trajectory recorded with TRL 1.12's PPO loop (tests/data/ppo_reference/).

TRL removed PPO in 1.13; before tunelab's own trainer replaced TRL's loop, tests/data/ppo_reference/record.py
ran TRL 1.12's algorithm (tunelab's `ResumablePPOTrainer`, a `trl.experimental.ppo.PPOTrainer` subclass) on
models built by torch alone, for a full fine-tune and for LoRA, and wrote every update's logs and the trained
weights' fingerprints to trl-1.12.json. This replays both cases without TRL: the same models, settings and
seed through `tunelab.training.ppo.PPOTrainer`, and compares.

On the machine that recorded them (x86-64, torch 2.13 CPU, one thread) the replay is bit for bit: the same
logged floats and the same weight bytes (sha256). Elsewhere float32 sums may run in another order, which
moves the first steps by well under 1e-4 relative (tests/test_recorded_losses.py measured this); so logs
are compared within 1e-4 relative (1e-5 absolute, for values near 0), and each weight tensor by its sum,
norm and two random projections within the same tolerance. A change of the algorithm (a mask off by one
position, the score at another token, a different whitening) moves them by percents.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from tests.helpers import PPO_REFERENCE, fingerprint, ppo_reference_models, ppo_reference_run

REFERENCE = json.loads((PPO_REFERENCE / "trl-1.12.json").read_text())
RTOL, ATOL = 1e-4, 1e-5


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return ppo_reference_models(tmp_path_factory.mktemp("ppo-reference"))


def close_fingerprints(got: dict, want: dict, atol: float = ATOL) -> list[str]:
    """Names of the tensors whose sum, norm or projections differ beyond the tolerance."""
    assert got.keys() == want.keys()
    off = []
    for name, w in want.items():
        g = got[name]
        numbers = [(g["sum"], w["sum"]), (g["norm"], w["norm"]), *zip(g["projections"], w["projections"], strict=True)]
        if any(abs(a - b) > atol + RTOL * abs(b) for a, b in numbers):
            off.append(name)
    return off


def test_reference_models_are_the_recorded_ones(models: dict[str, Path]) -> None:
    """The replay starts where the recording did (else a failure below would be the builder's, not PPO's)."""
    from safetensors.torch import load_file

    for name, folder in models.items():
        got = fingerprint(load_file(folder / "model.safetensors"))
        assert close_fingerprints(got, REFERENCE["models"][name]) == [], name


@pytest.mark.parametrize("case", list(REFERENCE["cases"]))
def test_ppo_reproduces_trl_1_12(case: str, models: dict[str, Path], tmp_path: Path) -> None:
    from tunelab.training.ppo import PPOTrainer
    from tunelab.training.ppo_config import PPOConfig

    recorded = REFERENCE["cases"][case]
    got = ppo_reference_run(PPOTrainer, PPOConfig, models, recorded, tmp_path)
    assert len(got["updates"]) == len(recorded["updates"]) == 4
    for step, (ours, theirs) in enumerate(zip(got["updates"], recorded["updates"], strict=True)):
        assert ours.keys() == theirs.keys(), step
        for key, want in theirs.items():
            assert ours[key] == pytest.approx(want, rel=RTOL, abs=ATOL), (case, step, key)
    for part in ("policy", "value"):
        assert close_fingerprints(got[part], recorded[part]) == [], (case, part)
    # It learned: the policy moved from where it started (with LoRA, the adapter's B matrices, which start at 0).
    if recorded["lora"]:
        assert all(f["norm"] > 0 for n, f in got["policy"].items() if "lora_B" in n)
    else:
        assert close_fingerprints(got["policy"], REFERENCE["models"]["policy"]) != []


def test_config_takes_every_field_of_trl_1_12s_ppo_config() -> None:
    """Recipes written for TRL 1.12's PPOConfig validate against tunelab's: every PPO field, same default
    (but the documented three, whose TRL value TRL's loop never acted on)."""
    from transformers import TrainingArguments

    from tunelab.training.ppo_config import PPOConfig

    ours = {f.name: f.default for f in dataclasses.fields(PPOConfig)}
    recorded = REFERENCE["ppo_config_defaults"]
    assert set(recorded) <= set(ours), set(recorded) - set(ours)
    changed = {k for k, v in recorded.items() if ours[k] != v}
    assert changed == {"gradient_checkpointing", "max_grad_norm", "num_sample_generations"}, changed
    assert issubclass(PPOConfig, TrainingArguments)
    assert PPOConfig(output_dir="x", use_cpu=True).bf16 is True  # TRL's default: bf16 unless fp16


@pytest.mark.parametrize(
    ("extra", "same"),
    [
        ({"gradient_checkpointing": True}, True),  # recomputed activations: the same numbers, less memory
        ({"max_grad_norm": 1e-3}, False),  # TRL's loop never clipped; tunelab's clips when asked
    ],
)
def test_settings_trls_loop_ignored_are_taken(extra: dict, same: bool, models: dict[str, Path], tmp_path: Path) -> None:
    from tunelab.training.ppo import PPOTrainer
    from tunelab.training.ppo_config import PPOConfig

    recorded = REFERENCE["cases"]["full"]
    case = {**recorded, "settings": {**recorded["settings"], **extra}}
    got = ppo_reference_run(PPOTrainer, PPOConfig, models, case, tmp_path)
    first = recorded["updates"][0]
    assert got["updates"][0]["objective/scores"] == pytest.approx(first["objective/scores"], rel=RTOL, abs=ATOL)
    # The first mini-batch's loss comes before any optimizer step; the second's after one (clipped or not).
    second = [u["loss/value_avg"] for u in (got["updates"][1], recorded["updates"][1])]
    assert (second[0] == pytest.approx(second[1], rel=RTOL, abs=ATOL)) is same, second


def test_prompt_tokens_with_the_pad_id_stay_visible(models: dict[str, Path], tmp_path: Path) -> None:
    """Where the tokenizer's pad is its EOS (SmolLM2), a chat prompt holds EOS tokens of its own: the rollout
    attends to them (the collator's mask), and masks only the left padding."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from tests.helpers import ppo_reference_prompts
    from tunelab.training.ppo import PPOTrainer
    from tunelab.training.ppo_config import PPOConfig

    tokenizer = AutoTokenizer.from_pretrained(models["policy"], padding_side="left", pad_token="<eos>")
    prompts = ppo_reference_prompts(tokenizer).map(lambda row: {"input_ids": row["input_ids"] + [1, 4, 13]})
    args = PPOConfig(output_dir=str(tmp_path), use_cpu=True, report_to="none", per_device_train_batch_size=16)
    trainer = PPOTrainer(
        args=args,
        processing_class=tokenizer,
        model=AutoModelForCausalLM.from_pretrained(models["policy"]),
        ref_model=AutoModelForCausalLM.from_pretrained(models["policy"]),
        reward_model=AutoModelForSequenceClassification.from_pretrained(models["reward"]),
        value_model=AutoModelForSequenceClassification.from_pretrained(models["reward"]),
        train_dataset=prompts,
    )
    ids, mask = trainer._prompts(0)
    lengths = [len(prompts[i]["input_ids"]) for i in range(len(prompts))]
    assert sorted(mask.sum(1).tolist()) == sorted(lengths)  # every prompt token, its own EOS included
    assert ((ids == 1) & mask).sum(1).tolist() == [1] * 16 and not mask[:, 0].all()  # left padding is masked


def test_sampling_ignores_the_models_own_generation_settings(models: dict[str, Path], tmp_path: Path) -> None:
    """A repetition penalty or top_p in the policy's generation_config.json would change the distribution
    responses are sampled from, and PPO's ratio would divide by the wrong log-probabilities: the first
    rollout's KL to the reference (the same weights) stays 0."""
    import shutil

    from tunelab.training.ppo import PPOTrainer
    from tunelab.training.ppo_config import PPOConfig

    policy = shutil.copytree(models["policy"], tmp_path / "policy")
    config = json.loads((policy / "generation_config.json").read_text())
    (policy / "generation_config.json").write_text(json.dumps({**config, "repetition_penalty": 1.5, "top_p": 0.5}))
    recorded = REFERENCE["cases"]["full"]
    case = {**recorded, "settings": {**recorded["settings"], "total_episodes": 8}}
    got = ppo_reference_run(PPOTrainer, PPOConfig, {**models, "policy": policy}, case, tmp_path / "run")
    assert abs(got["updates"][0]["objective/kl"]) < 1e-5
    assert got["updates"][0]["objective/scores"] == pytest.approx(recorded["updates"][0]["objective/scores"])
