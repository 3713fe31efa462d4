"""Memory planner: what a recipe's stages need per device, from the model's config alone.

The model is built on PyTorch's meta device (shapes, no storage), so parameter
counts and layer shapes are exact for any architecture transformers knows, and
a 70B model is planned in a second. Then, per training stage:

- weights: at the load dtype, or 4/8-bit for quantized linear layers plus their
  quantization constants (absmax per 64-value block, double-quantized or not;
  one fp32 scale per row at 8 bits); layers left unquantized (embeddings,
  norms, lm_head) are upcast to fp32 by `prepare_model_for_kbit_training`;
- LoRA: r x (in + out) per targeted linear layer;
- gradients and optimizer states of the trainable parameters (AdamW: two
  states at the parameter's dtype; 8-bit AdamW: two bytes; SGD, Adafactor);
- activations kept for the backward pass, per token and layer, calibrated
  against measured peaks (see docs/BENCHMARKS.md), with and without gradient
  checkpointing; and the logits, which dominate small models with large
  vocabularies;
- for generation (eval stages) the KV cache instead.

Sharding across N devices: DDP replicates everything; ZeRO-2 shards gradients
and optimizer states; ZeRO-3 and FSDP (full shard) also shard the weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.models.quant import bits as quant_bits
from tunelab.models.spec import model_config, model_spec

GiB = 2**30
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}
# Activation values kept per token and layer for the backward pass:
# ACT_HIDDEN x hidden_size + ACT_INTER x intermediate_size + ACT_HEADS x (q + 2 kv widths).
# Fitted to measured peaks of Llama-style decoders (12M-95M parameters) on CPU with and without
# gradient checkpointing (benchmarks/memory_plan.py); the count of saved tensors in a Llama layer
# (norm inputs, q/k/v, attention output, gate/up/act/product) gives the same order.
ACT_HIDDEN, ACT_INTER, ACT_HEADS = 7.0, 3.0, 1.5
LOGIT_COPIES = 1.0  # fp32 logits live at the peak; the loss's temporaries come and go before it
OVERHEAD = 55 * 2**20  # batches, autograd bookkeeping, kernel workspaces: measured, constant across sizes


@dataclass
class StagePlan:
    """Bytes a stage needs on one device, by part; `total` adds them up."""

    stage: str
    kind: str
    mode: str
    params: int
    trainable: int
    parts: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    steps: int | None = None
    """Optimizer steps, when the stage knows them without `max_steps` (PPO: from total_episodes)."""

    @property
    def total(self) -> float:
        """Peak bytes: gradients fill up as the backward pass frees activations, so only the larger counts."""
        return peak(self.parts)

    def sharded(self, devices: int, strategy: str) -> float:
        """Per-device peak when `devices` devices share the work under `strategy`."""
        n = max(devices, 1)
        parts = dict(self.parts)
        if strategy in ("zero2", "zero3"):
            parts["gradients"] = parts.get("gradients", 0) / n
            parts["optimizer"] = parts.get("optimizer", 0) / n
        if strategy == "zero3":
            for key in ("weights", "lora"):
                parts[key] = parts.get(key, 0) / n
        return peak(parts)


def peak(parts: dict[str, float]) -> float:
    """Peak of a training step from its parts.

    Weights, adapters and optimizer states live throughout. The backward pass
    frees activations (and logits) while it fills the gradients, so the peak
    holds the larger of the two, not their sum.
    """
    transient = parts.get("activations", 0) + parts.get("logits", 0)
    steady = sum(v for k, v in parts.items() if k not in ("activations", "logits", "gradients"))
    return steady + max(parts.get("gradients", 0), transient)


def dtype_name(value: Any, default: str = "float32") -> str:
    """A dtype (torch dtype, its name, "auto" or None) as a key of `DTYPE_BYTES`; other planners size weights by it."""
    if value is None or value == "auto":
        return default
    name = str(value).replace("torch.", "")
    if name not in DTYPE_BYTES:
        raise TunelabError(f"dtype '{value}' is not one of {', '.join(DTYPE_BYTES)}")
    return name


def model_structure(config) -> tuple[list[tuple[str, int, int]], int, set[str]]:
    """(linear layers as (name, in, out), total parameter count, names of output-embedding modules), read
    from a meta-device model: planners count a second model (a teacher, a reward model) the same way."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = [(n, m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings()
    heads = {n for n, m in model.named_modules() if head is not None and m is head}
    return linears, params, heads


