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
        if isinstance(logs.get("tokens_per_second"), float):  # from `track_throughput`
            parts.append(f"tok/s {logs['tokens_per_second']:.0f}")
        if isinstance(logs.get("mfu"), float):
            parts.append(f"mfu {100 * logs['mfu']:.1f}%")
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


# --- Throughput and model FLOPs utilization (MFU) -------------------------------------------------
#
# MFU = model FLOPs per second / the device's peak FLOPs per second. Model FLOPs are counted from the
# tokens trained, not from what the kernels execute (so activation recomputation under gradient
# checkpointing is not counted, as in PaLM's definition), with the estimate of Kaplan et al., nanoGPT
# and PaLM (appendix B):
#
#     FLOPs per trained token = c * N + 12 * layers * width * T
#
# - N: the parameters that take part in matmuls: every parameter of the base model except embedding
#   tables, with the output projection (lm_head) counted even when it is tied to the input embedding
#   (the lookup costs nothing, the projection costs 2 * vocab * hidden per token). LoRA's own weights
#   are left out (under 1% of the FLOPs at usual ranks).
# - c = 6 when the base weights train (forward 2N, backward 4N: input and weight gradients) and 4 when
#   they are frozen, as under LoRA (forward 2N, backward 2N: input gradients only).
# - 12 * layers * width * T: attention scores and weighted values, forward and backward, for a token
#   in a sequence of T tokens (width = heads * head_dim). Summed over a batch this is
#   12 * layers * width * sum(length**2), from each row's own length (padding-free batches included).
#
# Peak: TUNELAB_PEAK_FLOPS (FLOP/s) when set; on CUDA a table of dense tensor-core figures by device
# name and training dtype; on CPU a float32 2048x2048 matmul measured once per process (~0.5 s).
# Devices without a known peak get tokens/s only.

# Dense (no sparsity) peak TFLOP/s per device: (bf16/fp16 tensor cores, TF32 tensor cores, fp32).
# Matched in order on torch.cuda.get_device_name(); None where the figure is not published or absent.
GPU_PEAK_TFLOPS: tuple[tuple[str, tuple[float | None, float | None, float | None]], ...] = (
    ("B200", (2250.0, 1100.0, None)),
    ("H200", (989.4, 494.7, 66.9)),
    ("H100 PCIe", (756.0, 378.0, 51.2)),
    ("H100 NVL", (835.0, 417.5, 60.0)),
    ("H100", (989.4, 494.7, 66.9)),  # SXM
    ("H800", (989.4, 494.7, 66.9)),
    ("GH200", (989.4, 494.7, 66.9)),
    ("A100", (312.0, 156.0, 19.5)),
    ("A800", (312.0, 156.0, 19.5)),
    ("L40S", (362.1, 183.0, 91.6)),
    ("L40", (181.0, 90.5, 90.5)),
    ("L4", (121.0, 60.0, 30.3)),
    ("A10G", (None, None, None)),  # AWS's A10 variant: no published tensor-core figure
    ("A10", (125.0, 62.5, 31.2)),
    ("RTX 4090", (165.2, 82.6, 82.6)),
    ("RTX 3090", (71.0, 35.6, 35.6)),
    ("A6000", (154.8, 77.4, 38.7)),
    ("V100", (125.0, None, 15.7)),  # fp16 only
    ("T4", (65.0, None, 8.1)),  # fp16 only
)
_CPU_PEAK: dict[int, float] = {}  # torch threads -> measured FLOP/s, once per process


def matmul_params(model: Any) -> tuple[int, bool]:
    """(N, whether the base weights train) for `model`, a transformers model or a peft wrapper of one.

    N counts the base model's parameters except embedding tables and LoRA weights, plus the output
    projection when it shares the input embedding's weight. 4-bit weights count their unpacked size.
    """
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    embeddings = {id(m.weight) for m in base.modules() if isinstance(m, torch.nn.Embedding)}
    out = base.get_output_embeddings() if hasattr(base, "get_output_embeddings") else None
    n, trains = 0, False
    for name, param in base.named_parameters():
        if "lora_" in name or id(param) in embeddings:
            continue
        n += _numel(param)
        trains = trains or param.requires_grad
    weight = getattr(out, "weight", None)
    if weight is not None and id(weight) in embeddings:  # tied: the projection still does its matmul
        n += _numel(weight)
        trains = trains or weight.requires_grad
    return n, trains


