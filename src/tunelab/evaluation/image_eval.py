"""The eval stage's path for diffusion pipelines: sample from each and score the images against held-out
real ones (`frechet_distance`, in the feature space of a small classifier trained on `classifier_data`;
see `tunelab.diffusion.quality`). The text path is `tunelab.stages.eval`; image+text models are
`tunelab.vision.prompting`."""

from __future__ import annotations

from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.core.hub import local_path
from tunelab.core.refs import ref_name
from tunelab.data.datasets import fingerprint, require_columns
from tunelab.diffusion.pipelines import (
    DIGITS,
    generate,
    image_spec,
    is_lora_folder,
    load_images,
    load_pipeline,
    pipeline_kind,
    sampling_spec,
    write_images,
)
from tunelab.diffusion.quality import CLASSIFIER_CONFIG, load_classifier, quality, to_batch, train_classifier
from tunelab.stages import StageResult

IMAGE_METRICS = ("frechet_distance",)


def is_diffusion(value: Any, ctx: Any) -> bool:
    """Whether a model to evaluate is a diffusion pipeline (pending diffusion_train stage, or model_index.json)."""
    path = value.get("path") if isinstance(value, dict) else value
    if not isinstance(path, str):
        return False
    if ctx.is_pending(path):
        return ctx.kinds.get(ref_name(path)) == "diffusion_train"
    local = local_path(ctx.resolve_ref(path))
    return local is not None and ((local / "model_index.json").is_file() or is_lora_folder(local))


def _settings(spec: Any, ctx: Any, models: dict[str, Any]) -> dict[str, Any]:
    kinds = set()
    for label, value in models.items():
        path = value.get("path") if isinstance(value, dict) else value
        if not ctx.is_pending(path):
            kinds.add(pipeline_kind(ctx.resolve_ref(path), f"{spec.where}.models.{label}"))
    kind = kinds.pop() if len(kinds) == 1 else None
    return sampling_spec(spec.cfg.get("sampling") or {}, f"{spec.where}.sampling", kind, ctx.seed, num_images=None)


def _data(spec: Any):
    """(held-out real images, labelled classifier training images) as datasets."""
    image_col = spec.cfg.get("image_column", "image")
    label_col = spec.cfg.get("label_column", "label")
    value = spec.cfg.get("data", DIGITS)
    real = load_images(value, f"{spec.where}.data", "test", image_col)
    if "classifier_data" in spec.cfg:
        source = spec.cfg["classifier_data"]
    else:
        source = {"path": value if isinstance(value, str) else value["path"], "split": "train"}
    labelled = load_images(source, f"{spec.where}.classifier_data", "train", image_col)
    require_columns(labelled, [label_col], f"{spec.where}.classifier_data", "class labels for the feature classifier")
    return real, labelled


def _metric_names(spec: Any, names: list[str] | None) -> list[str]:
    names = names if "metrics" in spec.cfg else list(IMAGE_METRICS)
    for name in names:
        if name not in IMAGE_METRICS:
            raise TunelabError(
                f"'{spec.where}.metrics': '{name}' scores text; for diffusion pipelines use {', '.join(IMAGE_METRICS)}"
            )
    return names


def check(spec: Any, ctx: Any, models: dict[str, Any], metrics: list[str] | None) -> None:
    """What `run` will need: the sampling settings, image metrics, readable image data."""
    _settings(spec, ctx, models)
    _metric_names(spec, metrics)
    for key, default in (("data", "digits"), ("classifier_data", None)):
        value = spec.cfg.get(key, default)
        if value is not None:  # digits, a readable image folder, or a loadable dataset source
            image_spec({key: value, "resolution": 16}, spec.where, key)


def run(spec: Any, ctx: Any, models: dict[str, Any], metrics: list[str] | None) -> StageResult:
    """Sample from each pipeline, score against held-out real images in a tunelab-trained feature space."""
    import torch

    settings = _settings(spec, ctx, models)
    _metric_names(spec, metrics)
    real, labelled = _data(spec)
    image_col, label_col = spec.cfg.get("image_column", "image"), spec.cfg.get("label_column", "label")
    n = settings["num_images"] or len(real)
    if n > len(real):
        raise TunelabError(
            f"'{spec.where}.sampling.num_images' is {n} but '{spec.where}.data' has {len(real)} real images; "
            "the Fréchet distance compares equal counts: lower num_images or use a larger split"
        )
    settings["num_images"] = n
    real = real.shuffle(seed=ctx.seed).select(range(n)) if n < len(real) else real
    scores: dict[str, Any] = {}
    files: dict[str, str] = {}
    folder = spec.out_dir / "classifier"
    net = None
    for label, value in models.items():
        where = f"{spec.where}.models.{label}" if "models" in spec.cfg else f"{spec.where}.model"
        path = value.get("path") if isinstance(value, dict) else value
        pipe = load_pipeline(ctx.resolve_ref(path), where)
        if torch.cuda.is_available():
            pipe = pipe.to("cuda")
        if net is None:
            size = pipe.unet.config.sample_size * getattr(pipe, "vae_scale_factor", 1)
            channels = 3 if hasattr(pipe, "vae") else pipe.unet.config.in_channels
            if not (folder / CLASSIFIER_CONFIG).is_file():
                images = to_batch(labelled[image_col], size, channels)
                train_classifier(images, [int(v) for v in labelled[label_col]], folder, ctx.seed)
            net, config = load_classifier(folder)
            real_batch = to_batch(real[image_col], config["resolution"], config["channels"])
            others = labelled.shuffle(seed=ctx.seed).select(range(min(n, len(labelled))))
            reference = quality(net, to_batch(others[image_col], config["resolution"], config["channels"]), real_batch)
            floor = reference["frechet_distance"]  # real vs real: the best a model can score here
        images, seconds = generate(pipe, settings, where)
        files.update({f"{k}-{label}": v for k, v in write_images(images, spec.out_dir / label).items()})
        result = quality(net, to_batch(images, config["resolution"], config["channels"]), real_batch)
        scores[label] = {
            **result,
            "real_frechet_distance": floor,
            "num_images": float(n),
            "seconds_per_image": seconds / n,
        }
    return StageResult(metrics=scores, files=files, fingerprints={"data": fingerprint(real)})
