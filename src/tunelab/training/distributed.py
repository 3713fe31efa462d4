"""Several processes on one run: who writes, barriers that time out naming the rank and its node, how to launch.

`tunelab launch` (or `accelerate launch -m tunelab run ...`) starts N processes, on one host or
several; each runs the whole pipeline. Training stages run on every rank (the Trainer shards data
and all-reduces gradients; only the global main process saves). Everything else the pipeline
writes (run.json, stage.json, metrics, reports, the lock) is written by the global main process
alone, and stages that do not train (eval, diffusion_sample) run on it while the others wait at a
barrier. Across hosts, the run folder must be on storage every host sees, and every message that
concerns one rank names its host.
"""

from __future__ import annotations

import contextlib
import os
import re
import socket
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


def multi_node() -> bool:
    """More than one host takes part (torchrun's LOCAL_WORLD_SIZE: the ranks on this host)."""
    size = world()[1]
    return int(os.environ.get("LOCAL_WORLD_SIZE", str(size))) < size


def node() -> str:
    """This host's name, as messages and log lines show it."""
    return socket.gethostname()


def where(rank: int | None = None) -> str:
    """'rank R on HOST': who a message is about (the host is known for every rank once `init` ran)."""
    rank = world()[0] if rank is None else rank
    host = _HOSTS[rank][0] if 0 <= rank < len(_HOSTS) else (node() if rank == world()[0] else None)
    return f"rank {rank} on {host}" if host else f"rank {rank}"


def log_prefix() -> str:
    """'[HOST rank R] ' before each log line when the run spans hosts (their lines share one log), else ''."""
    return f"[{node()} rank {world()[0]}] " if distributed() and multi_node() else ""


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
        # Every rank's host and addresses, so that a rank that is late or gone is named by its host.
        hosts: list[Any] = [None] * world()[1]
        dist.all_gather_object(hosts, (node(), sorted(_addresses())), group=_MONITOR)
        _HOSTS[:] = hosts


_MONITOR = None
_HOSTS: list[tuple[str, list[str]]] = []  # (host, its IPv4 addresses) of each rank, from `init`


def _addresses() -> set[str]:
    """This host's IPv4 addresses (its name's and every interface's): a peer's error names one of them."""
    found = set()
    with contextlib.suppress(OSError):
        found.add(socket.gethostbyname(node()))
    with contextlib.suppress(OSError):
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                found.add(_interface_address(name))
    return found


def _interface_address(name: str) -> str:
    """The IPv4 address of network interface `name` (Linux: the SIOCGIFADDR ioctl)."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))  # SIOCGIFADDR
    return socket.inet_ntoa(packed[20:24])


def hosts() -> list[str]:
    """The hosts taking part, in rank order (known once `init` ran; [] for one process)."""
    return list(dict.fromkeys(host for host, _ in _HOSTS))


def _named(ranks: list[int]) -> str:
    return ", ".join(where(r) for r in ranks)


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
            text = " ".join(str(exc).split())
            late = _ranks_in(text)
            missing = f"{_named(late)} did not arrive" if late else _peer_in(text) or "a process did not arrive"
            raise TunelabError(
                f"{where()}: not every process reached '{what}' within {timeout.total_seconds():.0f} s: {missing} "
                f"({text[:200]}); see that rank's output"
            ) from None
    else:
        dist.barrier()


def _ranks_in(text: str) -> list[int]:
    """The ranks monitored_barrier names ('Rank 1 failed to pass', 'Ranks 1, 3 failed to pass')."""
    found = re.search(r"[Rr]anks? ((?:\d+(?:, )?)+) failed to pass", text)
    return [int(r) for r in re.findall(r"\d+", found.group(1))] if found else []


def _peer_in(text: str) -> str | None:
    """'rank R on HOST (ADDRESS)' for the peer address in a gloo/NCCL error ('[10.0.0.3]:4242'), when known."""
    for address in re.findall(r"\[?(\d{1,3}(?:\.\d{1,3}){3})\]?:\d+", text):
        ranks = [r for r, (_, addresses) in enumerate(_HOSTS) if address in addresses and r != world()[0]]
        if ranks:
            return f"{_named(ranks)} ({address})"
        if not address.startswith("127."):
            return f"the host at {address}"
    return None


# Words of gloo's and NCCL's errors when the other end of a collective went away.
LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Connection refused", "NCCL error")


def lost_peer(exc: BaseException, what: str) -> TunelabError | None:
    """A collective that failed because another rank died (SIGKILL, a host down), as one line naming that
    rank's host; None for any other error. The run stops here; its checkpoints stay for --resume."""
    if not distributed() or isinstance(exc, TunelabError | KeyboardInterrupt):
        return None
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    if not (any(word in text for word in LOST) or type(exc).__name__ == "DistBackendError"):
        return None
    peer = _peer_in(text)
    gone = f"lost contact with {peer}" if peer else "lost contact with another rank"
    return TunelabError(
        f"{where()}: {gone} during {what} ({text[:160]}): that host's processes died or its network failed; "
        "the run is marked failed: rerun (or requeue) it with --resume to continue from its last checkpoint"
    )


def anyone(flag: bool) -> bool:
    """True on every rank when `flag` is True on any: a decision all ranks must take at the same step."""
    if not distributed() or _MONITOR is None:
        return flag
    import torch
    import torch.distributed as dist

    box = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(box, op=dist.ReduceOp.MAX, group=_MONITOR)
    return bool(box.item())


