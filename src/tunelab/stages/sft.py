"""Supervised fine-tuning with `trl.SFTTrainer`, full or LoRA.

Sections map onto the libraries: `training` is `trl.SFTConfig`, `lora` is
`peft.LoraConfig`. The data format is TRL's: a `text` column (plain language
modelling), a `messages` column (chat, via the tokenizer's chat template), or
`prompt` and `completion` columns (loss on the completion only, TRL's default).
`assistant_only_loss` works with any chat template: where the template has no `{% generation %}`
markers (ChatML, Llama 3, Qwen, Gemma), tunelab derives the mask itself (`tunelab.models.chat_templates`) and hands
TRL pre-tokenized rows. `chat_template:` gives the tokenizer a template (or `false` refuses chats).
The stage folder ends up holding the adapter (with LoRA) or the full model,
plus the tokenizer, so it loads with `PeftModel` / `AutoModelForCausalLM`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.data.formats import tool_chat
from tunelab.data.mixtures import is_stream, preview
from tunelab.models.chat_templates import check_rows, has_markers, tokenize_assistant_only, use_template
from tunelab.models.plan import plan_training
from tunelab.models.spec import model_config, model_spec
from tunelab.models.tokenizers import load_tokenizer
from tunelab.stages import TRAINING, Context, Metrics, StageSpec
from tunelab.stages.base import Settings, TrainerStage, sections
from tunelab.training.tokenized import sft_tokens


def data_format(ds, text_field: str, where: str) -> str:
    """Which of TRL's formats a dataset is in; a one-line error when none."""
    columns = ds.column_names
    if text_field in columns:
        return "text"
    if "messages" in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt-completion"
    raise TunelabError(
        f"'{where}' needs a '{text_field}' column, a 'messages' column, or 'prompt' and 'completion' columns "
        f"for SFT; its columns are {', '.join(columns)}"
    )


def check_text_columns(ds: Any, text_field: str, where: str, rows: int = 2) -> None:
    """Text columns hold text: a column of numbers would reach the tokenizer and fail after the model loads."""
    for column in (text_field, "prompt", "completion"):
        if column not in ds.column_names:
            continue
        for i, value in enumerate(ds.select(range(min(rows, len(ds))))[column]):
            if not isinstance(value, (str, list)):
                raise TunelabError(
                    f"'{where}' row {i}: column '{column}' holds {type(value).__name__} values, not text: "
                    "store it as strings (or chat turns)"
                )


FLASH_ATTENTION = (
    "flash_attention_2",
    "flash_attention_3",
    "kernels-community/flash-attn",
    "kernels-community/vllm-flash-attn3",
)


def _flash_attention(spec: StageSpec) -> bool:
    model = spec.cfg.get("model")
    return isinstance(model, dict) and model.get("attn_implementation") in FLASH_ATTENTION


@dataclass(kw_only=True)
class SFTSettings(Settings):
    """What sft parses beyond the common sections: who masks the loss to the assistant turns."""

    assistant_only: bool
    """`training.assistant_only_loss` as the recipe sets it (TRL's own flag is off when tunelab masks)."""
    assistant_only_set: bool
    """The recipe sets `assistant_only_loss` (tool chats default to loss on the assistant's turns only)."""
    masks: bool
    """tunelab derives the assistant masks and hands TRL tokenized rows: the chat template has no
    `{% generation %}` markers, which TRL needs to mask chats itself."""


def _chat_tokenizer(spec: StageSpec, s: SFTSettings, train_ds: Any, tokenizer: Any) -> bool:
    """Apply `chat_template:`; check chat data can be rendered (and masked) as run will. True for chat data."""
    fmt = data_format(train_ds, s.args.dataset_text_field, f"{spec.where}.data")
    value = s.chat
    templated = use_template(tokenizer, value)
    if s.assistant_only and fmt != "messages":
        raise TunelabError(
            f"'{spec.where}.training.assistant_only_loss' needs conversational data (a `messages` column); "
            f"'{spec.where}.data' is {fmt} data (prompt/completion data trains on completions only already)"
        )
    if fmt != "messages":
        return False
    if value is False:
        raise TunelabError(
            f"'{spec.where}' sets chat_template: false, but its data is conversational (messages): "
            "drop chat_template: false, or use prompt/completion data"
        )
    if not templated:
        raise TunelabError(
            f"'{spec.where}.data' is conversational (messages) but the tokenizer of the model has no chat "
            "template: use a chat model, set `chat_template:` (a Jinja template, or `tunelab`), or use "
            "prompt/completion data"
        )
    check_rows(train_ds, tokenizer, f"{spec.where}.data", _assistant_only(s, train_ds))
    return True


def _assistant_only(s: SFTSettings, ds: Any) -> bool:
    """Loss on the assistant's turns only: as the recipe sets it; for tool chats, on unless the recipe says
    otherwise (a tool's results are its words, not the model's to learn)."""
    return s.assistant_only or (not s.assistant_only_set and tool_chat(ds))


