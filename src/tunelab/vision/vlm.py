"""Vision-language models: building, loading, image data, assistant-only masks, image+text prompting.

What the `vlm_build`, `vlm_sft` and `eval` stages and `tunelab chat --image` share:

- **Models** load through `AutoModelForImageTextToText` and `AutoProcessor` (any family transformers
  has: LLaVA, Idefics3/SmolVLM, Qwen2-VL, ...); an adapter folder loads over its base. `build_llava`
  composes a LLaVA from a pretrained causal LM (e.g. SmolLM2) and a vision tower + projector built
  from a config, with a processor made locally: the offline test model, and the recipe's base.
- **Data** is TRL's vision SFT format: `images` (paths, relative to the dataset folder, or image
  objects) and `messages` whose user turns hold `{"type": "image"}` placeholders. `load_images`
  resolves and opens every image (one line naming the file and row when one is missing or
  unreadable) and `check_rows` checks every row's placeholders against its images and runs the
  processor on the first rows and on one image of each mode.
- **Loss on assistant turns only**: TRL 1.12 refuses `assistant_only_loss` for vision data and
  trains on every non-pad token (system, user and image tokens too). `AssistantOnlyCollator` keeps
  TRL's collator and derives the mask as `tunelab.models.chat_templates.assistant_mask` does for text chats (render
  up to and through each assistant turn, mark the characters the assistant adds), then carries it
  onto the processor's ids, where each image placeholder has grown into the image's tokens.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from tunelab.core.config import check_keys
from tunelab.core.errors import TunelabError
from tunelab.core.hub import local_path
from tunelab.core.paths import refuse_special
from tunelab.models.chat_templates import assistant_mask
from tunelab.models.loading import adapter_base, is_adapter, load_kwargs, model_config
from tunelab.models.plan import DTYPE_BYTES, _dtype_name, _optimizer_bytes, plan_training
from tunelab.models.quant import CPU_IN_BLOCK, CPU_OUT_BLOCK, bits, packed_cpu_kernel

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


# ---------------------------------------------------------------- models and processors


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
        raise TunelabError(f"'{where}': cannot load the processor of '{source}': {_short(exc)}") from None
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
            from tunelab.core.errors import unknown_key

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


# ---------------------------------------------------------------- data


def data_root(value: Any) -> Path | None:
    """Where relative image paths in a dataset resolve: its local folder (or its file's folder)."""

    path = value if isinstance(value, str) else value.get("path") if isinstance(value, dict) else None
    if isinstance(value, dict) and value.get("data_files") is not None:
        files = value["data_files"]
        if isinstance(files, dict):
            files = next(iter(files.values()))
        first = files if isinstance(files, str) else files[0]
        first = first[0] if isinstance(first, list) else first
        local = local_path(first) if isinstance(first, str) else None
        return local.parent if local is not None else None
    local = local_path(path) if isinstance(path, str) else None
    if local is None:
        return None
    return local if local.is_dir() else local.parent


def has_images(ds: Any) -> bool:
    return "images" in ds.column_names or "image" in ds.column_names


def load_images(ds: Any, value: Any, where: str) -> Any:
    """`images` as image objects: relative paths resolved against the dataset folder, every file opened.

    A single `image` column becomes `images` (one per row). Runs at validate and at run, so a
    missing or unreadable image is named (file and row) before any model loads.
    """
    import datasets
    from PIL import Image

    if "image" in ds.column_names and "images" not in ds.column_names:
        ds = ds.map(lambda row: {"images": [row["image"]]}, remove_columns=["image"])
    if isinstance(getattr(ds.features["images"], "feature", None), datasets.Image):
        ds = ds.cast_column("images", _undecoded())  # opened and checked below, like paths
    root = data_root(value)
    resolved: list[list[Any]] = []
    for row, images in enumerate(ds["images"]):
        if images is None:
            images = []
        if not isinstance(images, list):
            kind = type(images).__name__
            raise TunelabError(f"'{where}' row {row}: `images` must be a list of images or paths, got {kind}")
        out = []
        for item in images:
            if isinstance(item, dict):  # a datasets Image value: {path, bytes}
                out.append(item if item.get("bytes") else _path(item.get("path"), root, where, row))
            elif isinstance(item, str):
                out.append(_path(item, root, where, row))
            elif isinstance(item, Image.Image):
                out.append(item)
            else:
                raise TunelabError(f"'{where}' row {row}: an image is a {type(item).__name__}; use paths or images")
        resolved.append(out)
    for row, images in enumerate(resolved):
        for item, given in zip(images, ds[row]["images"] or [], strict=False):
            _open(item, where, row, given if isinstance(given, str) else None)
    ds = ds.remove_columns("images").add_column("images", resolved) if resolved else ds
    return ds.cast_column("images", datasets.List(datasets.Image()))


def _path(item: Any, root: Path | None, where: str, row: int) -> str:
    if not isinstance(item, str) or not item:
        raise TunelabError(f"'{where}' row {row}: an entry of `images` is {item!r}, not a file path")
    path = Path(item).expanduser()
    if not path.is_absolute():
        path = (root / path) if root is not None and (root / path).exists() else Path.cwd() / path
    if not path.is_file():
        raise TunelabError(f"'{where}' row {row}: image '{item}' does not exist (looked in {path.parent})")
    return str(path)


def _open(item: Any, where: str, row: int, given: str | None = None) -> None:
    """Open an image fully (a truncated or non-image file fails here, not in a training step)."""
    import io

    from PIL import Image

    if not isinstance(item, (str, dict)):
        return
    name = given or (item if isinstance(item, str) else item.get("path") or "(bytes)")
    if isinstance(item, str):
        refuse_special(item, f"'{where}' row {row}: image")
    try:
        with Image.open(item if isinstance(item, str) else io.BytesIO(item["bytes"])) as image:
            image.load()
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, ...
        why = _short(exc).replace(str(item), name) if isinstance(item, str) else _short(exc)
        raise TunelabError(f"'{where}' row {row}: image '{name}' cannot be read ({why})") from None


def placeholders(turns: Any) -> int:
    """The number of `{"type": "image"}` parts in a conversation."""
    count = 0
    for turn in turns or []:
        content = turn.get("content") if isinstance(turn, dict) else None
        if isinstance(content, list):
            count += sum(1 for part in content if isinstance(part, dict) and part.get("type") == "image")
    return count


def check_rows(ds: Any, processor: Any, where: str, rows: int = 2) -> None:
    """Every row: its placeholders match its images. The first rows, and one image of each mode:
    the processor takes them (what the collator will do, minus the model)."""
    from trl.data_utils import prepare_multimodal_messages

    if "messages" not in ds.column_names:
        raise TunelabError(
            f"'{where}' has images but no `messages` column: vision SFT takes TRL's format, `images` with "
            '`messages` whose user turns hold {"type": "image"} placeholders'
        )
    images_col = ds.with_format(None).select_columns(["images"]).cast_column("images", _undecoded())["images"]
    for row, (turns, images) in enumerate(zip(ds["messages"], images_col, strict=True)):
        if not any(isinstance(t, dict) and t.get("role") == "assistant" for t in turns or []):
            raise TunelabError(  # the loss is on the assistant's turns: such a row trains on nothing
                f"'{where}' row {row} has no assistant turn: vision SFT learns the assistant's answers, and this row "
                "has none; add the answer as an assistant turn, or remove the row"
            )
        count = placeholders(turns)
        structured = any(isinstance(t.get("content"), list) for t in turns or [])
        if structured and count != len(images or []):
            raise TunelabError(
                f"'{where}' row {row} has {count} image placeholder(s) in its messages but {len(images or [])} "
                'image(s): give each image one {"type": "image"} part in a user turn'
            )
    modes: dict[str, int] = {}
    for row, images in enumerate(images_col):
        for item in images or []:
            modes.setdefault(_mode(item), row)
    sample = sorted(set(range(min(rows, len(ds)))) | set(modes.values()))
    for row in sample:
        example = ds[row]
        try:
            turns = prepare_multimodal_messages(example["messages"], images=example["images"])
            text = processor.apply_chat_template(turns, tokenize=False)
            processor(images=[example["images"]] if example["images"] else None, text=[text], return_tensors="pt")
        except TunelabError:
            raise
        except Exception as exc:  # noqa: BLE001 - processors raise ValueError, TypeError, KeyError, ...
            mode = ", ".join(sorted({im.mode for im in example["images"] or []}))
            raise TunelabError(
                f"'{where}' row {row}: the processor rejects it (images of mode {mode}): {_short(exc)}; "
                "convert the images (e.g. to RGB) or fix the row"
            ) from None


def _undecoded():
    import datasets

    return datasets.List(datasets.Image(decode=False))


def _mode(item: Any) -> str:
    import io

    from PIL import Image

    source = item.get("path") if item.get("bytes") is None else io.BytesIO(item["bytes"])
    with Image.open(source) as image:
        return image.mode


def _short(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


# ---------------------------------------------------------------- loss on assistant turns only


class _Renderer:
    """The processor's chat template with its tokenizer's encoding: what `chat_templates.assistant_mask` needs."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    @property
    def chat_template(self) -> str | None:
        return self.processor.chat_template

    def apply_chat_template(self, turns: list[dict[str, Any]], **kwargs: Any) -> str:
        return self.processor.apply_chat_template(turns, **kwargs)

    def __call__(self, text: str, **kwargs: Any):
        return self.processor.tokenizer(text, **kwargs)


def text_turns(turns: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Turns with image payloads dropped (placeholders kept): what the template renders."""
    out = []
    for turn in turns:
        content = turn.get("content")
        if isinstance(content, list):
            content = [{k: v for k, v in part.items() if k != "image"} for part in content]
        out.append({**turn, "content": content})
    return out


def carry_mask(plain_ids: list[int], plain_mask: list[int], ids: list[int]) -> list[int]:
    """The mask of `plain_ids` (placeholders unexpanded) carried onto `ids` (each placeholder grown into
    its image's tokens): matched tokens keep their mask, tokens the processor added get 0."""
    out = [0] * len(ids)
    matcher = difflib.SequenceMatcher(None, plain_ids, ids, autojunk=False)
    for block in matcher.get_matching_blocks():
        for k in range(block.size):
            out[block.b + k] = plain_mask[block.a + k]
    return out


def collator(processor: Any, args: Any, assistant_only: bool, where: str):
    """TRL's vision collator; with `assistant_only`, labels only on the assistants' tokens."""
    from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

    class AssistantOnlyCollator(DataCollatorForVisionLanguageModeling):
        """TRL's batches (images processed, right padding), labels masked to the assistant turns."""

        def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
            from trl.data_utils import prepare_multimodal_messages

            turns = [prepare_multimodal_messages(e["messages"], images=e["images"]) for e in examples]
            batch = super().torch_call(examples)
            if not assistant_only:
                return batch
            renderer = _Renderer(self.processor)
            labels = batch["labels"]
            for i, conversation in enumerate(turns):
                plain_ids, plain_mask = assistant_mask(renderer, text_turns(conversation), where, i)
                length = int(batch["attention_mask"][i].sum())
                ids = batch["input_ids"][i, :length].tolist()
                mask = carry_mask(plain_ids, plain_mask, ids)
                truncated = self.max_length is not None and length >= self.max_length
                if not truncated and sum(mask) != sum(plain_mask):
                    raise TunelabError(
                        f"'{where}': the assistant-only mask could not be carried onto the processor's tokens "
                        f"({sum(mask)} of {sum(plain_mask)} assistant tokens found): set "
                        "training.assistant_only_loss: false"
                    )
                for j, keep in enumerate(mask):
                    if not keep:
                        labels[i, j] = -100
            batch["labels"] = labels
            return batch

    return AssistantOnlyCollator(
        processor=processor,
        max_length=args.max_length,
        pad_to_multiple_of=args.pad_to_multiple_of,
        dataset_text_field=args.dataset_text_field,
    )


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


# ---------------------------------------------------------------- checks and plans from configs


def skeleton(config: Any, where: str):
    """The image+text model `config` describes, on the meta device (no memory, no weights)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForImageTextToText

    try:
        with init_empty_weights():
            model = AutoModelForImageTextToText.from_config(config)
    except (ValueError, TypeError, KeyError) as exc:
        raise TunelabError(f"'{where}': cannot build the image+text model from its config: {_short(exc)}") from None
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
            f"'{spec.where}.lora': peft cannot apply it to this model ({_short(exc)}); its linear layers: "
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
    wbytes = DTYPE_BYTES[_dtype_name(dtype or getattr(config, "dtype", None))]
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
    parts["optimizer"] = _optimizer_bytes(getattr(args, "optim", "adamw_torch"), trainable, tbytes, [])
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
