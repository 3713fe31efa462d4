"""What every training stage shares: TRL/transformers args with sane device defaults,
quiet logs with readable progress lines, and checkpoint resume.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path
from typing import Any

from tunelab.config import build

# Stages write their files where tunelab says; these keys would break that.
MANAGED_KEYS = ("output_dir",)


def quiet() -> None:
    """Silence the libraries' known noise; keep progress bars, warnings that matter, errors."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # PPO lives in trl.experimental (TRL 1.12); we know
    for name in ("bitsandbytes",):  # before its import: it logs a Hub kernel it cannot fetch offline
        logging.getLogger(name).setLevel(logging.ERROR)
    import datasets
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # "Loading weights" bars; training bars stay
    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()  # TRL's per-map "Tokenizing..." bars
    for name in ("trl", "peft", "accelerate", "torch.distributed", "httpx", "huggingface_hub", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)
    for pattern in (
        ".*attention implementation is not set to a supported Flash Attention.*",
        ".*Padding-free training is enabled.*",
        ".*use_cache=True.*is incompatible with gradient checkpointing.*",
        ".*torch.utils.checkpoint.*use_reentrant.*",
        ".*is deprecated.*",
        ".*Trainer.tokenizer is now deprecated.*",
        ".*The tokenizer has new PAD/BOS/EOS tokens.*",
        ".*does not have many workers.*",
        ".*pin_memory.*",
        ".*is_gradient_checkpointing.*",
        ".*MatMul8bitLt: inputs will be cast.*",
    ):
        warnings.filterwarnings("ignore", message=pattern)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


def on_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def training_args(cls: type, values: dict[str, Any] | None, where: str, out_dir: Path, seed: int) -> Any:
    """Build `cls` (SFTConfig, ...) from a `training:` section.

    Defaults that differ from the library's, each because the library's would
    surprise here: CPU machines train in fp32 on the CPU (TRL defaults to
    bf16=True); the recipe's seed; TensorBoard logs (they work offline).
    """
    values = dict(values or {})
    fixed: dict[str, Any] = {"output_dir": str(out_dir)}
    values.setdefault("seed", seed)
    values.setdefault("report_to", "tensorboard")
    values.setdefault("disable_tqdm", False)  # else decided by the log level, which quiet() raises
    if on_cpu():
        values.setdefault("use_cpu", True)
        values.setdefault("bf16", False)
        values.setdefault("dataloader_pin_memory", False)
    elif not _gpu_has_bf16():
        values.setdefault("bf16", False)  # e.g. T4, V100: TRL's bf16 default would refuse to start
    return build(cls, values, where, fixed=fixed, exclude=MANAGED_KEYS)


def _gpu_has_bf16() -> bool:
    import torch

    return bool(torch.cuda.is_bf16_supported())


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


PROGRESS_KEYS = ("loss", "eval_loss", "grad_norm", "learning_rate", "mean_token_accuracy", "accuracy", "epoch")
RL_KEYS = {  # what PPO and GRPO log per step, in the order people read them
    "objective/scores": "score",
    "objective/kl": "kl",
    "objective/entropy": "entropy",
    "loss/value_avg": "value_loss",
    "reward": "reward",
    "kl": "kl",
    "rewards/chosen": "chosen",
    "rewards/accuracies": "pref_acc",
}


def readable_progress(trainer: Any) -> None:
    """Replace the Trainer's dict-per-log printing with one compact line per log."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    keys = PROGRESS_KEYS

    def line(state: Any, logs: dict[str, Any]) -> str | None:
        every = getattr(state, "logging_steps", 0)
        if "objective/kl" in logs and every and state.global_step % every and state.global_step != state.max_steps:
            return None  # TRL's PPO logs every step whatever logging_steps says; print as asked
        parts = [f"step {state.global_step}/{state.max_steps}"]
        parts += [f"{label} {logs[k]:.4g}" for k, label in RL_KEYS.items() if isinstance(logs.get(k), (int, float))]
        parts += [
            f"{k.replace('learning_rate', 'lr')} {logs[k]:.4g}" for k in keys if isinstance(logs.get(k), (int, float))
        ]
        return "  ".join(parts) if any(k in logs for k in (*keys[:-1], *RL_KEYS)) else None

    class _Progress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            text = line(state, logs or {}) if state.is_world_process_zero else None
            if text and self.training_bar is not None:
                self.training_bar.write(text)

    class _Printer(PrinterCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            text = line(state, logs or {}) if state.is_world_process_zero else None
            if text:
                print(text, flush=True)

    handler = trainer.callback_handler
    handler.callbacks = [cb for cb in handler.callbacks if not isinstance(cb, (ProgressCallback, PrinterCallback))]
    trainer.add_callback(_Printer() if trainer.args.disable_tqdm else _Progress())


class Interrupted(KeyboardInterrupt):
    """Training stopped by SIGINT/SIGTERM after saving a checkpoint; `signum` says which."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        super().__init__(f"stopped by signal {signum}; checkpoint {checkpoint}")
        self.signum, self.checkpoint = signum, checkpoint


