"""What a training run prints: the libraries' known noise silenced, and one compact line per log.

Bars stay on a terminal; off one (the CLI sets TQDM_DISABLE there) the Trainer's printer prints the
same line instead, so CI and Slurm logs hold one line per logging step and no carriage returns.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Any


def quiet(diffusers: bool = False) -> None:
    """Silence the libraries' known noise; keep progress bars, warnings that matter, errors.

    `diffusers`: also diffusers' (warnings and errors only, no "Loading components" bars), for the
    diffusion stages; the others need not import it."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # PPO lives in trl.experimental (TRL 1.12); we know
    for name in ("bitsandbytes", "kernels"):  # before their import: they log a Hub kernel they cannot fetch offline
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
    if diffusers:
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()
        diffusers_logging.disable_progress_bar()


PROGRESS_KEYS = ("loss", "eval_loss", "grad_norm", "learning_rate", "mean_token_accuracy", "accuracy", "epoch")


def readable_progress(trainer: Any, signals: dict[str, str] | None = None, throttle: bool = False) -> None:
    """Replace the Trainer's dict-per-log printing with one compact line per log.

    `signals` are the stage's own per-step keys and their short labels (its `METRICS.progress`),
    printed first; `throttle` prints only every `logging_steps`, for loops that log each step (PPO).
    """
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

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
