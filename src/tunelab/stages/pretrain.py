"""Pre-training from scratch: a new model from a transformers config, a byte-level BPE
tokenizer trained on the stage's data, and next-token training with `trl.SFTTrainer`.

`config` is the model's transformers config (`model_type` plus that config
class's own fields, e.g. LlamaConfig's `hidden_size`); `tokenizer` is either
the arguments of `tokenizers.trainers.BpeTrainer` (`vocab_size`,
`min_frequency`, ...) or an existing tokenizer to reuse (hub id, folder, or an earlier stage's
`${stage}`: a student for distillation shares its teacher's vocabulary).
Sequences are packed by default (`packing: true`, `packing_strategy: wrapped`),
as pre-training usually is. The stage folder is a standard model folder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from tunelab.core.config import build, check_keys
from tunelab.core.errors import TunelabError
from tunelab.core.hub import resolve_model
from tunelab.core.refs import ref_name
from tunelab.data.datasets import require_columns
from tunelab.data.mixtures import is_stream, preview
from tunelab.models.plan import plan_training
from tunelab.models.tokenizers import BpeTrainerArgs, load_tokenizer, tokenizer_origin, train_tokenizer
from tunelab.stages import TRAINING, Context, Metrics, StageSpec
from tunelab.stages.base import Settings, TokenizerPending, TrainerStage
from tunelab.training.tokenized import sft_tokens

PACKING_DEFAULTS = {"packing": True, "packing_strategy": "wrapped"}
STREAM_TOKENIZER_ROWS = 100_000
"""Rows of a streamed corpus the BPE tokenizer is trained on (bounded: the stream may be any size)."""


def _config(spec: StageSpec, overrides: dict[str, Any] | None = None):
    from transformers import CONFIG_MAPPING

    where = f"{spec.where}.config"
    values = spec.cfg.get("config")
    if not isinstance(values, dict) or "model_type" not in values:
        raise TunelabError(f"'{where}' needs `model_type:` (llama, qwen2, gpt2, ...) and that config's fields")
    values = dict(values)
    model_type = values.pop("model_type")
    if model_type not in CONFIG_MAPPING:
        from tunelab.core.errors import closest

        guess = closest(str(model_type), list(CONFIG_MAPPING.keys()))
        raise TunelabError(
            f"'{where}.model_type' is '{model_type}', unknown to transformers"
            + (f"; did you mean '{guess}'?" if guess else "")
        )
    cls = CONFIG_MAPPING[model_type]
    return build(cls, values, where, fixed=overrides)


@dataclass(kw_only=True)
class PretrainSettings(Settings):
    """Where pre-training's tokenizer comes from: one to reuse, or BpeTrainer arguments to train one."""

    reuse: str | None = None
    """A tokenizer to reuse (folder or hub id); None: one is trained on the data with `bpe`."""
    pending: str | None = None
    """While validating, the earlier stage (`tokenizer: ${stage}`) whose tokenizer is not written yet."""
    bpe: dict[str, Any] = field(default_factory=dict)
    """`tokenizers.trainers.BpeTrainer` arguments (with `special_tokens`), when the tokenizer is trained."""


def _tokenizer_source(spec: StageSpec, ctx: Context) -> dict[str, Any]:
    """`reuse`, `pending` and `bpe` of `PretrainSettings`, from the `tokenizer:` section."""
    value = spec.cfg.get("tokenizer", {})
    if isinstance(value, str):
        if ctx.checking and ctx.is_pending(value):
            return {"pending": ref_name(value)}
        return {"reuse": resolve_model(ctx.resolve_ref(value), f"{spec.where}.tokenizer")}
    if not isinstance(value, dict):
        raise TunelabError(f"'{spec.where}.tokenizer' must be BpeTrainer arguments or a tokenizer to reuse")
    check_keys({k: v for k, v in value.items() if k != "special_tokens"}, BpeTrainerArgs, f"{spec.where}.tokenizer")
    return {"bpe": dict(value)}


