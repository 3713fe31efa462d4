"""Diffusion training through diffusers and the transformers `Trainer`.

Two forms, one stage:

- **unconditional DDPM** (no `model:`, or an unconditional pipeline to keep training): a
  `diffusers.UNet2DModel` built from `unet:` learns to predict the noise that a
  `DDPMScheduler` (`scheduler:`) added to images (MSE), with EMA weights (`ema:`, diffusers'
  `EMAModel`). The stage folder is a `DDPMPipeline` (EMA weights) that loads with
  `DiffusionPipeline.from_pretrained`.
- **LoRA on a text-to-image pipeline** (`model:` a Stable Diffusion style pipeline, `lora:`
  peft.LoraConfig fields): the UNet gets an adapter through diffusers' `add_adapter`; images are
  encoded by the pipeline's VAE and captions by its text encoder (both frozen). The stage folder
  holds `pytorch_lora_weights.safetensors`, which the pipeline's `load_lora_weights` reads, and a
  model card naming the base.

`training:` is `transformers.TrainingArguments`, so optimisation, logging, checkpoints, `--resume`
(model, optimizer, scheduler, RNG states, data position, and the EMA weights) and multi-device
runs work as in every other tunelab stage. `samples:` writes a grid of samples every N steps.
The loss is diffusers' (`scheduler.prediction_type`: epsilon, v_prediction or sample; any other is
refused at validate, as diffusers' training scripts refuse it). The Trainer subclass is
`tunelab.diffusion.trainer.DiffusionTrainer`; checkpoints hold the EMA weights as diffusers'
`EMAModel.save_pretrained` writes them (`unet_ema/`).

A `Stage`, not a `TrainerStage` declaration: TrainerStage's steps are a language model's (`model:` a
causal LM or classifier loaded with its tokenizer, peft task types, chat templates, the token-based
memory plan), while this stage builds a UNet or opens a diffusers pipeline, trains it with its own
loss and EMA callbacks, and saves a pipeline. What it shares with the Trainer stages is the
training itself, which it gets from the same `guarded_train` (divergence guard, atomic checkpoints,
signals, resume).
"""

from __future__ import annotations

from typing import Any

from tunelab.core.config import build, check_keys
from tunelab.core.errors import TunelabError
from tunelab.core.hub import local_path
from tunelab.core.progress import quiet
from tunelab.data.datasets import fingerprint, require_columns
from tunelab.diffusion.pipelines import (
    PREDICTION_TYPES,
    image_spec,
    load_images,
    load_pipeline,
    make_scheduler,
    pipeline_kind,
    scheduler_spec,
    to_tensor,
)
from tunelab.models.plan import StagePlan
from tunelab.stages import TRAINING, Context, Metrics, Stage, StageResult, StageSpec
from tunelab.training.trainer import guarded_train, training_args

SECTIONS = {
    "model": "pipeline to start from: a text-to-image pipeline for LoRA, or a DDPM pipeline; omit to build `unet:`",
    "unet": "diffusers.UNet2DModel fields for a model trained from scratch (block_out_channels, ...)",
    "scheduler": "diffusers.DDPMScheduler fields: the training noise schedule (num_train_timesteps, beta_schedule)",
    "data": "images: `digits` (bundled), a local image folder, or datasets.load_dataset arguments",
    "image_column": "column holding the images (default: image)",
    "caption_column": "column holding captions, for text-to-image LoRA (default: text)",
    "resolution": "train at this side length: images are resized and centre-cropped (default: the images' own)",
    "channels": "1 (greyscale) or 3 (RGB): images are converted (default: the images' own)",
    "random_flip": "flip images left-right at random (default: false)",
    "training": "transformers.TrainingArguments fields (learning_rate, max_steps, per_device_train_batch_size, ...)",
    "ema": "diffusers EMAModel fields (decay, use_ema_warmup, inv_gamma, power), or false; unconditional only",
    "lora": "peft.LoraConfig fields (r, lora_alpha, target_modules): LoRA on a text-to-image pipeline's UNet",
    "samples": "sample grids during training: {every: steps, num_images, scheduler, num_inference_steps, prompt}",
}
EMA_DEFAULTS = {"decay": 0.9999, "use_ema_warmup": True, "inv_gamma": 1.0, "power": 0.75}
SAMPLE_KEYS = ("every", "num_images", "scheduler", "num_inference_steps", "prompt", "seed")
TRAINING_DEFAULTS = {"remove_unused_columns": False, "learning_rate": 1e-4, "lr_scheduler_type": "cosine"}
LORA_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]


