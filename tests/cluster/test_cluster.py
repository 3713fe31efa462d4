"""Multi-node runs on a real two-node Slurm cluster (`make test-cluster`): two network namespaces on this
machine, n1 (10.77.0.2) and n2 (10.77.0.3), each a host with its own address, hostname and slurmd.

The same tiny SFT (40 steps, global batch 8, a checkpoint every 10 steps) runs six ways, and every way ends
with the weights of one node running 2 processes:
- `tunelab launch --slurm --submit` on 2 nodes x 1 process;
- the same, pre-empted by `scontrol requeue` after its first checkpoint: it resumes (SLURM_RESTART_COUNT=1);
- the same, warned of its time limit (Slurm's B:TERM): it checkpoints, requeues itself and resumes;
- the same, with n2's processes killed (SIGKILL): it fails at once naming n2; requeued, it resumes;
- `tunelab launch --num-machines 2` in the two namespaces, without Slurm.
And a PPO stage then an eval stage (on the main process only) across the two nodes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.helpers import PPO_TRAINING, QA_TEST, QA_TRAIN, tiny_training

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[2]
TUNELAB = [sys.executable, "-m", "tunelab"]
JOB_ENV = {"OMP_NUM_THREADS": "1", "TUNELAB_BARRIER_TIMEOUT": "120", "PYTHONUNBUFFERED": "1"}
STEPS, SAVE_EVERY = 40, 10  # a fault comes after checkpoint-10: 30 steps to land in


def _data(split: dict) -> dict:
    return {**split, "path": str(ROOT / split["path"])}  # jobs start in the test's folder: absolute paths


def _sft_recipe(folder: Path, name: str, model: Path, per_device: int) -> Path:
    training = tiny_training(
        max_steps=STEPS,
        per_device_train_batch_size=per_device,
        learning_rate=1e-3,
        save_strategy="steps",
        save_steps=SAVE_EVERY,
    )
    stage = {"stage": "sft", "model": str(model), "data": _data(QA_TRAIN), "lora": {"r": 4}, "training": training}
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(folder / name), "seed": 1, "stages": {"s": stage}}))
    return path


def _cli(args: list[str], timeout: int = 600, env: dict | None = None) -> str:
    out = subprocess.run(
        [*TUNELAB, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **JOB_ENV, **(env or {})}
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out.stdout + out.stderr


def _submit(recipe: Path, *options: str) -> str:
    said = _cli(["launch", "--slurm", "--submit", str(recipe), "--nodes", "2", "--ifname", "eth0", *options])
    found = re.search(r"submitted job (\d+)", said)
    assert found, said
    return found.group(1)


def _job(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(job: str, states: set[str], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = _job(job).get("JobState", "")
        if state in states:
            return state
        time.sleep(1)
    raise AssertionError(f"job {job} not in {states} after {timeout:.0f} s: {_job(job)}")


def _wait_for(path: Path, job: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} not written within {timeout:.0f} s: {_job(job)}"
        assert _job(job).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), _job(job)
        time.sleep(0.1)


def _release(job: str) -> None:
    """A requeued job is held ~120 s (BeginTime); start it now. Not in the second it was requeued: slurmd
    refuses a credential issued in the second its previous one was revoked ("Job credential revoked")."""
    _wait(job, {"PENDING"}, 120)
    time.sleep(3)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], check=True, timeout=30)


def _log(folder: Path, name: str, job: str) -> str:
    return (folder / f"{name}-slurm-{job}.out").read_text()


def _adapter(run: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(run / "s" / "adapter_model.safetensors")


def _same_weights(a: Path, b: Path) -> None:
    """Gloo sums the two ranks' gradients in either order alike: across hosts as on one, the same weights."""
    x, y = _adapter(a), _adapter(b)
    assert x.keys() == y.keys()
    worst = max(float(np.abs(x[k] - y[k]).max()) for k in x)
    assert worst < 1e-6, worst


def _stage(run: Path, name: str = "s") -> dict:
    return json.loads((run / name / "stage.json").read_text())


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cluster")


@pytest.fixture(scope="module")
def one_node(cluster: Path, work: Path, tiny_lm: Path) -> Path:
    """The reference: one host, 2 processes of 4 examples each (global batch 8)."""
    _cli(["launch", "--num-processes", "2", str(_sft_recipe(work, "one_node", tiny_lm, 4))])
    return work / "one_node"