class Pretrain(TrainerStage):
    config_class = "trl:SFTConfig"
    trainer_class = "trl:SFTTrainer"
    streams = True  # packs and tokenizes an IterableDataset as it reads it; the BPE learns from its first rows
    defaults = PACKING_DEFAULTS  # pre-training packs its corpus, as it usually is
    chat_columns = ()
    data_hint = "name a text corpus (folder, file or hub id)"
    data_target = "text"
    eval_keys = ("eval_loss",)
    metrics = Metrics(summary=(*TRAINING, "perplexity", "params"))
    sections = {
        "config": "transformers config of the new model: model_type plus its fields (hidden_size, ...)",
        "tokenizer": "tokenizers.trainers.BpeTrainer arguments (vocab_size, min_frequency), or a tokenizer to "
        "reuse (folder, hub id, ${stage})",
        "data": "text corpus: datasets.load_dataset arguments; the text column is training.dataset_text_field",
        "eval_data": "optional held-out text; eval_loss and perplexity are reported",
        "training": "trl.SFTConfig fields (learning_rate, max_steps, max_length, ...)",
    }

    def tokenizer_source(self, spec: StageSpec, ctx: Context) -> str:
        """The tokenizer this stage saves: the one it reuses, or the one it trains (known by the stage's name)."""
        value = spec.cfg.get("tokenizer")
        if isinstance(value, str):
            return tokenizer_origin(value, ctx, f"{spec.where}.tokenizer")
        return f"stage '{spec.name}'"

    def settings(self, spec: StageSpec, ctx: Context) -> PretrainSettings:
        """No `model:`: the model is built from `config`, the tokenizer reused or trained on the data."""
        args = self.args(spec, ctx)
        _config(spec)
        return PretrainSettings(args=args, chat_columns=self.chat_columns, **_tokenizer_source(spec, ctx))

    def data(self, spec: StageSpec, ctx: Context, s: Settings) -> tuple[Any, Any]:
        text_field = s.args.dataset_text_field
        own = (text_field,) if text_field != "text" else ()  # a custom text column: read as it is
        train = self.load(spec, ctx, "data", own)
        require_columns(preview(train), [text_field], f"{spec.where}.data", "text to pre-train on")
        evaluation = None
        if spec.cfg.get("eval_data") is not None:
            evaluation = self.load(spec, ctx, "eval_data", own)
            require_columns(preview(evaluation), [text_field], f"{spec.where}.eval_data", "held-out text")
        return train, evaluation

    def check_more(self, spec: StageSpec, ctx: Context, s: PretrainSettings, train: Any, evaluation: Any) -> None:
        """Plan what later stages see: the model's config, with the vocabulary size known before training."""
        if s.reuse is None and s.pending is None:
            vocab = s.bpe.get("vocab_size", 1024)
            ctx.configs[spec.name] = _config(spec, overrides={"vocab_size": vocab})
        elif s.pending is not None and getattr(ctx.configs.get(s.pending), "vocab_size", None):
            vocab = ctx.configs[s.pending].vocab_size  # the earlier stage's planned tokenizer
            ctx.configs[spec.name] = _config(spec, overrides={"vocab_size": vocab})

    def tokenizer(self, spec: StageSpec, ctx: Context, s: PretrainSettings, train: Any) -> Any:
        """The reused tokenizer, or a byte-level BPE trained on the corpus."""
        if s.pending is not None:
            raise TokenizerPending(f"its tokenizer is the one stage '{s.pending}' saves, which has not run yet")
        if s.reuse is not None:
            return load_tokenizer(s.reuse)
        column = s.args.dataset_text_field
        if is_stream(train):  # a stream is not read whole for the vocabulary: its first rows teach it
            texts = (row[column] for row in train.take(STREAM_TOKENIZER_ROWS) if row[column])
        else:
            texts = (t for t in train[column] if t)
        return train_tokenizer(texts, s.bpe, f"{spec.where}.tokenizer")

    def tokens(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any, shown: int):
        return sft_tokens(train, tokenizer, s.args, shown)

    def model(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any) -> Any:
        """A new model from `config`, its vocabulary and special tokens from the tokenizer."""
        from transformers import AutoModelForCausalLM, set_seed

        config = _config(
            spec,
            overrides={
                "vocab_size": len(tokenizer),
                "bos_token_id": tokenizer.bos_token_id,
                "eos_token_id": tokenizer.eos_token_id,
                "pad_token_id": tokenizer.pad_token_id,
            },
        )
        set_seed(ctx.seed)  # the initial weights depend on it
        return AutoModelForCausalLM.from_config(config)

    def after(self, spec, ctx, s, trainer, tokenizer, evaluation) -> dict[str, Any]:
        out = super().after(spec, ctx, s, trainer, tokenizer, evaluation)
        if "eval_loss" in out:
            out["perplexity"] = math.exp(min(out["eval_loss"], 50.0))
        out["params"] = float(sum(p.numel() for p in trainer.model.parameters()))
        return out

    def plan(self, spec: StageSpec, ctx: Context):
        """Memory plan of pre-training the configured model (vocabulary size from the tokenizer section)."""
        config = ctx.configs.get(spec.name) or _config(spec)
        return plan_training(spec.name, spec.kind, config, self.args(spec, ctx), load_dtype="float32")