# ---------------------------------------------------------------- checks (no weights, no pixels)


def _mode(spec: StageSpec, ctx: Context) -> str:
    """'unconditional' or 'text', from `model:` (or its pending stage's kind) and `lora:`."""

    if "model" not in spec.cfg:
        if "lora" in spec.cfg:
            raise TunelabError(f"'{spec.where}.lora' needs `model:`: a text-to-image pipeline to adapt")
        if "unet" not in spec.cfg:
            raise TunelabError(
                f"'{spec.where}' needs `unet:` (diffusers.UNet2DModel fields) to train from scratch, "
                "or `model:` (a pipeline to start from)"
            )
        return "unconditional"
    if "unet" in spec.cfg:
        raise TunelabError(f"'{spec.where}': `unet:` builds a new model; drop it when `model:` names one")
    value = spec.cfg["model"]
    if not isinstance(value, str):
        raise TunelabError(f"'{spec.where}.model' must be a pipeline folder, hub id or ${{stage}}")
    if ctx.checking and ctx.is_pending(value):
        kind = "unconditional"  # an earlier diffusion_train stage without lora writes a DDPM pipeline
    else:
        kind = pipeline_kind(ctx.resolve_ref(value), f"{spec.where}.model")
    if kind == "text" and "lora" not in spec.cfg:
        raise TunelabError(
            f"'{spec.where}': '{value}' is a text-to-image pipeline; add `lora:` (tunelab trains LoRA adapters on them)"
        )
    if kind == "unconditional" and "lora" in spec.cfg:
        raise TunelabError(f"'{spec.where}.lora': LoRA applies to text-to-image pipelines; '{value}' is unconditional")
    return kind


def _unet_config(spec: StageSpec, image: dict[str, Any]) -> dict[str, Any]:
    from diffusers import UNet2DModel

    where = f"{spec.where}.unet"
    values = check_keys(spec.cfg.get("unet") or {}, UNet2DModel, where)
    for key in ("in_channels", "out_channels"):
        if key in values and values[key] != image["channels"]:
            raise TunelabError(
                f"'{where}.{key}' is {values[key]} but the images have {image['channels']} channel(s); "
                "drop it (tunelab sets it from the data) or set `channels:`"
            )
    if "sample_size" in values and values["sample_size"] != image["resolution"]:
        raise TunelabError(
            f"'{where}.sample_size' is {values['sample_size']} but the stage trains at resolution "
            f"{image['resolution']}; drop it or set `resolution:`"
        )
    return {
        "sample_size": image["resolution"],
        "in_channels": image["channels"],
        "out_channels": image["channels"],
        **values,
    }


def _build_unet(config: dict[str, Any], where: str, meta: bool = False):
    import torch
    from diffusers import UNet2DModel

    try:
        if meta:
            with torch.device("meta"):
                return UNet2DModel(**config)
        return UNet2DModel(**config)
    except (ValueError, TypeError, AssertionError, KeyError) as exc:
        raise TunelabError(f"'{where}' is rejected by UNet2DModel: {' '.join(str(exc).split())[:300]}") from None


def _noise_scheduler(spec: StageSpec):
    from diffusers import DDPMScheduler

    # `build` holds prediction_type to DDPMScheduler's Literal annotation: the types the loss implements.
    return build(DDPMScheduler, spec.cfg.get("scheduler") or {}, f"{spec.where}.scheduler")


# Diffusers' training scripts raise on a prediction type they do not implement; taking it for "sample" (as
# tunelab once did) trains a UNet that its own scheduler then samples wrongly from.
_PREDICTION_FIX = f"diffusion_train trains the prediction types {', '.join(PREDICTION_TYPES)}; use one of them"


