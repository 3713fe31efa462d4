"""What tunelab shows while it drives the libraries: their known noise silenced, scoped to its own calls.

Training's one compact line per log is `tunelab.training.trainer.readable_progress`: the lines go to the
`tunelab.progress` logger (INFO), which the CLI prints and an API user sees once logging is configured.
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
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # ORPO and CPO live in trl.experimental; we know
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