@contextlib.contextmanager
def stop_on_signals(trainer: Any, out_dir: Path):
    """The first SIGINT/SIGTERM ends training after the current step with a checkpoint; a second stops at once.

    The Trainer saves when a callback sets `control.should_save` and stops at `should_training_stop`,
    so the checkpoint holds model, optimizer, scheduler, RNG states and data position like any other.
    On leaving, `Interrupted` (a KeyboardInterrupt) tells the pipeline to mark the run interrupted.
    """
    import signal
    import threading

    from transformers import TrainerCallback

    caught: list[int] = []

    class _Stop(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if caught:
                control.should_save = True
                control.should_training_stop = True

    def handler(signum: int, frame: Any) -> None:
        if caught:
            raise KeyboardInterrupt  # second signal: stop now, keep the checkpoints already written
        caught.append(signum)
        print(
            f"\nsignal {signum}: saving a checkpoint after this step, then stopping (again to stop at once)", flush=True
        )

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    trainer.add_callback(_Stop())
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


def train(trainer: Any, out_dir: Path, resume: bool) -> dict[str, float]:
    """Train (from the newest checkpoint when resuming); return the train metrics.

    SIGINT/SIGTERM save a checkpoint and raise `Interrupted` (see `stop_on_signals`).
    """
    checkpoint = last_checkpoint(out_dir) if resume else None
    readable_progress(trainer)
    atomic_checkpoints(trainer, out_dir)
    seed_per_rank(trainer)
    with stop_on_signals(trainer, out_dir):
        result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics["global_step"] = float(result.global_step)
    metrics.update(check_ranks_in_sync(trainer))
    from tunelab.runs import write_json

    if trainer.args.should_save:
        write_json(out_dir / "log_history.json", trainer.state.log_history)  # loss curves for report.md
    if checkpoint:
        metrics["resumed_from_step"] = float(Path(checkpoint).name.split("-")[-1])
    return metrics


def seed_per_rank(trainer: Any) -> None:
    """Under N processes, rank r trains with seed + r: its own dropout masks and sampled generations.

    The Trainer seeds every rank alike, so ranks draw the same dropout masks (and GRPO/PPO the same
    samples for a repeated prompt). Reseeding when training begins is safe for the data order:
    the sampler's generator was made when the dataloader was, and accelerate broadcasts rank 0's
    to every rank at each epoch. A resumed run then restores each rank's saved RNG states.
    """
    from transformers import TrainerCallback, set_seed

    from tunelab import distributed

    rank, size = distributed.world()
    if size == 1:
        return

    class _Seed(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            set_seed(args.seed + rank)

    trainer.add_callback(_Seed())


def check_ranks_in_sync(trainer: Any) -> dict[str, float]:
    """After distributed training, every rank must hold the same trainable weights; prove it, or fail.

    A checksum of the trainable parameters is gathered from all ranks. A mismatch (a parameter
    outside DDP's reach, a rank that trained on different settings) is an error, not a silent
    divergence the saved model would hide. Returns {"world_size", "ranks_in_sync"} for metrics.
    """
    import torch

    from tunelab import distributed

    rank, size = distributed.world()
    if size == 1:
        return {}
    import torch.distributed as dist

    model = trainer.accelerator.unwrap_model(trainer.model)
    params = [p.detach().float().flatten().cpu() for p in model.parameters() if p.requires_grad]
    local = torch.stack([torch.cat(params).sum(), torch.cat(params).abs().sum()]).double()
    gathered = [torch.zeros_like(local) for _ in range(size)]
    dist.all_gather(gathered, local.to(trainer.args.device))
    sums = torch.stack([g.cpu() for g in gathered])
    if not torch.allclose(sums, sums[0].expand_as(sums), rtol=1e-6, atol=0):
        from tunelab.errors import TunelabError

        raise TunelabError(f"after training, the ranks hold different weights (checksums {sums[:, 0].tolist()})")
    return {"world_size": float(size), "ranks_in_sync": 1.0}


class Diverged(Exception):
    """Training stopped by `divergence_guard`; the message says why and at which step."""


def divergence_guard(trainer: Any, kl_limit: float | None, kl_keys: tuple[str, ...] = ("objective/kl", "kl")) -> None:
    """Stop training when a logged loss or reward turns NaN/inf, or the KL to the reference passes `kl_limit`.

    It raises from `on_log`, which TRL's trainers call before the step's checkpoint is
    saved, so the checkpoints on disk are all from before the blow-up.
    """
    import math

    from transformers import TrainerCallback

    class _Guard(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            for key, value in (logs or {}).items():
                if not isinstance(value, float) or key in ("learning_rate", "lr"):
                    continue
                if not math.isfinite(value):
                    raise Diverged(f"'{key}' became {value} at step {state.global_step}")
                if kl_limit is not None and key in kl_keys and value > kl_limit:
                    raise Diverged(
                        f"KL to the reference model reached {value:.3g} at step {state.global_step}, "
                        f"past kl_limit={kl_limit:g}"
                    )

    trainer.add_callback(_Guard())


def diverged_error(where: str, reason: Diverged, out_dir: Path):
    """The one-line error for a diverged run, naming the newest checkpoint that is still good."""
    from tunelab.errors import TunelabError

    good = last_checkpoint(out_dir)
    kept = f"the last good checkpoint is {good}" if good else "no checkpoint was saved before it (set save_steps)"
    return TunelabError(
        f"'{where}' stopped: {reason}; {kept}. Lower training.learning_rate, raise training.kl_coef/beta, "
        "or raise kl_limit"
    )


def guarded_train(trainer: Any, spec: Any, resume: bool, kl_limit: float | None = None, kl_keys=("kl",)):
    """`train` with `divergence_guard`: a NaN loss (or KL past `kl_limit`) ends in one line naming the checkpoint."""
    divergence_guard(trainer, kl_limit, kl_keys)
    try:
        return train(trainer, spec.out_dir, resume)
    except Diverged as exc:
        raise diverged_error(spec.where, exc, spec.out_dir) from None