def _dims(config) -> tuple[int, int, int, int, int, int]:
    """(hidden, intermediate, layers, query heads, kv heads, head dim) from a decoder's config."""
    h = int(config.hidden_size)
    heads_q = int(config.num_attention_heads)
    return (
        h,
        int(getattr(config, "intermediate_size", None) or 4 * h),
        int(config.num_hidden_layers),
        heads_q,
        int(getattr(config, "num_key_value_heads", None) or heads_q),
        int(getattr(config, "head_dim", None) or h // heads_q),
    )


def _lora_targets(linears: list[tuple[str, int, int]], heads: set[str], lora: dict[str, Any]) -> list[tuple]:
    targets = lora.get("target_modules")
    if targets in (None, "all-linear"):
        return [layer for layer in linears if layer[0] not in heads]
    if isinstance(targets, str):  # a regex, as in peft
        return [layer for layer in linears if re.fullmatch(targets, layer[0])]
    names = set(targets)
    return [layer for layer in linears if layer[0].split(".")[-1] in names or layer[0] in names]


def _weight_bytes(
    linears, params: int, heads: set[str], quantization: dict[str, Any] | None, other_bytes: int
) -> float:
    """Weights in memory: quantized linear layers with their constants, the rest at `other_bytes` each."""
    bits = quant_bits(quantization)
    if not bits:
        return params * other_bytes
    quantized = [layer for layer in linears if layer[0] not in heads]
    qparams = sum(i * o for _, i, o in quantized)
    if bits == 4:
        double = bool(quantization.get("bnb_4bit_use_double_quant"))
        # absmax per 64-value block: fp32, or (double quant) uint8 plus an fp32 per 256 blocks
        constants = qparams / 64 * (1 + 4 / 256) if double else qparams / 64 * 4
        quant = qparams / 2 + constants
    else:
        quant = qparams + sum(o for _, _, o in quantized) * 4  # int8 weights, one fp32 scale per row
    return quant + (params - qparams) * other_bytes


def optimizer_bytes(optim: str, trainable: int, param_bytes: int, shapes: list[tuple[int, int]]) -> float:
    """The optimizer's state for `trainable` parameters (`shapes` for Adafactor's factored moments): shared
    by every planner, so a stage that trains a second model (PPO's value model) counts its state the same way."""
    optim = str(optim).lower().replace("optimizernames.", "")
    if "8bit" in optim:
        return trainable * 2 * 1.0 + trainable / 256 * 8  # two uint8 states plus blockwise scales
    if optim.startswith("sgd"):
        return 0.0
    if "adafactor" in optim:
        return sum((r + c) * 4 for r, c in shapes)  # factored second moment, no first moment
    return trainable * 2 * param_bytes  # AdamW family: exp_avg and exp_avg_sq


def plan_training(
    stage: str,
    kind: str,
    config,
    args,
    lora: dict[str, Any] | None = None,
    quantization: dict[str, Any] | None = None,
    load_dtype: Any = None,
    cpu: bool | None = None,
) -> StagePlan:
    """Per-device memory of a training stage (pretrain, sft) from its model config and SFTConfig."""
    linears, params, heads = model_structure(config)
    bits = quant_bits(quantization)
    dtype = dtype_name(load_dtype or getattr(config, "dtype", None))
    wbytes = DTYPE_BYTES[dtype]
    parts: dict[str, float] = {}
    notes: list[str] = []
    # prepare_model_for_kbit_training upcasts what stays unquantized (embeddings, norms, head) to fp32.
    parts["weights"] = _weight_bytes(linears, params, heads, quantization, 4 if bits else wbytes)

    targets = _lora_targets(linears, heads, lora) if lora is not None else []
    if lora is not None:
        r = int(lora.get("r", 8))
        trainable = sum(r * (i + o) for _, i, o in targets)
        shapes = [s for _, i, o in targets for s in ((r, i), (o, r))]
        # TRL keeps QLoRA adapters in bf16; otherwise peft holds them in fp32.
        tbytes = 2 if bits else 4
        parts["lora"] = trainable * tbytes
        mode = f"qlora-{bits}bit" if bits else "lora"
    else:
        trainable = params
        shapes = [(o, i) for _, i, o in linears]
        tbytes = wbytes
        mode = "full"
    parts["gradients"] = trainable * tbytes
    parts["optimizer"] = optimizer_bytes(getattr(args, "optim", "adamw_torch"), trainable, tbytes, shapes)

    tokens = int(args.per_device_train_batch_size) * int(args.max_length or 1024)
    mixed = bool(getattr(args, "bf16", False) or getattr(args, "fp16", False))
    abytes = 2 if (mixed or wbytes == 2) else 4
    h, inter, layers, heads_q, kv, head_dim = _dims(config)
    per_layer = abytes * tokens * (ACT_HIDDEN * h + ACT_INTER * inter + ACT_HEADS * (heads_q + 2 * kv) * head_dim)
    if lora is not None:  # the rank-r intermediate of every adapter
        per_layer += abytes * tokens * int(lora.get("r", 8)) * len(targets) / layers
    logits = tokens * int(config.vocab_size) * 4 * LOGIT_COPIES
    if getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False):
        # Layer inputs stay; one layer is recomputed at a time, after the logits' memory is released.
        parts["activations"] = abytes * tokens * h * layers + max(0.0, per_layer - logits)
        notes.append("gradient checkpointing: layer inputs kept, one layer recomputed at a time")
    else:
        parts["activations"] = per_layer * layers
    parts["logits"] = logits
    parts["overhead"] = OVERHEAD
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    if bits and cpu:
        # On CPU, transformers memory-maps the full-precision checkpoint while quantizing, and the
        # pages of the quantized layers stay resident for the run.
        ckpt_bytes = DTYPE_BYTES[dtype_name(getattr(config, "dtype", None))]
        parts["checkpoint_pages"] = sum(i * o for n, i, o in linears if n not in heads) * ckpt_bytes
        notes.append("CPU: the full-precision checkpoint pages of quantized layers stay mapped in RAM")
    return StagePlan(stage, kind, mode, params, trainable, parts, notes)


