"""Sample images from any diffusers pipeline: a folder, a hub id, an earlier stage, or a LoRA folder.

The scheduler is chosen by name (`DDPM`, `DDIM`, `DPM-Solver++`, `Euler`, ... or a diffusers class
name with options), with `num_inference_steps`, `seed`, `batch_size`, and `prompt` for
text-to-image pipelines; `pipeline_args` passes any other argument of the pipeline's call
(`guidance_scale`, `negative_prompt`, `eta`, ...). Image i is drawn from seed + i, so the same seed
gives the same images whatever the batch size. Writes `images/NNNN.png` and `grid.png`.
`tunelab sample MODEL` is this stage without a recipe.
"""

from __future__ import annotations

from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.diffusion.pipelines import generate, load_pipeline, pipeline_kind, sampling_spec, write_images
from tunelab.models.spec import parse_dtype
from tunelab.stages import Context, Metrics, Stage, StageResult, StageSpec

SECTIONS = {
    "model": "diffusers pipeline: folder, hub id, ${stage} (a diffusion_train output), or a LoRA folder",
    "scheduler": "sampler: DDPM, DDIM, DPM-Solver++, DPM-Solver, UniPC, DEIS, Euler, EulerAncestral, Heun, PNDM, LMS",
    "num_inference_steps": "denoising steps (default: 1000 for DDPM, 50 otherwise)",
    "num_images": "how many images (default 16)",
    "batch_size": "images generated together (default 64)",
    "seed": "image i is drawn from seed + i (default: the recipe's seed)",
    "prompt": "text-to-image pipelines: one prompt for all images, or one per image",
    "pipeline_args": "other arguments of the pipeline's __call__ (guidance_scale, negative_prompt, eta, ...)",
    "dtype": "load the pipeline in this torch dtype (float16, bfloat16; default float32)",
}


def _kind(spec: StageSpec, ctx: Context) -> str | None:

    value = spec.cfg.get("model")
    if not isinstance(value, str):
        raise TunelabError(f"'{spec.where}' needs `model:`: a diffusers pipeline folder, hub id or ${{stage}}")
    if ctx.checking and ctx.is_pending(value):
        stage = value.strip()[2:-1]
        if ctx.kinds.get(stage) != "diffusion_train":
            raise TunelabError(
                f"'{spec.where}.model' is {value}, a {ctx.kinds.get(stage)} stage: name a diffusion_train stage"
            )
        return None
    return pipeline_kind(ctx.resolve_ref(value), f"{spec.where}.model")


def _settings(spec: StageSpec, ctx: Context, kind: str | None) -> dict[str, Any]:

    values = {k: v for k, v in spec.cfg.items() if k not in ("model", "dtype")}
    return sampling_spec(values, spec.where, kind, ctx.seed)


def _dtype(spec: StageSpec):

    value = spec.cfg.get("dtype")
    return None if value is None else parse_dtype(value, f"{spec.where}.dtype")


class DiffusionSample(Stage):
    """Sample images from any diffusers pipeline: a folder, a hub id, an earlier stage, or a LoRA folder."""

    produces_model = False
    metrics = Metrics(summary=("num_images", "seconds_per_image"))
    sections = SECTIONS

    def check(self, spec: StageSpec, ctx: Context) -> None:
        _settings(spec, ctx, _kind(spec, ctx))
        _dtype(spec)

    def plan(self, spec: StageSpec, ctx: Context):
        return None

    def run(self, spec: StageSpec, ctx: Context) -> StageResult:
        import torch

        settings = _settings(spec, ctx, _kind(spec, ctx))
        pipe = load_pipeline(ctx.resolve_ref(spec.cfg["model"]), f"{spec.where}.model", dtype=_dtype(spec))
        if torch.cuda.is_available():
            pipe = pipe.to("cuda")
        images, seconds = generate(pipe, settings, spec.where)
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        files = write_images(images, spec.out_dir)
        metrics = {"num_images": float(len(images)), "seconds_per_image": seconds / len(images)}
        return StageResult(metrics=metrics, files=files)
