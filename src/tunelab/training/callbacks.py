"""The Trainer callbacks tunelab adds, as ordinary classes over transformers' `TrainerCallback`.

transformers (and so torch) is imported at the top: only code that trains imports this module, from
inside the functions that add the callbacks (`readable_progress`, `track_throughput`, `stop_on_signals`,
`seed_per_rank`, `divergence_guard`), so the CLI and `tunelab validate` still start without torch. What a
callback needs from those light modules (the line format, token counts, the error to raise) is handed in,
so this module imports none of them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from transformers import TrainerCallback, set_seed
from transformers.trainer_callback import PrinterCallback, ProgressCallback

# Training's per-step lines (`tunelab.core.progress`): the CLI prints them, an API user's logging decides.
PROGRESS = logging.getLogger("tunelab.progress")

Line = Callable[[Any, dict[str, Any]], str | None]


class ProgressLines(ProgressCallback):
    """The Trainer's bars, with one compact line per log written above them (on a terminal)."""

    def __init__(self, line: Line) -> None:
        super().__init__()
        self.line = line

    def on_log(self, args, state, control, logs=None, **kwargs):
        text = self.line(state, logs or {}) if state.is_world_process_zero else None
        if text and self.training_bar is not None:
            PROGRESS.info(text)  # the CLI's handler writes it above the bar (tqdm.write)


class PrinterLines(PrinterCallback):
    """One compact line per log instead of the Trainer's printed dict (no bars: CI, Slurm logs)."""

    def __init__(self, line: Line) -> None:
        super().__init__()
        self.line = line

    def on_log(self, args, state, control, logs=None, **kwargs):
        text = self.line(state, logs or {}) if state.is_world_process_zero else None
        if text:
            PROGRESS.info(text)


class Throughput(TrainerCallback):
    """Adds `tokens_per_second` and `mfu` to each training log, from the tokens `track_throughput` counts.

    `read` returns (tokens, sum of squared lengths) counted so far, or None before the first batch;
    `flops` turns new (tokens, squares) into training FLOPs; `peak` holds the device's peak FLOP/s once
    measured (empty or None: no MFU). `clock` is shared with the counting step, which moves it past the
    peak's measurement.
    """

    def __init__(
        self,
        read: Callable[[], tuple[float, float] | None],
        flops: Callable[[float, float], float],
        peak: list[float | None],
    ) -> None:
        self.read, self.flops, self.peak = read, flops, peak
        self.clock: dict[str, float] = {}
        self.last = {"tokens": 0.0, "squares": 0.0}

    def on_train_begin(self, args, state, control, **kwargs):
        self.clock["begin"] = self.clock["last"] = time.perf_counter()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or "last" not in self.clock:
            return
        now = time.perf_counter()
        counted = self.read()
        if counted is None:
            return
        tokens, squares = counted
        took = max(now - self.clock["last"], 1e-9)
        new_tokens, new_squares = tokens - self.last["tokens"], squares - self.last["squares"]
        self.clock["last"], self.last["tokens"], self.last["squares"] = now, tokens, squares
        added = {"tokens_per_second": new_tokens / took * args.world_size}
        if self.peak and self.peak[0]:
            added["mfu"] = self.flops(new_tokens, new_squares) / took / self.peak[0]
        logs.update(added)
        entry = state.log_history[-1] if state.log_history else {}
        if entry.get("step") == state.global_step and "loss" in entry:
            entry.update(added)  # log_history.json keeps them beside the loss

    def on_train_end(self, args, state, control, **kwargs):
        self.clock["end"] = time.perf_counter()


class StopAfterStep(TrainerCallback):
    """Once a signal is `caught` (by `stop_on_signals`' handler), save a checkpoint after this step and stop.

    Under several processes the ranks decide together, at every step: a signal that reaches one rank a
    moment after another (a step boundary between them) must not have one rank saving while another trains.
    """

    def __init__(self, caught: list[int], anyone: Callable[[bool], bool]) -> None:
        self.caught, self.anyone = caught, anyone  # anyone: tunelab.training.distributed.anyone

    def on_step_end(self, args, state, control, **kwargs):
        if self.anyone(bool(self.caught)):
            control.should_save = True
            control.should_training_stop = True


class SeedPerRank(TrainerCallback):
    """Reseed with seed + rank when training begins (see `seed_per_rank` for why that is safe)."""

    def __init__(self, rank: int) -> None:
        self.rank = rank

    def on_train_begin(self, args, state, control, **kwargs):
        set_seed(args.seed + self.rank)


class DivergenceGuard(TrainerCallback):
    """Raise `error` when a logged value turns NaN/inf, or a KL key passes `kl_limit` (see `divergence_guard`)."""

    def __init__(self, kl_limit: float | None, kl_keys: tuple[str, ...], error: Callable[[str], Exception]) -> None:
        self.kl_limit, self.kl_keys, self.error = kl_limit, kl_keys, error

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, value in (logs or {}).items():
            if not isinstance(value, float) or key in ("learning_rate", "lr"):
                continue
            if not math.isfinite(value):
                raise self.error(f"'{key}' became {value} at step {state.global_step}")
            if self.kl_limit is not None and key in self.kl_keys and value > self.kl_limit:
                raise self.error(
                    f"KL to the reference model reached {value:.3g} at step {state.global_step}, "
                    f"past kl_limit={self.kl_limit:g}"
                )
