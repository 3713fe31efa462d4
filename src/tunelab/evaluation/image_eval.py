"""Scoring diffusion pipelines: sample from each and compare the images with held-out real ones
(`frechet_distance`, in the feature space of a small classifier trained on `classifier_data`; see
`tunelab.diffusion.quality`). The eval stage's image mode (`tunelab.stages.eval.ImageEval`) is the
declaration over it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.core.hub import local_path
from tunelab.core.refs import ref_name
from tunelab.data.datasets import require_columns
from tunelab.diffusion.pipelines import (
    DIGITS,
    generate,
    image_spec,
    is_lora_folder,
    load_images,
    pipeline_kind,
    sampling_spec,
)
from tunelab.diffusion.quality import CLASSIFIER_CONFIG, load_classifier, quality, to_batch, train_classifier

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


def sampling(value: Any, where: str, ctx: Any, models: list[tuple[str | None, str]]) -> dict[str, Any]:
    """The `sampling:` settings (those of `diffusion_sample`), checked against the pipelines' kind where known."""
    kinds = set()
    for path, model_where in models:
        if isinstance(path, str) and not ctx.is_pending(path):
            kinds.add(pipeline_kind(ctx.resolve_ref(path), model_where))
    kind = kinds.pop() if len(kinds) == 1 else None
    return sampling_spec(value or {}, where, kind, ctx.seed, num_images=None)


def check_sources(data: Any, classifier_data: Any, where: str) -> None:
    """The held-out images and the classifier's: digits, a readable image folder, or a loadable dataset source."""
    for key, value in (("data", "digits" if data is None else data), ("classifier_data", classifier_data)):
        if value is not None:
            image_spec({key: value, "resolution": 16}, where, key)


class Reference:
    """The held-out real images every pipeline is compared with, and the feature space they are compared in.

    The feature classifier is trained once, at the first pipeline's resolution, and kept in the stage
    folder; `real_frechet_distance` (other real images against these) is the best a model can score.
    """

    def __init__(self, real: Any, labelled: Any, image_column: str, label_column: str, n: int, seed: int) -> None:
        self.real, self.labelled, self.n, self.seed = real, labelled, n, seed
        self.image_column, self.label_column = image_column, label_column
        self.net: Any = None

    @classmethod
    def read(cls, cfg: dict[str, Any], where: str, sampling: dict[str, Any], image_col: str, label_col: str, seed: int):
        value = cfg.get("data", DIGITS)
        real = load_images(value, f"{where}.data", "test", image_col)
        source = cfg.get("classifier_data") or {
            "path": value if isinstance(value, str) else value["path"],
            "split": "train",
        }
        labelled = load_images(source, f"{where}.classifier_data", "train", image_col)
        require_columns(labelled, [label_col], f"{where}.classifier_data", "class labels for the feature classifier")
        n = sampling["num_images"] or len(real)
        if n > len(real):
            raise TunelabError(
                f"'{where}.sampling.num_images' is {n} but '{where}.data' has {len(real)} real images; "
                "the Fréchet distance compares equal counts: lower num_images or use a larger split"
            )
        real = real.shuffle(seed=seed).select(range(n)) if n < len(real) else real
        return cls(real, labelled, image_col, label_col, n, seed)

    def _features(self, pipe: Any, folder: Path) -> None:
        size = pipe.unet.config.sample_size * getattr(pipe, "vae_scale_factor", 1)
        channels = 3 if hasattr(pipe, "vae") else pipe.unet.config.in_channels
        if not (folder / CLASSIFIER_CONFIG).is_file():
            images = to_batch(self.labelled[self.image_column], size, channels)
            train_classifier(images, [int(v) for v in self.labelled[self.label_column]], folder, self.seed)
        self.net, self.config = load_classifier(folder)
        self.real_batch = self._batch(self.real[self.image_column])
        others = self.labelled.shuffle(seed=self.seed).select(range(min(self.n, len(self.labelled))))
        self.floor = quality(self.net, self._batch(others[self.image_column]), self.real_batch)["frechet_distance"]

    def _batch(self, images: Any) -> Any:
        return to_batch(images, self.config["resolution"], self.config["channels"])

    def score(self, pipe: Any, folder: Path, settings: dict[str, Any], where: str) -> tuple[list, dict[str, float]]:
        """(the pipeline's samples, their scores against the real images)."""
        if self.net is None:
            self._features(pipe, folder)
        images, seconds = generate(pipe, {**settings, "num_images": self.n}, where)
        result = quality(self.net, self._batch(images), self.real_batch)
        metrics = {
            **result,
            "real_frechet_distance": self.floor,
            "num_images": float(self.n),
            "seconds_per_image": seconds / self.n,
        }
        return images, metrics
