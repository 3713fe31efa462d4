"""Vision-language supervised fine-tuning with `trl.SFTTrainer`: full, LoRA (language model only, or the
vision tower too) or QLoRA, on TRL's vision SFT data.

A separate stage rather than `sft` recognising images: the model class (`AutoModelForImageTextToText`),
the processing class (`AutoProcessor`), the collator and the checks (image files, placeholders,
image modes) all differ, and `sft`'s text-only paths (packing, padding-free, tokenized rows) do not
apply. Sections are the libraries' own: `training` is `trl.SFTConfig`, `lora` is `peft.LoraConfig`
(`target_modules` as peft takes them: a list of names, a regex such as
`.*language_model.*\\.(q_proj|v_proj)` for the language model only, or `all-linear`; the new
projector trains through `modules_to_save`), `quantization` is `BitsAndBytesConfig`.

- **Data:** `images` (paths relative to the dataset folder, or images) and `messages` whose user
  turns hold `{"type": "image"}` placeholders (string turns get the row's images before the first
  user turn, as TRL does).
- **Loss on the assistant turns only** (`assistant_only_loss`, default true here): TRL 1.12 refuses it
  for vision data and would train on system, user and image tokens too; the mask is derived as for
  text chats (`tunelab.vision.collator`). `assistant_only_loss: false` gives TRL's labels.
- **`freeze_vision: true`** keeps the vision tower's weights fixed (the projector and language model
  train). With LoRA the tower trains only where `target_modules` / `modules_to_save` reach it.
- **Packing:** TRL 1.12 does not pack vision data (nor padding-free batching); `packing: true` is
  refused in one line. Images of different sizes are resized by the processor and batched with
  right padding by TRL's collator.

The stage folder holds the full model (`AutoModelForImageTextToText.from_pretrained`, the family's own
class too) or the adapter (`PeftModel.from_pretrained`), and the processor (`AutoProcessor`).
"""

from __future__ import annotations

from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.core.refs import REF
from tunelab.data.datasets import load_split
from tunelab.models.adapters import lora_config, trainable_quantization
from tunelab.models.loading import prepare_kbit
from tunelab.models.preflight import check_training
from tunelab.models.spec import model_config, model_spec, stage_model
from tunelab.stages import TRAINING, Context, Metrics, Stage, StageResult, StageSpec
from tunelab.training.trainer import train_and_save, training_args
from tunelab.vision.checks import check_model, plan_vlm
from tunelab.vision.collator import collator
from tunelab.vision.data import check_rows, has_images, load_images
from tunelab.vision.models import freeze_vision, load_processor, load_vlm

SECTIONS = {
    "model": "image+text model: hub id, folder, ${stage} (e.g. a vlm_build stage), or {path, dtype, ...}",
    "data": "training data with `images` and `messages`: datasets.load_dataset arguments",
    "eval_data": "optional held-out data, same form; eval_loss is reported",
    "training": "trl.SFTConfig fields (learning_rate, max_steps, assistant_only_loss (default true), ...)",
    "lora": "peft.LoraConfig fields (r, target_modules, modules_to_save, ...); omit for full fine-tuning",
    "quantization": "transformers.BitsAndBytesConfig fields (load_in_4bit, ...): QLoRA",
    "freeze_vision": "true: the vision tower's weights stay fixed (default false)",
}


def _args(spec: StageSpec, ctx: Context):
    """SFTConfig, and whether the loss is on assistant turns only (tunelab's mask; TRL's flag goes off)."""
    from trl import SFTConfig

    where = f"{spec.where}.training"
    values = dict(spec.cfg.get("training") or {})
    for key in ("packing", "padding_free"):
        if values.get(key):
            raise TunelabError(
                f"'{where}.{key}' is true, but TRL 1.12 does not pack or pad-free vision data (its SFTTrainer "
                f"refuses it): remove {key}"
            )
    assistant_only = values.pop("assistant_only_loss", True)
    if not isinstance(assistant_only, bool):
        raise TunelabError(f"'{where}.assistant_only_loss' is {assistant_only!r}: use true or false")
    values.setdefault("max_length", None)  # truncating inside an image's tokens breaks the model's forward
    args = training_args(SFTConfig, values, where, spec.out_dir, ctx.seed)
    if args.truncation_mode == "keep_end":
        raise TunelabError(f"'{where}.truncation_mode' is keep_end, which drops image tokens: use keep_start")
    return args, assistant_only


def _lora(spec: StageSpec):
    return lora_config(spec.cfg.get("lora"), f"{spec.where}.lora")


def _quantization(spec: StageSpec):
    return trainable_quantization(spec.cfg, spec.where)


def _freeze(spec: StageSpec) -> bool:
    value = spec.cfg.get("freeze_vision", False)
    if not isinstance(value, bool):
        raise TunelabError(f"'{spec.where}.freeze_vision' is {value!r}: use true or false")
    return value