def plan_generation(
    stage: str, config, batch: int, max_tokens: int, quantization=None, load_dtype=None, scored_tokens: int = 1
) -> StagePlan:
    """Per-device memory of generation: weights and the KV cache for `batch` sequences of `max_tokens`.

    `scored_tokens`: positions whose logits are kept at once; log-likelihood scoring (multiple choice)
    keeps every position's, generation only the last.
    """
    linears, params, heads = model_structure(config)
    wbytes = DTYPE_BYTES[dtype_name(load_dtype or getattr(config, "dtype", None))]
    bits = quant_bits(quantization)
    weights = _weight_bytes(linears, params, heads, quantization, wbytes)
    _, _, layers, _, kv, head_dim = _dims(config)
    cache = 2 * layers * kv * head_dim * batch * max_tokens * wbytes
    logits = batch * scored_tokens * int(config.vocab_size) * 4 * 2  # float32 logits and their log-softmax
    parts = {"weights": weights, "kv_cache": cache, "logits": logits}
    return StagePlan(stage, "eval", f"generate-{bits}bit" if bits else "generate", params, 0, parts)


def fmt_bytes(value: float) -> str:
    if value >= GiB:
        return f"{value / GiB:.2f} GiB"
    return f"{value / 2**20:.0f} MiB" if value >= 2**20 else f"{value / 2**10:.0f} KiB"


def device_memory() -> tuple[str, float] | None:
    """(description, bytes) of one device's memory: the first GPU, else this machine's RAM."""
    import torch

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} x{torch.cuda.device_count()}", float(props.total_memory)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable"):
                    return "CPU RAM (available)", float(line.split()[1]) * 1024
    except OSError:
        pass
    return None


ABSURD = 100
"""A plan above this many times the device's memory, even sharded over MAX_DEVICES with ZeRO-3, is a recipe
error (a batch of 1e6, a length of 1e9), not a tight fit: validate refuses it instead of warning."""
MAX_DEVICES = 1024


def check_fits(plans: list[StagePlan]) -> None:
    """One line for a stage whose plan exceeds the device's memory by orders of magnitude however it is
    spread: it could never run, and starting it fills the memory or fails after the model loads. A plan
    that is merely too large stays a warning (`tunelab plan` shows what would fit)."""
    memory = device_memory()
    if memory is None:
        return
    for p in plans:
        need = p.sharded(MAX_DEVICES, "zero3")
        if need > ABSURD * memory[1]:
            biggest = max(p.parts, key=lambda k: p.parts[k])
            raise TunelabError(
                f"stage '{p.stage}' would need {fmt_bytes(need)} per device even spread over {MAX_DEVICES} "
                f"devices, over {ABSURD} times what {memory[0]} has ({fmt_bytes(memory[1])}); most of it is "
                f"{biggest.replace('_', ' ')} ({fmt_bytes(p.parts[biggest])}): lower the batch size or lengths "
                "(`tunelab plan` shows the parts)"
            )


def suggestions(plan: StagePlan) -> list[str]:
    """What would make a plan smaller, cheapest change first (for a plan over the device's memory)."""
    out = []
    p = plan.parts
    if plan.mode == "full":
        saved = p.get("gradients", 0) + p.get("optimizer", 0) - 0.02 * p.get("weights", 0)
        out.append(f"LoRA instead of full fine-tuning (add `lora:`): saves about {fmt_bytes(saved)}")
    if not plan.mode.startswith("qlora"):
        out.append("QLoRA: `quantization: {load_in_4bit: true}` with `lora:` cuts the weights about 4x (from 16-bit)")
    act = p.get("activations", 0) + p.get("logits", 0)
    if act > 0.2 * plan.total:
        out.append("halve training.per_device_train_batch_size and double gradient_accumulation_steps")
        if "gradient checkpointing" not in " ".join(plan.notes):
            out.append("training.gradient_checkpointing: true (activations drop to about one layer's worth)")
    if p.get("optimizer", 0) > 0.2 * plan.total:
        out.append("training.optim: adamw_8bit (or paged_adamw_8bit) quarters the optimizer states")
    out.append("DeepSpeed ZeRO-3 / FSDP across N devices divides weights, gradients and optimizer states by N")
    return [s for s in out if s]


def policy_plan(spec: Any, ctx: Any, args: Any) -> StagePlan | None:
    """The training plan of a stage's `model:` with its `lora:` and `quantization:` (None if not knowable yet)."""

    config = model_config(spec.cfg["model"], ctx, f"{spec.where}.model")
    if config is None:
        return None
    return plan_training(
        spec.name,
        spec.kind,
        config,
        args,
        lora=spec.cfg.get("lora"),
        quantization=spec.cfg.get("quantization"),
        load_dtype=model_spec(spec.cfg["model"], f"{spec.where}.model").get("dtype"),
    )
