"""Supervised fine-tuning with `trl.SFTTrainer`, full or LoRA.

Sections map onto the libraries: `training` is `trl.SFTConfig`, `lora` is
`peft.LoraConfig`. The data format is TRL's: a `text` column (plain language
modelling), a `messages` column (chat, via the tokenizer's chat template), or
`prompt` and `completion` columns (loss on the completion only, TRL's default).
`assistant_only_loss` works with any chat template: where the template has no `{% generation %}`
markers (ChatML, Llama 3, Qwen, Gemma), tunelab derives the mask itself (`tunelab.chat`) and hands
TRL pre-tokenized rows. `chat_template:` gives the tokenizer a template (or `false` refuses chats).
The stage folder ends up holding the adapter (with LoRA) or the full model,
plus the tokenizer, so it loads with `PeftModel` / `AutoModelForCausalLM`.
"""

from __future__ import annotations

from typing import Any

from tunelab.errors import TunelabError
from tunelab.stages import Context, StageResult, StageSpec

PRODUCES_MODEL = True
RANKS = "all"  # trains on every process of a distributed run (the Trainer shards the data)
SECTIONS = {
    "model": "model to fine-tune: hub id, folder, ${stage}, or {path, dtype, revision, ...}",
    "data": "training data: datasets.load_dataset arguments (path, name, data_files, split)",
    "eval_data": "optional held-out data, same form; eval_loss is reported",
    "training": "trl.SFTConfig fields (learning_rate, max_steps, packing, ...)",
    "lora": "peft.LoraConfig fields (r, lora_alpha, target_modules, ...); omit for full fine-tuning",
    "quantization": "transformers.BitsAndBytesConfig fields (load_in_4bit, bnb_4bit_quant_type, ...): QLoRA",
    "chat_template": "a Jinja template for `messages` data (`tunelab`: a minimal one); false refuses chat data",
}


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


def _lora(values: dict[str, Any] | None, where: str, task_type: str = "CAUSAL_LM"):
    if values is None:
        return None
    from peft import LoraConfig

    from tunelab.config import build

    return build(LoraConfig, {"task_type": task_type, **values}, where)


def _args(spec: StageSpec, ctx: Context):
    from trl import SFTConfig

    from tunelab.training import training_args

    values = dict(spec.cfg.get("training") or {})
    if "packing" not in values and _flash_attention(spec):
        # Padding-free packing (TRL's best-fit decreasing) is safe where attention keeps the packed rows
        # apart. Flash-attention kernels always do; sdpa and eager do only for models on transformers'
        # masking utilities (the mask is rebuilt from position_ids), so there it stays the user's choice.
        values.update(packing=True, packing_strategy=values.get("packing_strategy", "bfd"))
    return training_args(SFTConfig, values, f"{spec.where}.training", spec.out_dir, ctx.seed)


FLASH_ATTENTION = (
    "flash_attention_2",
    "flash_attention_3",
    "kernels-community/flash-attn",
    "kernels-community/vllm-flash-attn3",
)


def _flash_attention(spec: StageSpec) -> bool:
    model = spec.cfg.get("model")
    return isinstance(model, dict) and model.get("attn_implementation") in FLASH_ATTENTION


def _model_path(spec: StageSpec, ctx: Context) -> dict[str, Any] | None:
    from tunelab.models import stage_model

    return stage_model(spec, ctx)


def _datasets(spec: StageSpec, text_field: str):
    from tunelab.data import load_split

    if "data" not in spec.cfg:
        raise TunelabError(f"'{spec.where}' has no `data:`: name a dataset folder, file or hub id")
    train = load_split(spec.cfg["data"], f"{spec.where}.data", "train")
    if "images" in train.column_names or "image" in train.column_names:  # TRL would fail after the model loads
        raise TunelabError(
            f"'{spec.where}.data' holds images: train image+text models with the `vlm_sft` stage (sft is text-only)"
        )
    data_format(train, text_field, f"{spec.where}.data")
    evaluation = None
    if spec.cfg.get("eval_data") is not None:
        evaluation = load_split(spec.cfg["eval_data"], f"{spec.where}.eval_data", "test")
        data_format(evaluation, text_field, f"{spec.where}.eval_data")
    return train, evaluation


