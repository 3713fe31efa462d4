"""The diffusion Trainer: the transformers `Trainer` with the DDPM loss, diffusers-format checkpoints and
EMA weights kept beside them, plus the callbacks that update the EMA and write sample grids.

Only `diffusion_train`'s `run()` imports this module, so it imports torch, transformers and diffusers at
its top (listing and checking stages stays light without it).

Checkpoints are what diffusers' own training scripts write: the UNet with `save_pretrained` (or the LoRA
weights), and the EMA weights with `EMAModel.save_pretrained` in `unet_ema/` (a UNet folder whose config
carries the EMA's decay and step count), read back with `EMAModel.from_pretrained`. No pickles.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import FrozenDict
from diffusers.training_utils import EMAModel
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback

from tunelab.core.errors import TunelabError
from tunelab.diffusion.pipelines import PREDICTION_TYPES, grid, sample

EMA_FOLDER = "unet_ema"
LORA_FILE = "lora.safetensors"


class DiffusionTrainer(Trainer):
    """`Trainer` with the DDPM loss, diffusers-format checkpoints and EMA weights saved beside them."""

    def __init__(self, *args, noise_scheduler, ema=None, vae=None, text_encoder=None, lora=False, **kwargs):
        readable_config(kwargs["model"])
        super().__init__(*args, **kwargs)
        self.noise_scheduler, self.ema, self.lora = noise_scheduler, ema, lora
        self.vae, self.text_encoder = vae, text_encoder
        self._gen: torch.Generator | None = None
        self._gen_state: torch.Tensor | None = None
        for frozen in (vae, text_encoder):
            if frozen is not None:
                frozen.to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        latents = inputs["pixel_values"]
        if self.vae is not None:
            with torch.no_grad():
                latents = self.vae.encode(latents.to(self.vae.dtype)).latent_dist.sample()
                latents = latents * self.vae.config.scaling_factor
        gen = self._noise_generator(latents.device)
        noise = torch.randn(latents.shape, generator=gen, device=latents.device, dtype=latents.dtype)
        steps = self.noise_scheduler.config.num_train_timesteps
        timesteps = torch.randint(0, steps, (latents.shape[0],), generator=gen, device=latents.device).long()
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = self._target(latents, noise, timesteps)
        if self.text_encoder is not None:
            with torch.no_grad():
                states = self.text_encoder(inputs["input_ids"], return_dict=False)[0]
            pred = model(noisy, timesteps, states, return_dict=False)[0]
        else:
            pred = model(noisy, timesteps, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float())
        return (loss, {"pred": pred}) if return_outputs else loss

    def _target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the UNet should predict, by the scheduler's `prediction_type` (checked at validate)."""
        kind = self.noise_scheduler.config.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if kind == "sample":
            return latents
        raise TunelabError(f"prediction_type '{kind}' is not one of {', '.join(PREDICTION_TYPES)}")

    def _noise_generator(self, device) -> torch.Generator:
        """Noise and timesteps from a generator seeded per rank (seed + rank), saved with each checkpoint.

        Ranks see different images; with one global seed they would also draw the same noise
        and timesteps for them, which correlates the gradient each rank contributes.
        """
        if self._gen is None:
            self._gen = torch.Generator(device=device).manual_seed(self.args.seed + self.args.process_index)
            if self._gen_state is not None:
                self._gen.set_state(self._gen_state)
        return self._gen

    def _noise_file(self, folder) -> Path:
        return Path(folder) / f"noise_rng_{self.args.process_index}.pth"

    def _save_rng_state(self, output_dir: str) -> None:
        super()._save_rng_state(output_dir)
        if self._gen is not None:
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            torch.save(self._gen.get_state(), self._noise_file(output_dir))

    def _load_rng_state(self, checkpoint) -> None:
        super()._load_rng_state(checkpoint)
        if checkpoint is not None and self._noise_file(checkpoint).is_file():
            self._gen_state = torch.load(self._noise_file(checkpoint))  # a plain uint8 tensor: weights_only load
            self._gen = None

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        if not self.args.should_save:
            return
        out = Path(output_dir or self.args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        unet = self.accelerator.unwrap_model(self.model)
        if self.lora:
            weights = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(unet).items()}
            save_file(weights, out / LORA_FILE)
        else:
            unet.save_pretrained(out)
        if self.ema is not None:
            self.ema.save_pretrained(str(out / EMA_FOLDER))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        folder = Path(resume_from_checkpoint)
        unet = self.accelerator.unwrap_model(model or self.model)
        if self.lora:
            set_peft_model_state_dict(unet, load_file(folder / LORA_FILE))
        else:
            unet.load_state_dict(load_file(folder / "diffusion_pytorch_model.safetensors"))
        if self.ema is not None and (folder / EMA_FOLDER).is_dir():
            # As diffusers' train_unconditional.py does: load the saved EMA, take its state (shadow weights,
            # decay, step count) into the one the callbacks update.
            saved = EMAModel.from_pretrained(str(folder / EMA_FOLDER), model_cls=type(unet))
            self.ema.load_state_dict(saved.state_dict())
            self.ema.to(self.args.device)


class ReadableConfig(FrozenDict):
    """A diffusers config with the `to_dict`/`to_json_string` of a transformers config."""

    def to_dict(self) -> dict[str, Any]:
        return dict(self)

    def to_json_string(self, *args, **kwargs) -> str:
        return json.dumps(dict(self), indent=2, sort_keys=True, default=str)


def readable_config(model) -> None:
    """Give a diffusers model's config the methods the Trainer's reporting callbacks (TensorBoard, wandb,
    mlflow) log `model.config` through; a diffusers FrozenDict has neither."""
    if not hasattr(model.config, "to_json_string"):
        model._internal_dict = ReadableConfig(model._internal_dict)


class EMAUpdate(TrainerCallback):
    """The EMA weights follow the model after each optimizer step."""

    def __init__(self, ema: EMAModel) -> None:
        self.ema = ema

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.ema.step(model.parameters())


class SampleGrids(TrainerCallback):
    """A grid of samples every `samples["every"]` steps (main process), drawn with the EMA weights."""

    def __init__(self, samples: dict[str, Any], ema: EMAModel | None, make_pipe: Callable, out_dir: Path) -> None:
        self.samples, self.ema, self.make_pipe, self.out_dir = samples, ema, make_pipe, out_dir

    def on_step_end(self, args, state, control, model=None, **kwargs):
        every = self.samples["every"]
        if every and state.global_step % every == 0 and state.is_world_process_zero:
            self.write(model, state.global_step)

    def write(self, model, step: int) -> Path:
        was_training = model.training
        model.eval()
        if self.ema is not None:
            self.ema.store(model.parameters())
            self.ema.copy_to(model.parameters())
        try:
            images = sample(
                self.make_pipe(model),
                num_images=self.samples["num_images"],
                num_inference_steps=self.samples["num_inference_steps"],
                seed=self.samples["seed"],
                prompt=self.samples.get("prompt"),
            )
        finally:
            if self.ema is not None:
                self.ema.restore(model.parameters())
            model.train(was_training)
        path = self.out_dir / "samples" / f"step-{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid(images).save(path)
        return path