def agree(ok: bool) -> list[int]:
    """Every rank's `ok`, gathered: the ranks where it is False (on every rank alike)."""
    if not distributed() or _MONITOR is None:
        return [] if ok else [world()[0]]
    import torch.distributed as dist

    every: list[Any] = [None] * world()[1]
    dist.all_gather_object(every, bool(ok), group=_MONITOR)
    return [r for r, good in enumerate(every) if not good]


def check_shared(path: Path, wait_s: float = 30.0) -> None:
    """Across hosts, every rank must see `path`, which the main process has just written: the run folder is
    on storage all hosts share. A network file system may show a new file late: look again for `wait_s`."""
    if not multi_node():
        return
    import time

    deadline = time.monotonic() + wait_s
    while not (seen := path.exists()) and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            os.listdir(path.parent)  # revalidates the folder's cached entries on NFS
        time.sleep(0.5)
    blind = agree(seen)
    if blind:
        raise TunelabError(
            f"{_named(blind)} cannot see '{path}', which the main process ({where(0)}) wrote: the run folder "
            "must be on storage every node shares (NFS, Lustre, GPFS); set output_dir to a path on it"
        )


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
    "rdzv_backend",
)
RDZV_BACKENDS = ("static", "c10d")


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

    Across hosts (`num_machines` > 1) every host runs this with its own `machine_rank`; `ifname` names the
    network interface gloo and NCCL use (a host with several picks the wrong one, or the loopback, by
    itself). The launcher (torchrun's agent) leaves SIGTERM to the ranks: a scheduler that signals every
    process of a job would otherwise have the agent send its own SIGTERM to the ranks, a second signal
    that cuts their checkpoint short (see `tunelab launch`, which starts the agent with SIGTERM ignored).
    """
    import sys

    import torch

    config_file = options.get("config_file")
    config = check_accelerate_config(config_file) if config_file else {}
    machines = options.get("num_machines") or config.get("num_machines") or 1
    n = options.get("num_processes") or config.get("num_processes") or machines
    if not isinstance(n, int) or n < 1:
        raise TunelabError(f"--num-processes must be a positive integer, got {n!r}")
    if machines > 1:
        _check_machines(options, config, n, machines)
    backend = options.get("rdzv_backend")
    if backend is not None and backend not in RDZV_BACKENDS:
        raise TunelabError(f"--rdzv-backend '{backend}': use {' or '.join(RDZV_BACKENDS)}")
    if machines > 1 and backend == "c10d" and config.get("same_network"):
        raise TunelabError(
            f"--config-file '{config_file}' sets same_network: true, with which accelerate ignores the c10d "
            "rendezvous (every host would look for the main one on itself): remove that line"
        )
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
    # --quiet: a rank that fails says why in its own lines; the launcher adds a summary, not its traceback
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--quiet"]
    values = {**options, "num_processes": n, "num_machines": machines}
    if not config:
        values.setdefault("mixed_precision", None)
        values["mixed_precision"] = values["mixed_precision"] or "no"  # the recipe's bf16/fp16 decide
    for key in LAUNCH_OPTIONS:
        if values.get(key) is not None:
            argv += [f"--{key}", str(values[key])]
    env = dict(os.environ)
    if options.get("ifname"):
        env["GLOO_SOCKET_IFNAME"] = env["NCCL_SOCKET_IFNAME"] = options["ifname"]
    env["TORCHELASTIC_SIGNALS_TO_HANDLE"] = "SIGINT,SIGHUP,SIGQUIT"  # not SIGTERM: the ranks' (see above)
    if on_cpu:
        env["ACCELERATE_USE_CPU"] = "1"
        if n > 1:
            argv.append("--multi_gpu")
    elif n > 1 and not config:
        argv.append("--multi_gpu")
    argv += ["--dynamo_backend", "no"] if not config else []
    if kind == "DEEPSPEED" and machines > 1:  # each host is launched on its own (here, or by srun): not pdsh/ssh
        launcher = (config.get("deepspeed_config") or {}).get("deepspeed_multinode_launcher", "standard")
        if launcher != "standard":
            raise TunelabError(
                f"--config-file '{config_file}' sets deepspeed_multinode_launcher: {launcher}, which starts every "
                "host from one over ssh; tunelab launch runs on each host (srun does that under Slurm): set it to "
                "standard"
            )
        argv += ["--deepspeed_multinode_launcher", "standard"]
    argv += ["-m", "tunelab", "run", *run_args]
    return argv, env


def _check_machines(options: dict[str, Any], config: dict[str, Any], n: int, machines: int) -> None:
    """Several hosts: the processes divide evenly, and each host knows its rank and where the main host is."""
    if n % machines:
        raise TunelabError(
            f"--num-processes {n} over --num-machines {machines}: the processes in all must divide evenly over "
            f"the machines (e.g. --num-processes {machines * max(1, n // machines)})"
        )
    if options.get("machine_rank") is None and config.get("machine_rank") is None:
        raise TunelabError(
            f"--num-machines {machines} needs --machine-rank: 0 on the main host, 1 to {machines - 1} on the others"
        )
    if not (options.get("main_process_ip") or config.get("main_process_ip")):
        raise TunelabError(
            f"--num-machines {machines} needs --main-process-ip: the address of the main host (machine rank 0), "
            "the same on every host"
        )


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
