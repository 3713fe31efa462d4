"""What the diffusion stages share: image data, schedulers by name, pipelines, sampling, grids.

Image data (`data:` of `diffusion_train` and of image evals) is one of

- ``digits``: scikit-learn's 1,797 handwritten digits (8x8, shipped inside scikit-learn, so
  offline), split 1,500 train / 297 test by a fixed permutation; upscaled to `resolution`;
- a local folder of images (datasets' ``imagefolder``: a ``metadata.jsonl`` with ``file_name``
  and a caption column gives image/caption pairs; ``train/`` and ``test/`` subfolders give splits);
- any other `datasets.load_dataset` arguments (hub id, ...) whose split has an image column.

Schedulers are chosen by short name (``DDPM``, ``DDIM``, ``DPM-Solver++``, ``Euler``, ...) or by
diffusers class name, with options that are that class's config fields.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.core.config import check_keys
from tunelab.core.errors import TunelabError, closest, unknown_key
from tunelab.core.hub import local_path, resolve_model
from tunelab.core.progress import quiet
from tunelab.data.datasets import check_source, data_spec, load_split, require_columns

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
DIGITS = "digits"
DIGITS_TRAIN = 1500  # of 1,797; the rest is the held-out test split
MODES = {1: "L", 3: "RGB"}

# Short name -> (diffusers class, options that make it that sampler).
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "DDPM": ("DDPMScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "DPM-Solver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "DPM-Solver": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver"}),
    "DPM-Solver-SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "UniPC": ("UniPCMultistepScheduler", {}),
    "DEIS": ("DEISMultistepScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "EulerAncestral": ("EulerAncestralDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "PNDM": ("PNDMScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
}


PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
"""What a UNet learns to predict (a noise scheduler's `prediction_type`) that tunelab trains and samples."""

# ---------------------------------------------------------------- image data


def _is_digits(value: Any) -> bool:
    path = value if isinstance(value, str) else value.get("path") if isinstance(value, dict) else None
    return path == DIGITS


def image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _local_folder(value: Any) -> Path | None:

    path = value if isinstance(value, str) else value.get("path") if isinstance(value, dict) else None
    local = local_path(path) if isinstance(path, str) else None
    return local if local is not None and local.is_dir() else None


def check_image_folder(folder: Path, where: str, resolution: int | None, channels: int | None) -> tuple[int, int]:
    """Read every image's header (not its pixels): (size, channels) the stage will train at.

    Mixed sizes need `resolution:` (every image is then resized and centre-cropped); mixed
    modes need `channels:` (every image is then converted). Either unset with mixed files would
    train on something the user did not choose.
    """
    from PIL import Image, UnidentifiedImageError

    files = image_files(folder)
    if not files:
        raise TunelabError(f"'{where}': no images in '{folder}' (looked for {', '.join(IMAGE_SUFFIXES)})")
    sizes: dict[tuple[int, int], Path] = {}
    modes: dict[int, Path] = {}
    for f in files:
        try:
            with Image.open(f) as im:
                sizes.setdefault(im.size, f)
                modes.setdefault(1 if im.mode in ("L", "1", "I", "I;16", "F") else 3, f)
        except (UnidentifiedImageError, OSError) as exc:
            raise TunelabError(f"'{where}': '{f}' is not a readable image ({exc})") from None
        except Exception as exc:  # noqa: BLE001 - PIL also raises DecompressionBombError, SyntaxError, ValueError
            message = " ".join(str(exc).split())[:200]
            raise TunelabError(f"'{where}': '{f}' cannot be read ({type(exc).__name__}: {message})") from None
    if len(modes) > 1 and channels is None:
        (a, fa), (b, fb) = list(modes.items())[:2]
        raise TunelabError(
            f"'{where}': images mix {a}-channel ({fa.name}) and {b}-channel ({fb.name}) files; "
            "set `channels: 1` or `channels: 3` to convert them all"
        )
    if len(sizes) > 1 and resolution is None:
        (sa, fa), (sb, fb) = list(sizes.items())[:2]
        raise TunelabError(
            f"'{where}': images have different sizes ({sa[0]}x{sa[1]} {fa.name}, {sb[0]}x{sb[1]} {fb.name}); "
            "set `resolution:` to resize and centre-crop them all to one size"
        )
    (w, h) = next(iter(sizes))
    return resolution or min(w, h), channels or next(iter(modes))


def image_spec(cfg: dict[str, Any], where: str, data_key: str = "data") -> dict[str, Any]:
    """Check an image `data:` (and the stage's `resolution`/`channels`) without loading pixels.

    Returns {resolution, channels}: what the model will see.
    """

    resolution, channels = cfg.get("resolution"), cfg.get("channels")
    if resolution is not None and (not isinstance(resolution, int) or isinstance(resolution, bool) or resolution < 4):
        raise TunelabError(f"'{where}.resolution' must be an image side in pixels (>= 4), got {resolution!r}")
    if channels is not None and channels not in MODES:
        raise TunelabError(f"'{where}.channels' must be 1 (greyscale) or 3 (RGB), got {channels!r}")
    value = cfg.get(data_key, DIGITS)
    dwhere = f"{where}.{data_key}"
    if _is_digits(value):
        data_spec(value, dwhere, "train")
        try:
            import sklearn.datasets  # noqa: F401
        except ImportError:
            raise TunelabError(
                f"'{dwhere}' is the bundled digits, which ship inside scikit-learn: pip install 'tunelab[diffusion]'"
            ) from None
        return {"resolution": resolution or 16, "channels": channels or 1}
    folder = _local_folder(value)
    if folder is not None:
        size, chans = check_image_folder(folder, dwhere, resolution, channels)
        return {"resolution": size, "channels": chans}
    check_source(value, dwhere, "train")
    if resolution is None:
        raise TunelabError(f"'{where}' needs `resolution:` for a dataset that is not a local folder")
    return {"resolution": resolution, "channels": channels or 3}


def digits(split: str):
    """scikit-learn's digits as a datasets.Dataset of 8x8 greyscale PIL images with labels."""
    import datasets
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    raw = load_digits()
    order = np.random.default_rng(0).permutation(len(raw.images))
    name = split.split("[")[0]
    if name not in ("train", "test"):
        raise TunelabError(f"the bundled digits have splits 'train' and 'test', not '{name}'")
    idx = order[:DIGITS_TRAIN] if name == "train" else order[DIGITS_TRAIN:]
    images = [Image.fromarray((raw.images[i] * (255 / 16)).round().astype("uint8"), mode="L") for i in idx]
    ds = datasets.Dataset.from_dict(
        {"image": images, "label": [int(raw.target[i]) for i in idx]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    if "[" in split:  # datasets' slice syntax, e.g. train[:64]
        ds = _slice(ds, split)
    return ds


def _slice(ds, split: str):
    import re

    match = re.fullmatch(r"\w+\[(-?\d*):(-?\d*)\]", split)
    if not match:
        raise TunelabError(f"digits split '{split}': use a slice like train[:256]")
    start, stop = (int(x) if x else None for x in match.groups())
    return ds.select(range(len(ds))[start:stop])


def load_images(value: Any, where: str, split: str = "train", image_column: str = "image"):
    """An image split as a datasets.Dataset (digits, a local image folder, or load_dataset arguments)."""
    import datasets

    value = DIGITS if value is None else value
    if _is_digits(value):
        spec = data_spec(value, where, split)
        return digits(spec["split"])
    folder = _local_folder(value)
    if folder is not None:
        spec = data_spec(value, where, split)
        ds = datasets.load_dataset("imagefolder", data_dir=str(folder))
        names = list(ds)
        want = spec["split"].split("[")[0]
        if want not in ds:
            if len(names) == 1 and not (isinstance(value, dict) and "split" in value):
                want = names[0]  # a plain folder is one split, whatever the stage's default
            else:
                raise TunelabError(f"'{where}': '{folder}' has no split '{want}' (it has {', '.join(names)})")
        out = ds[want]
        if "[" in spec["split"]:
            out = _slice(out, spec["split"])
    else:
        out = load_split(value, where, split)
    require_columns(out, [image_column], where, "images; set image_column")
    return out


def to_tensor(image, resolution: int, channels: int, flip: bool = False):
    """PIL image -> float tensor (C, H, W) in [-1, 1]: converted, resized (short side), centre-cropped."""
    import numpy as np
    import torch
    from PIL import Image

    image = image.convert(MODES[channels])
    w, h = image.size
    if (w, h) != (resolution, resolution):
        scale = resolution / min(w, h)
        image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR)
        w, h = image.size
        left, top = (w - resolution) // 2, (h - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
    if flip:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(np.ascontiguousarray(array))


def grid(images: list, columns: int | None = None):
    """One image holding `images` in rows (2 px gaps), for quick looks and the docs."""
    import math

    from PIL import Image

    n = len(images)
    columns = columns or math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    w, h = images[0].size
    out = Image.new(images[0].mode, (columns * (w + 2) + 2, rows * (h + 2) + 2))
    for i, im in enumerate(images):
        out.paste(im, (2 + (i % columns) * (w + 2), 2 + (i // columns) * (h + 2)))
    return out


# ---------------------------------------------------------------- schedulers


def scheduler_spec(value: Any, where: str) -> tuple[type, dict[str, Any]]:
    """`DDIM` or `{name: DPM-Solver++, solver_order: 2}` -> (diffusers scheduler class, options)."""
    import diffusers

    if isinstance(value, dict):
        if "name" not in value:
            raise TunelabError(f"'{where}' needs `name:` (one of {', '.join(SCHEDULERS)}) beside its options")
        name, options = value["name"], {k: v for k, v in value.items() if k != "name"}
    else:
        name, options = value, {}
    if not isinstance(name, str):
        raise TunelabError(f"'{where}' must be a scheduler name, got {name!r}")
    by_lower = {k.lower(): k for k in SCHEDULERS}
    if name.lower() in by_lower:
        cls_name, fixed = SCHEDULERS[by_lower[name.lower()]]
    elif name.endswith("Scheduler") and hasattr(diffusers, name):
        cls_name, fixed = name, {}
    else:
        guess = closest(name, list(SCHEDULERS))
        hint = f"did you mean '{guess}'? " if guess else ""
        raise TunelabError(
            f"'{where}': unknown scheduler '{name}'; {hint}valid: {', '.join(SCHEDULERS)} "
            "(or a diffusers class name such as DDIMScheduler)"
        )

    cls = getattr(diffusers, cls_name)
    options = check_keys(options, cls, where)
    return cls, {**fixed, **options}


def make_scheduler(value: Any, base_config: dict[str, Any], where: str):
    """The named scheduler, built on a pipeline's scheduler config (its betas, timesteps, prediction type)."""
    cls, options = scheduler_spec(value, where)
    return cls.from_config(base_config, **options)


# ---------------------------------------------------------------- pipelines


def lora_base(folder: Path) -> str | None:
    """The base pipeline of a LoRA folder tunelab wrote (its model card's `base_model:`)."""
    import yaml

    card = folder / "README.md"
    if not card.is_file():
        return None
    text = card.read_text()
    if not text.startswith("---"):
        return None
    meta = yaml.safe_load(text.split("---")[1]) or {}
    return meta.get("base_model")


def is_lora_folder(folder: Path) -> bool:
    return (folder / "pytorch_lora_weights.safetensors").is_file()


def pipeline_kind(value: str, where: str) -> str:
    """'unconditional' or 'text' for a pipeline folder, a tunelab LoRA folder, or a cached hub id.

    Fails in one line for folders that are not diffusers pipelines (the usual mistake: a
    transformers model folder, or the `unet/` subfolder instead of the pipeline above it).
    """
    import json

    local = local_path(value)
    if local is not None and local.is_dir():
        if is_lora_folder(local):
            base = lora_base(local)
            if base is None:
                raise TunelabError(f"'{where}': LoRA folder '{value}' names no base_model in its README.md")
            return pipeline_kind(base, where)
        index = local / "model_index.json"
        if not index.is_file():
            hint = " (point at the folder that holds model_index.json)"
            if (local / "config.json").is_file():
                hint = " (it has a config.json: a single model, not a pipeline; point at the folder above it)"
            raise TunelabError(f"'{where}': '{value}' is not a diffusers pipeline: no model_index.json{hint}")
    else:
        from huggingface_hub import hf_hub_download

        resolve_model(value, where)
        try:
            index = Path(hf_hub_download(value, "model_index.json"))
        except Exception:
            raise TunelabError(
                f"'{where}': hub id '{value}' has no model_index.json: not a diffusers pipeline"
            ) from None
    components = json.loads(index.read_text())
    return "text" if "text_encoder" in components or "tokenizer" in components else "unconditional"


@quiet(diffusers=True)
def load_pipeline(value: str, where: str, dtype: Any = None):
    """A diffusers pipeline from a folder or hub id; a tunelab LoRA folder loads its base plus the LoRA."""
    from diffusers import DiffusionPipeline

    folder = Path(resolve_model(value, where))
    kwargs = {"dtype": dtype} if dtype is not None else {}
    if is_lora_folder(folder):
        pipe = DiffusionPipeline.from_pretrained(resolve_model(lora_base(folder), where), **kwargs)
        pipe.load_lora_weights(str(folder))
        return pipe
    pipe = DiffusionPipeline.from_pretrained(str(folder), **kwargs)
    if hasattr(pipe, "safety_checker") and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None  # it needs a Hub download of its own and only blacks out images
    return pipe


def sample(
    pipe,
    *,
    num_images: int,
    num_inference_steps: int,
    seed: int,
    batch_size: int = 64,
    prompt: str | list[str] | None = None,
    **extra: Any,
) -> list:
    """`num_images` PIL images; image i depends only on (seed, i), not on the batch size.

    Each image gets its own torch.Generator seeded `seed + i`, so a run with a different
    batch size, or a resumed one, draws the same images.
    """
    import torch

    pipe.set_progress_bar_config(disable=True)
    prompts = [prompt] * num_images if isinstance(prompt, str) else prompt
    out = []
    for start in range(0, num_images, batch_size):
        n = min(batch_size, num_images - start)
        generators = [torch.Generator(device="cpu").manual_seed(seed + start + i) for i in range(n)]
        kwargs: dict[str, Any] = {"num_inference_steps": num_inference_steps, "generator": generators, **extra}
        if prompts is not None:
            kwargs["prompt"] = prompts[start : start + n]
        else:
            kwargs["batch_size"] = n
        result = pipe(output_type="pil", **kwargs)
        out.extend(result.images)
    return out


# ---------------------------------------------------------------- sampling settings

SAMPLING_KEYS = ("scheduler", "num_inference_steps", "num_images", "batch_size", "seed", "prompt", "pipeline_args")


def sampling_spec(
    values: dict[str, Any], where: str, kind: str | None, seed: int, num_images: int | None = 16
) -> dict[str, Any]:
    """Check sampling settings (the keys of `diffusion_sample`, or eval's `sampling:`).

    `kind` is the pipeline's ('unconditional' / 'text'), or None while it is not known yet.
    DDPM defaults to one step per training timestep (1000); the other samplers to 50.
    """

    for key in values:
        if key not in SAMPLING_KEYS:
            raise unknown_key(where, key, SAMPLING_KEYS, "sampling settings")
    out = {"scheduler": "DDPM", "num_images": num_images, "batch_size": 64, "seed": seed, **values}
    scheduler_spec(out["scheduler"], f"{where}.scheduler")
    name = out["scheduler"]["name"] if isinstance(out["scheduler"], dict) else out["scheduler"]
    out.setdefault("num_inference_steps", 1000 if str(name).upper() in ("DDPM", "DDPMSCHEDULER") else 50)
    for key in ("num_inference_steps", "num_images", "batch_size"):
        if out[key] is None and key == "num_images":
            continue  # eval: as many as there are real images
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1:
            raise TunelabError(f"'{where}.{key}' must be a positive integer, got {out[key]!r}")
    if not isinstance(out["seed"], int) or isinstance(out["seed"], bool):
        raise TunelabError(f"'{where}.seed' must be an integer, got {out['seed']!r}")
    prompt = out.get("prompt")
    if prompt is not None and not (isinstance(prompt, str) or (isinstance(prompt, list) and prompt)):
        raise TunelabError(f"'{where}.prompt' must be a string or a list of strings")
    if isinstance(prompt, list) and len(prompt) != out["num_images"]:
        raise TunelabError(f"'{where}.prompt' lists {len(prompt)} prompts for num_images={out['num_images']}")
    if kind == "unconditional" and prompt is not None:
        raise TunelabError(f"'{where}.prompt': the pipeline is unconditional; it takes no prompt (drop prompt)")
    if kind == "text" and prompt is None:
        raise TunelabError(f"'{where}': the pipeline is text-to-image; give `prompt:` (a string or one per image)")
    extra = out.get("pipeline_args") or {}
    if not isinstance(extra, dict):
        raise TunelabError(f"'{where}.pipeline_args' must map pipeline call arguments to values (guidance_scale, ...)")
    return out


def generate(pipe, settings: dict[str, Any], where: str) -> tuple[list, float]:
    """Images from a loaded pipeline with checked settings; (images, seconds)."""
    import inspect
    import time

    extra = dict(settings.get("pipeline_args") or {})
    accepted = [p for p in inspect.signature(pipe.__call__).parameters if p not in ("self", "kwargs")]
    for key in extra:
        if key not in accepted:
            raise unknown_key(f"{where}.pipeline_args", key, accepted, f"not an argument of {type(pipe).__name__}")
    pipe.scheduler = make_scheduler(settings["scheduler"], pipe.scheduler.config, f"{where}.scheduler")
    start = time.perf_counter()
    images = sample(
        pipe,
        num_images=settings["num_images"],
        num_inference_steps=settings["num_inference_steps"],
        seed=settings["seed"],
        batch_size=settings["batch_size"],
        prompt=settings.get("prompt"),
        **extra,
    )
    return images, time.perf_counter() - start


def write_images(images: list, out_dir: Path) -> dict[str, str]:
    """images/0000.png ... and grid.png (the first 64) in `out_dir`; returns the paths written."""
    folder = out_dir / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(images):
        im.save(folder / f"{i:04d}.png")
    grid(images[:64]).save(out_dir / "grid.png")
    return {"images": str(folder), "grid": str(out_dir / "grid.png")}
