"""What keeps a training run's work safe: signals that stop with a checkpoint, checkpoints written
atomically and read back only when complete, ranks seeded apart and proven in sync, and a guard that
stops a diverging run."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.training import distributed

log = logging.getLogger(__name__)


def last_checkpoint(out_dir: Path) -> str | None:
    """Newest *complete* `checkpoint-N` folder in `out_dir`.

    The Trainer writes trainer_state.json last, so a folder without a readable one was torn by a
    kill mid-save; transformers' own get_last_checkpoint would pick it and the resume would crash.
    """
    import json
    import re

    if not out_dir.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in out_dir.iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))]
    for _, path in sorted(found, reverse=True):
        try:
            json.loads((path / "trainer_state.json").read_text())
        except (OSError, ValueError):
            continue
        return str(path)
    return None


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint; `signum` says which."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        super().__init__(f"stopped by signal {signum}; checkpoint {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


# A scheduler stops a job by signalling every process in it (Slurm: scancel, requeue, pre-emption), and
# launchers pass the signal on: one request reaches a rank as two or three SIGTERMs within moments.
ECHO_S = 30.0
_TERMS: list[float] = []


def echo(signum: int) -> bool:
    """True for a SIGTERM that repeats one received less than ECHO_S ago: the same request, not a second one."""
    import signal
    import time

    if signum != signal.SIGTERM:
        return False
    now = time.monotonic()
    repeat = bool(_TERMS) and now - _TERMS[-1] < ECHO_S
    if not repeat:
        _TERMS.append(now)
    return repeat


@contextlib.contextmanager
def stop_on_signals(trainer: Any, out_dir: Path):
    """The first SIGINT/SIGTERM ends training after the current step with a checkpoint; a second stops at once.

    A SIGTERM repeated within ECHO_S is the same request (see `echo`): a job's scheduler and its launchers
    each pass it on; to stop at once, send SIGINT (Ctrl-C) again.

    The Trainer saves when a callback sets `control.should_save` and stops at `should_training_stop`,
    so the checkpoint holds model, optimizer, scheduler, RNG states and data position like any other.
    On leaving, `Interrupted` (a KeyboardInterrupt) tells the pipeline to mark the run interrupted.
    """
    import signal
    import threading

    from tunelab.training.callbacks import StopAfterStep

    caught: list[int] = []

    def handler(signum: int, frame: Any) -> None:
        if echo(signum):
            return
        if caught:
            raise KeyboardInterrupt  # second signal: stop now, keep the checkpoints already written
        caught.append(signum)
        log.info("\nsignal %s: saving a checkpoint after this step, then stopping (again to stop at once)", signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    trainer.add_callback(StopAfterStep(caught, distributed.anyone))
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
    if caught:
        raise Interrupted(caught[0], last_checkpoint(out_dir))


STAGING = ".partial"  # checkpoints are written here, then renamed into place


def atomic_checkpoints(trainer: Any, out_dir: Path) -> None:
    """Make the Trainer write each `checkpoint-N` under `out_dir/.partial/` and rename it into place when complete.

    A kill at any moment leaves the previous complete checkpoints and, at worst, a torn folder in
    `.partial/` that nothing reads (it is cleared when training starts again). Rotation
    (`save_total_limit`) then runs on the real folder.
    """
    import shutil

    from transformers.trainer import rotate_checkpoints

    staging = out_dir / STAGING
    original = trainer._save_checkpoint
    if trainer.args.should_save and staging.exists():
        shutil.rmtree(staging, ignore_errors=True)

    def save(model: Any, trial: Any) -> None:
        trainer._get_output_dir = lambda trial=None: str(staging)  # where _save_checkpoint writes
        try:
            original(model, trial)
        finally:
            del trainer._get_output_dir
        trainer.accelerator.wait_for_everyone()  # sharded saves: every rank has written its part
        if trainer.args.should_save:
            name = f"checkpoint-{trainer.state.global_step}"
            target = out_dir / name
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging / name, target)
            best = trainer.state.best_model_checkpoint
            if best and Path(best).parent == staging:
                trainer.state.best_model_checkpoint = str(out_dir / Path(best).name)
            rotate_checkpoints(
                output_dir=str(out_dir),
                save_total_limit=trainer.args.save_total_limit,
                best_model_checkpoint=trainer.state.best_model_checkpoint,
                use_mtime=True,
            )
        trainer.accelerator.wait_for_everyone()

    trainer._save_checkpoint = save


def seed_per_rank(trainer: Any) -> None:
    """Under N processes, rank r trains with seed + r: its own dropout masks and sampled generations.

    The Trainer seeds every rank alike, so ranks draw the same dropout masks (and GRPO/PPO the same
    samples for a repeated prompt). Reseeding when training begins is safe for the data order:
    the sampler's generator was made when the dataloader was, and accelerate broadcasts rank 0's
    to every rank at each epoch. A resumed run then restores each rank's saved RNG states.
    """
    from tunelab.training.callbacks import SeedPerRank

    rank, size = distributed.world()
    if size == 1:
        return
    trainer.add_callback(SeedPerRank(rank))


def check_ranks_in_sync(trainer: Any) -> dict[str, float]:
    """After distributed training, every rank must hold the same trainable weights; prove it, or fail.

    A checksum of the trainable parameters is gathered from all ranks, on every host. A mismatch (a parameter
    outside DDP's reach, a rank that trained on different settings) is an error, not a silent
    divergence the saved model would hide. Returns {"world_size", "ranks_in_sync"} for metrics.
    """
    import torch

    rank, size = distributed.world()
    if size == 1:
        return {}
    import torch.distributed as dist

    model = trainer.accelerator.unwrap_model(trainer.model)
    params = [p.detach().float().flatten().cpu() for p in model.parameters() if p.requires_grad]
    flat = torch.cat(params).double()
    weights = torch.arange(flat.numel(), dtype=torch.float64) % 1021 + 1  # position-weighted: a swap shows too
    local = torch.stack([flat.sum(), flat.abs().sum(), (flat * weights).sum()])
    gathered = [torch.zeros_like(local) for _ in range(size)]
    dist.all_gather(gathered, local.to(trainer.args.device))
    sums = torch.stack([g.cpu() for g in gathered])
    apart = [r for r in range(size) if not torch.allclose(sums[r], sums[0], rtol=1e-6, atol=0)]
    if apart:
        raise TunelabError(
            f"after training, the ranks hold different weights: {', '.join(distributed.where(r) for r in apart)} "
            f"apart from {distributed.where(0)} (checksums {sums[:, 0].tolist()})"
        )
    return {"world_size": float(size), "ranks_in_sync": 1.0}


class Diverged(Exception):
    """Training stopped by `divergence_guard`; the message says why and at which step."""


def divergence_guard(trainer: Any, kl_limit: float | None, kl_keys: tuple[str, ...] = ("objective/kl", "kl")) -> None:
    """Stop training when a logged loss or reward turns NaN/inf, or the KL to the reference passes `kl_limit`.

    It raises from `on_log`, which TRL's trainers call before the step's checkpoint is
    saved, so the checkpoints on disk are all from before the blow-up.
    """
    from tunelab.training.callbacks import DivergenceGuard

    trainer.add_callback(DivergenceGuard(kl_limit, kl_keys, Diverged))


def diverged_error(where: str, reason: Diverged, out_dir: Path):
    """The one-line error for a diverged run, naming the newest checkpoint that is still good."""
    good = last_checkpoint(out_dir)
    kept = f"the last good checkpoint is {good}" if good else "no checkpoint was saved before it (set save_steps)"
    return TunelabError(
        f"'{where}' stopped: {reason}; {kept}. Lower training.learning_rate, raise training.kl_coef/beta, "
        "or raise kl_limit"
    )
