"""PEFT and quantization as every training stage reads them: `lora:` is `peft.LoraConfig`,
`quantization:` is `transformers.BitsAndBytesConfig` (checked in `tunelab.models.quant`), and a quantized
model trains only through an adapter (QLoRA)."""

from __future__ import annotations

from typing import Any

from tunelab.core.config import build
from tunelab.core.errors import TunelabError
from tunelab.models.quant import quant_config


def lora_config(values: dict[str, Any] | None, where: str, task_type: str = "CAUSAL_LM"):
    """A `peft.LoraConfig` from a `lora:` section (None when absent: full fine-tuning)."""
    if values is None:
        return None
    from peft import LoraConfig

    return build(LoraConfig, {"task_type": task_type, **values}, where)


def trainable_quantization(cfg: dict[str, Any], where: str):
    """A stage's `quantization:` as a BitsAndBytesConfig (None when absent), refused without `lora:`:
    4/8-bit weights cannot be trained in full."""
    values = cfg.get("quantization")
    saved = (cfg.get("lora") or {}).get("modules_to_save") or [] if isinstance(cfg.get("lora"), dict) else []
    if isinstance(values, dict) and saved:
        # Modules trained whole (`modules_to_save`: a new projector, a score head) stay in full precision: a
        # 4-bit weight cannot train. transformers matches skip names from the start of a module's name (or
        # as a regex), so a short name needs `.*` to match anywhere.
        skip = values.get("llm_int8_skip_modules") or ["lm_head"]
        values = {**values, "llm_int8_skip_modules": list(dict.fromkeys([*skip, *(f".*{m}" for m in saved)]))}
    quant = quant_config(values, f"{where}.quantization")
    if quant is not None and cfg.get("lora") is None:
        raise TunelabError(
            f"'{where}' quantizes the model but has no `lora:`: a 4/8-bit model cannot be fully "
            "fine-tuned; add a `lora:` section (QLoRA) or remove `quantization:`"
        )
    return quant
