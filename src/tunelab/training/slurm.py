"""`tunelab launch --slurm`: an sbatch script that runs a recipe over several nodes, resumes when requeued.

The script is plain bash a user can read, edit and submit unchanged. The first node of the allocation is
the rendezvous host; `srun` starts one task per node, each a `tunelab launch` of that node's processes
through accelerate's multi-node launch with c10d rendezvous (so every node runs the same checks and
signal handling as a local launch). Slurm's warning signal (`--signal=B:TERM@GRACE`) reaches the batch
shell alone: the script passes it to every rank, which saves a checkpoint after its step and exits 143.
A requeued start (`SLURM_RESTART_COUNT > 0`: `scontrol requeue`, pre-emption, a node failure, or the
job requeueing itself at its time limit) continues with `--resume` from the last complete checkpoint.

What is checked before anything is written or submitted, one line each: the options, the time limit
against the grace a checkpoint needs, the node count against the partition (`sinfo`, where Slurm is
installed), and `sbatch` for --submit. The recipe itself is checked by the caller (`tunelab.slurm`).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.core.runs import checkpoint_bytes, fmt_size

MARK = "# tunelab: sbatch script"  # the first comment line of every script tunelab writes (it may replace those)
DEFAULT_SIGNAL = "B:TERM@120"
STARTUP_S = 120  # start on every node, rendezvous, load the model: what a job spends before its first step
STEP_S = 30  # the step in progress when the signal comes, and leaving after the checkpoint
SAVE_BYTES_PER_S = 200e6  # a shared file system's write rate, conservatively: checkpoints go there
SIGNALS = ("TERM", "INT", "USR1", "USR2")  # what the batch shell may be warned with; ranks get TERM


@dataclass(kw_only=True)
class SlurmOptions:
    """What `tunelab launch --slurm` takes besides the recipe: the allocation and how each node launches."""

    nodes: int = 1
    gpus_per_node: int | None = None  # also the processes per node, one per GPU
    processes_per_node: int | None = None  # on CPU nodes (gloo); default: gpus_per_node, else 1
    cpus_per_node: int | None = None  # --cpus-per-task of the one task per node
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    job_name: str | None = None
    output: str | None = None  # the job's log; default RUN_DIR-slurm-%j.out beside the run folder
    sbatch: list[str] = field(default_factory=list)  # more #SBATCH lines: "--qos=high"
    requeue: bool = False
    signal: str = DEFAULT_SIGNAL
    ifname: str | None = None  # GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME on every node
    config_file: str | None = None  # an Accelerate config (recipes/accelerate/: DeepSpeed, FSDP)
    mixed_precision: str | None = None
    script: str | None = None  # where to write it; default RUN_DIR.sbatch beside the run folder


@dataclass
class SlurmJob:
    """The script written (`path`, None for a dry run) and, once submitted, its job id; `log` is its output."""

    script: str
    path: Path | None
    log: str
    job_id: str | None = None


def per_node(options: SlurmOptions) -> int:
    return options.processes_per_node or options.gpus_per_node or 1


def check_options(options: SlurmOptions) -> None:
    """One line for each option Slurm or the launch would refuse later."""
    for name in ("nodes", "gpus_per_node", "processes_per_node", "cpus_per_node"):
        value = getattr(options, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise TunelabError(f"--{name.replace('_', '-')} is {value!r}: use a whole number, 1 or more")
    if options.gpus_per_node and options.processes_per_node and options.processes_per_node != options.gpus_per_node:
        raise TunelabError(
            f"--processes-per-node {options.processes_per_node} with --gpus-per-node {options.gpus_per_node}: "
            "on GPU nodes tunelab runs one process per GPU; drop --processes-per-node"
        )
    for name in ("partition", "account", "job_name"):
        value = getattr(options, name)
        if value is not None and (not value or re.search(r"[\s'\"\\$`]", value)):
            raise TunelabError(f"--{name.replace('_', '-')} {value!r}: give a plain name, without spaces or quotes")
    for line in options.sbatch:
        if not line.startswith("-") or "\n" in line:
            raise TunelabError(
                f"--sbatch {line!r}: give one sbatch option as you would on its command line, e.g. --qos=high"
            )
    if options.ifname is not None and not re.fullmatch(r"[\w.:,-]+", options.ifname):
        raise TunelabError(f"--ifname {options.ifname!r}: give a network interface name, e.g. eth0 or ib0")
    parse_signal(options.signal)
    if options.time is not None:
        parse_time(options.time)


UNLIMITED = ("UNLIMITED", "INFINITE")


def parse_time(text: str) -> int | None:
    """Seconds in a Slurm time limit: M, M:S, H:M:S, D-H, D-H:M, D-H:M:S; None for UNLIMITED."""
    if text.strip().upper() in UNLIMITED:
        return None
    fix = "use minutes, MM:SS, HH:MM:SS or D-HH:MM:SS (e.g. --time 4:00:00)"
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not match:
        raise TunelabError(f"--time '{text}' is not a Slurm time limit: {fix}")
    days, a, b, c = match.groups()
    if days is not None:  # D-H, D-H:M, D-H:M:S
        hours, minutes, seconds = int(a), int(b or 0), int(c or 0)
        total = int(days) * 86400 + hours * 3600 + minutes * 60 + seconds
    elif c is not None:  # H:M:S
        total = int(a) * 3600 + int(b) * 60 + int(c)
    elif b is not None:  # M:S
        total = int(a) * 60 + int(b)
    else:  # M
        total = int(a) * 60
    if total <= 0:
        raise TunelabError(f"--time '{text}' is no time at all: {fix}")
    return total


def parse_signal(text: str) -> tuple[bool, str, int]:
    """(to the batch shell, signal name, grace seconds) of `[B:]SIG[@GRACE]` (Slurm's --signal; grace 60)."""
    match = re.fullmatch(r"(B:)?(?:SIG)?([A-Z0-9]+)(?:@(\d+))?", text.strip().upper())
    names = {str(getattr(signal, f"SIG{s}").value): s for s in SIGNALS}  # numbers as Slurm takes them too
    name = match and (names.get(match.group(2)) or match.group(2))
    if not match or name not in SIGNALS:
        raise TunelabError(
            f"--signal '{text}': use [B:]SIGNAL@SECONDS with SIGNAL one of {', '.join(SIGNALS)} "
            f"(e.g. {DEFAULT_SIGNAL}: SIGTERM to the batch script 120 s before the time limit)"
        )
    batch = bool(match.group(1))
    if not batch and name not in ("TERM", "INT"):
        raise TunelabError(
            f"--signal '{text}': without 'B:' Slurm sends SIG{name} to every process of the job, and it would kill "
            f"them; use B:{name}@... (the script passes it on as SIGTERM) or TERM"
        )
    grace = int(match.group(3)) if match.group(3) else 60
    if grace <= 0:
        raise TunelabError(f"--signal '{text}': give the seconds before the time limit, e.g. {DEFAULT_SIGNAL}")
    return batch, name, grace


def check_time(options: SlurmOptions, plans: list[Any]) -> None:
    """The time limit must leave a job time to start and train, and the grace time to save one checkpoint:
    otherwise every allocation ends before a checkpoint is written, and a requeued job never gets further."""
    _, name, grace = parse_signal(options.signal)
    biggest = max(plans, key=checkpoint_bytes, default=None)
    if biggest is not None:
        size = checkpoint_bytes(biggest)
        need = STEP_S + size / SAVE_BYTES_PER_S
        if grace < need:
            raise TunelabError(
                f"--signal {options.signal} leaves {grace} s to save a checkpoint, but stage '{biggest.stage}' writes "
                f"~{fmt_size(size)} per checkpoint (~{need:.0f} s at {SAVE_BYTES_PER_S / 1e6:.0f} MB/s, with the step "
                f"in progress): raise the grace, e.g. --signal B:{name}@{int(need * 1.5 // 60 + 1) * 60}"
            )
    limit = None if options.time is None else parse_time(options.time)
    if limit is None:
        return
    if limit < grace + STARTUP_S:
        raise TunelabError(
            f"--time {options.time} ({limit} s) is shorter than one checkpoint interval can survive: the job needs "
            f"~{STARTUP_S} s to start on every node and the last {grace} s (--signal {options.signal}) to save its "
            f"checkpoint; give --time at least {_clock(grace + STARTUP_S + 60)}"
        )


def _clock(seconds: int) -> str:
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def partition_nodes(partition: str | None) -> tuple[str, int] | None:
    """(partition, its node count) from `sinfo`; the default partition when None. None where Slurm is not
    installed or does not answer (the script may be written for another cluster)."""
    if shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-o", "%N %P"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    members: dict[str, set[str]] = {}
    default = None
    for line in out.splitlines():
        if len(parts := line.split()) != 2:
            continue
        host, name = parts
        if name.endswith("*"):
            name = default = name[:-1]
        members.setdefault(name, set()).add(host)
    name = partition or default
    if name is None:
        return None
    if name not in members:
        known = ", ".join(sorted(members)) or "none"
        raise TunelabError(f"--partition '{name}': sinfo knows no such partition (partitions: {known})")
    return name, len(members[name])


def check_nodes(options: SlurmOptions) -> None:
    found = partition_nodes(options.partition)
    if found is not None and options.nodes > found[1]:
        name, count = found
        raise TunelabError(
            f"--nodes {options.nodes} is more than partition '{name}' has ({count} node{'s' * (count != 1)}, "
            f"sinfo): lower --nodes, or pick another --partition"
        )


def sbatch_path() -> str:
    found = shutil.which("sbatch")
    if found is None:
        raise TunelabError(
            "--submit: sbatch not found on this machine's PATH: run this on the cluster's login node, or write the "
            "script without --submit and submit it there with sbatch"
        )
    return found


def default_paths(run_dir: Path) -> tuple[Path, str]:
    """The script and the job's log, beside the run folder (never in it: the run folder is tunelab's)."""
    return run_dir.with_name(run_dir.name + ".sbatch"), str(run_dir.with_name(run_dir.name + "-slurm-%j.out"))


# The script's body; @NAME@ is filled in by `render`. Plain bash, so that a user can read and edit it.
BODY = r"""
set -uo pipefail
export PYTHONUNBUFFERED=1  # every rank's lines reach the log as they are printed
@IFNAME@RUN_DIR=@RUN_DIR@
PROCESSES_PER_NODE=@PER_NODE@
GRACE=@GRACE@
REQUEUE=@REQUEUE@
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)  # the rendezvous host
PORT=$((20000 + SLURM_JOB_ID % 20000))  # one per job: jobs that share a node do not collide
RESTARTS=${SLURM_RESTART_COUNT:-0}
MODE=(@FLAGS@)
if [ "$RESTARTS" -gt 0 ] && [ -f "$RUN_DIR/run.json" ]; then
    MODE=(--resume)  # requeued: continue from the last complete checkpoint
fi
echo "tunelab: job $SLURM_JOB_ID on $SLURM_JOB_NODELIST, SLURM_RESTART_COUNT=$RESTARTS, head $HEAD:$PORT ${MODE[*]:-}"

NEAR_END=0
stop() {  # Slurm's signal reaches this shell alone: every rank gets SIGTERM, saves a checkpoint and stops
    local end left=""
    end=$(scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o 'EndTime=[^ ]*' | head -n 1 | cut -d= -f2)
    end=$(date -d "$end" +%s 2>/dev/null) && left=$((end - $(date +%s)))
    if [ -n "$left" ] && [ "$left" -le $((GRACE + 60)) ]; then NEAR_END=1; fi  # the time limit, not a kill
    echo "tunelab: SIG$1 (${left:-?} s left): every rank saves a checkpoint and stops"
    scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || true  # to the job's steps (srun's), not this shell
}
@TRAPS@

srun --nodes="$SLURM_JOB_NUM_NODES" --ntasks-per-node=1@CPUS@ --kill-on-bad-exit=0 \
    bash -c 'exec "$@" --machine-rank "$SLURM_NODEID"' tunelab \
    @LAUNCH@ \
    --num-processes $((SLURM_JOB_NUM_NODES * PROCESSES_PER_NODE)) --num-machines "$SLURM_JOB_NUM_NODES" \
    --main-process-ip "$HEAD" --main-process-port "$PORT" --rdzv-backend c10d --no-check @EXTRA@\
    ${MODE[@]+"${MODE[@]}"} &
SRUN=$!
CODE=0
while kill -0 "$SRUN" 2>/dev/null; do  # a trapped signal interrupts `wait`: wait for srun again
    wait "$SRUN"
    CODE=$?
done
if [ "$NEAR_END" = 1 ] && [ "$REQUEUE" = 1 ]; then
    echo "tunelab: requeueing job $SLURM_JOB_ID: it continues from its checkpoint when it starts again"
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$CODE"
"""


def render(
    recipe: str,
    overrides: list[str],
    flags: list[str],
    run_dir: Path,
    name: str,
    options: SlurmOptions,
    log: str,
    path: Path,
) -> str:
    """The sbatch script's text: a header that says what it does and where the run folder must live, the
    #SBATCH directives, then `BODY`."""
    batch, signame, grace = parse_signal(options.signal)
    procs = per_node(options)
    directives = [
        f"--job-name={options.job_name or 'tunelab-' + name}",
        f"--nodes={options.nodes}",
        "--ntasks-per-node=1",
        *([f"--gpus-per-node={options.gpus_per_node}"] if options.gpus_per_node else []),
        *([f"--cpus-per-task={options.cpus_per_node}"] if options.cpus_per_node else []),
        *([f"--time={options.time}"] if options.time else []),
        *([f"--partition={options.partition}"] if options.partition else []),
        *([f"--account={options.account}"] if options.account else []),
        f"--output={log}",
        "--open-mode=append",  # a requeued job's lines follow the first attempt's
        f"--chdir={Path.cwd()}",  # the recipe's relative paths mean what they meant here
        f"--signal={'B:' if batch else ''}{signame}@{grace}",
        *(["--requeue"] if options.requeue else []),
        *options.sbatch,
    ]
    extra = []
    if options.config_file:
        extra += ["--config-file", str(Path(options.config_file).resolve())]
    if options.mixed_precision:
        extra += ["--mixed-precision", options.mixed_precision]
    if options.ifname:
        extra += ["--ifname", options.ifname]
    each = f"{procs} process(es) per node, one per GPU" if options.gpus_per_node else f"{procs} process(es) per node"
    itself = "\n# So near its time limit, the job then requeues itself." if options.requeue else ""
    header = f"""#!/bin/bash
{MARK} for recipe {recipe}, written by `tunelab launch --slurm`.
# {options.nodes} node(s), {each}.
# Submit it as it is: sbatch {path}
#
# The run folder must be on storage every node sees (NFS, Lustre, GPFS, ...), and so must tunelab itself
# (the Python below) and the recipe's models and data:
#     {run_dir}
# The main process (rank 0, on the first node) writes run.json, the lock and the checkpoints there, every
# rank writes its RNG state into each checkpoint, and a requeued job resumes from there on whichever
# nodes it gets.
#
# The first node of the allocation is the rendezvous host; srun starts one task per node, each a
# `tunelab launch` of that node's processes through accelerate's multi-node launch (c10d rendezvous);
# every process checks the recipe before it trains (tunelab checked it before writing this script too).
# Slurm's SIG{signame}, {grace} s before the time limit, is passed to every rank as SIGTERM: each saves a
# checkpoint after its current step and exits 143 (the run is marked interrupted).{itself}
# A requeued start (SLURM_RESTART_COUNT > 0: scontrol requeue, pre-emption, a node failure) continues
# the run with --resume from its last complete checkpoint.
"""
    traps = [f"trap 'stop {signame}' {signame}"] + ([] if signame == "TERM" else ["trap 'stop TERM' TERM"])
    fill = {
        "IFNAME": f"export GLOO_SOCKET_IFNAME={options.ifname} NCCL_SOCKET_IFNAME={options.ifname}\n"
        if options.ifname
        else "",
        "RUN_DIR": shlex.quote(str(run_dir)),
        "PER_NODE": str(procs),
        "GRACE": str(grace),
        "REQUEUE": str(int(options.requeue)),
        "FLAGS": shlex.join(flags),
        "TRAPS": "\n".join(traps),
        "CPUS": f" --cpus-per-task={options.cpus_per_node}" if options.cpus_per_node else "",
        "LAUNCH": shlex.join([sys.executable, "-m", "tunelab", "launch", recipe, *overrides]),
        "EXTRA": shlex.join(extra) + " " if extra else "",
    }
    body = re.sub(r"@([A-Z_]+)@", lambda m: fill[m.group(1)], BODY)
    return header + "".join(f"#SBATCH {d}\n" for d in directives) + body


def write(path: Path, text: str) -> None:
    """Write the script; a file there that tunelab did not write is never replaced."""
    from tunelab.core.runs import write_atomic

    if path.is_dir():
        raise TunelabError(f"--script '{path}' is a folder: give the path of the script file to write")
    if path.exists():
        try:
            head = path.read_text(errors="replace").splitlines()[:2]
        except OSError:
            head = []
        if not any(line.startswith(MARK) for line in head):
            raise TunelabError(
                f"'{path}' exists and was not written by tunelab: choose another --script, or move that file"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)
    os.chmod(path, 0o755)


def submit(path: Path) -> str:
    """`sbatch --parsable PATH`: the job id."""
    try:
        out = subprocess.run([sbatch_path(), "--parsable", str(path)], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        raise TunelabError(f"sbatch {path}: no answer from Slurm within 120 s; is slurmctld up?") from None
    if out.returncode != 0:
        said = " ".join((out.stderr or out.stdout).split())[:300] or f"exit code {out.returncode}"
        raise TunelabError(f"sbatch {path} refused the job: {said}")
    return out.stdout.strip().split(";")[0]