def _check_pipeline_prediction(spec: StageSpec, ctx: Context, config: Any = None) -> None:
    """The prediction type of `model:`'s noise schedule: `config` (run), or a local pipeline's scheduler config
    (validate; a hub pipeline's is read when it loads)."""
    if config is None:
        import json

        value = spec.cfg["model"]
        if ctx.is_pending(value):
            return  # an earlier diffusion_train stage writes it, with a schedule checked there
        folder = local_path(ctx.resolve_ref(value))
        path = folder / "scheduler" / "scheduler_config.json" if folder is not None else None
        if path is None or not path.is_file():
            return
        config = json.loads(path.read_text())
    kind = config.get("prediction_type", "epsilon")
    if kind not in PREDICTION_TYPES:
        raise TunelabError(
            f"'{spec.where}.model' has a noise schedule with prediction_type {kind!r} (scheduler/"
            f"scheduler_config.json): {_PREDICTION_FIX}"
        )


def _ema(spec: StageSpec, mode: str) -> dict[str, Any] | None:
    from diffusers.training_utils import EMAModel

    value = spec.cfg.get("ema")
    if value is False or (value is None and mode == "text"):
        return None
    if mode == "text":
        raise TunelabError(f"'{spec.where}.ema': EMA applies to full UNet training, not to LoRA; drop it")
    if value is True or value is None:
        value = {}
    if not isinstance(value, dict):
        raise TunelabError(f"'{spec.where}.ema' must be EMAModel fields or false, got {value!r}")
    values = check_keys(value, EMAModel, f"{spec.where}.ema", exclude=("parameters", "model_cls", "model_config"))
    return {**EMA_DEFAULTS, **values}


def _samples(spec: StageSpec, mode: str) -> dict[str, Any] | None:

    value = spec.cfg.get("samples")
    if value is None or value is False:
        return None
    where = f"{spec.where}.samples"
    if not isinstance(value, dict):
        raise TunelabError(f"'{where}' must be a mapping: {{every: 500, num_images: 16, scheduler: DDIM}}")
    for key in value:
        if key not in SAMPLE_KEYS:
            from tunelab.core.errors import unknown_key

            raise unknown_key(where, key, SAMPLE_KEYS, "sample grid settings")
    out = {"every": 0, "num_images": 16, "scheduler": "DDIM", "num_inference_steps": 50, "seed": 0, **value}
    for key in ("every", "num_images", "num_inference_steps", "seed"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 0:
            raise TunelabError(f"'{where}.{key}' must be a non-negative integer, got {out[key]!r}")
    scheduler_spec(out["scheduler"], f"{where}.scheduler")
    if mode == "unconditional" and out.get("prompt") is not None:
        raise TunelabError(f"'{where}.prompt': the pipeline is unconditional; it takes no prompt")
    return out


def _args(spec: StageSpec, ctx: Context):
    from transformers import TrainingArguments

    values = {**TRAINING_DEFAULTS, **(spec.cfg.get("training") or {})}
    return training_args(TrainingArguments, values, f"{spec.where}.training", spec.out_dir, ctx.seed)


def _lora(spec: StageSpec):
    from peft import LoraConfig

    values = {"init_lora_weights": "gaussian", "target_modules": LORA_TARGETS, **(spec.cfg.get("lora") or {})}
    return build(LoraConfig, values, f"{spec.where}.lora")


def _image(spec: StageSpec, mode: str) -> dict[str, Any]:

    flip = spec.cfg.get("random_flip", False)
    if not isinstance(flip, bool):
        raise TunelabError(f"'{spec.where}.random_flip' must be true or false, got {flip!r}")
    return image_spec(spec.cfg, spec.where)


# ---------------------------------------------------------------- training


def _dataset(spec: StageSpec, image: dict[str, Any], tokenizer=None):
    """The training images (and tokenized captions), transformed lazily per batch."""
    import random

    import torch

    image_column = spec.cfg.get("image_column", "image")
    caption_column = spec.cfg.get("caption_column", "text")
    ds = load_images(spec.cfg.get("data"), f"{spec.where}.data", "train", image_column)
    if tokenizer is not None:
        require_columns(ds, [caption_column], f"{spec.where}.data", "captions; set caption_column")
    flip = spec.cfg.get("random_flip", False)
    resolution, channels = image["resolution"], image["channels"]
    rng = random.Random()

    def transform(batch: dict[str, list]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pixel_values": [
                to_tensor(im, resolution, channels, flip=flip and rng.random() < 0.5) for im in batch[image_column]
            ]
        }
        if tokenizer is not None:
            ids = tokenizer(
                [str(c) for c in batch[caption_column]],
                padding="max_length",
                max_length=tokenizer.model_max_length,
                truncation=True,
                return_tensors="pt",
            ).input_ids
            out["input_ids"] = list(ids)
        return out

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        batch = {"pixel_values": torch.stack([r["pixel_values"] for r in rows])}
        if tokenizer is not None:
            batch["input_ids"] = torch.stack([r["input_ids"] for r in rows])
        return batch

    return ds.with_transform(transform), collate