def _numel(param: Any) -> int:
    state = getattr(param, "quant_state", None)  # bitsandbytes 4-bit: packed two to a byte
    if state is not None and getattr(state, "shape", None) is not None:
        return int(state.shape.numel())
    return int(getattr(param, "ds_numel", 0) or param.numel())  # DeepSpeed ZeRO-3 shards report ds_numel


def attention_shape(config: Any) -> tuple[int, int]:
    """(layers, width = heads * head_dim) from a transformers config; (0, 0) when it does not say."""
    config = getattr(config, "text_config", None) or config
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None) or 0
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None) or 0
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    head_dim = getattr(config, "head_dim", None)
    width = heads * head_dim if heads and isinstance(head_dim, int) else hidden
    return int(layers), int(width)


def training_flops(n: int, trains_base: bool, layers: int, width: int, tokens: float, squared_lengths: float) -> float:
    """Model FLOPs of training on `tokens` tokens whose sequences' squared lengths sum to `squared_lengths`."""
    return (6 if trains_base else 4) * n * tokens + 12 * layers * width * squared_lengths


def peak_flops(device: Any, dtype: str = "fp32") -> float | None:
    """Peak FLOP/s of `device` for matmuls in `dtype` ("half" for bf16/fp16, "tf32", "fp32"); None if unknown."""
    override = os.environ.get("TUNELAB_PEAK_FLOPS")
    if override:
        return float(override)
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        column = {"half": 0, "tf32": 1}.get(dtype, 2)
        for key, figures in GPU_PEAK_TFLOPS:
            if key in name:
                value = figures[column]
                return value * 1e12 if value is not None else None
        return None
    if device.type == "cpu":
        threads = torch.get_num_threads()
        if threads not in _CPU_PEAK:
            _CPU_PEAK[threads] = _measure_cpu_peak()
        return _CPU_PEAK[threads]
    return None


def _measure_cpu_peak(size: int = 2048, seconds: float = 0.5) -> float:
    """Best float32 matmul rate over ~`seconds` of `size`x`size` products, after one warm-up."""
    import time

    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best, spent = 0.0, 0.0
    while spent < seconds:
        start = time.perf_counter()
        torch.mm(a, b)
        took = time.perf_counter() - start
        spent += took
        best = max(best, 2 * size**3 / took)
    return best


def _batch_counts(inputs: Any):
    """(tokens, sum of squared sequence lengths) of a language-model batch; None for other batches.

    Each is an int when the shapes tell it, else a 0-d tensor on the batch's device (from the
    attention mask), so that counting never copies to or from the device.
    """
    import torch

    if not hasattr(inputs, "get") or not isinstance(inputs.get("input_ids"), torch.Tensor):
        return None
    ids, mask, positions = inputs["input_ids"], inputs.get("attention_mask"), inputs.get("position_ids")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        lengths = mask.sum(-1)
        return lengths.sum(), (lengths * lengths).sum()
    if isinstance(positions, torch.Tensor) and positions.shape == ids.shape:  # padding-free: rows flattened
        return positions.numel(), (2 * positions + 1).sum()  # sum of 2p+1 over p < L is L**2
    rows, length = (ids.shape[0], ids.shape[-1]) if ids.dim() == 2 else (1, ids.numel())
    return rows * length, rows * length * length


