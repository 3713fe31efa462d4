"""Several processes on one run: who writes, barriers that time out naming the rank, how to launch.

`tunelab launch` (or `accelerate launch -m tunelab run ...`) starts N processes; each runs the
whole pipeline. Training stages run on every rank (the Trainer shards data and all-reduces
gradients; only the main process saves). Everything else the pipeline writes (run.json,
stage.json, metrics, reports) is written by the main process alone, and stages that do not
train (eval, diffusion_sample) run on the main process while the others wait at a barrier.
"""

from __future__ import annotations

import contextlib
import os
from datetime import timedelta
from pathlib import Path
from typing import Any

from tunelab.core.errors import TunelabError

BARRIER_TIMEOUT_S = int(os.environ.get("TUNELAB_BARRIER_TIMEOUT", "1800"))  # a long eval on rank 0 is normal


def world() -> tuple[int, int]:
    """(rank, world size) from the launcher's environment; (0, 1) for a plain run."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return world()[0] == 0


def distributed() -> bool:
    return world()[1] > 1


def init() -> None:
    """Join the process group (gloo on CPU, NCCL on GPU) before the pipeline needs its first barrier."""
    if not distributed():
        return
    global _MONITOR
    import torch.distributed as dist
    from accelerate import PartialState

    PartialState(timeout=timedelta(seconds=BARRIER_TIMEOUT_S))
    if _MONITOR is None:
        # A gloo group of all ranks just for barriers: monitored_barrier (which times out and names the
        # missing rank) exists only for gloo, and the default group may be NCCL or device-mapped.
        _MONITOR = dist.new_group(backend="gloo", timeout=timedelta(seconds=BARRIER_TIMEOUT_S))


_MONITOR = None


def barrier(what: str, timeout_s: int | None = None) -> None:
    """Wait for every rank; on gloo, a rank that does not arrive is named instead of hanging forever."""
    if not distributed():
        return
    import torch.distributed as dist

    timeout = timedelta(seconds=timeout_s or BARRIER_TIMEOUT_S)
    if _MONITOR is not None:
        try:
            dist.monitored_barrier(group=_MONITOR, timeout=timeout, wait_all_ranks=True)
        except RuntimeError as exc:
            raise TunelabError(
                f"rank {world()[0]}: not every process reached '{what}' within {timeout.total_seconds():.0f} s "
                f"({' '.join(str(exc).split())[:200]}); see that rank's output"
            ) from None
    else:
        dist.barrier()


def broadcast(value: Any) -> Any:
    """The main process's `value` on every rank (a decision all ranks must share)."""
    if not distributed():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------- launching

LAUNCH_OPTIONS = (
    "num_processes",
    "num_machines",
    "machine_rank",
    "main_process_ip",
    "main_process_port",
    "mixed_precision",
    "config_file",
)


def check_accelerate_config(path: str) -> dict[str, Any]:
    """Parse an Accelerate config file; one line for YAML errors and unknown distributed types."""
    from pathlib import Path

    import yaml
    from accelerate.utils import DistributedType

    file = Path(path)
    if not file.is_file():
        raise TunelabError(f"--config-file '{path}': no such file (shipped ones are in recipes/accelerate/)")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise TunelabError(f"--config-file '{path}' is not valid YAML{where}") from None
    if not isinstance(data, dict):
        raise TunelabError(f"--config-file '{path}' must be a mapping of Accelerate settings")
    kinds = [d.value for d in DistributedType]
    kind = data.get("distributed_type", "NO")
    if kind not in kinds:
        from tunelab.core.errors import closest

        guess = closest(str(kind), kinds)
        hint = f"did you mean '{guess}'? " if guess else ""
        raise TunelabError(
            f"--config-file '{path}': unknown distributed_type '{kind}'; {hint}valid: {', '.join(kinds)}"
        )
    if kind == "DEEPSPEED":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise TunelabError(
                f"--config-file '{path}' uses DeepSpeed, which is not installed: pip install 'tunelab[deepspeed]'"
            )
    return data


def launch_command(options: dict[str, Any], run_args: list[str]) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch` argv and environment for `tunelab run RUN_ARGS` under `options`.

    On a machine without GPUs (or with a MULTI_CPU config), N > 1 processes are launched with
    `--multi_gpu` and ACCELERATE_USE_CPU=1, which starts N gloo processes through torchrun;
    Accelerate's own `--cpu --num_processes N` (and a MULTI_CPU config) would quietly start one.
    """
    import sys

    import torch

    config_file = options.get("config_file")
    config = check_accelerate_config(config_file) if config_file else {}
    n = options.get("num_processes") or config.get("num_processes") or 1
    machines = options.get("num_machines") or config.get("num_machines") or 1
    if not isinstance(n, int) or n < 1:
        raise TunelabError(f"--num-processes must be a positive integer, got {n!r}")
    gpus = torch.cuda.device_count()
    kind = config.get("distributed_type", "NO")
    if gpus == 0 and kind in ("MULTI_GPU", "DEEPSPEED", "FSDP") and config.get("use_cpu") is not True:
        raise TunelabError(
            f"--config-file '{config_file}' distributes over GPUs (distributed_type {kind}) but this machine has "
            "none; on CPUs use recipes/accelerate/multi_cpu.yaml or --num-processes N"
        )
    on_cpu = gpus == 0 or config.get("use_cpu") is True or kind == "MULTI_CPU"
    local = -(-n // machines)  # processes on this machine
    if not on_cpu and local > gpus:
        raise TunelabError(
            f"{local} processes on this machine but it has {gpus} GPU(s): lower --num-processes "
            "(one process per GPU), or add machines with --num-machines"
        )
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if on_cpu and local > cores:  # each rank holds a copy of the model: 100000 of them would exhaust the machine
        raise TunelabError(
            f"{local} processes on this machine but it has {cores} CPU core(s) for them: lower --num-processes "
            "(at most one process per core), or add machines with --num-machines"
        )
    argv = [sys.executable, "-m", "accelerate.commands.launch"]
    values = {**options, "num_processes": n, "num_machines": machines}
    if not config:
        values.setdefault("mixed_precision", None)
        values["mixed_precision"] = values["mixed_precision"] or "no"  # the recipe's bf16/fp16 decide
    for key in LAUNCH_OPTIONS:
        if values.get(key) is not None:
            argv += [f"--{key}", str(values[key])]
    env = dict(os.environ)
    if on_cpu:
        env["ACCELERATE_USE_CPU"] = "1"
        if n > 1:
            argv.append("--multi_gpu")
    elif n > 1 and not config:
        argv.append("--multi_gpu")
    argv += ["--dynamo_backend", "no"] if not config else []
    argv += ["-m", "tunelab", "run", *run_args]
    return argv, env


def signal_ranks(launcher_pid: int, signum: int) -> None:
    """Send `signum` to the ranks `accelerate launch` (pid `launcher_pid`) started, not to it.

    Each rank checkpoints on the first SIGINT/SIGTERM and stops at once on a second. Signalling
    the launcher too would make torchrun send its own SIGTERM to every rank right after ours: a
    second signal that cuts the checkpoint short. torchrun sees the ranks exit and exits itself.
    Without /proc (not Linux), the whole process group gets the signal.
    """
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == launcher_pid:  # field 4 of /proc/PID/stat: the parent's pid
            children.append(int(stat.parent.name))
    if not children:
        os.killpg(launcher_pid, signum)
        return
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