def _save_lora(pipe, unet, spec: StageSpec, ctx: Context) -> None:
    """diffusers-format LoRA weights (what `load_lora_weights` reads) and a model card naming the base."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    type(pipe).save_lora_weights(str(spec.out_dir), unet_lora_layers=layers, safe_serialization=True)
    ref = ctx.resolve_ref(spec.cfg["model"])
    local = local_path(ref)
    base = str(local.resolve()) if local is not None else ref
    (spec.out_dir / "README.md").write_text(
        f"---\nbase_model: {base}\nlibrary_name: diffusers\ntags: [lora, text-to-image, tunelab]\n---\n\n"
        f"# LoRA for {base}\n\nTrained by tunelab stage `{spec.name}`. Load with\n\n"
        f"```python\nfrom diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained({base!r})\n"
        f"pipe.load_lora_weights({str(spec.out_dir)!r})\n```\n"
    )


class DiffusionTrain(Stage):
    """Diffusion training through diffusers and the transformers `Trainer`."""

    produces_model = True
    ranks = "all"  # trains on every process of a distributed run (the Trainer shards the data)
    metrics = Metrics(summary=(*TRAINING, "trainable_parameters"))
    sections = SECTIONS

    def check(self, spec: StageSpec, ctx: Context) -> None:
        mode = _mode(spec, ctx)
        _args(spec, ctx)
        image = _image(spec, mode)
        if mode == "unconditional" and "model" not in spec.cfg:
            _build_unet(_unet_config(spec, image), f"{spec.where}.unet", meta=True)
            _noise_scheduler(spec)
        elif "scheduler" in spec.cfg:
            raise TunelabError(f"'{spec.where}.scheduler': the pipeline brings its noise schedule; drop it")
        else:
            _check_pipeline_prediction(spec, ctx)
        if mode == "text":
            _lora(spec)
            if "channels" in spec.cfg and spec.cfg["channels"] != 3:
                raise TunelabError(f"'{spec.where}.channels': text-to-image pipelines take RGB images (3 channels)")
        _ema(spec, mode)
        _samples(spec, mode)

    def plan(self, spec: StageSpec, ctx: Context):
        """Weights, gradients and AdamW state of the UNet (activations of UNets are not modelled).

        Enough for the disk check (checkpoint sizes) and a lower bound on memory.
        """

        mode = _mode(spec, ctx)
        if "model" not in spec.cfg:
            unet = _build_unet(_unet_config(spec, _image(spec, mode)), f"{spec.where}.unet", meta=True)
            params = trainable = sum(p.numel() for p in unet.parameters())
        else:
            from tunelab.core.hub import local_path

            if ctx.is_pending(spec.cfg["model"]):
                return None
            folder = local_path(ctx.resolve_ref(spec.cfg["model"]))
            if folder is None or not (folder / "unet" / "config.json").is_file():
                return None  # a hub pipeline: its config is not read before download
            import torch
            from diffusers import UNet2DConditionModel, UNet2DModel

            cls = UNet2DConditionModel if mode == "text" else UNet2DModel
            with torch.device("meta"):
                unet = cls.from_config(cls.load_config(folder / "unet"))
            params = sum(p.numel() for p in unet.parameters())
            trainable = params
            if mode == "text":
                unet.add_adapter(_lora(spec))
                trainable = sum(p.numel() for n, p in unet.named_parameters() if "lora_" in n)
        parts = {"weights": params * 4.0, "gradients": trainable * 4.0, "optimizer": trainable * 8.0}
        return StagePlan(
            spec.name,
            "train",
            "lora" if mode == "text" else "full",
            params,
            trainable,
            parts,
            ["activations of UNets are not modelled"],
        )

    def tokenizer_source(self, spec: StageSpec, ctx: Context) -> str | None:
        return None  # a diffusion pipeline is not a tokenizer source for language stages

    @quiet(diffusers=True)  # diffusers' noise too, while the stage runs
    def run(self, spec: StageSpec, ctx: Context) -> StageResult:
        import torch
        from transformers import set_seed

        from tunelab.diffusion.trainer import DiffusionTrainer, EMAUpdate, SampleGrids

        mode = _mode(spec, ctx)
        args = _args(spec, ctx)
        image = _image(spec, mode)
        ema_cfg = _ema(spec, mode)
        samples = _samples(spec, mode)
        set_seed(ctx.seed)  # the UNet's (or adapter's) initial weights
        vae = text_encoder = tokenizer = pipe = None
        if mode == "text":
            pipe = load_pipeline(ctx.resolve_ref(spec.cfg["model"]), f"{spec.where}.model")
            unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
            for module in (unet, vae, text_encoder):
                module.requires_grad_(False)
            if "resolution" not in spec.cfg:
                image["resolution"] = unet.config.sample_size * pipe.vae_scale_factor
            unet.add_adapter(_lora(spec))
            noise_scheduler = make_scheduler("DDPM", pipe.scheduler.config, f"{spec.where}.model")
            _check_pipeline_prediction(spec, ctx, noise_scheduler.config)
        elif "model" in spec.cfg:
            pipe = load_pipeline(ctx.resolve_ref(spec.cfg["model"]), f"{spec.where}.model")
            unet = pipe.unet
            noise_scheduler = make_scheduler("DDPM", pipe.scheduler.config, f"{spec.where}.model")
            _check_pipeline_prediction(spec, ctx, noise_scheduler.config)
            if unet.config.in_channels != image["channels"]:
                raise TunelabError(
                    f"'{spec.where}': the pipeline's UNet takes {unet.config.in_channels} channel(s), "
                    f"the images have {image['channels']}; set `channels: {unet.config.in_channels}`"
                )
        else:
            unet = _build_unet(_unet_config(spec, image), f"{spec.where}.unet")
            noise_scheduler = _noise_scheduler(spec)
        unet.train()
        train_ds, collate = _dataset(spec, image, tokenizer)

        ema = None
        if ema_cfg is not None:
            from diffusers.training_utils import EMAModel

            ema = EMAModel(unet.parameters(), model_cls=type(unet), model_config=unet.config, **ema_cfg)

        def make_pipe(model):
            from diffusers import DDPMPipeline

            base = pipe.scheduler.config if pipe is not None else noise_scheduler.config
            scheduler = make_scheduler(samples["scheduler"] if samples else "DDIM", base, f"{spec.where}.samples")
            if mode == "text":
                pipe.scheduler = scheduler
                return pipe.to(model.device)
            return DDPMPipeline(unet=model, scheduler=scheduler)

        grids = SampleGrids(samples, ema, make_pipe, spec.out_dir) if samples is not None else None
        callbacks = [c for c in (EMAUpdate(ema) if ema is not None else None, grids) if c is not None]
        trainer = DiffusionTrainer(
            model=unet,
            args=args,
            train_dataset=train_ds,
            data_collator=collate,
            callbacks=callbacks,
            noise_scheduler=noise_scheduler,
            ema=ema,
            vae=vae,
            text_encoder=text_encoder,
            lora=mode == "text",
        )
        if ema is not None:
            ema.to(trainer.args.device)
        metrics: dict[str, Any] = guarded_train(trainer, spec, ctx.resume)
        files: dict[str, str] = {}
        if trainer.args.should_save:
            final = unet
            if grids is not None:
                files["samples"] = str(grids.write(final, int(metrics["global_step"])))
            if mode == "text":
                _save_lora(pipe, unet, spec, ctx)
            else:
                from diffusers import DDPMPipeline

                if ema is not None:
                    ema.copy_to(unet.parameters())
                unet.eval()
                with torch.no_grad():
                    DDPMPipeline(unet=unet, scheduler=noise_scheduler).save_pretrained(str(spec.out_dir))
        metrics["parameters"] = float(sum(p.numel() for p in unet.parameters()))
        metrics["trainable_parameters"] = float(sum(p.numel() for p in unet.parameters() if p.requires_grad))
        return StageResult(
            metrics=metrics, model=spec.out_dir, files=files, fingerprints={"data": fingerprint(train_ds)}
        )
