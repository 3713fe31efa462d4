"""Image+text models checked and planned from their configs alone, before any weights load.

`check_model` builds the model on the meta device (`skeleton`) to find what a run would only find after
loading: a text-only model, a `freeze_vision` the LoRA contradicts, layers the 4-bit CPU kernel cannot
take, a LoRA peft cannot apply. `plan_vlm` counts a vlm_sft stage's memory on the same skeleton.
"""

from __future__ import annotations

from typing import Any

from tunelab.core.errors import TunelabError, one_line
from tunelab.models.plan import DTYPE_BYTES, dtype_name, optimizer_bytes, plan_training
from tunelab.models.quant import CPU_IN_BLOCK, CPU_OUT_BLOCK, bits, packed_cpu_kernel
from tunelab.models.spec import model_config
from tunelab.vision.models import is_vlm_config, vision_tower


def skeleton(config: Any, where: str):
    """The image+text model `config` describes, on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    try:
        with init_empty_weights():
            model = AutoModelForImageTextToText.from_config(config)
    except (ValueError, TypeError, KeyError) as exc:
        raise TunelabError(f"'{where}': cannot build the image+text model from its config: {one_line(exc)}") from None
    model.tie_weights()  # init_empty_weights leaves tied embeddings as two tensors; loading ties them
    return model


def check_model(spec: Any, ctx: Any, lora: Any, freeze: bool) -> Any:
    """From the config alone: an image+text model, freeze_vision possible, 4-bit CPU shapes, the LoRA applies."""
    import copy

    where = f"{spec.where}.model"
    config = model_config(spec.cfg["model"], ctx, where)
    if config is None:
        return None
    if not is_vlm_config(config):
        arch = (getattr(config, "architectures", None) or [config.model_type])[0]
        if freeze:
            raise TunelabError(
                f"'{spec.where}.freeze_vision' is set, but '{where}' ({arch}) has no vision tower: remove "
                "freeze_vision, or name an image+text model"
            )
        raise TunelabError(
            f"'{where}' is a text-only model ({arch}), but vlm_sft trains image+text models: use an image+text "
            "model (a vlm_build stage makes one), or the `sft` stage for text data"
        )
    model = skeleton(config, where)
    if spec.cfg.get("quantization") is not None:
        _check_cpu_shapes(model, spec.cfg["quantization"], f"{spec.where}.quantization")
    if lora is None:
        return config
    from peft import get_peft_model

    try:
        peft_model = get_peft_model(model, copy.deepcopy(lora))
    except (ValueError, TypeError, KeyError) as exc:
        names = sorted({n.split(".")[-1] for n, m in model.named_modules() if hasattr(m, "in_features")})
        raise TunelabError(
            f"'{spec.where}.lora': peft cannot apply it to this model ({one_line(exc)}); its linear layers: "
            f"{', '.join(names[:14])} (or all-linear)"
        ) from None
    tower = vision_tower(model)
    if freeze and tower is not None:
        trained = [n for n, p in peft_model.named_parameters() if p.requires_grad and f".{tower[0]}." in f".{n}"]
        if trained:
            raise TunelabError(
                f"'{spec.where}.freeze_vision' is set, but `lora:` trains the vision tower ({trained[0]}): "
                "drop freeze_vision, or keep target_modules / modules_to_save off the vision tower"
            )
    return config


def _check_cpu_shapes(model: Any, values: dict[str, Any], where: str) -> None:
    """The layers bitsandbytes' packed 4-bit CPU kernel cannot take, named (as `tunelab.models.quant` does for text)."""
    import torch

    if bits(values) != 4 or not packed_cpu_kernel():
        return
    skip = {"lm_head", *(values.get("llm_int8_skip_modules") or [])}
    bad = [
        f"{n} ({m.in_features}->{m.out_features})"
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
        and n.split(".")[-1] not in skip
        and n not in skip
        and (m.in_features % CPU_IN_BLOCK or m.out_features % CPU_OUT_BLOCK)
    ]
    if bad:
        raise TunelabError(
            f"'{where}': 4-bit on this CPU needs in_features divisible by {CPU_IN_BLOCK} and out_features by "
            f"{CPU_OUT_BLOCK}; {len(bad)} layers do not fit: {', '.join(bad[:3])}: use multiples of 64, "
            "llm_int8_skip_modules for them, load_in_8bit, or a GPU"
        )


def plan_vlm(stage: str, kind: str, config: Any, args: Any, lora: Any, quantization: Any, dtype: Any, freeze: bool):
    """Memory of a vlm_sft stage: the language model's weights, activations and logits as `sft` plans them,
    plus the vision tower and projector's weights and activations per image; what trains (LoRA adapters,
    modules trained whole, everything but a frozen tower) counted on the model skeleton, as peft applies it."""
    import copy

    text = plan_training(stage, kind, config.text_config, args, lora=None, quantization=quantization, load_dtype=dtype)
    model = skeleton(config, "model")
    tower = vision_tower(model)
    language = getattr(model.model, "language_model", None)
    text_ids = {id(p) for p in language.parameters()} if language is not None else set()
    head = model.get_output_embeddings()
    text_ids |= {id(p) for p in head.parameters()} if head is not None else set()
    n_vision = sum(p.numel() for p in model.parameters() if id(p) not in text_ids)
    n_all = sum(p.numel() for p in model.parameters())
    adapters = 0
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(**{"task_type": "CAUSAL_LM", **copy.deepcopy(lora)}))
        named = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
        adapters = sum(p.numel() for n, p in named if "lora_" in n)
        trainable = sum(p.numel() for _, p in named)
    else:
        frozen = sum(p.numel() for p in tower[1].parameters()) if freeze and tower is not None else 0
        trainable = n_all - frozen
    wbytes = DTYPE_BYTES[dtype_name(dtype or getattr(config, "dtype", None))]
    tbytes = 2 if quantization and lora is not None else 4
    vcfg = config.vision_config
    patches = (int(vcfg.image_size) // int(vcfg.patch_size)) ** 2
    width = int(vcfg.hidden_size)
    inter = int(getattr(vcfg, "intermediate_size", None) or 4 * width)
    parts = dict(text.parts)
    saved_copies = (trainable - adapters) * wbytes if lora is not None else 0  # modules_to_save keep a copy
    parts["weights"] = parts.get("weights", 0) + n_vision * wbytes + saved_copies
    parts["lora"] = adapters * tbytes
    parts["gradients"] = trainable * tbytes
    parts["optimizer"] = optimizer_bytes(getattr(args, "optim", "adamw_torch"), trainable, tbytes, [])
    images = int(args.per_device_train_batch_size)
    parts["activations"] = parts.get("activations", 0) + 4 * images * patches * (7 * width + 3 * inter) * int(
        vcfg.num_hidden_layers
    )
    text.parts, text.params, text.trainable = parts, n_all, trainable
    text.mode = ("qlora" if quantization else "lora") if lora is not None else "full"
    state = "frozen" if freeze else "trained" if lora is None or trainable > adapters else "frozen (LoRA elsewhere)"
    text.notes.append(f"vision tower + projector: {n_vision / 1e6:.2f}M parameters ({state}), {patches} patches/image")
    if args.max_length is None:
        text.notes.append("max_length unset: activations planned for 1024 tokens per row")
    return text
