"""Several processes through `tunelab launch`: real 2-process gloo runs on CPU for SFT and diffusion,
weights equal across ranks, loss curves against one process with the same global batch; the
launcher's command and its one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import QA_TRAIN, ddpm_stage, fails, tiny_training

LAUNCH = [sys.executable, "-m", "tunelab", "launch"]
RUN = [sys.executable, "-m", "tunelab", "run"]


def _recipe(tmp_path: Path, name: str, stage: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / name), "seed": 1, "stages": {"s": stage}}))
    return path


def _losses(tmp_path: Path, name: str) -> list[float]:
    history = json.loads((tmp_path / name / "s" / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h]


def _run(argv: list[str]) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def _one_and_two(tmp_path: Path, stage_for: callable) -> tuple[list[float], list[float], dict]:
    """Train with 1 process at batch 8, and with 2 processes at 4 each (same global batch)."""
    _run([*RUN, str(_recipe(tmp_path, "one", stage_for(8)))])
    output = _run([*LAUNCH, "--num-processes", "2", str(_recipe(tmp_path, "two", stage_for(4)))])
    assert "on 2 processes" in output
    metrics = json.loads((tmp_path / "two" / "metrics.json").read_text())["s"]
    return _losses(tmp_path, "one"), _losses(tmp_path, "two"), metrics


@pytest.mark.slow  # 37 s; CI's `make test-cluster` runs 1 node x 2 processes as the reference of its 2-node runs
def test_two_process_sft_matches_one_process(tmp_path: Path, tiny_lm: Path) -> None:
    def stage(batch: int) -> dict:
        training = tiny_training(max_steps=8, per_device_train_batch_size=batch, learning_rate=1e-3)
        return {"stage": "sft", "model": str(tiny_lm), "data": QA_TRAIN, "lora": {"r": 4}, "training": training}

    one, two, metrics = _one_and_two(tmp_path, stage)
    assert metrics["world_size"] == 2 and metrics["ranks_in_sync"] == 1  # checksums of every rank's weights agree
    assert len(one) == len(two) == 8
    # The same 8 examples per step (accelerate gives each rank half of the seeded global batch), so the
    # curves agree; the logged loss of 2 ranks is the mean of their means, which differs from the
    # token-weighted mean of 1 process when the halves hold different token counts (up to ~3% here).
    rel = np.abs(np.array(one) - np.array(two)) / np.array(one)
    assert np.median(rel) < 1e-3 and rel.max() < 0.05, (one, two)
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / n / "s" / "adapter_model.safetensors") for n in ("one", "two"))
    diff = sum(float(((a[k] - b[k]) ** 2).sum()) for k in a) ** 0.5 / sum(float((a[k] ** 2).sum()) for k in a) ** 0.5
    assert diff < 0.02, diff  # 8 Adam steps from float-order differences in the all-reduced gradients
    assert not list((tmp_path / "two").rglob("*rank1*"))  # one writer


@pytest.mark.slow  # ~20 s on 2 cores; SFT, the pipeline and the preference stages keep 2-process cases by default
def test_two_process_diffusion_matches_one_process(tmp_path: Path) -> None:
    def stage(batch: int) -> dict:
        s = ddpm_stage(max_steps=8, per_device_train_batch_size=batch, logging_steps=1)
        s["samples"] = None
        return s

    one, two, metrics = _one_and_two(tmp_path, stage)
    assert metrics["world_size"] == 2 and metrics["ranks_in_sync"] == 1
    assert len(one) == len(two) == 8
    # the same images per step, but each rank draws its own noise and timesteps: the curves agree in level
    assert abs(np.mean(one) - np.mean(two)) < 0.15 * np.mean(one), (one, two)
    assert (tmp_path / "two" / "s" / "model_index.json").is_file()


def test_launch_command_on_cpu_really_distributes() -> None:
    from tunelab.training.distributed import launch_command

    argv, env = launch_command({"num_processes": 2}, ["quickstart"])
    assert env["ACCELERATE_USE_CPU"] == "1"
    assert "--multi_gpu" in argv and "--cpu" not in argv  # --cpu --num_processes 2 would start one process
    assert argv[argv.index("--num_processes") + 1] == "2"
    assert argv[-4:] == ["-m", "tunelab", "run", "quickstart"]
    argv, env = launch_command({"config_file": "recipes/accelerate/multi_cpu.yaml"}, ["quickstart"])
    assert "--multi_gpu" in argv and env["ACCELERATE_USE_CPU"] == "1"


def test_shipped_accelerate_configs_parse() -> None:
    from accelerate.commands.config.config_args import ClusterConfig

    from tunelab.training.distributed import check_accelerate_config

    kinds = {}
    for path in sorted(Path("recipes/accelerate").glob("*.yaml")):
        if "deepspeed" not in path.name:
            check_accelerate_config(str(path))
        kinds[path.stem] = ClusterConfig.from_yaml_file(str(path)).distributed_type.value
    assert kinds == {
        "deepspeed_zero2": "DEEPSPEED",
        "deepspeed_zero3": "DEEPSPEED",
        "fsdp": "FSDP",
        "multi_cpu": "MULTI_CPU",
        "multi_gpu": "MULTI_GPU",
        "single_gpu": "NO",
    }


def test_bad_accelerate_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("distributed_type: [MULTI_GPU\n")
    fails(["launch", "--config-file", str(bad), "quickstart"], "is not valid YAML at line")
    bad.write_text("distributed_type: MULTI_GPUS\nnum_processes: 2\n")
    fails(
        ["launch", "--config-file", str(bad), "quickstart"],
        "unknown distributed_type 'MULTI_GPUS'; did you mean 'MULTI_GPU'?",
    )
    fails(["launch", "--config-file", str(tmp_path / "none.yaml"), "quickstart"], "no such file")


def test_gpu_config_on_a_machine_without_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    """A DDP/FSDP config on CPUs would quietly become N CPU processes of plain DDP: say so instead."""
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    for name, kind in (("fsdp", "FSDP"), ("multi_gpu", "MULTI_GPU")):
        fails(
            ["launch", "--config-file", f"recipes/accelerate/{name}.yaml", "quickstart", "--dry-run"],
            f"distributes over GPUs (distributed_type {kind}) but this machine has none; on CPUs use",
        )


def test_deepspeed_config_without_deepspeed() -> None:
    pytest.importorskip("accelerate")
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed")
    fails(
        ["launch", "--config-file", "recipes/accelerate/deepspeed_zero2.yaml", "quickstart"],
        "uses DeepSpeed, which is not installed: pip install 'tunelab[deepspeed]'",
    )


def test_more_processes_than_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from tunelab.core.errors import TunelabError
    from tunelab.training.distributed import launch_command

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(TunelabError, match="4 processes on this machine but it has 2 GPU"):
        launch_command({"num_processes": 4}, ["quickstart"])
    argv, env = launch_command({"num_processes": 2}, ["quickstart"])  # two GPUs: DDP over NCCL
    assert "--multi_gpu" in argv and env.get("ACCELERATE_USE_CPU") == os.environ.get("ACCELERATE_USE_CPU")


def test_a_rank_that_never_arrives_is_named(tmp_path: Path) -> None:
    """A barrier that times out says which rank did not arrive and on which host, instead of hanging."""
    script = tmp_path / "late.py"
    script.write_text(
        "import os, sys, time\n"
        "from tunelab.training import distributed\n"
        "from tunelab.core.errors import TunelabError\n"
        "distributed.init()\n"
        "if distributed.world()[0] == 1:\n"
        "    time.sleep(8)\n"
        "try:\n"
        "    distributed.barrier('the end of stage s', timeout_s=2)\n"
        "except TunelabError as exc:\n"
        "    print('ERROR', exc, flush=True)\n"
        "    sys.exit(2)\n"
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "MASTER_PORT": "29533"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120, env=env)
    text = out.stdout + out.stderr
    host = socket.gethostname()  # the rank and its host: across hosts, which node to look at
    said = f"ERROR rank 0 on {host}: not every process reached 'the end of stage s' within 2 s: rank 1 on {host} did"
    assert said in text, text[-2000:]


@pytest.mark.slow  # two processes stay in the default suite: test_two_process_sft_matches_one_process
def test_two_process_pipeline_hands_models_on(tmp_path: Path, tiny_lm: Path) -> None:
    """pretrain -> sft -> eval under 2 processes: the eval (main process only) reads the SFT adapter."""
    from tests.helpers import QA_TEST, pretrain_stage

    recipe = tmp_path / "pipe.yaml"
    stages = {
        "pretrain": pretrain_stage(max_steps=4),
        "sft": {
            "stage": "sft",
            "model": "${pretrain}",
            "data": QA_TRAIN,
            "lora": {"r": 4},
            "training": tiny_training(max_steps=4),
        },
        "eval": {
            "stage": "eval",
            "models": {"base": "${pretrain}", "sft": "${sft}"},
            "data": QA_TEST,
            "generation": {"max_new_tokens": 4},
        },
    }
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "p"), "seed": 0, "stages": stages}, sort_keys=False))
    output = _run([*LAUNCH, "--num-processes", "2", str(recipe)])
    assert "eval (eval) ->" in output and "(main process; the others wait)" in output
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert metrics["pretrain"]["ranks_in_sync"] == 1 and metrics["sft"]["ranks_in_sync"] == 1
    assert metrics["eval"]["sft"]["examples"] == 16
    assert json.loads((tmp_path / "p" / "run.json").read_text())["status"] == "completed"


# ~30 s: `make test-all`. Two processes stay in the default suite through SFT (the same weights as one process)
# and a pretrain -> sft -> eval pipeline; this one adds the other training stages under DDP.
@pytest.mark.slow
def test_two_process_reward_dpo_grpo_classify(tmp_path: Path, tiny_lm: Path, tiny_encoder: Path) -> None:
    """The other training stages under 2 processes: weights in sync, one writer, models that load."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from tests.helpers import KIND_TEST, KIND_TRAIN, PPO_TRAINING, PREF_TEST, PREF_TRAIN, grpo_stage

    training = tiny_training(max_steps=3, learning_rate=1e-3, max_length=128, per_device_train_batch_size=2)
    ppo = {**PPO_TRAINING, "per_device_train_batch_size": 2, "local_rollout_forward_batch_size": 2}
    ppo.update(save_strategy="steps", save_steps=1)  # checkpoints under DDP: policy, value model, both ranks' RNG
    stages = {
        "reward": {
            "stage": "reward",
            "model": str(tiny_lm),
            "data": PREF_TRAIN,
            "eval_data": PREF_TEST,
            "training": training,
        },
        "dpo": {"stage": "dpo", "model": str(tiny_lm), "data": PREF_TRAIN, "training": training},
        "classify": {
            "stage": "classify",
            "model": str(tiny_encoder),
            "data": KIND_TRAIN,
            "eval_data": KIND_TEST,
            "training": {
                **{
                    k: v
                    for k, v in tiny_training(max_steps=3, per_device_train_batch_size=4).items()
                    if k != "max_length"
                },
                "eval_strategy": "no",
            },
        },
        "grpo": grpo_stage(str(tiny_lm), "${reward}"),
        # 2 updates of 2 x 2 prompts; the LoRA policy's reference is itself with the adapter off (DDP hides it)
        "ppo": {"stage": "ppo", "model": str(tiny_lm), "reward_model": "${reward}", "data": QA_TRAIN, "training": ppo},
        "ppo_lora": {
            "stage": "ppo",
            "model": str(tiny_lm),
            "reward_model": "${reward}",
            "data": QA_TRAIN,
            "lora": {"r": 4, "target_modules": "all-linear"},
            "training": {**ppo, "learning_rate": 1e-2},
        },
    }
    recipe = tmp_path / "pref.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "p"), "seed": 0, "stages": stages}, sort_keys=False))
    _run([*LAUNCH, "--num-processes", "2", str(recipe)])
    metrics = json.loads((tmp_path / "p" / "metrics.json").read_text())
    assert all(metrics[s]["ranks_in_sync"] == 1 for s in ("reward", "dpo", "classify", "grpo", "ppo", "ppo_lora"))
    assert metrics["ppo"]["global_step"] == 2 and metrics["ppo"]["episodes"] == 8  # 8 episodes, 4 per update
    assert 0 <= metrics["classify"]["accuracy"] <= 1
    assert 0 <= metrics["reward"]["pairwise_accuracy"] <= 1
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "p" / "reward")
    AutoModelForCausalLM.from_pretrained(tmp_path / "p" / "dpo")
    AutoModelForCausalLM.from_pretrained(tmp_path / "p" / "grpo")
    policy = AutoModelForCausalLM.from_pretrained(tmp_path / "p" / "ppo")  # the policy alone, not DDP's wrapper
    assert not torch.equal(policy.lm_head.weight, AutoModelForCausalLM.from_pretrained(tiny_lm).lm_head.weight)
    assert PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), tmp_path / "p" / "ppo_lora")
    for name in ("ppo", "ppo_lora"):
        checkpoint = tmp_path / "p" / name / "checkpoint-1"
        assert {p.name for p in checkpoint.glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
        AutoModelForSequenceClassification.from_pretrained(checkpoint / "value_model")


def test_each_rank_trains_with_its_own_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank r reseeds with seed + r when training begins (the Trainer seeds every rank alike)."""
    import torch
    from transformers import TrainingArguments

    from tunelab.training import distributed
    from tunelab.training.safeguards import seed_per_rank

    class Fake:
        callbacks: list = []

        def add_callback(self, callback) -> None:
            self.callbacks.append(callback)

    args = TrainingArguments(output_dir="unused", seed=5, use_cpu=True, report_to="none")
    for rank, expected in ((0, 5), (1, 6)):
        trainer = Fake()
        trainer.callbacks = []
        monkeypatch.setattr(distributed, "world", lambda rank=rank: (rank, 2))
        seed_per_rank(trainer)
        torch.manual_seed(0)
        trainer.callbacks[0].on_train_begin(args, None, None)
        assert torch.initial_seed() == expected
    monkeypatch.setattr(distributed, "world", lambda: (0, 1))
    alone = Fake()
    alone.callbacks = []
    seed_per_rank(alone)
    assert alone.callbacks == []  # one process: the Trainer's own seeding stands


@pytest.mark.slow  # 95 s: two launches of 2 ranks; `make test-all` runs it
def test_sigterm_to_the_launcher_checkpoints_every_rank_and_resume_matches(tmp_path: Path, tiny_lm: Path) -> None:
    """SIGTERM to `tunelab launch` reaches both ranks: one checkpoint (all ranks' RNG states), run marked
    interrupted; `launch --resume` ends with the weights of an uninterrupted 2-process run."""
    import signal

    from safetensors.torch import load_file

    training = tiny_training(max_steps=300, learning_rate=1e-3, save_strategy="steps", save_steps=1000)
    stage = {"stage": "sft", "model": str(tiny_lm), "data": QA_TRAIN, "lora": {"r": 4}, "training": training}
    _run([*LAUNCH, "--num-processes", "2", str(_recipe(tmp_path, "straight", stage))])
    path = _recipe(tmp_path, "stopped", stage)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    argv = [*LAUNCH, "--num-processes", "2", str(path)]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = ""
    for line in proc.stdout:  # the first progress line: both ranks are training
        seen += line
        if "step " in line and "loss" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, seen + out  # 128 + SIGTERM, as `tunelab run` exits
    assert out.count("interrupted: the run is marked 'interrupted'") == 1, out  # said once, by rank 0
    assert out.count("saving a checkpoint after this step") == 2, out  # each rank got the signal once
    saved = list((tmp_path / "stopped" / "s").glob("checkpoint-*"))
    assert len(saved) == 1 and 0 < int(saved[0].name.split("-")[1]) < 300, seen + out
    assert {p.name for p in saved[0].glob("rng_state_*.pth")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert json.loads((tmp_path / "stopped" / "run.json").read_text())["status"] == "interrupted"
    _run([*LAUNCH, "--num-processes", "2", str(path), "--resume"])
    record = json.loads((tmp_path / "stopped" / "s" / "stage.json").read_text())
    assert record["status"] == "completed" and record["metrics"]["resumed_from_step"] > 0
    assert record["metrics"]["ranks_in_sync"] == 1
    a, b = (load_file(tmp_path / run / "s" / "adapter_model.safetensors") for run in ("straight", "stopped"))
    assert a.keys() == b.keys() and all(np.allclose(a[k].numpy(), b[k].numpy(), atol=1e-5) for k in a)
