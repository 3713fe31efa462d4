"""Throughput and model FLOPs utilization (MFU) of a Trainer run, from the tokens it trains on."""

from __future__ import annotations

import os
from typing import Any

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

    from tunelab.training.callbacks import Throughput

    model = trainer.model
    n, trains_base = matmul_params(model)
    layers, width = attention_shape(getattr(model, "config", None))
    counts: list[Any] = []  # [tokens, squared lengths] known on the host, then a device tensor of the rest
    peak: list[float | None] = []
    callback = Throughput(
        read=lambda: _read(counts) if counts else None,
        flops=lambda tokens, squares: training_flops(n, trains_base, layers, width, tokens, squares),
        peak=peak,
    )
    clock = callback.clock
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

    trainer.training_step = training_step
    trainer.add_callback(callback)

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
