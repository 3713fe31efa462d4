"""The Trainer plumbing every training stage shares: the library's args with sane device defaults, and
training that resumes, prints one line per log, guards against divergence and saves what it made.

What keeps the work safe is in `tunelab.training.safeguards`, the log lines in `tunelab.core.progress`, tokens/s
and MFU in `tunelab.training.throughput`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tunelab.core.config import build
from tunelab.core.errors import TunelabError
from tunelab.core.runs import write_json
from tunelab.data.datasets import fingerprint
from tunelab.training.safeguards import (
    Diverged,
    atomic_checkpoints,
    check_ranks_in_sync,
    diverged_error,
    divergence_guard,
    last_checkpoint,
    seed_per_rank,
    stop_on_signals,
)
from tunelab.training.throughput import track_throughput
from tunelab.training.trl_changes import check_values

# Stages write their files where tunelab says; these keys would break that.
MANAGED_KEYS = ("output_dir",)


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
    check_values(cls, values, where)  # what TRL renamed or deprecated away since 1.12, with the new spelling
    fixed: dict[str, Any] = {"output_dir": str(out_dir)}
    values.setdefault("seed", seed)
    values.setdefault("report_to", "tensorboard")
    # Bars on a terminal, one printed line per log off it (the CLI sets TQDM_DISABLE there); not left to
    # the log level, which quiet() raises.
    values.setdefault("disable_tqdm", os.environ.get("TQDM_DISABLE", "") not in ("", "0", "false", "False"))
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


def kl_limit(cfg: dict[str, Any], where: str) -> float | None:
    """A stage's `kl_limit:`: stop when the logged KL to the reference passes it (None: no limit)."""
    value = cfg.get("kl_limit")
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
        raise TunelabError(f"'{where}.kl_limit' must be a positive number, got {value!r}")
    return value


def train(
    trainer: Any, out_dir: Path, resume: bool, signals: dict[str, str] | None = None, throttle: bool = False
) -> dict[str, float]:
    """Train (from the newest checkpoint when resuming); return the train metrics.

    Language-model trainers' metrics include `tokens_per_second` and `mfu` (see `track_throughput`);
    `signals` are the stage's per-step keys for the progress lines (see `readable_progress`).

    SIGINT/SIGTERM save a checkpoint and raise `Interrupted` (see `stop_on_signals`).
    """
    checkpoint = last_checkpoint(out_dir) if resume else None
    throughput = track_throughput(trainer)  # before readable_progress: its line shows what this adds to the logs
    readable_progress(trainer, signals, throttle)
    atomic_checkpoints(trainer, out_dir)
    seed_per_rank(trainer)
    with stop_on_signals(trainer, out_dir):
        result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics["global_step"] = float(result.global_step)
    metrics.update(throughput())
    metrics.update(check_ranks_in_sync(trainer))
    if trainer.args.should_save:
        write_json(out_dir / "log_history.json", trainer.state.log_history)  # loss curves for report.md
    if checkpoint:
        metrics["resumed_from_step"] = float(Path(checkpoint).name.split("-")[-1])
    return metrics


def guarded_train(
    trainer: Any,
    spec: Any,
    resume: bool,
    kl_limit: float | None = None,
    kl_keys: tuple[str, ...] = ("kl",),
    signals: dict[str, str] | None = None,
    throttle: bool = False,
) -> dict[str, float]:
    """`train` with `divergence_guard`: a NaN loss (or KL past `kl_limit`) ends in one line naming the checkpoint."""
    divergence_guard(trainer, kl_limit, kl_keys)
    try:
        return train(trainer, spec.out_dir, resume, signals, throttle)
    except Diverged as exc:
        raise diverged_error(spec.where, exc, spec.out_dir) from None


def save(trainer: Any, out_dir: Path, processor: Any) -> None:
    """Save the trained model, and on the main process only its tokenizer or processor (several ranks
    would otherwise write the same files)."""
    trainer.save_model(str(out_dir))
    if trainer.args.should_save:
        processor.save_pretrained(str(out_dir))


def fingerprints(train_ds: Any, eval_ds: Any = None) -> dict[str, str]:
    """The data fingerprints a stage records, so `--resume` can tell changed data from the same."""
    return {"data": fingerprint(train_ds)} | ({"eval_data": fingerprint(eval_ds)} if eval_ds is not None else {})


def train_and_save(trainer: Any, out_dir: Path, resume: bool, train_ds: Any, eval_ds: Any, processor: Any):
    """The common end of a Trainer-backed stage: train (resumably), evaluate, save the model and, on the
    main process only, its tokenizer or processor. Returns (metrics, data fingerprints)."""
    metrics = train(trainer, out_dir, resume)
    if eval_ds is not None:
        metrics.update({k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
    save(trainer, out_dir, processor)
    metrics["trainable_params"] = float(sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))
    return metrics, fingerprints(train_ds, eval_ds)


PROGRESS_KEYS = ("loss", "eval_loss", "grad_norm", "learning_rate", "mean_token_accuracy", "accuracy", "epoch")


def readable_progress(trainer: Any, signals: dict[str, str] | None = None, throttle: bool = False) -> None:
    """Replace the Trainer's dict-per-log printing with one compact line per log.

    `signals` are the stage's own per-step keys and their short labels (its `METRICS.progress`),
    printed first; `throttle` prints only every `logging_steps`, for loops that log each step (PPO).
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from tunelab.training.callbacks import PrinterLines, ProgressLines

    own = signals or {}
    keys = tuple(k for k in PROGRESS_KEYS if k not in own)

    def line(state: Any, logs: dict[str, Any]) -> str | None:
        every = getattr(state, "logging_steps", 0)
        if throttle and every and state.global_step % every and state.global_step != state.max_steps:
            return None  # TRL's PPO logs every step whatever logging_steps says; print as asked
        parts = [f"step {state.global_step}/{state.max_steps}"]
        parts += [f"{label} {logs[k]:.4g}" for k, label in own.items() if isinstance(logs.get(k), (int, float))]
        parts += [
            f"{k.replace('learning_rate', 'lr')} {logs[k]:.4g}" for k in keys if isinstance(logs.get(k), (int, float))
        ]
        if isinstance(logs.get("tokens_per_second"), float):  # from `track_throughput`
            parts.append(f"tok/s {logs['tokens_per_second']:.0f}")
        if isinstance(logs.get("mfu"), float):
            parts.append(f"mfu {100 * logs['mfu']:.1f}%")
        return "  ".join(parts) if any(k in logs for k in (*keys[:-1], *own)) else None

    handler = trainer.callback_handler
    handler.callbacks = [cb for cb in handler.callbacks if not isinstance(cb, (ProgressCallback, PrinterCallback))]
    trainer.add_callback(PrinterLines(line) if trainer.args.disable_tqdm else ProgressLines(line))
