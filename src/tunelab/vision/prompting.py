"""Image+text prompting: what the eval stage's image+text mode (`tunelab.stages.eval.VisionEval`) and
`tunelab chat --image` share, and the report's sample images with each model's answers.

Prompts are a user turn holding the row's images (as `{"type": "image"}` parts, before the text, as
TRL places them) and the prompt text, rendered through the processor's chat template with the
generation prompt; batches are left-padded, images processed by the model's own processor.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.core.hub import configure_offline, local_path
from tunelab.core.paths import refuse_special
from tunelab.core.progress import quiet
from tunelab.core.runs import write_atomic
from tunelab.data.datasets import load_split, require_columns
from tunelab.models.chat import model_source
from tunelab.models.chat_templates import render as render_text
from tunelab.models.quant import quant_config
from tunelab.models.spec import model_config, model_spec, resolve_spec
from tunelab.vision.collator import ProcessorRenderer
from tunelab.vision.data import has_images, load_images
from tunelab.vision.models import is_vlm_folder, load_processor, load_vlm

log = logging.getLogger(__name__)

VLM_KINDS = ("vlm_build", "vlm_sft")
SAMPLES = 6  # rows shown in report.md with their images
IMAGE_MARK = "<image>"  # in a prompt: where its images go


def model_path(value: Any) -> str | None:
    path = value.get("path") if isinstance(value, dict) else value
    return path if isinstance(path, str) else None


def is_vlm(value: Any, ctx: Any, where: str = "model") -> bool:
    """Whether an eval model is an image+text model: a pending vlm stage, a folder with a vision tower,
    or a hub model whose config has one (read from the cache; an uncached one is the download it needs)."""

    path = model_path(value)
    if path is None:
        return False
    if ctx.is_pending(path):
        return ctx.kinds.get(path.strip()[2:-1]) in VLM_KINDS
    local = local_path(ctx.resolve_ref(path))
    if local is not None:
        return local.is_dir() and is_vlm_folder(local)
    if isinstance(value, dict) and "gguf_file" in value:
        return False  # GGUF files hold language models
    return getattr(model_config(value, ctx, where), "vision_config", None) is not None


def image_rows(value: Any, where: str, prompt: str, reference: str):
    """The held-out rows with their images opened (`images` column: files or image objects)."""
    if value is None:
        raise TunelabError(f"'{where}' has no `data:`: name the dataset (and split) to evaluate on")
    data_where = f"{where}.data"
    ds = load_split(value, data_where, "test")
    require_columns(ds, [prompt], data_where, "prompts to answer; set prompt_column")
    require_columns(ds, [reference], data_where, "reference answers; set reference_column")
    if not has_images(ds):
        raise TunelabError(
            f"'{data_where}' has no `images` column, but the models are image+text models: give each row its images"
        )
    return load_images(ds, value, data_where)


def turns(prompt: str, images: int, system: str | None = None) -> list[dict[str, Any]]:
    """A user turn with `images` image parts and the prompt text (after an optional system turn).

    The images go before the text (TRL's placement), unless the text marks where they go with `<image>`
    (e.g. `prompt_template: "{prompt}<image>"` for a model trained with the image after the question).
    """
    head = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system is not None else []
    pieces = prompt.split(IMAGE_MARK)
    if len(pieces) == 1:
        parts = [{"type": "image"} for _ in range(images)] + [{"type": "text", "text": prompt}]
        return head + [{"role": "user", "content": parts}]
    if len(pieces) - 1 != images:
        raise TunelabError(
            f"the prompt marks {len(pieces) - 1} image place(s) with {IMAGE_MARK} but the row has {images} image(s)"
        )
    parts = [{"type": "text", "text": pieces[0]}] if pieces[0] else []
    for piece in pieces[1:]:
        parts += [{"type": "image"}] + ([{"type": "text", "text": piece}] if piece else [])
    return head + [{"role": "user", "content": parts}]


def render(processor: Any, conversation: list[dict[str, Any]], where: str, row: int = 0) -> str:

    return render_text(ProcessorRenderer(processor), conversation, where, row)


def check_rows(
    processor: Any, prompts: list[str], images: list[list[Any]], system: str | None, where: str, data_where: str
) -> None:
    """The first rows render through the processor's template and process, as generation will use them."""
    for i, (prompt, row) in enumerate(zip(prompts, images, strict=True)):
        text = render(processor, turns(prompt, len(row), system), where, i)
        try:
            processor(images=[row] if row else None, text=[text], return_tensors="pt")
        except Exception as exc:  # noqa: BLE001 - processors raise ValueError, TypeError, ...
            raise TunelabError(f"'{data_where}' row {i}: the processor rejects it: {exc}"[:300]) from None


def load(ref: str | dict[str, Any], where: str, quantization: Any = None):
    """(model, processor) of an image+text model, adapter merged over its base (unless quantized)."""

    spec = resolve_spec(model_spec(ref, where), where)
    processor = load_processor(spec["path"], where)
    model = load_vlm(spec, quantization=quantization, merge_adapter=quantization is None)
    return model.eval(), processor


def generate(
    model: Any, processor: Any, texts: list[str], images: list[list[Any]], config: Any, batch_size: int
) -> list[str]:
    """Batched generation over image+text prompts: left padding, the processor's image handling."""
    import torch

    tokenizer = processor.tokenizer
    config.pad_token_id = tokenizer.pad_token_id
    config.eos_token_id = config.eos_token_id or tokenizer.eos_token_id
    out: list[str] = []
    for start in range(0, len(texts), batch_size):
        batch_images = images[start : start + batch_size]
        enc = processor(
            images=batch_images if any(batch_images) else None,
            text=texts[start : start + batch_size],
            padding=True,
            padding_side="left",
            add_special_tokens=False,  # the template wrote its special tokens
            return_tensors="pt",
        ).to(model.device)
        with torch.no_grad():
            ids = model.generate(**enc, generation_config=config)
        out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def write_samples(
    out_dir: Path, images: list[list[Any]], prompts: list[str], references: list[str], answers: dict[str, list[str]]
) -> None:
    """The first rows' images, prompts, references and each model's answers, for report.md."""
    samples = {
        "images": _sample_images(images, out_dir),
        "prompts": prompts[:SAMPLES],
        "references": references[:SAMPLES],
        "answers": {label: got[:SAMPLES] for label, got in answers.items()},
    }
    write_atomic(out_dir / "vlm_samples.json", json.dumps(samples, indent=2) + "\n")


def _sample_images(images: list[list[Any]], out_dir: Path) -> list[str]:
    """The first rows' images as PNGs in the stage folder (the report links them)."""
    folder = out_dir / "samples"
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, row in enumerate(images[:SAMPLES]):
        if not row:
            names.append("")
            continue
        name = f"samples/{i:02d}.png"
        image = row[0].convert("RGB")
        scale = max(1, 96 // max(image.size))
        image.resize((image.width * scale, image.height * scale)).save(out_dir / name)
        names.append(name)
    return names


def report_section(run_dir: Path, stage: str) -> list[str]:
    """report.md lines: the sample images with the prompt, the reference and each model's answer."""
    path = Path(run_dir, stage, "vlm_samples.json")
    if not path.is_file():
        return []
    data = json.loads(path.read_text())
    labels = list(data["answers"])
    lines = [
        f"## {stage}: sample images and answers",
        "",
        "| image | prompt | reference | " + " | ".join(labels) + " |",
        "|---" * (3 + len(labels)) + "|",
    ]
    for i, prompt in enumerate(data["prompts"]):
        image = f"![]({stage}/{data['images'][i]})" if data["images"][i] else ""
        answers = [str(data["answers"][label][i]).replace("|", "\\|") for label in labels]
        lines.append(f"| {image} | {prompt} | {data['references'][i]} | " + " | ".join(answers) + " |")
    return lines + [""]


class VisionChat:
    """`tunelab chat --image`: a conversation whose first user turn holds the images."""

    def __init__(self, model: Any, processor: Any, config: Any, system: str | None, images: list[Any]) -> None:
        self.model, self.processor, self.config, self.system = model, processor, config, system
        self.images = images
        self.templated = True
        self.history: list[dict[str, Any]] = []

    def reset(self, system: str | None = None) -> None:
        self.history = []
        if system is not None:
            self.system = system

    @quiet()  # each reply: the caller's warning filters are theirs between replies
    def say(self, text: str, on_token: Any = None) -> str:
        first = not self.history
        turn = turns(text, len(self.images) if first else 0)[-1]
        conversation = ([] if self.system is None else turns("", 0, self.system)[:1]) + self.history + [turn]
        prompt = render(self.processor, conversation, "chat")
        reply = generate(self.model, self.processor, [prompt], [self.images], self.config, 1)[0].strip()
        if on_token is not None:
            on_token(reply)
        self.history += [turn, {"role": "assistant", "content": [{"type": "text", "text": reply}]}]
        return reply


def is_vlm_ref(ref: str) -> bool:
    """Whether `tunelab chat REF` names a local image+text model (or an adapter over one)."""

    local = local_path(ref)
    return local is not None and local.is_dir() and is_vlm_folder(local)


@quiet()
def open_chat(ref: str, config: Any, system: str | None, image_paths: list[Path], quantization: Any = None):
    """A `VisionChat` over the model `ref` names with the images opened (one line for a missing one)."""
    from PIL import Image

    for path in image_paths:  # before the model: a FIFO would hang PIL's open, and loading takes a while
        refuse_special(path, "--image")
    configure_offline()
    spec = model_source(ref)
    if not is_vlm_folder(spec["path"]):
        raise TunelabError(f"--image: '{ref}' is a text-only model, which cannot read images; drop --image")
    images = []
    for path in image_paths:
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, DecompressionBombError, ...
            raise TunelabError(f"--image '{path}' cannot be read ({' '.join(str(exc).split())[:150]})") from None

    model, processor = load(spec, "model", quant_config(quantization, "quantization"))
    return VisionChat(model, processor, config, system, images)