def test_slurm_job_on_two_nodes_matches_one_node(cluster: Path, work: Path, tiny_lm: Path, one_node: Path) -> None:
    """2 nodes x 1 process through sbatch: COMPLETED, one writer, every line named by its node, and the
    adapter of one node with 2 processes."""
    recipe = _sft_recipe(work, "two_nodes", tiny_lm, 4)
    started = time.monotonic()
    job = _submit(recipe, "--time", "20:00")
    assert _wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600) == "COMPLETED", _log(work, "two_nodes", job)
    log, run = _log(work, "two_nodes", job), work / "two_nodes"
    assert "on 2 processes over 2 hosts (n1, n2)" in log
    assert "[n1 rank 0] -- s (sft) ->" in log and f"[n1 rank 0] step {STEPS}/{STEPS}" in log
    metrics = json.loads((run / "metrics.json").read_text())["s"]
    assert metrics["world_size"] == 2 and metrics["ranks_in_sync"] == 1
    assert json.loads((run / "run.json").read_text())["status"] == "completed"
    saved = sorted(p.name for p in (run / "s").glob("checkpoint-*"))
    assert saved == [f"checkpoint-{n}" for n in range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)]
    assert {p.name for p in (run / "s" / "checkpoint-10").glob("rng_state_*")} == {"rng_state_0.pth", "rng_state_1.pth"}
    assert not list(run.rglob("*rank1*"))  # one writer
    assert (run / ".tunelab.lock").read_text().split(",")[0].endswith(" on n1")  # held by rank 0, on n1
    _same_weights(run, one_node)
    print(f"2-node job: {time.monotonic() - started:.0f} s from sbatch to COMPLETED")


def test_requeue_resumes_to_the_same_weights(cluster: Path, work: Path, tiny_lm: Path, one_node: Path) -> None:
    """`scontrol requeue` after the first checkpoint: every rank checkpoints on Slurm's SIGTERM, the job comes
    back with SLURM_RESTART_COUNT=1, resumes, and ends with the uninterrupted weights."""
    recipe = _sft_recipe(work, "requeued", tiny_lm, 4)
    job = _submit(recipe, "--time", "20:00", "--requeue")
    run = work / "requeued"
    _wait_for(run / "s" / f"checkpoint-{SAVE_EVERY}", job, 600)
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    _release(job)
    assert _wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600) == "COMPLETED", _log(work, "requeued", job)
    log = _log(work, "requeued", job)
    assert "SLURM_RESTART_COUNT=0" in log and "SLURM_RESTART_COUNT=1" in log and "--resume" in log
    # both nodes' ranks caught Slurm's SIGTERM once (the launchers' and the batch script's copies are echoes)
    assert log.count("[n1 rank 0] signal 15: saving a checkpoint") == 1, log
    assert log.count("[n2 rank 1] signal 15: saving a checkpoint") == 1, log
    assert "n1: task 0: Exited with exit code 143" in log and "n2: task 1: Exited with exit code 143" in log
    record = _stage(run)
    assert record["status"] == "completed" and record["metrics"]["resumed_from_step"] >= SAVE_EVERY
    assert _job(job)["Restarts"] == "1"
    _same_weights(run, one_node)


def test_the_time_limit_warning_checkpoints_and_requeues_the_job(
    cluster: Path, work: Path, tiny_lm: Path, one_node: Path
) -> None:
    """Slurm's warning (--signal B:TERM@120) reaches the batch shell 120 s before the time limit: the script
    passes SIGTERM to every rank, they checkpoint, and the job requeues itself and resumes. Here the limit is
    brought near (scontrol update TimeLimit) and the warning sent as Slurm sends it (to the batch shell)."""
    recipe = _sft_recipe(work, "time_limit", tiny_lm, 4)
    job = _submit(recipe, "--time", "20:00", "--requeue", "--signal", "B:TERM@120")
    run = work / "time_limit"
    _wait_for(run / "s" / f"checkpoint-{SAVE_EVERY}", job, 600)
    hours, minutes, seconds = (int(x) for x in _job(job)["RunTime"].split(":"))  # H:MM:SS, within 20 min
    elapsed = hours * 3600 + minutes * 60 + seconds
    minutes = -(-(elapsed + 100) // 60)  # Slurm keeps limits in minutes: 100 to 160 s left
    subprocess.run(["scontrol", "update", f"jobid={job}", f"TimeLimit={minutes}"], check=True, timeout=30)
    subprocess.run(["scancel", "--batch", "--signal=TERM", job], check=True, timeout=30)
    _wait(job, {"PENDING"}, 120)  # requeued by its own script
    subprocess.run(["scontrol", "update", f"jobid={job}", "TimeLimit=20"], check=True, timeout=30)
    _release(job)
    assert _wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600) == "COMPLETED", _log(
        work, "time_limit", job
    )
    log = _log(work, "time_limit", job)
    assert re.search(r"tunelab: SIGTERM \((\d{2,3}) s left\): every rank saves a checkpoint", log), log
    assert "tunelab: requeueing job" in log and "SLURM_RESTART_COUNT=1" in log
    assert log.count("signal 15: saving a checkpoint") == 2, log  # each rank, once
    record = _stage(run)
    assert record["status"] == "completed" and record["metrics"]["resumed_from_step"] >= SAVE_EVERY
    _same_weights(run, one_node)


