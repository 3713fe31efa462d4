"""Image+text prompting: the eval stage's held-out scores for vision-language models, `tunelab chat --image`,
and the report's sample images with each model's answers.

Prompts are a user turn holding the row's images (as `{"type": "image"}` parts, before the text, as
TRL places them) and the prompt text, rendered through the processor's chat template with the
generation prompt; batches are left-padded, images processed by the model's own processor.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.core.hub import configure_offline, local_path
from tunelab.core.paths import refuse_special
from tunelab.core.progress import quiet
from tunelab.core.runs import write_atomic
from tunelab.data.datasets import fingerprint, load_split, require_columns
from tunelab.evaluation.answers import answer, matches
from tunelab.models.chat import model_source
from tunelab.models.chat_templates import render as render_text
from tunelab.models.quant import quant_config
from tunelab.models.spec import model_config, model_spec, resolve_spec
from tunelab.stages import StageResult
from tunelab.vision.collator import ProcessorRenderer
from tunelab.vision.data import has_images, load_images
from tunelab.vision.models import is_vlm_folder, load_processor, load_vlm

VLM_KINDS = ("vlm_build", "vlm_sft")
UNSUPPORTED = ("fewshot", "reward_model", "quantization")  # eval keys the image+text path does not take (yet)
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


def vision_mode(spec: Any, ctx: Any, models: dict[str, Any]) -> bool:
    """True when every model is image+text; one line for a mix, and for eval keys this path does not take."""
    flags = {label: is_vlm(value, ctx, f"{spec.where}.models.{label}") for label, value in models.items()}
    if not any(flags.values()):
        return False
    if not all(flags.values()):
        text = next(label for label, flag in flags.items() if not flag)
        raise TunelabError(
            f"'{spec.where}' mixes image+text models and a text-only one ('{text}'); use one eval stage each"
        )
    for key in UNSUPPORTED:
        if spec.cfg.get(key) is not None:
            raise TunelabError(f"'{spec.where}.{key}' is not supported for image+text models yet: remove it")
    if spec.cfg.get("chat_template", True) is not True:
        raise TunelabError(
            f"'{spec.where}.chat_template': image+text models are prompted through their processor's template"
        )
    return True


def _data(spec: Any, prompt: str, reference: str):

    if "data" not in spec.cfg:
        raise TunelabError(f"'{spec.where}' has no `data:`: name the dataset (and split) to evaluate on")
    where = f"{spec.where}.data"
    ds = load_split(spec.cfg["data"], where, "test")
    require_columns(ds, [prompt], where, "prompts to answer; set prompt_column")
    require_columns(ds, [reference], where, "reference answers; set reference_column")
    if not has_images(ds):
        raise TunelabError(
            f"'{where}' has no `images` column, but the models are image+text models: give each row its images"
        )
    return load_images(ds, spec.cfg["data"], where)


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


def check(
    spec: Any, ctx: Any, models: dict[str, Any], prompt: str, reference: str, template: str, system: str | None
) -> None:
    """The data's images open and the first rows render and process for every model that exists already."""

    ds = _data(spec, prompt, reference)
    for label, value in models.items():
        where = f"{spec.where}.models.{label}" if "models" in spec.cfg else f"{spec.where}.model"
        mspec = model_spec(value, where)
        if ctx.is_pending(mspec["path"]):
            continue
        resolved = resolve_spec({**mspec, "path": ctx.resolve_ref(mspec["path"])}, where, materialize=False)
        processor = load_processor(resolved["path"], where)
        for i in range(min(2, len(ds))):
            row = ds[i]
            text = render(processor, turns(template.format(prompt=row[prompt]), len(row["images"]), system), where, i)
            try:
                processor(images=[row["images"]] if row["images"] else None, text=[text], return_tensors="pt")
            except Exception as exc:  # noqa: BLE001 - processors raise ValueError, TypeError, ...
                raise TunelabError(f"'{spec.where}.data' row {i}: the processor rejects it: {exc}"[:300]) from None


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


def run(
    spec: Any,
    ctx: Any,
    models: dict[str, Any],
    prompt_col: str,
    ref_col: str,
    batch_size: int,
    scorers: list[tuple[str, dict[str, Any], Any]],
    config: Any,
    pattern: str | None,
    template: str,
    system: str | None,
    multi_reference: tuple[str, ...],
):
    """Score each image+text model on the held-out rows; predictions and report samples written beside."""
    from transformers import set_seed

    ds = _data(spec, prompt_col, ref_col)
    prompts = [template.format(prompt=str(p)) for p in ds[prompt_col]]
    references = [str(r).strip() for r in ds[ref_col]]
    images = [list(row) for row in ds["images"]]
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    metrics: dict[str, Any] = {}
    files: dict[str, str] = {}
    samples: dict[str, Any] = {
        "images": _sample_images(images, spec.out_dir),
        "prompts": prompts[:SAMPLES],
        "references": references[:SAMPLES],
        "answers": {},
    }
    same = next((dict(o) for n, o, _ in scorers if n == "exact_match"), {})  # rows scored as metrics.json
    for label, value in models.items():
        where = f"{spec.where}.models.{label}" if "models" in spec.cfg else f"{spec.where}.model"
        set_seed(ctx.seed)
        path = model_path(value)
        model, processor = load({**(value if isinstance(value, dict) else {}), "path": ctx.resolve_ref(path)}, where)
        pairs = enumerate(zip(prompts, images, strict=True))
        texts = [render(processor, turns(p, len(im), system), where, i) for i, (p, im) in pairs]
        print(
            f"   {label}: image+text prompts through its processor's template; the first reads:\n     | "
            + texts[0].replace("\n", "\n     | "),
            flush=True,
        )
        outputs = generate(model, processor, texts, images, config, batch_size)
        answers = [answer(t, pattern) for t in outputs]
        scores = [float(matches(a, r, **same)) for a, r in zip(answers, references, strict=True)]
        metrics[label] = {}
        for name, options, scorer in scorers:
            refs = [[r] for r in references] if name in multi_reference else references
            result = scorer.compute(predictions=answers, references=refs, **options)
            metrics[label].update({k: float(v) for k, v in result.items() if isinstance(v, (int, float))})
        metrics[label]["examples"] = len(scores)
        rows = [
            {
                "prompt": p,
                "images": [getattr(im, "filename", "") for im in ims],
                "output": t,
                "answer": a,
                "reference": r,
                "exact_match": s,
            }
            for p, ims, t, a, r, s in zip(prompts, images, outputs, answers, references, scores, strict=True)
        ]
        out = spec.out_dir / f"predictions-{label}.jsonl"
        write_atomic(out, "".join(json.dumps(row) + "\n" for row in rows))
        files[f"predictions-{label}"] = str(out)
        samples["answers"][label] = answers[:SAMPLES]
        del model
    write_atomic(spec.out_dir / "vlm_samples.json", json.dumps(samples, indent=2) + "\n")
    return StageResult(metrics=metrics, files=files, fingerprints={"data": fingerprint(ds.remove_columns("images"))})


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


def open_chat(ref: str, config: Any, system: str | None, image_paths: list[Path], quantization: Any = None):
    """A `VisionChat` over the model `ref` names with the images opened (one line for a missing one)."""
    from PIL import Image

    for path in image_paths:  # before the model: a FIFO would hang PIL's open, and loading takes a while
        refuse_special(path, "--image")
    configure_offline()
    quiet()
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
