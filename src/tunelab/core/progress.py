"""What a training run shows: the libraries' known noise silenced, and one compact line per log.

The lines go to the `tunelab.progress` logger (INFO): the CLI prints them, an API user sees them once
logging is configured. Bars stay on a terminal; off one (the CLI sets TQDM_DISABLE there) the line is
all there is, so CI and Slurm logs hold one line per logging step and no carriage returns.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from collections.abc import Iterator
from typing import Any

# Warnings the libraries raise on every run that the user cannot act on (tunelab decides these settings).
NOISE = (
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
)
# Loggers of the libraries tunelab drives, held at ERROR during its calls.
LIBRARY_LOGGERS = ("trl", "peft", "accelerate", "torch.distributed", "httpx", "huggingface_hub", "bitsandbytes")


@contextlib.contextmanager
def quiet(diffusers: bool = False) -> Iterator[None]:
    """Silence the libraries' known noise while tunelab works; keep progress bars, warnings that matter, errors.

    A context manager (or decorator) around tunelab's own calls, so that a program calling tunelab gets its
    warning filters, library log levels and progress-bar settings back as they were. tunelab's filters are
    appended: the caller's own (a `-W` option, pytest's `filterwarnings`) come first and win, and tunelab's
    decide only what the caller left to Python's defaults. `diffusers`: also diffusers' (warnings and errors
    only, no "Loading components" bars), for the diffusion stages; the others need not import it.
    """
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # PPO lives in trl.experimental (TRL 1.12); we know
    with warnings.catch_warnings(), contextlib.ExitStack() as restore:
        # Before their import: they log a Hub kernel they cannot fetch offline.
        restore.enter_context(_levels(("bitsandbytes", "kernels"), logging.ERROR))
        import datasets
        import transformers

        restore.enter_context(_levels(("transformers", "datasets", *LIBRARY_LOGGERS), logging.ERROR))
        restore.enter_context(_bars(transformers.utils.logging))  # "Loading weights" bars; training bars stay
        restore.enter_context(_bars(datasets))  # TRL's per-map "Tokenizing..." bars
        if diffusers:
            from diffusers.utils import logging as diffusers_logging

            restore.enter_context(_levels(("diffusers",), logging.ERROR))
            restore.enter_context(_bars(diffusers_logging))
        for pattern in NOISE:
            warnings.filterwarnings("ignore", message=pattern, append=True)
        warnings.filterwarnings("ignore", category=FutureWarning, append=True)
        warnings.filterwarnings("ignore", category=DeprecationWarning, append=True)
        yield


@contextlib.contextmanager
def _levels(names: tuple[str, ...], level: int) -> Iterator[None]:
    """These loggers at `level` (the libraries' `set_verbosity` sets their root logger's), then as they were."""
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, before, strict=True):
            logger.setLevel(old)


@contextlib.contextmanager
def _bars(module: Any) -> Iterator[None]:
    """A library's own progress bars off, then as they were (transformers', datasets' or diffusers' helpers)."""
    if hasattr(module, "are_progress_bars_disabled"):  # datasets
        on, enable, disable = (
            not module.are_progress_bars_disabled(),
            module.enable_progress_bars,
            module.disable_progress_bars,
        )
    else:
        on, enable, disable = module.is_progress_bar_enabled(), module.enable_progress_bar, module.disable_progress_bar
    if on:
        disable()
    try:
        yield
    finally:
        if on:
            enable()


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