def test_a_killed_node_fails_the_job_naming_it_then_requeued_resumes(
    cluster: Path, work: Path, tiny_lm: Path, one_node: Path
) -> None:
    """n2's processes SIGKILLed mid-run: the job fails within the barrier timeout (120 s here), its error names
    n2; requeued, it resumes from the last complete checkpoint to the same weights."""
    recipe = _sft_recipe(work, "killed", tiny_lm, 4)
    job = _submit(recipe, "--time", "20:00", "--requeue")
    run = work / "killed"
    _wait_for(run / "s" / f"checkpoint-{SAVE_EVERY}", job, 600)
    pids = subprocess.run(["ip", "netns", "pids", "tl-n2"], capture_output=True, text=True, check=True).stdout.split()
    killed = [p for p in pids if Path(f"/proc/{p}/comm").read_text().startswith("python")]
    assert killed, "no tunelab process on n2"
    for pid in killed:
        os.kill(int(pid), 9)
    started = time.monotonic()
    assert _wait(job, {"COMPLETED", "FAILED", "CANCELLED"}, 180) == "FAILED"
    assert time.monotonic() - started < 120, "the job outlived the barrier timeout"
    log = _log(work, "killed", job)
    assert re.search(r"\[n1 rank 0\] error: rank 0 on n1: lost contact with rank 1 on n2 \(10\.77\.0\.3\)", log), log
    assert json.loads((run / "run.json").read_text())["status"] == "failed"
    subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)
    _release(job)
    assert _wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600) == "COMPLETED", _log(work, "killed", job)
    record = _stage(run)
    assert record["status"] == "completed" and record["metrics"]["resumed_from_step"] >= SAVE_EVERY
    _same_weights(run, one_node)


def test_launch_across_two_hosts_without_slurm(cluster: Path, work: Path, tiny_lm: Path, one_node: Path) -> None:
    """`tunelab launch --num-machines 2` on each host (static rendezvous at n1's address, gloo on eth0)."""
    recipe = _sft_recipe(work, "no_slurm", tiny_lm, 4)
    procs = []
    for rank, host in enumerate(("n1", "n2")):
        inside = f'hostname {host}; mount --bind {cluster / "hosts"} /etc/hosts; exec "$@"'
        argv = [
            *("nsenter", f"--net=/run/netns/tl-{host}", "unshare", "--uts", "--mount", "sh", "-c", inside, "sh"),
            *TUNELAB,
            *("launch", str(recipe), "--num-processes", "2", "--num-machines", "2", "--machine-rank", str(rank)),
            *("--main-process-ip", "10.77.0.2", "--main-process-port", "29511", "--ifname", "eth0"),
        ]
        env = {**os.environ, **JOB_ENV}
        procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    assert "[n1 rank 0] tunelab: no_slurm (s)" in outputs[0] and "over 2 hosts (n1, n2)" in outputs[0]
    assert json.loads((work / "no_slurm" / "metrics.json").read_text())["s"]["ranks_in_sync"] == 1
    _same_weights(work / "no_slurm", one_node)


def test_ppo_then_eval_on_the_main_process(cluster: Path, work: Path, tiny_lm: Path, reward_model: Path) -> None:
    """A PPO stage (tunelab's own loop) across 2 nodes, then an eval stage that runs on the main process while
    n2 waits: weights in sync, checkpoints with both ranks' RNG states, the eval's metrics."""
    ppo = {**PPO_TRAINING, "per_device_train_batch_size": 2, "local_rollout_forward_batch_size": 2}
    ppo.update(save_strategy="steps", save_steps=1)
    stages = {
        "ppo": {"stage": "ppo", "model": str(tiny_lm), "reward_model": str(reward_model), "data": _data(QA_TRAIN)},
        "eval": {
            "stage": "eval",
            "models": {"ppo": "${ppo}"},
            "data": _data(QA_TEST),
            "generation": {"max_new_tokens": 4},
        },
    }
    stages["ppo"]["training"] = ppo
    recipe = work / "ppo.yaml"
    recipe.write_text(yaml.safe_dump({"output_dir": str(work / "ppo"), "seed": 0, "stages": stages}, sort_keys=False))
    job = _submit(recipe, "--time", "20:00")
    assert _wait(job, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}, 600) == "COMPLETED", _log(work, "ppo", job)
    log, run = _log(work, "ppo", job), work / "ppo"
    assert "[n1 rank 0] -- eval (eval) ->" in log and "(main process; the others wait)" in log
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["ppo"]["world_size"] == 2 and metrics["ppo"]["ranks_in_sync"] == 1
    assert metrics["ppo"]["global_step"] == 2 and metrics["ppo"]["episodes"] == 8
    assert metrics["eval"]["ppo"]["examples"] == 16
    assert {p.name for p in (run / "ppo" / "checkpoint-1").glob("rng_state_*.pth")} == {
        "rng_state_0.pth",
        "rng_state_1.pth",
    }
    assert not list((run / "eval").glob("*rank1*"))
