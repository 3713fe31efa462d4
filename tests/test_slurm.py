"""`tunelab launch --slurm` without a cluster: the sbatch script it writes (directives, rendezvous, signal,
requeue and resume), run by bash against stand-ins for srun/scontrol/scancel whose srun runs each node's
real `tunelab launch --dry-run`; the refusals, one line each; multi-node launch options; host names in
errors. On a real two-node cluster: tests/cluster/ (`make test-cluster`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tunelab
from tests.helpers import fails, runner
from tunelab.cli.app import app
from tunelab.core.errors import TunelabError


def _dry_run(*args: str) -> str:
    result = runner.invoke(app, ["launch", "--slurm", "--dry-run", *args])
    assert result.exit_code == 0, result.output
    return result.output


def test_dry_run_prints_a_script_to_submit_unchanged(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    script = _dry_run("quickstart", "--nodes", "2")
    run_dir = tmp_path / "runs" / "quickstart"
    for line in (
        "#!/bin/bash",
        "#SBATCH --job-name=tunelab-quickstart",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --output={run_dir}-slurm-%j.out",
        "#SBATCH --open-mode=append",
        f"#SBATCH --chdir={tmp_path}",
        "#SBATCH --signal=B:TERM@120",
        f"#     {run_dir}",  # the header names the run folder...
        "# The run folder must be on storage every node sees",  # ...and where it must live
        'HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        '--main-process-ip "$HEAD" --main-process-port "$PORT" --rdzv-backend c10d',
        'if [ "$RESTARTS" -gt 0 ] && [ -f "$RUN_DIR/run.json" ]; then',
        "trap 'stop TERM' TERM",
    ):
        assert line in script, line
    assert "--requeue" not in script and "--time" not in script and "--gpus-per-node" not in script
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0  # bash parses it
    assert not list(tmp_path.rglob("*.sbatch"))  # a dry run writes nothing


def _fake_slurm(bin_dir: Path, calls: Path, minutes_left: int) -> None:
    """srun/scontrol/scancel stand-ins: each records its call; srun runs the node's command (rank 1) as a
    dry run, or sleeps when SLEEP is set (a job that is running when the signal comes)."""
    bin_dir.mkdir()
    tools = {
        "scontrol": f"""echo "scontrol $*" >> {calls}
case "$1 $2" in
  "show hostnames") printf 'n1\\nn2\\n' ;;
  "show job") echo "JobId=$SLURM_JOB_ID JobState=RUNNING EndTime=$(date -d '+{minutes_left} min' +%Y-%m-%dT%H:%M:%S)" ;;
esac""",
        "scancel": f'echo "scancel $*" >> {calls}; kill -TERM "$(cat {calls}.srun)" 2>/dev/null || true',
        "srun": f"""echo "srun $*" >> {calls}
while [ "${{1#--}}" != "$1" ]; do shift; done  # srun's own options
if [ -n "${{SLEEP:-}}" ]; then
  echo $$ > {calls}.srun
  trap 'kill $! 2>/dev/null; echo "task got TERM" >> {calls}; exit 143' TERM
  sleep 30 & wait; exit 0