def track_throughput(trainer: Any):
    """Count the tokens `trainer` trains on; add `tokens_per_second` and `mfu` to each training log.

    Tokens are the batches' non-pad tokens (attention_mask, or every token of a padding-free batch),
    summed on the device where the batch is: no host sync per step; they are read at each log,
    where the Trainer syncs anyway. Returns a function giving the run's totals for the stage
    metrics: {"tokens_per_second", "mfu"} (mfu a fraction, left out when the peak is unknown), over
    the wall time from train begin to train end, summed over processes (one reduce at the end).
    Batches without `input_ids` (preference pairs, images) are not counted and add nothing.
    Per-log figures under N processes are the main process's rate times N.
    """
    import time

    import torch
    from transformers import TrainerCallback

    model = trainer.model
    n, trains_base = matmul_params(model)
    layers, width = attention_shape(getattr(model, "config", None))
    counts: list[Any] = []  # [tokens, squared lengths] known on the host, then a device tensor of the rest
    clock: dict[str, float] = {}
    last = {"tokens": 0.0, "squares": 0.0}
    peak: list[float | None] = []
    original = trainer.training_step

    def training_step(model: Any, inputs: Any, *args: Any, **kwargs: Any):
        found = _batch_counts(inputs)
        if found is not None:
            first = not counts
            if first:
                counts.extend([[0, 0], None])
            for i, value in enumerate(found):
                if isinstance(value, int):
                    counts[0][i] += value
                    continue
                if counts[1] is None:
                    counts[1] = value.new_zeros(2, dtype=torch.int64)
                counts[1][i] += value.long()
            if first:  # the first counted batch: find the peak now, off the clock (a CPU measures it, ~0.5 s)
                start = time.perf_counter()
                peak.append(peak_flops(trainer.args.device, dtype()))
                for key in clock:
                    clock[key] += time.perf_counter() - start
        return original(model, inputs, *args, **kwargs)

    def dtype() -> str:
        if trainer.args.bf16 or trainer.args.fp16:
            return "half"
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"

    class _Throughput(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            clock["begin"] = clock["last"] = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not counts or logs is None or "loss" not in logs or "last" not in clock:
                return
            now = time.perf_counter()
            tokens, squares = _read(counts)
            took = max(now - clock["last"], 1e-9)
            new_tokens, new_squares = tokens - last["tokens"], squares - last["squares"]
            clock["last"], last["tokens"], last["squares"] = now, tokens, squares
            added = {"tokens_per_second": new_tokens / took * args.world_size}
            if peak and peak[0]:
                flops = training_flops(n, trains_base, layers, width, new_tokens, new_squares)
                added["mfu"] = flops / took / peak[0]
            logs.update(added)
            entry = state.log_history[-1] if state.log_history else {}
            if entry.get("step") == state.global_step and "loss" in entry:
                entry.update(added)  # log_history.json keeps them beside the loss

        def on_train_end(self, args, state, control, **kwargs):
            clock["end"] = time.perf_counter()

    trainer.training_step = training_step
    trainer.add_callback(_Throughput())

    def totals() -> dict[str, float]:
        if not counts or "begin" not in clock:
            return {}
        took = max(clock.get("end", time.perf_counter()) - clock["begin"], 1e-9)
        tokens, squares = _read(counts)
        processes = trainer.accelerator.num_processes
        if processes > 1:
            local = torch.tensor([tokens, squares], dtype=torch.float64, device=trainer.args.device)
            tokens, squares = trainer.accelerator.reduce(local, reduction="sum").tolist()
        result = {"tokens_per_second": tokens / took}
        if peak and peak[0]:
            flops = training_flops(n, trains_base, layers, width, tokens, squares)
            result["mfu"] = flops / took / (peak[0] * processes)
        return result

    return totals


def _read(counts: list[Any]) -> tuple[float, float]:
    """`track_throughput`'s running [tokens, squared lengths]: host part plus device part (one copy, at a log)."""
    host, device = counts
    extra = device.tolist() if device is not None else [0, 0]
    return float(host[0] + extra[0]), float(host[1] + extra[1])


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

    Language-model trainers' metrics include `tokens_per_second` and `mfu` (see `track_throughput`).

    SIGINT/SIGTERM save a checkpoint and raise `Interrupted` (see `stop_on_signals`).
    """
    checkpoint = last_checkpoint(out_dir) if resume else None
    throughput = track_throughput(trainer)  # before readable_progress: its line shows what this adds to the logs
    readable_progress(trainer)
    atomic_checkpoints(trainer, out_dir)
    seed_per_rank(trainer)
    with stop_on_signals(trainer, out_dir):
        result = trainer.train(resume_from_checkpoint=checkpoint)
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    metrics["global_step"] = float(result.global_step)
    metrics.update(throughput())
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


def train_and_save(trainer: Any, out_dir: Path, resume: bool, train_ds: Any, eval_ds: Any, processor: Any):
    """The common end of a Trainer-backed stage: train (resumably), evaluate, save the model and, on the
    main process only, its tokenizer or processor. Returns (metrics, data fingerprints)."""
    from tunelab.data import fingerprint

    metrics = train(trainer, out_dir, resume)
    if eval_ds is not None:
        metrics.update({k: float(v) for k, v in trainer.evaluate().items() if isinstance(v, (int, float))})
    trainer.save_model(str(out_dir))
    if trainer.args.should_save:  # the main process (several write the same files otherwise)
        processor.save_pretrained(str(out_dir))
    metrics["trainable_params"] = float(sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))
    prints = {"data": fingerprint(train_ds)} | ({"eval_data": fingerprint(eval_ds)} if eval_ds is not None else {})
    return metrics, prints
