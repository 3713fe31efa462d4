"""Quantized loading through bitsandbytes: a `quantization:` section is `transformers.BitsAndBytesConfig`.

Checks that the libraries leave to a crash deep inside the first forward pass
are made here, before anything loads: both bit widths at once, unknown quant
types and dtypes, a bf16 compute dtype on a GPU without bf16, bitsandbytes
missing, and layer shapes that bitsandbytes' packed 4-bit CPU kernel rejects.
"""

from __future__ import annotations

from typing import Any

from tunelab.core.config import build
from tunelab.core.errors import TunelabError
from tunelab.models.spec import DTYPES

QUANT_TYPES = ("nf4", "fp4")
DTYPE_KEYS = ("bnb_4bit_compute_dtype", "bnb_4bit_quant_storage")
# bitsandbytes' packed CPU kernel (used for inference on CPUs with AVX512-BF16) reshapes
# weights in blocks: in_features must divide by the 64-wide quantization block, out_features by 32.
CPU_IN_BLOCK, CPU_OUT_BLOCK = 64, 32


def bits(values: dict[str, Any] | None) -> int:
    """Bit width a quantization section asks for: 4, 8, or 0 (none)."""
    if not values:
        return 0
    return 4 if values.get("load_in_4bit") else 8 if values.get("load_in_8bit") else 0


def quant_config(values: dict[str, Any] | None, where: str):
    """A BitsAndBytesConfig from the recipe section (None when absent), after checks."""
    if values is None:
        return None
    if not isinstance(values, dict):
        raise TunelabError(f"'{where}' must be BitsAndBytesConfig fields, e.g. {{load_in_4bit: true}}")
    if values.get("load_in_4bit") and values.get("load_in_8bit"):
        raise TunelabError(f"'{where}' sets both load_in_4bit and load_in_8bit: choose one")
    if not bits(values):
        raise TunelabError(f"'{where}' quantizes nothing: set load_in_4bit: true (QLoRA) or load_in_8bit: true")
    quant_type = values.get("bnb_4bit_quant_type", "nf4")
    if quant_type not in QUANT_TYPES:
        raise TunelabError(f"'{where}.bnb_4bit_quant_type' is {quant_type!r}; expected one of {', '.join(QUANT_TYPES)}")
    for key in DTYPE_KEYS:
        if key in values and values[key] not in DTYPES:
            raise TunelabError(f"'{where}.{key}' is {values[key]!r}; expected one of {', '.join(DTYPES)}")
    _require_bitsandbytes(where)
    import torch

    gpu = torch.cuda.is_available()
    if values.get("bnb_4bit_compute_dtype") == "bfloat16" and gpu and not torch.cuda.is_bf16_supported():
        name = torch.cuda.get_device_name(0)
        raise TunelabError(f"'{where}.bnb_4bit_compute_dtype' is bfloat16, which {name} cannot compute in: use float16")
    from transformers import BitsAndBytesConfig

    values = {"bnb_4bit_quant_type": "nf4", **values} if bits(values) == 4 else dict(values)
    return build(BitsAndBytesConfig, values, where)


def _require_bitsandbytes(where: str) -> None:
    import logging

    # At import, bitsandbytes logs that it cannot fetch an optional CPU kernel from the Hub: noise offline.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a CUDA/ROCm setup error raised at import
        reason = " ".join(str(exc).split())[:160] or type(exc).__name__
        raise TunelabError(
            f"'{where}' needs bitsandbytes, which cannot be loaded here ({reason}): "
            "pip install 'tunelab[quant]' (bitsandbytes >= 0.50 runs on CPU and CUDA GPUs)"
        ) from None


def packed_cpu_kernel() -> bool:
    """Whether 4-bit inference here goes through bitsandbytes' packed CPU kernel."""
    import torch

    if torch.cuda.is_available():
        return False
    try:
        from bitsandbytes.functional import has_avx512bf16
    except Exception:
        return False
    return bool(has_avx512bf16())


def linear_layers(config) -> list[tuple[str, int, int]]:
    """(name, in_features, out_features) of every Linear a causal LM built from `config` has.

    The model is built on the meta device: no memory, no weights, milliseconds.
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return [(n, m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def check_cpu_shapes(config, values: dict[str, Any], where: str) -> None:
    """Name the layers bitsandbytes' packed 4-bit CPU kernel cannot take, and what to change."""
    if bits(values) != 4 or not packed_cpu_kernel():
        return
    skip = {"lm_head", *(values.get("llm_int8_skip_modules") or [])}
    bad = [
        (n, i, o)
        for n, i, o in linear_layers(config)
        if n.split(".")[-1] not in skip and n not in skip and (i % CPU_IN_BLOCK or o % CPU_OUT_BLOCK)
    ]
    if bad:
        shown = ", ".join(f"{n} ({i}->{o})" for n, i, o in bad[:3]) + (
            f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        )
        raise TunelabError(
            f"'{where}': 4-bit on this CPU needs in_features divisible by {CPU_IN_BLOCK} and out_features by "
            f"{CPU_OUT_BLOCK} (bitsandbytes' packed kernel); {len(bad)} layers do not fit: {shown}. "
            "Use sizes that are multiples of 64 (hidden_size, intermediate_size, heads x head_dim), "
            "load_in_8bit, or a GPU"
        )
