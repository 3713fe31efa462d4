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
- **Loss on the assistant turns only** (`assistant_only_loss`, default true here): TRL 1.16 masks vision
  chats only through `{% generation %}` markers (its own training templates for a few families), and
  without the flag trains on system, user and image tokens too; the mask is derived as for text chats,
  on any template (`tunelab.vision.collator`). `assistant_only_loss: false` gives TRL's labels.
- **`freeze_vision: true`** keeps the vision tower's weights fixed (the projector and language model
  train). With LoRA the tower trains only where `target_modules` / `modules_to_save` reach it.
- **Packing:** TRL 1.16 does not pack vision data (nor padding-free batching); `packing: true` is
  refused in one line. Images of different sizes are resized by the processor and batched with
  right padding by TRL's collator.

The stage folder holds the full model (`AutoModelForImageTextToText.from_pretrained`, the family's own
class too) or the adapter (`PeftModel.from_pretrained`), and the processor (`AutoProcessor`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.core.refs import REF
from tunelab.models.loading import prepare_kbit
from tunelab.models.spec import model_config, model_spec
from tunelab.stages import TRAINING, Context, Metrics, StageSpec
from tunelab.stages.base import Settings, TrainerStage
from tunelab.training.trl_changes import check_model_fit
from tunelab.vision.checks import check_model, plan_vlm
from tunelab.vision.collator import collator
from tunelab.vision.data import check_rows, has_images, load_images
from tunelab.vision.models import freeze_vision, load_processor, load_vlm, vision_tower

SECTIONS = {
    "model": "image+text model: hub id, folder, ${stage} (e.g. a vlm_build stage), or {path, dtype, ...}",
    "data": "training data with `images` and `messages`: datasets.load_dataset arguments",
    "eval_data": "optional held-out data, same form; eval_loss is reported",
    "training": "trl.SFTConfig fields (learning_rate, max_steps, assistant_only_loss (default true), ...)",
    "lora": "peft.LoraConfig fields (r, target_modules, modules_to_save, ...); omit for full fine-tuning",
    "quantization": "transformers.BitsAndBytesConfig fields (load_in_4bit, ...): QLoRA",
    "freeze_vision": "true: the vision tower's weights stay fixed (default false)",
}


@dataclass(kw_only=True)
class VlmSettings(Settings):
    """What vlm_sft parses beyond the common sections."""

    assistant_only: bool
    """Loss on the assistant turns only: tunelab's mask in the collator (TRL's own flag stays off)."""
    freeze_vision: bool


class VlmSft(TrainerStage):
    """Vision-language SFT: `trl.SFTTrainer` with an image+text model, its processor and tunelab's collator."""

    config_class = "trl:SFTConfig"
    trainer_class = "trl:SFTTrainer"
    chat_columns = ()  # the processor's template is checked on the rows themselves (`check_rows`, the collator)
    data_hint = "name a dataset with `images` and `messages`"
    data_target = "vision"
    metrics = Metrics(summary=(*TRAINING, "trainable_params"), progress={"mean_token_accuracy": "tok_acc"})
    sections = SECTIONS

    def training_values(self, spec: StageSpec, ctx: Context) -> dict[str, Any]:
        where = f"{spec.where}.training"
        values = super().training_values(spec, ctx)
        for key in ("packing", "padding_free"):
            if values.get(key):
                raise TunelabError(
                    f"'{where}.{key}' is true, but TRL does not pack or pad-free vision data (its SFTTrainer "
                    f"refuses it): remove {key}"
                )
        values.pop("assistant_only_loss", None)  # tunelab's collator masks, on any template (TRL's needs markers)
        values.setdefault("max_length", None)  # truncating inside an image's tokens breaks the model's forward
        return values

    def settings(self, spec: StageSpec, ctx: Context) -> VlmSettings:
        common = super().settings(spec, ctx)
        where = f"{spec.where}.training"
        if common.args.truncation_mode == "keep_end":
            raise TunelabError(f"'{where}.truncation_mode' is keep_end, which drops image tokens: use keep_start")
        assistant_only = (spec.cfg.get("training") or {}).get("assistant_only_loss", True)
        if not isinstance(assistant_only, bool):
            raise TunelabError(f"'{where}.assistant_only_loss' is {assistant_only!r}: use true or false")
        return VlmSettings(**vars(common), assistant_only=assistant_only, freeze_vision=_freeze(spec))

    def check_model(self, spec: StageSpec, ctx: Context, s: VlmSettings) -> None:
        config = check_model(spec, ctx, s.lora, s.freeze_vision)
        check_model_fit(s.args, config, s.lora, spec.where)

    def data(self, spec: StageSpec, ctx: Context, s: Settings) -> tuple[Any, Any]:
        """(train, eval): rows with `images` (loaded) and `messages`."""
        self.require_data(spec)
        out = []
        for key in ("data", "eval_data"):
            if spec.cfg.get(key) is None:
                out.append(None)
                continue
            where = f"{spec.where}.{key}"
            ds = self.load(spec, ctx, key)
            if not has_images(ds):
                raise TunelabError(
                    f"'{where}' has no `images` column (columns: {', '.join(ds.column_names)}), but the model is an "
                    "image+text model: give each row its images (TRL's vision format), or train a text model with "
                    "`sft`"
                )
            out.append(load_images(ds, spec.cfg[key], where))
        return out[0], out[1]

    def check_more(self, spec: StageSpec, ctx: Context, s: VlmSettings, train: Any, evaluation: Any) -> None:
        """What run's collator does to the first rows (images processed, templates rendered, masks derived)."""
        processor = _processor(spec, ctx, s.model)
        if processor is None:
            return  # an earlier stage makes the model; its processor is checked when it exists
        for ds, key in ((train, "data"), (evaluation, "eval_data")):
            if ds is not None:
                check_rows(ds, processor, f"{spec.where}.{key}")
        collate = collator(processor, s.args, s.assistant_only, f"{spec.where}.data")
        collate([train[i] for i in range(min(2, len(train)))])

    def tokenizer(self, spec: StageSpec, ctx: Context, s: Settings, train: Any) -> Any:
        if s.model is None:  # an earlier stage (vlm_build) makes it: TokenizerPending, as the base says
            return super().tokenizer(spec, ctx, s, train)
        return load_processor(s.model["path"], f"{spec.where}.model")

    def model(self, spec: StageSpec, ctx: Context, s: VlmSettings, tokenizer: Any, train: Any) -> Any:
        model = prepare_kbit(
            load_vlm(s.model, quantization=s.quantization), s.quantization, s.args.gradient_checkpointing
        )
        if s.freeze_vision:
            freeze_vision(model)
        return model

    def trainer_kwargs(self, spec, ctx, s, model, tokenizer, train, evaluation) -> dict[str, Any]:
        kwargs = super().trainer_kwargs(spec, ctx, s, model, tokenizer, train, evaluation)
        return {**kwargs, "data_collator": collator(tokenizer, s.args, s.assistant_only, f"{spec.where}.data")}

    def before(self, spec, ctx, s, trainer, tokenizer, evaluation) -> dict[str, Any]:
        if s.quantization is not None:
            # TRL casts every trainable weight of a quantized model to bf16 (the QLoRA paper's adapters); modules
            # trained whole (the projector) then meet the tower's fp32 features. Back to fp32: LoRA casts its input.
            for name, param in trainer.model.named_parameters():
                if param.requires_grad and "lora_" not in name:
                    param.data = param.data.float()
        return {}

    def after(self, spec, ctx, s, trainer, tokenizer, evaluation) -> dict[str, Any]:
        out = super().after(spec, ctx, s, trainer, tokenizer, evaluation)
        out["trainable_params"] = float(sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))
        model = trainer.model.get_base_model() if hasattr(trainer.model, "get_base_model") else trainer.model
        tower = vision_tower(model) if s.freeze_vision else None
        out["frozen_vision_params"] = float(sum(p.numel() for p in tower[1].parameters()) if tower else 0)
        return out

    def plan(self, spec: StageSpec, ctx: Context):
        """Memory plan: the language model as for `sft`, plus the vision tower and projector."""
        config = model_config(spec.cfg["model"], ctx, f"{spec.where}.model")
        if config is None:
            return None
        dtype = model_spec(spec.cfg["model"], f"{spec.where}.model").get("dtype")
        return plan_vlm(
            spec.name,
            spec.kind,
            config,
            self.args(spec, ctx),
            spec.cfg.get("lora"),
            spec.cfg.get("quantization"),
            dtype,
            _freeze(spec),
        )


def _processor(spec: StageSpec, ctx: Context, mspec: dict[str, Any] | None):
    """The model's processor; while checking a pipeline, the one an earlier vlm_build stage plans (else None)."""
    if mspec is not None:
        return load_processor(mspec["path"], f"{spec.where}.model")
    ref = REF.match(str(spec.cfg["model"] if isinstance(spec.cfg["model"], str) else spec.cfg["model"]["path"]))
    planned = ctx.tokenizers.get(ref.group(1)) if ref else None
    if planned and Path(planned, "processor_config.json").is_file():
        return load_processor(planned, f"{spec.where}.model")
    return None


def _freeze(spec: StageSpec) -> bool:
    value = spec.cfg.get("freeze_vision", False)
    if not isinstance(value, bool):
        raise TunelabError(f"'{spec.where}.freeze_vision' is {value!r}: use true or false")
    return value