def _datasets(spec: StageSpec):

    if "data" not in spec.cfg:
        raise TunelabError(f"'{spec.where}' has no `data:`: name a dataset with `images` and `messages`")
    out = []
    for key, split in (("data", "train"), ("eval_data", "test")):
        if spec.cfg.get(key) is None:
            out.append(None)
            continue
        where = f"{spec.where}.{key}"
        ds = load_split(spec.cfg[key], where, split)
        if not has_images(ds):
            raise TunelabError(
                f"'{where}' has no `images` column (columns: {', '.join(ds.column_names)}), but the model is an "
                "image+text model: give each row its images (TRL's vision format), or train a text model with `sft`"
            )
        out.append(load_images(ds, spec.cfg[key], where))
    return out[0], out[1]


def _processor(spec: StageSpec, ctx: Context, mspec: dict[str, Any] | None):
    """The model's processor; while checking a pipeline, the one an earlier vlm_build stage plans (else None)."""

    if mspec is not None:
        return load_processor(mspec["path"], f"{spec.where}.model")
    ref = REF.match(str(spec.cfg["model"] if isinstance(spec.cfg["model"], str) else spec.cfg["model"]["path"]))
    planned = ctx.tokenizers.get(ref.group(1)) if ref else None
    from pathlib import Path

    if planned and Path(planned, "processor_config.json").is_file():
        return load_processor(planned, f"{spec.where}.model")
    return None


class VlmSft(Stage):
    """Vision-language supervised fine-tuning with `trl.SFTTrainer`: full, LoRA (language model only, or the"""

    produces_model = True
    ranks = "all"  # trains on every process of a distributed run (the Trainer shards the data)
    metrics = Metrics(summary=(*TRAINING, "trainable_params"), progress={"mean_token_accuracy": "tok_acc"})
    sections = SECTIONS

    def check(self, spec: StageSpec, ctx: Context) -> None:

        args, assistant_only = _args(spec, ctx)
        check_training(args, spec)
        lora = _lora(spec)
        _quantization(spec)
        freeze = _freeze(spec)
        mspec = stage_model(spec, ctx)
        check_model(spec, ctx, lora, freeze)
        train_ds, eval_ds = _datasets(spec)
        processor = _processor(spec, ctx, mspec)
        if processor is None:
            return  # an earlier stage makes the model; its processor is checked when it exists
        for ds, key in ((train_ds, "data"), (eval_ds, "eval_data")):
            if ds is not None:
                check_rows(ds, processor, f"{spec.where}.{key}")
        # What run's collator does to the first rows (images processed, templates rendered, masks derived).
        collate = collator(processor, args, assistant_only, f"{spec.where}.data")
        collate([train_ds[i] for i in range(min(2, len(train_ds)))])

    def run(self, spec: StageSpec, ctx: Context) -> StageResult:
        from trl import SFTTrainer

        args, assistant_only = _args(spec, ctx)
        peft_config = _lora(spec)
        quant = _quantization(spec)
        mspec = stage_model(spec, ctx)
        train_ds, eval_ds = _datasets(spec)
        processor = load_processor(mspec["path"], f"{spec.where}.model")
        model = prepare_kbit(load_vlm(mspec, quantization=quant), quant, args.gradient_checkpointing)
        frozen = freeze_vision(model) if _freeze(spec) else 0
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_ds,
            eval_dataset=eval_ds,
            processing_class=processor,
            peft_config=peft_config,
            data_collator=collator(processor, args, assistant_only, f"{spec.where}.data"),
        )
        if quant is not None:
            # TRL casts every trainable weight of a quantized model to bf16 (the QLoRA paper's adapters); modules
            # trained whole (the projector) then meet the tower's fp32 features. Back to fp32: LoRA casts its input.
            for name, param in trainer.model.named_parameters():
                if param.requires_grad and "lora_" not in name:
                    param.data = param.data.float()
        metrics, prints = train_and_save(trainer, spec.out_dir, ctx.resume, train_ds, eval_ds, processor)
        metrics["frozen_vision_params"] = float(frozen)
        return StageResult(metrics=metrics, model=spec.out_dir, fingerprints=prints)

    def plan(self, spec: StageSpec, ctx: Context):
        """Memory plan: the language model as for `sft`, plus the vision tower and projector."""

        config = model_config(spec.cfg["model"], ctx, f"{spec.where}.model")
        if config is None:
            return None
        dtype = model_spec(spec.cfg["model"], f"{spec.where}.model").get("dtype")
        args, _ = _args(spec, ctx)
        return plan_vlm(
            spec.name, spec.kind, config, args, spec.cfg.get("lora"), spec.cfg.get("quantization"), dtype, _freeze(spec)
        )