def _quantization(spec: StageSpec):
    from tunelab.quant import quant_config

    quant = quant_config(spec.cfg.get("quantization"), f"{spec.where}.quantization")
    if quant is not None and spec.cfg.get("lora") is None:
        raise TunelabError(
            f"'{spec.where}' quantizes the model but has no `lora:`: a 4/8-bit model cannot be fully "
            "fine-tuned; add a `lora:` section (QLoRA) or remove `quantization:`"
        )
    return quant


def _chat_tokenizer(spec: StageSpec, args: Any, train_ds: Any, tokenizer: Any) -> bool:
    """Apply `chat_template:`; check chat data can be rendered (and masked) as run will. True for chat data."""
    from tunelab.chat import check_rows, setting, use_template

    fmt = data_format(train_ds, args.dataset_text_field, f"{spec.where}.data")
    value = setting(spec.cfg, spec.where)
    templated = use_template(tokenizer, value)
    if args.assistant_only_loss and fmt != "messages":
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
    check_rows(train_ds, tokenizer, f"{spec.where}.data", args.assistant_only_loss)
    return True


def check(spec: StageSpec, ctx: Context) -> None:
    from tunelab.models import load_tokenizer
    from tunelab.preflight import check_model, check_training

    args = _args(spec, ctx)
    check_training(args, spec)
    lora = _lora(spec.cfg.get("lora"), f"{spec.where}.lora")
    _quantization(spec)
    mspec = _model_path(spec, ctx)
    check_model(spec, ctx, lora)
    train_ds, _ = _datasets(spec, args.dataset_text_field)
    check_text_columns(train_ds, args.dataset_text_field, f"{spec.where}.data")
    chat = data_format(train_ds, args.dataset_text_field, f"{spec.where}.data") == "messages"
    if mspec is not None and (chat or args.assistant_only_loss):  # the tokenizer matters for chats only
        _chat_tokenizer(spec, args, train_ds, load_tokenizer(mspec.get("gguf_file", mspec["path"])))


def run(spec: StageSpec, ctx: Context) -> StageResult:
    from trl import SFTTrainer

    from tunelab.chat import has_markers, tokenize_assistant_only
    from tunelab.models import load_causal_lm, load_tokenizer, prepare_kbit
    from tunelab.training import train_and_save

    args = _args(spec, ctx)
    peft_config = _lora(spec.cfg.get("lora"), f"{spec.where}.lora")
    mspec = _model_path(spec, ctx)
    train_ds, eval_ds = _datasets(spec, args.dataset_text_field)
    tokenizer = load_tokenizer(mspec["path"])
    chat = _chat_tokenizer(spec, args, train_ds, tokenizer)
    if chat and args.assistant_only_loss and not has_markers(tokenizer.chat_template):
        # TRL needs {% generation %} markers; derive the mask here and hand TRL tokenized rows.
        train_ds = tokenize_assistant_only(train_ds, tokenizer, f"{spec.where}.data")
        if eval_ds is not None:
            eval_ds = tokenize_assistant_only(eval_ds, tokenizer, f"{spec.where}.eval_data")
        args.assistant_only_loss = False  # the masks are in the rows; TRL builds labels from them
    quant = _quantization(spec)
    model = prepare_kbit(load_causal_lm(mspec, quantization=quant), quant, args.gradient_checkpointing)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    if len(trainer.train_dataset) == 0:
        raise TunelabError(
            f"'{spec.where}.data': no example has a trainable token left after truncation to "
            f"max_length={args.max_length}: raise training.max_length"
        )
    metrics, prints = train_and_save(trainer, spec.out_dir, ctx.resume, train_ds, eval_ds, tokenizer)
    return StageResult(metrics=metrics, model=spec.out_dir, fingerprints=prints)


def plan(spec: StageSpec, ctx: Context):
    """Memory plan from the model's config (None when the model cannot be known before earlier stages run)."""
    from tunelab.models import model_config, model_spec
    from tunelab.plan import plan_training

    config = model_config(spec.cfg["model"], ctx, f"{spec.where}.model")
    if config is None:
        return None
    dtype = model_spec(spec.cfg["model"], f"{spec.where}.model").get("dtype")
    return plan_training(
        spec.name,
        spec.kind,
        config,
        _args(spec, ctx),
        lora=spec.cfg.get("lora"),
        quantization=spec.cfg.get("quantization"),
        load_dtype=dtype,
    )
