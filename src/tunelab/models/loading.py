"""Causal LMs loaded from a resolved spec (hub id, folder, or adapter folder over its base), and prepared
for QLoRA.

Loading goes through the `Auto*` classes and `from_pretrained`, so the same recipe that loads a tiny
local model in tests loads `Qwen/...` on a GPU.
"""

from __future__ import annotations

from typing import Any

from tunelab.models.spec import adapter_base, is_adapter, load_kwargs


def load_causal_lm(spec: dict[str, Any], quantization: Any = None, merge_adapter: bool = True):
    """A causal LM from a folder or hub id; an adapter folder is loaded on its base.

    With `merge_adapter`, an adapter is merged into its base, so a new LoRA can be
    trained on top of the result (SFT after SFT).
    """
    from transformers import AutoModelForCausalLM

    path, kwargs = spec["path"], load_kwargs(spec)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if is_adapter(path):
        from peft import PeftModel

        base_path = adapter_base(path)
        if is_adapter(base_path):  # a LoRA trained on a merged LoRA (DPO after SFT): its base, merged, first
            base = load_causal_lm({**spec, "path": base_path}, quantization, merge_adapter=True)
        else:
            base = AutoModelForCausalLM.from_pretrained(base_path, **kwargs)
        model = PeftModel.from_pretrained(base, path)
        if not merge_adapter:
            return model
        # PeftModel froze the base for inference; the merged model is trained on by later stages.
        merged = model.merge_and_unload().requires_grad_(True)
        # An adapter trained on this model must name this adapter folder as its base, not the model under it.
        merged.name_or_path = str(path)
        return merged
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)


def prepare_kbit(model: Any, quantization: Any, gradient_checkpointing: bool):
    """For QLoRA: norms and embeddings to fp32, input gradients on (a no-op without quantization)."""
    if quantization is None:
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