class SFT(TrainerStage):
    config_class = "trl:SFTConfig"
    trainer_class = "trl:SFTTrainer"
    streams = True  # SFTTrainer tokenizes an IterableDataset as it reads it
    chat_columns = ()  # sft checks its chat data itself (`_chat_tokenizer`), masks included
    data_hint = "name a dataset folder, file or hub id"
    metrics = Metrics(summary=(*TRAINING, "trainable_params"), progress={"mean_token_accuracy": "tok_acc"})
    sections = sections(
        {
            "model": "model to fine-tune: hub id, folder, ${stage}, or {path, dtype, revision, ...}",
            "data": "training data: datasets.load_dataset arguments (path, name, data_files, split)",
            "eval_data": "optional held-out data, same form; eval_loss is reported",
            "training": "trl.SFTConfig fields (learning_rate, max_steps, packing, ...)",
            "lora": "peft.LoraConfig fields (r, lora_alpha, target_modules, ...); omit for full fine-tuning",
            "quantization": "transformers.BitsAndBytesConfig fields (load_in_4bit, bnb_4bit_quant_type, ...): QLoRA",
            "chat_template": "a Jinja template for `messages` data (`tunelab`: a minimal one); false refuses chat data",
        },
        common=("lora", "quantization", "chat_template"),
    )

    def training_values(self, spec: StageSpec, ctx: Context) -> dict[str, Any]:
        values = super().training_values(spec, ctx)
        if "packing" not in values and _flash_attention(spec):
            # Padding-free packing (TRL's best-fit decreasing) is safe where attention keeps the packed rows
            # apart. Flash-attention kernels always do; sdpa and eager do only for models on transformers'
            # masking utilities (the mask is rebuilt from position_ids), so there it stays the user's choice.
            values.update(packing=True, packing_strategy=values.get("packing_strategy", "bfd"))
        return values

    def settings(self, spec: StageSpec, ctx: Context) -> SFTSettings:
        """With `assistant_only_loss` on a template without generation markers, tunelab masks the rows and
        TRL's flag goes off in the config the trainer gets (TRL would refuse such a template)."""
        common = super().settings(spec, ctx)
        assistant_only = bool(common.args.assistant_only_loss)
        masks = False
        if assistant_only and common.model is not None:  # while checking, an earlier stage may make the model
            tokenizer = load_tokenizer(common.model.get("gguf_file", common.model["path"]))
            masks = use_template(tokenizer, common.chat) and not has_markers(tokenizer.chat_template)
        if masks:
            common.args.assistant_only_loss = False  # the masks are in the rows; TRL builds labels from them
        given = "assistant_only_loss" in (spec.cfg.get("training") or {})
        return SFTSettings(**vars(common), assistant_only=assistant_only, assistant_only_set=given, masks=masks)

    def data(self, spec: StageSpec, ctx: Context, s: Settings) -> tuple[Any, Any]:
        text_field = s.args.dataset_text_field
        own = (text_field,) if text_field != "text" else ()  # a custom text column: read as it is
        train = self.load(spec, ctx, "data", own)
        shown = preview(train)  # a stream's first rows
        if "images" in shown.column_names or "image" in shown.column_names:  # TRL would fail after the model loads
            raise TunelabError(
                f"'{spec.where}.data' holds images: train image+text models with the `vlm_sft` stage (sft is text-only)"
            )
        data_format(shown, text_field, f"{spec.where}.data")
        evaluation = None
        if spec.cfg.get("eval_data") is not None:
            evaluation = self.load(spec, ctx, "eval_data", own)
            data_format(preview(evaluation), text_field, f"{spec.where}.eval_data")
        return train, evaluation

    def check_more(self, spec: StageSpec, ctx: Context, s: SFTSettings, train: Any, evaluation: Any) -> None:
        text_field = s.args.dataset_text_field
        check_text_columns(train, text_field, f"{spec.where}.data")
        chat = data_format(train, text_field, f"{spec.where}.data") == "messages"
        if s.model is not None and (chat or s.assistant_only):  # the tokenizer matters for chats only
            _chat_tokenizer(spec, s, train, load_tokenizer(s.model.get("gguf_file", s.model["path"])))

    def prepare(self, spec: StageSpec, ctx: Context, s: SFTSettings, tokenizer: Any, train: Any, evaluation: Any):
        chat = _chat_tokenizer(spec, s, preview(train), tokenizer)
        tools = chat and tool_chat(train)
        # TRL needs {% generation %} markers to mask; tunelab derives the masks instead. Tool chats are always
        # tokenized here: their turns reach the template cleaned (`template_turns`) and with their `tools`.
        if chat and (s.masks or tools):
            masked = _assistant_only(s, train)
            train = tokenize_assistant_only(train, tokenizer, f"{spec.where}.data", masked)
            if evaluation is not None:
                evaluation = tokenize_assistant_only(evaluation, tokenizer, f"{spec.where}.eval_data", masked)
        return train, evaluation

    def tokens(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any, shown: int):
        """SFTTrainer's own preparation of the rows `prepare` hands it (tunelab's assistant masks included)."""
        return sft_tokens(train, tokenizer, s.args, shown)

    def before(self, spec, ctx, s, trainer, tokenizer, evaluation) -> dict[str, Any]:
        if not is_stream(trainer.train_dataset) and len(trainer.train_dataset) == 0:
            raise TunelabError(
                f"'{spec.where}.data': no example has a trainable token left after truncation to "
                f"max_length={s.args.max_length}: raise training.max_length"
            )
        return {}

    def after(self, spec, ctx, s, trainer, tokenizer, evaluation) -> dict[str, Any]:
        out = super().after(spec, ctx, s, trainer, tokenizer, evaluation)
        out["trainable_params"] = float(sum(p.numel() for p in trainer.model.parameters() if p.requires_grad))
        return out

    def plan(self, spec: StageSpec, ctx: Context):
        """Memory plan from the model's config (None when the model cannot be known before earlier stages run)."""

        config = model_config(spec.cfg["model"], ctx, f"{spec.where}.model")
        if config is None:
            return None
        dtype = model_spec(spec.cfg["model"], f"{spec.where}.model").get("dtype")
        return plan_training(
            spec.name,
            spec.kind,
            config,
            self.args(spec, ctx),
            lora=spec.cfg.get("lora"),
            quantization=spec.cfg.get("quantization"),
            load_dtype=dtype,
        )
