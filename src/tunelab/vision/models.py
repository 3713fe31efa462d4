"""Image+text models and their processors: detecting, loading, building a LLaVA, freezing the tower.

Models load through `AutoModelForImageTextToText` and `AutoProcessor` (any family transformers has:
LLaVA, Idefics3/SmolVLM, Qwen2-VL, ...); an adapter folder loads over its base. `build_llava` composes a
LLaVA from a pretrained causal LM (e.g. SmolLM2) and a vision tower + projector built from a config,
with a processor made locally: the offline test model, and the recipe's base.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.core.config import check_keys
from tunelab.core.errors import TunelabError, one_line, unknown_key
from tunelab.models.spec import adapter_base, is_adapter, load_kwargs

IMAGE_TOKEN = "<image>"


# SmolLM2's ChatML template (its default system turn included) with content that may be a list of
# parts: {"type": "image"} becomes the processor's image placeholder, {"type": "text"} its text.
CHATML_TEMPLATE = (
    "{%- for message in messages %}{%- if loop.first and messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{%- endif %}{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}{%- else %}"
    "{%- for part in message['content'] %}{%- if part['type'] == 'image' %}{{- '<image>' }}"
    "{%- elif part['type'] == 'text' %}{{- part['text'] }}{%- endif %}{%- endfor %}{%- endif %}"
    "{{- '<|im_end|>\n' }}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


VISION_DEFAULTS = {
    "model_type": "siglip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "image_size": 32,
    "patch_size": 8,
}


# The vision side of each family, by attribute name on the model (or its `.model`).
VISION_TOWERS = ("vision_tower", "vision_model", "visual", "vision_encoder")


PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def is_vlm_config(config: Any) -> bool:
    """Whether a transformers config describes an image+text model (it has a vision tower)."""
    return config is not None and getattr(config, "vision_config", None) is not None


def is_vlm_folder(path: str | Path) -> bool:
    """A local model or adapter folder whose model (or base model) has a vision tower."""

    folder = Path(path)
    for _ in range(4):  # adapter -> base (-> base of a merged adapter)
        if not is_adapter(folder):
            break
        folder = Path(adapter_base(folder))
    config = folder / "config.json"
    if not config.is_file():
        return False
    try:
        return "vision_config" in json.loads(config.read_text())
    except ValueError:
        return False


def processor_source(path: str | Path) -> str:
    """The folder a model's processor is read from: the folder itself, or an adapter's base when it has none."""

    folder = Path(path)
    while is_adapter(folder) and not any((folder / f).is_file() for f in PROCESSOR_FILES):
        folder = Path(adapter_base(folder))
    return str(folder)


def load_processor(path: str | Path, where: str):
    """The model's `AutoProcessor`; one line when none is saved beside it."""
    from transformers import AutoProcessor, ProcessorMixin

    source = processor_source(path)
    local = Path(source)
    if local.is_dir() and not any((local / f).is_file() for f in PROCESSOR_FILES):
        raise TunelabError(
            f"'{where}' is '{path}', which has no processor beside the model (no {PROCESSOR_FILES[0]}): save it "
            "there (processor.save_pretrained(folder)), or build the model with a `vlm_build` stage"
        )
    try:
        processor = AutoProcessor.from_pretrained(source)
    except (OSError, ValueError, TypeError, KeyError) as exc:
        raise TunelabError(f"'{where}': cannot load the processor of '{source}': {one_line(exc)}") from None
    if not isinstance(processor, ProcessorMixin) or getattr(processor, "image_processor", None) is None:
        raise TunelabError(
            f"'{where}': '{source}' has a tokenizer but no image processor, so it cannot read images: "
            "use an image+text model (AutoModelForImageTextToText) with its processor"
        )
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return processor


def load_vlm(spec: dict[str, Any], quantization: Any = None, merge_adapter: bool = True):
    """An image+text model from a folder or hub id (`AutoModelForImageTextToText`); an adapter over its base.

    With `merge_adapter` an adapter is merged, so a new LoRA can train on the result.
    """
    from transformers import AutoModelForImageTextToText

    path, kwargs = spec["path"], load_kwargs(spec)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    if not is_adapter(path):
        return AutoModelForImageTextToText.from_pretrained(path, **kwargs)
    from peft import PeftModel

    base = load_vlm({**spec, "path": adapter_base(path)}, quantization, merge_adapter=True)
    model = PeftModel.from_pretrained(base, path)
    if not merge_adapter:
        return model
    merged = model.merge_and_unload().requires_grad_(True)
    merged.name_or_path = str(path)  # an adapter trained on this names this adapter folder as its base
    return merged


def vision_tower(model: Any):
    """(name, module) of the model's vision tower, or None for a model without one."""
    for owner, prefix in ((model, ""), (getattr(model, "model", None), "model.")):
        for name in VISION_TOWERS:
            module = getattr(owner, name, None) if owner is not None else None
            if module is not None and hasattr(module, "parameters"):
                return prefix + name, module
    return None


def freeze_vision(model: Any) -> int:
    """Freeze the vision tower (the projector keeps training); the number of parameters frozen."""
    found = vision_tower(model)
    if found is None:
        raise TunelabError("freeze_vision: the model has no vision tower")  # checked at validate; a guard here
    frozen = 0
    for p in found[1].parameters():
        p.requires_grad_(False)
        frozen += p.numel()
    return frozen