fi
SLURM_NODEID=1 exec "$@" --dry-run""",
    }
    for name, body in tools.items():
        (bin_dir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bin_dir / name).chmod(0o755)


def _job_env(bin_dir: Path, restarts: int, **extra: str) -> dict[str, str]:
    return {
        **os.environ,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "n[1-2]",
        "SLURM_JOB_NUM_NODES": "2",
        "SLURM_RESTART_COUNT": str(restarts),
        **extra,
    }


def test_the_script_launches_each_node_and_resumes_when_requeued(
    tmp_path: Path, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run the script as sbatch would: each node's `tunelab launch` gets its machine rank, the first node as
    the rendezvous host, the process count and the interface; a requeued start continues with --resume."""
    data = Path("recipes/data/arith_qa").resolve()
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: run\nstages:\n  s: {{stage: sft, model: {tiny_lm}, data: {data}}}\n")
    out = tmp_path / "job.sbatch"
    job = tunelab.slurm(
        recipe, ["training.max_steps=3"], overwrite=True, nodes=2, processes_per_node=2, ifname="eth0", script=out
    )
    assert job.path == out and out.is_file() and job.job_id is None
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    _fake_slurm(bin_dir, calls, minutes_left=60)
    first = subprocess.run(["bash", str(out)], env=_job_env(bin_dir, 0), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout + first.stderr
    # the node's own `tunelab launch` parsed the script's command line and printed accelerate's (rank 1 of 2)
    said = first.stdout
    for part in (
        "GLOO_SOCKET_IFNAME=eth0 NCCL_SOCKET_IFNAME=eth0",
        "--num_processes 4 --num_machines 2 --machine_rank 1 --main_process_ip n1 --main_process_port 20007",
        "--rdzv_backend c10d",
        "-m tunelab run",
        "training.max_steps=3 --overwrite",
    ):
        assert part in said, said
    assert "SLURM_RESTART_COUNT=0" in said
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "run.json").write_text("{}")  # the first attempt got as far as starting the run
    again = subprocess.run(["bash", str(out)], env=_job_env(bin_dir, 1), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "training.max_steps=3 --resume" in again.stdout and "--overwrite" not in again.stdout.split("tunelab run")[1]


@pytest.mark.parametrize("minutes_left", [1, 60])
def test_the_warning_signal_reaches_every_rank_and_requeues_only_at_the_time_limit(
    tmp_path: Path, minutes_left: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Slurm's B:TERM reaches the batch shell: it signals the job's steps (every rank) with SIGTERM, waits for
    them, and requeues the job when the signal was the time limit's warning, not a cancel or a pre-emption."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "job.sbatch"
    tunelab.slurm("quickstart", dry_run=False, nodes=2, requeue=True, time="1:00:00", script=out)
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    _fake_slurm(bin_dir, calls, minutes_left=minutes_left)
    env = _job_env(bin_dir, 0, SLEEP="1")
    proc = subprocess.Popen(["bash", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 30
    while "srun" not in (calls.read_text() if calls.exists() else ""):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    recorded = calls.read_text()
    assert "scancel --signal=TERM 7" in recorded and "task got TERM" in recorded, output + recorded
    assert "every rank saves a checkpoint and stops" in output
    requeued = "scontrol requeue 7" in recorded
    assert requeued == (minutes_left == 1), output + recorded


def test_refusals_one_line_each(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    fails(["launch", "--slurm", "quickstart", "--time", "2:00"], r"--time 2:00 \(120 s\) is shorter than one checkpo")
    fails(["launch", "--slurm", "quickstart", "--signal", "B:TERM@10"], "leaves 10 s to save a checkpoint, but stage")
    fails(["launch", "--slurm", "quickstart", "--signal", "USR1@60"], "without 'B:' Slurm sends SIGUSR1 to every")
    fails(["launch", "--slurm", "quickstart", "--time", "soon"], "--time 'soon' is not a Slurm time limit")
    fails(["launch", "quickstart", "--nodes", "2"], "--nodes belongs to a Slurm job: add --slurm")
    fails(["launch", "--slurm", "quickstart", "--num-machines", "2"], "--num-machines is set by the sbatch script")
    fails(["launch", "--slurm", "quickstart", "--dry-run", "--submit"], "--dry-run and --submit contradict")
    fails(["launch", "--slurm", "quickstart", "sft.training.max_step=3"], "did you mean 'max_steps'")  # the recipe
    # Slurm's commands: sbatch missing for --submit; a partition smaller than --nodes (sinfo)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    fails(["launch", "--slurm", "quickstart", "--submit"], "--submit: sbatch not found on this machine's PATH")
    (bin_dir / "sinfo").write_text("#!/bin/sh\nprintf 'n1 debug*\\nn2 debug*\\nn3 big\\n'\n")
    (bin_dir / "sinfo").chmod(0o755)
    fails(
        ["launch", "--slurm", "quickstart", "--nodes", "3"], r"--nodes 3 is more than partition 'debug' has \(2 nodes"
    )
    fails(["launch", "--slurm", "quickstart", "--partition", "gpu"], "no such partition (partitions: big, debug)")
    assert "--partition=big" in _dry_run("quickstart", "--partition", "big")
    assert not list(tmp_path.rglob("*.sbatch"))


def test_a_file_that_is_not_a_script_of_ours_is_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    mine = tmp_path / "mine.sh"
    mine.write_text("#!/bin/bash\necho mine\n")
    fails(["launch", "--slurm", "quickstart", "--script", str(mine)], "exists and was not written by tunelab")
    assert mine.read_text() == "#!/bin/bash\necho mine\n"
    result = runner.invoke(app, ["launch", "--slurm", "quickstart", "--gpus-per-node", "8", "--sbatch=--qos=high"])
    assert result.exit_code == 0 and "wrote " in result.output, result.output
    written = (tmp_path / "runs" / "quickstart.sbatch").read_text()
    assert "#SBATCH --gpus-per-node=8" in written and "#SBATCH --qos=high" in written
    assert "PROCESSES_PER_NODE=8" in written
    again = runner.invoke(app, ["launch", "--slurm", "quickstart", "--nodes", "1"])  # our own script: replaced
    assert again.exit_code == 0 and "#SBATCH --nodes=1" in (tmp_path / "runs" / "quickstart.sbatch").read_text()


def test_api_options_are_checked() -> None:
    with pytest.raises(TunelabError, match="slurm\\(\\) has no option 'node'; did you mean 'nodes'"):
        tunelab.slurm("quickstart", node=2, dry_run=True)
    with pytest.raises(TunelabError, match="--nodes is 0: use a whole number"):
        tunelab.slurm("quickstart", nodes=0, dry_run=True)


def test_slurm_time_limits() -> None:
    from tunelab.training.slurm import parse_signal, parse_time

    assert [parse_time(t) for t in ("90", "5:30", "4:00:00", "1-0", "1-2:30", "1-00:00:01")] == [
        5400,
        330,
        14400,
        86400,
        95400,
        86401,
    ]
    assert parse_time("UNLIMITED") is None
    assert parse_signal("B:TERM@120") == (True, "TERM", 120) and parse_signal("TERM") == (False, "TERM", 60)
    assert parse_signal("B:10@300") == (True, "USR1", 300)  # Slurm takes numbers too


def test_multi_node_launch_needs_each_hosts_rank_and_the_main_host() -> None:
    fails(["launch", "--num-machines", "2", "quickstart", "--dry-run"], "--num-machines 2 needs --machine-rank")
    fails(
        ["launch", "--num-machines", "2", "--machine-rank", "1", "quickstart", "--dry-run"],
        "needs --main-process-ip: the address of the main host",
    )
    fails(
        ["launch", "--num-processes", "3", "--num-machines", "2", "--machine-rank", "0", "quickstart"],
        "must divide evenly over the machines",
    )
    fails(["launch", "--rdzv-backend", "etcd", "quickstart"], "--rdzv-backend 'etcd': use static or c10d")


def test_errors_and_log_lines_name_the_host(monkeypatch: pytest.MonkeyPatch) -> None:
    """Across hosts: a lost peer is named by its host (from the gloo error's address), log lines carry theirs."""
    from tunelab.training import distributed

    monkeypatch.setattr(distributed, "_HOSTS", [("n1", ["10.77.0.2"]), ("n2", ["10.77.0.3"])])
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    gone = RuntimeError("[gloo/transport/tcp/pair.cc:553] Connection closed by peer [10.77.0.3]:58085")
    error = distributed.lost_peer(gone, "stage 'sft'")
    assert error is not None and str(error).startswith(
        "rank 0 on n1: lost contact with rank 1 on n2 (10.77.0.3) during stage 'sft'"
    )
    assert distributed.lost_peer(ValueError("a bug"), "stage 'sft'") is None
    assert distributed.log_prefix() == f"[{distributed.node()} rank 0] "
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # one host: lines as they were
    assert distributed.log_prefix() == ""


def test_a_host_that_cannot_see_the_run_folder_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab.training import distributed

    monkeypatch.setattr(distributed, "_HOSTS", [("n1", ["10.77.0.2"]), ("n2", ["10.77.0.3"])])
    monkeypatch.setattr(distributed, "agree", lambda ok: [1])  # rank 1 reported that it does not see it
    for name, value in (("RANK", "0"), ("WORLD_SIZE", "2"), ("LOCAL_WORLD_SIZE", "1")):
        monkeypatch.setenv(name, value)
    with pytest.raises(TunelabError, match="rank 1 on n2 cannot see .* the run folder must be on storage every node"):
        distributed.check_shared(tmp_path / "run.json", wait_s=0)


def test_one_sigterm_from_several_senders_is_one_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """Slurm signals every process of a job and launchers pass it on: repeats within ECHO_S are echoes."""
    from tunelab.training import safeguards

    monkeypatch.setattr(safeguards, "_TERMS", [])
    assert not safeguards.echo(signal.SIGTERM)
    assert safeguards.echo(signal.SIGTERM) and safeguards.echo(signal.SIGTERM)
    assert not safeguards.echo(signal.SIGINT)  # Ctrl-C twice still stops at once
    monkeypatch.setattr(safeguards, "_TERMS", [time.monotonic() - safeguards.ECHO_S - 1])
    assert not safeguards.echo(signal.SIGTERM)  # long after: a second request


def test_help_lists_the_slurm_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "tunelab", "launch", "--help"], capture_output=True, text=True, timeout=60
    ).stdout
    assert "--slurm" in out and "--requeue" in out and "--ifname" in out