def build_llava(
    language: dict[str, Any],
    out: str | Path,
    vision: dict[str, Any] | None = None,
    image_processor: dict[str, Any] | None = None,
    seed: int = 0,
    where: str = "vlm_build",
) -> Path:
    """A LLaVA: the pretrained causal LM `language` (from_pretrained arguments), a vision tower from a
    config (SigLIP unless `vision.model_type` says otherwise) and a projector, both newly initialised.

    The tokenizer gets `<image>` as a special token (embeddings resized to a multiple of 64, which
    4-bit CPU kernels need) and a ChatML template with image parts; the processor is a
    `LlavaProcessor` saved beside the model, so `AutoProcessor` and `AutoModelForImageTextToText` load
    the folder. Text-only prompts give the language model's own logits.
    """
    import torch
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    lm = AutoModelForCausalLM.from_pretrained(language["path"], **{"dtype": torch.float32, **load_kwargs(language)})
    processor = make_processor(language["path"], vision, image_processor, where)
    lm.resize_token_embeddings(len(processor.tokenizer), pad_to_multiple_of=64, mean_resizing=False)
    config = llava_config(lm.config, processor, vision, where)
    model = LlavaForConditionalGeneration(config).to(torch.float32)
    model.model.language_model.load_state_dict(lm.model.state_dict())
    model.lm_head.load_state_dict(lm.lm_head.state_dict())
    if lm.generation_config is not None:
        model.generation_config = lm.generation_config
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def make_processor(
    language_path: str,
    vision: dict[str, Any] | None,
    image_processor: dict[str, Any] | None,
    where: str,
    gguf_file: str | None = None,
):
    """The LlavaProcessor of `build_llava`: the LM's tokenizer with `<image>`, a ChatML template, an image processor.

    `gguf_file`: the LM is still a GGUF file (validate reads its tokenizer without converting the weights)."""
    from transformers import AutoTokenizer, LlavaProcessor

    vision_cfg = vision_config(vision, f"{where}.vision")
    kwargs = image_processor_kwargs(image_processor, vision_cfg, f"{where}.image_processor")
    tokenizer = AutoTokenizer.from_pretrained(language_path, **({"gguf_file": gguf_file} if gguf_file else {}))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.chat_template = CHATML_TEMPLATE
    siglip = "siglip" in vision_cfg.model_type
    return LlavaProcessor(
        image_processor=_image_processor(vision_cfg, kwargs),
        tokenizer=tokenizer,
        patch_size=vision_cfg.patch_size,
        vision_feature_select_strategy="full" if siglip else "default",
        chat_template=CHATML_TEMPLATE,
        num_additional_image_tokens=0 if siglip else 1,
    )


def llava_config(text_config: Any, processor: Any, vision: dict[str, Any] | None, where: str):
    """The LlavaConfig `build_llava` writes (also planned at validate, before any weights load)."""
    import math

    from transformers import AutoConfig, LlavaConfig

    vision_cfg = vision_config(vision, f"{where}.vision")
    text = AutoConfig.for_model(**text_config.to_dict())
    text.vocab_size = max(int(text.vocab_size), math.ceil(len(processor.tokenizer) / 64) * 64)
    return LlavaConfig(
        vision_config=vision_cfg.to_dict(),
        text_config=text.to_dict(),
        image_token_id=processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        vision_feature_layer=-1,
        tie_word_embeddings=bool(text.tie_word_embeddings),
    )


def vision_config(values: dict[str, Any] | None, where: str):
    """The vision tower's transformers config (`model_type` + that config's fields), checked."""
    from transformers import AutoConfig

    values = {**VISION_DEFAULTS, **(values or {})}
    kind = values.pop("model_type")
    try:
        cls = type(AutoConfig.for_model(kind))
    except ValueError:
        raise TunelabError(f"'{where}.model_type' is {kind!r}: use siglip_vision_model or clip_vision_model") from None
    if kind not in ("siglip_vision_model", "clip_vision_model"):
        raise TunelabError(f"'{where}.model_type' is {kind!r}: use siglip_vision_model or clip_vision_model")
    check_keys(values, cls, where)
    config = cls(**values)
    if config.image_size % config.patch_size:
        raise TunelabError(
            f"'{where}': image_size {config.image_size} is not a multiple of patch_size {config.patch_size}"
        )
    return config


def image_processor_kwargs(values: dict[str, Any] | None, vision_cfg: Any, where: str) -> dict[str, Any]:
    """The image processor's fields: resize to the tower's image size, RGB, normalised to [-1, 1] unless given."""
    values = dict(values or {})
    allowed = (
        "resample",
        "do_resize",
        "size",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
        "do_convert_rgb",
    )
    for key in values:
        if key not in allowed:
            raise unknown_key(where, key, allowed, "fields of the image processor")
    size = vision_cfg.image_size
    return {
        "size": {"height": size, "width": size},
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
        "do_convert_rgb": True,
        **values,
    }


def _image_processor(vision_cfg: Any, kwargs: dict[str, Any]):
    if "siglip" in vision_cfg.model_type:
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil as cls
    else:
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
    return cls(**kwargs)


_PLANNED: dict[str, Path] = {}


def planned_processor(
    language_path: str, vision: Any, image_processor: Any, where: str, gguf_file: str | None = None
) -> Path:
    """A `vlm_build` stage's processor, made at validate into a temporary folder (no weights), so the
    stages after it check their images and templates against the processor they will get."""
    import atexit
    import shutil
    import tempfile

    key = json.dumps([language_path, gguf_file, vision, image_processor], sort_keys=True, default=str)
    if key not in _PLANNED:
        folder = Path(tempfile.mkdtemp(prefix="tunelab-processor-"))
        atexit.register(shutil.rmtree, folder, True)
        make_processor(language_path, vision, image_processor, where, gguf_file).save_pretrained(folder)
        _PLANNED[key] = folder
    return _PLANNED[key]
