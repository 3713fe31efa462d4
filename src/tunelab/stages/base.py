"""One base for the Trainer-backed stages: a stage is a declaration over shared components.

A stage module declares a subclass of `TrainerStage` (its config class, its trainer class, its data,
its metrics), registered by kind in `tunelab.stages.STAGES` as "module:Class":

    class DPO(TrainerStage):
        config_class = "trl:DPOConfig"
        trainer_class = "trl:DPOTrainer"
        sections = {...}
        metrics = Metrics(summary=("train_loss", "eval_rewards/accuracies"), progress={"rewards/margins": "margin"})

`settings()` parses the stage's sections once into a typed `Settings` (the config object built as the
trainer will get it, the LoRA and quantization configs, the model's from_pretrained arguments, the chat
settings); `check` and `run` both start from it, so validate checks exactly what run builds. `run` then
reads top to bottom as the alignment-handbook scripts do: data, tokenizer, model, trainer, train,
evaluate, save. A stage overrides only the steps it does differently: the `HOOKS`, in run order, each
taking `(spec, ctx, s, ...)` where `s` is the stage's parsed settings. A stage that parses more than the
common sections declares a `Settings` subclass (`@dataclass(kw_only=True)`) with typed fields and returns
it from `settings`; hooks read it and never change it, nor the config object the trainer gets in it.

Class attributes name library classes as "module:Name" strings, imported on first use, so listing and
structurally checking stages never imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

from tunelab.core.errors import TunelabError
from tunelab.data.datasets import require_columns, require_preferences
from tunelab.data.mixtures import is_stream, preview, streams
from tunelab.data.preview import SUMMARY_ROWS, DataView, Source, Tokens, contamination, head
from tunelab.data.sources import load_data
from tunelab.models.adapters import lora_config, trainable_quantization
from tunelab.models.chat_templates import (
    chat_pairs,
    check_chat_data,
    check_example,
    conversational,
    setting,
    system_prompt,
    use_template,
)
from tunelab.models.loading import load_causal_lm, prepare_kbit
from tunelab.models.plan import policy_plan
from tunelab.models.preflight import check_model, check_training, check_vllm
from tunelab.models.reward_functions import check_reward_templates, check_rewards, reward_functions
from tunelab.models.spec import stage_model
from tunelab.models.tokenizers import load_tokenizer
from tunelab.stages import TRAINING, Context, Metrics, Stage, StageResult, StageSpec
from tunelab.training import distributed
from tunelab.training.tokenized import prompt_tokens
from tunelab.training.trainer import fingerprints, guarded_train, kl_limit, save, training_args


def _rows_read(ctx: Context, key: str, ds: Any) -> int | None:
    """The rows `load_data` read for `key` (None: a stream), else the dataset's."""
    report = ctx.data_reports.get(key)
    return report.rows if report is not None else len(ds)


class TokenizerPending(TunelabError):
    """The stage's tokenizer does not exist yet: an earlier stage of the pipeline makes it."""


def data_shape(ds: Any) -> str:
    """The shape a stage's rows are in, by TRL's column names: text, messages, prompt_completion, preference,
    prompt, kto."""
    columns = set(ds.column_names)
    for shape, needs in (
        ("preference", {"chosen", "rejected"}),
        ("kto", {"prompt", "completion", "label"}),
        ("messages", {"messages"}),
        ("prompt_completion", {"prompt", "completion"}),
        ("prompt", {"prompt"}),
        ("text", {"text"}),
    ):
        if needs <= columns:
            return shape
    return "columns"


def import_name(path: str) -> Any:
    """`"trl:DPOConfig"` -> the class (imported now)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass
class Settings:
    """A stage's sections parsed once, as the libraries' own objects; `check`, `plan` and `run` share it.

    Stages that parse more subclass it with typed fields (`SFTSettings`, `PPOSettings`, ...). Hooks read
    it; none writes to it, so what validate checked is what the trainer gets.
    """

    args: Any
    """The config object (`trl.DPOConfig`, ...) exactly as the trainer gets it."""
    lora: Any = None
    """`peft.LoraConfig`, or None for full fine-tuning."""
    quantization: Any = None
    """`transformers.BitsAndBytesConfig`, or None."""
    model: dict[str, Any] | None = None
    """from_pretrained arguments of `model:`; None while checking, when an earlier stage makes it."""
    chat: bool | str = True
    """`chat_template:`: True (the model's own, when it has one), False, or a template."""
    system: str | None = None
    kl_limit: float | None = None
    chat_columns: tuple[str, ...] = ()
    """Columns that may hold chat turns, checked against the chat template at validate."""


COMMON_SECTIONS = {
    "model": "model to train: a hub id, a folder, ${stage} (adapter folders are merged first), or {path, dtype, ...}",
    "lora": "peft.LoraConfig fields (r, lora_alpha, target_modules, ...); omit for full fine-tuning",
    "quantization": "transformers.BitsAndBytesConfig fields (load_in_4bit, ...): train a LoRA on a 4/8-bit model",
    "chat_template": "prompts through the model's chat template: true (default, when it has one), false, or a template",
    "system": "system prompt for chat-templated prompts",
}


def sections(own: dict[str, str], common: tuple[str, ...] = tuple(COMMON_SECTIONS)) -> dict[str, str]:
    """A stage's keys: `model`, then its own (data, training, ...), then the `common` ones it takes."""
    merged = {**{k: COMMON_SECTIONS[k] for k in common}, **own}
    first = ["model"] if "model" in merged else []
    return {k: merged[k] for k in [*first, *(k for k in own if k != "model"), *(k for k in common if k not in own)]}


HOOKS = (
    "training_values",
    "settings",
    "check_model",
    "data",
    "check_more",
    "tokenizer",
    "prepare",
    "model",
    "trainer_kwargs",
    "build",
    "before",
    "train",
    "after",
    "save",
    "plan",
    "tokens",
)
"""What a TrainerStage subclass may override, in run order (tests/test_architecture.py holds them to the base's
signatures). Everything else on the base is shared machinery."""


class TrainerStage(Stage):
    """A stage that trains with a (TRL) Trainer. Subclasses declare; the base does the common work."""

    # --- the declaration --------------------------------------------------------------------------
    config_class: ClassVar[str]
    """"module:Name" of the training config (`training:` holds its fields)."""
    trainer_class: ClassVar[str]
    """"module:Name" of the trainer."""
    sections: ClassVar[dict[str, str]]
    """Every key the stage accepts, with one line each (validate's "did you mean" and `tunelab list`)."""
    metrics: ClassVar[Metrics] = Metrics()
    produces_model: ClassVar[bool] = True
    ranks: ClassVar[str] = "all"
    """"all": trains on every process of a distributed run (the Trainer shards the data)."""
    task_type: ClassVar[str] = "CAUSAL_LM"
    """peft task type of `lora:`; SEQ_CLS for classifiers."""
    defaults: ClassVar[dict[str, Any]] = {}
    """`training:` values tunelab sets unless the recipe does (each with its reason where declared)."""
    data_hint: ClassVar[str] = "name a dataset folder, file or hub id"
    """What `data:` should be, for the "has no `data:`" error."""
    data_target: ClassVar[str] = "lm"
    """The shape the stage's trainer reads (`tunelab.data.formats.TARGETS`): every source's format is
    converted into it (`load_data`)."""
    chat_columns: ClassVar[tuple[str, ...]] = ("prompt",)
    """Columns that may hold chat turns (checked against the model's chat template at validate)."""
    model_hint: ClassVar[str | None] = None
    """What `model:` should be, for the "has no `model:`" error (default: a hub id, folder or ${stage})."""
    kl_keys: ClassVar[tuple[str, ...]] = ("kl",)
    """Logged keys that `kl_limit:` watches."""
    eval_keys: ClassVar[tuple[str, ...] | None] = None
    """Keys of `trainer.evaluate()` kept in the metrics (None: every number)."""
    completions: ClassVar[bool] = False
    """The trainer learns from completions it samples (online RL, distillation): the memory plan sizes a
    row as ~128 prompt tokens plus `max_completion_length`."""

    # --- parsing, shared by check, plan and run --------------------------------------------------
    def args(self, spec: StageSpec, ctx: Context) -> Any:
        """The config object (`config_class`) from `training_values`: `settings` and `plan` build it."""
        values = self.training_values(spec, ctx)
        return training_args(import_name(self.config_class), values, f"{spec.where}.training", spec.out_dir, ctx.seed)

    def training_values(self, spec: StageSpec, ctx: Context) -> dict[str, Any]:
        """`training:` with the stage's `defaults` under it: the keyword arguments of `config_class`."""
        return {**self.defaults, **(spec.cfg.get("training") or {})}

    def settings(self, spec: StageSpec, ctx: Context) -> Settings:
        """Every section parsed into the libraries' objects; one-line errors name the bad key."""
        return Settings(
            args=self.args(spec, ctx),
            chat=setting(spec.cfg, spec.where),
            system=system_prompt(spec.cfg, spec.where),
            kl_limit=kl_limit(spec.cfg, spec.where) if "kl_limit" in self.sections else None,
            lora=lora_config(spec.cfg.get("lora"), f"{spec.where}.lora", self.task_type),
            quantization=trainable_quantization(spec.cfg, spec.where) if "quantization" in self.sections else None,
            model=stage_model(spec, ctx, *([self.model_hint] if self.model_hint else [])),
            chat_columns=self.chat_columns,
        )

    # --- data -------------------------------------------------------------------------------------
    def data(self, spec: StageSpec, ctx: Context, s: Settings) -> tuple[Any, Any]:
        """(train, eval) datasets, their columns checked; eval is None without `eval_data:`."""
        train = self.load(spec, ctx, "data")
        evaluation = self.load(spec, ctx, "eval_data") if spec.cfg.get("eval_data") is not None else None
        return train, evaluation

    def load(self, spec: StageSpec, ctx: Context, key: str = "data", own: tuple[str, ...] = ()) -> Any:
        """`data:` (default split train) or `eval_data:` (test) in the stage's shape (`data_target`), through
        `load_data`: formats detected and converted; what was read is kept in `ctx.data_reports`. `own`: the
        stage's columns under names the recipe chose (taken as they are)."""
        value = self.require_data(spec) if key == "data" else spec.cfg[key]
        split = "train" if key == "data" else "test"
        ds, report = load_data(value, f"{spec.where}.{key}", split, self.data_target, seed=ctx.seed, own=own)
        ctx.data_reports[f"{spec.name}.{key}"] = report
        return ds

    def require_data(self, spec: StageSpec) -> Any:
        if "data" not in spec.cfg:
            raise TunelabError(f"'{spec.where}' has no `data:`: {self.data_hint}")
        return spec.cfg["data"]

    def prepare(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any, evaluation: Any):
        """The datasets as the trainer takes them (chat turns, renamed columns): (train, eval)."""
        return train, evaluation

    # --- checks -----------------------------------------------------------------------------------
    def check(self, spec: StageSpec, ctx: Context) -> None:
        """What `run` builds, minus the weights: the config objects, the model skeleton on the meta device
        with LoRA applied (and 4-bit CPU shapes), the data through the same loader, the chat template."""
        s = self.settings(spec, ctx)
        check_training(s.args, spec)
        self.check_stream(spec, s)
        self.check_model(spec, ctx, s)
        train, evaluation = self.data(spec, ctx, s)
        train, evaluation = preview(train), preview(evaluation)  # a stream's first rows
        check_chat_data(train, s.chat_columns, spec, ctx)
        self.check_template(spec, s, train)
        self.check_more(spec, ctx, s, train, evaluation)

    def check_stream(self, spec: StageSpec, s: Settings) -> None:
        """A stream has no length, so the Trainer cannot count epochs over it: `max_steps` must say when to stop."""
        if spec.cfg.get("data") is not None and streams(spec.cfg["data"]) and s.args.max_steps <= 0:
            raise TunelabError(
                f"'{spec.where}.data' streams (streaming: true), and a stream has no length to count epochs "
                f"over: set '{spec.where}.training.max_steps' (the optimizer steps to train)"
            )

    def check_model(self, spec: StageSpec, ctx: Context, s: Settings) -> None:
        """The model from its config alone (no weights): it builds, the LoRA applies, 4-bit shapes fit."""
        check_model(spec, ctx, s.lora, task=self.task_type)

    def check_template(self, spec: StageSpec, s: Settings, train: Any) -> None:
        """Render the first example through the chat template the trainer will use (`chat_template:` or the
        model's own), for every stage that prompts through one: a template that fails, loops or explodes is
        one line here, not a crash after the model has loaded. Stages without `chat_columns` (sft checks its
        own rows, masks included) skip it."""
        columns = [c for c in s.chat_columns if c in train.column_names]
        if not columns or s.model is None or len(train) == 0:
            return  # an earlier stage makes the model: its tokenizer is checked once that stage has run
        tokenizer = load_tokenizer(s.model.get("gguf_file", s.model["path"]))
        if use_template(tokenizer, s.chat):
            check_example(tokenizer, train[0], columns, s.system, f"{spec.where}.data")

    def check_more(self, spec: StageSpec, ctx: Context, s: Settings, train: Any, evaluation: Any) -> None:
        """A stage's own checks beyond the common ones (reward functions, batch arithmetic, ...); `run`
        calls it too, on the same data, so a check cannot be skipped by running without validating."""

    # --- running ----------------------------------------------------------------------------------
    def run(self, spec: StageSpec, ctx: Context) -> StageResult:
        s = self.settings(spec, ctx)
        self.check_stream(spec, s)
        train, evaluation = self.data(spec, ctx, s)
        self.check_more(spec, ctx, s, preview(train), preview(evaluation))
        tokenizer = self.tokenizer(spec, ctx, s, train)
        raw = train, evaluation
        train, evaluation = self.prepare(spec, ctx, s, tokenizer, train, evaluation)
        self.record_data(spec, ctx, s, tokenizer, raw, train)
        if is_stream(train):
            # A stream read to its end starts again within the one "epoch" of max_steps the Trainer counts
            # over a stream: a checkpoint's step is then a position in it, which --resume skips to exactly.
            train = train.repeat(None)
        model = self.model(spec, ctx, s, tokenizer, train)
        trainer = self.build(spec, ctx, s, self.trainer_kwargs(spec, ctx, s, model, tokenizer, train, evaluation))
        metrics = self.before(spec, ctx, s, trainer, tokenizer, evaluation)
        metrics.update(self.train(spec, ctx, s, trainer))
        metrics.update(self.after(spec, ctx, s, trainer, tokenizer, evaluation))
        self.save(spec, ctx, s, trainer, tokenizer)
        return StageResult(metrics=metrics, model=spec.out_dir, fingerprints=fingerprints(train, evaluation))

    def tokenizer(self, spec: StageSpec, ctx: Context, s: Settings, train: Any) -> Any:
        """The tokenizer (or processor) of the model; pretrain trains one on `train`. While checking, a GGUF
        model's tokenizer is read from the file; a model an earlier stage makes has none yet (`TokenizerPending`)."""
        if s.model is None:
            raise TokenizerPending(
                f"its tokenizer is the one {self.tokenizer_source(spec, ctx)} saves, which has not run yet: "
                "run the recipe up to it first"
            )
        return load_tokenizer(s.model.get("gguf_file", s.model["path"]))

    def model(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any) -> Any:
        """The model to train: loaded (quantized when asked) and prepared for k-bit training."""
        model = load_causal_lm(s.model, quantization=s.quantization)
        return prepare_kbit(model, s.quantization, s.args.gradient_checkpointing)

    def trainer_kwargs(
        self, spec: StageSpec, ctx: Context, s: Settings, model: Any, tokenizer: Any, train: Any, evaluation: Any
    ) -> dict[str, Any]:
        return {
            "model": model,
            "args": s.args,
            "train_dataset": train,
            "eval_dataset": evaluation,
            "processing_class": tokenizer,
            "peft_config": s.lora,
        }

    def build(self, spec: StageSpec, ctx: Context, s: Settings, kwargs: dict[str, Any]) -> Any:
        """The trainer, from its keyword arguments."""
        return import_name(self.trainer_class)(**kwargs)

    def before(
        self, spec: StageSpec, ctx: Context, s: Settings, trainer: Any, tokenizer: Any, evaluation: Any
    ) -> dict[str, Any]:
        """After the trainer is built, before training: what it must not be left to find mid-run, and metrics
        measured before training (an untrained baseline)."""
        return {}

    def train(self, spec: StageSpec, ctx: Context, s: Settings, trainer: Any) -> dict[str, Any]:
        return guarded_train(
            trainer, spec, ctx.resume, s.kl_limit, self.kl_keys, self.metrics.progress, self.metrics.throttle
        )

    def after(
        self, spec: StageSpec, ctx: Context, s: Settings, trainer: Any, tokenizer: Any, evaluation: Any
    ) -> dict[str, Any]:
        """Metrics after training: `trainer.evaluate()` on `eval_data` (its `eval_keys`), plus the
        first and last tenth of each `Metrics.trend` key of the log history."""
        out: dict[str, Any] = {}
        if evaluation is not None:
            keep = self.eval_keys
            out.update(
                {
                    k: float(v)
                    for k, v in trainer.evaluate().items()
                    if isinstance(v, (int, float)) and (keep is None or k in keep)
                }
            )
        out.update(trend(trainer.state.log_history, self.metrics.trend))
        return out

    def save(self, spec: StageSpec, ctx: Context, s: Settings, trainer: Any, tokenizer: Any) -> None:
        save(trainer, spec.out_dir, tokenizer)

    # --- the data as the trainer sees it (`tunelab data`) --------------------------------------------
    def tokens(
        self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any, shown: int
    ) -> Tokens | None:
        """The prepared training rows as the trainer tokenizes them (`tunelab.training.tokenized`): lengths, what
        `max_length` does, rows without a trained token, and the first `shown` rows with their loss mask. None:
        this stage kind has no token view (the view then shows its rows as read)."""
        return None

    def data_view(
        self, spec: StageSpec, ctx: Context, shown: int = 3, held_out: list[tuple[str, Any]] = ()
    ) -> DataView:
        """`tunelab data`: the stage's own steps (settings, data, tokenizer, prepare, tokens) without the model.
        `held_out`: rows later stages evaluate on, (where, rows), compared with the training rows."""
        s = self.settings(spec, ctx)
        train, evaluation = self.data(spec, ctx, s)
        # A stream has no end: its first rows stand for it (and the rest is never read).
        (train, measured), evaluation = head(train), head(evaluation)[0]
        tokenizer, reason = None, None
        if type(self).tokens is TrainerStage.tokens:
            reason = f"{spec.kind} stages have no token view: the rows are shown as read"
        else:
            try:
                tokenizer = self.tokenizer(spec, ctx, s, train)
            except TokenizerPending as exc:
                reason = str(exc)
        prepared = None
        if tokenizer is not None:
            prepared = self.prepare(spec, ctx, s, tokenizer, train, evaluation)[0]
        view = self.view(spec, ctx, s, tokenizer, (train, evaluation), prepared, shown, list(held_out), reason)
        view.measured = measured
        return view

    def record_data(
        self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, raw: tuple[Any, Any], prepared: Any
    ) -> None:
        """While running: the data view's summary into the stage folder (`data.json`, shown by report.md), from
        the rows and tokenizer the run itself uses. It only reports: a failure here is a warning, not a stop."""
        if not distributed.is_main():
            return
        import logging

        from tunelab.core.runs import write_json

        held_out = ctx.held_out.get(spec.name, [])
        try:
            # A large dataset's summary measures its first SUMMARY_ROWS rows, not the whole run's time again.
            (train, measured), evaluation = head(raw[0], SUMMARY_ROWS), head(raw[1], SUMMARY_ROWS)[0]
            prepared = head(prepared, SUMMARY_ROWS)[0]
            view = self.view(spec, ctx, s, tokenizer, (train, evaluation), prepared, 0, held_out, None)
            view.measured = measured
        except Exception as exc:  # noqa: BLE001 - the summary must not stop a run the checks accepted
            logging.getLogger(__name__).warning("'%s': no data summary (%s: %s)", spec.where, type(exc).__name__, exc)
            return
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        write_json(spec.out_dir / "data.json", view.as_dict())

    def view(
        self,
        spec: StageSpec,
        ctx: Context,
        s: Settings,
        tokenizer: Any,
        raw: tuple[Any, Any],
        prepared: Any,
        shown: int,
        held_out: list[tuple[str, Any]],
        reason: str | None,
    ) -> DataView:
        """The view from the stage's rows (as read, and as prepared) and its tokenizer."""
        train, evaluation = raw
        tokens = None
        if tokenizer is not None and prepared is not None:
            tokens = self.tokens(spec, ctx, s, tokenizer, prepared, shown)
            if tokens is None:
                reason = f"{spec.kind} stages have no token view: the rows are shown as read"
        compared = ([(f"{spec.where}.eval_data", evaluation)] if evaluation is not None else []) + held_out
        notes = [] if compared else ["add eval_data, or an eval stage after this one, to check for contamination"]
        sources, mix = self.sources(spec, ctx, train)
        return DataView(
            stage=spec.name,
            kind=spec.kind,
            sources=sources,
            mix=mix,
            rows=_rows_read(ctx, f"{spec.name}.data", train),
            eval_rows=None if evaluation is None else _rows_read(ctx, f"{spec.name}.eval_data", evaluation),
            tokens=tokens,
            no_tokens=reason if tokens is None else None,
            contamination=contamination(train, compared, notes),
            raw=[] if tokens is not None else [train[i] for i in range(min(shown, len(train)))],
        )

    def sources(self, spec: StageSpec, ctx: Context, train: Any) -> tuple[list[Source], str | None]:
        """Where the training rows come from and the format each was read in (from `load_data`'s report), and
        how they were mixed."""
        report = ctx.data_reports.get(f"{spec.name}.data")
        if report is None:  # a stage that reads its data otherwise: its shape, from the columns
            value = spec.cfg.get("data")
            path = value if isinstance(value, str) else (value or {}).get("path", "?")
            columns = f"columns {', '.join(train.column_names)}"
            return [Source(0, f"{spec.where}.data", str(path), data_shape(train), columns, len(train))], None
        found = [Source(s.index, s.where, s.path, s.format, s.detected_from, s.rows) for s in report.sources]
        return found, report.mix

    # --- planning ---------------------------------------------------------------------------------
    def plan(self, spec: StageSpec, ctx: Context):
        """Memory plan of the model's training from its config alone (None when an earlier stage makes it)."""
        args = self.args(spec, ctx)
        if self.completions:  # approximate: prompts of ~128 tokens plus the sampled completions
            args.max_length = (args.max_completion_length or 256) + 128
        return policy_plan(spec, ctx, args)


PREFERENCE_PROGRESS = {"rewards/margins": "margin", "rewards/accuracies": "pref_acc", "rewards/chosen": "chosen"}


class PreferenceStage(TrainerStage):
    """A Trainer on preference pairs (prompt, chosen, rejected): DPO and its kin (ORPO, CPO, KTO)."""

    chat_columns = ("prompt", "chosen", "rejected")
    data_hint = "name preference pairs (chosen and rejected columns)"
    metrics = Metrics(summary=(*TRAINING, "eval_rewards/accuracies"), progress=PREFERENCE_PROGRESS)
    eval_keys = ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins")
    reference: ClassVar[bool] = False
    """The trainer takes `ref_model`: a frozen copy of the start (with LoRA: the adapter switched off)."""

    data_target = "preference"

    def data(self, spec: StageSpec, ctx: Context, s: Settings) -> tuple[Any, Any]:
        """(train, eval) preference pairs (`data:`, `eval_data:`), their columns checked."""
        train = self.load(spec, ctx, "data")
        require_preferences(train, f"{spec.where}.data")
        evaluation = None
        if spec.cfg.get("eval_data") is not None:
            evaluation = self.load(spec, ctx, "eval_data")
            require_preferences(evaluation, f"{spec.where}.eval_data")
        return train, evaluation

    def prepare(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any, evaluation: Any):
        return chat_pairs(spec.cfg, spec.where, tokenizer, train, evaluation)

    def trainer_kwargs(self, spec, ctx, s, model, tokenizer, train, evaluation) -> dict[str, Any]:
        kwargs = super().trainer_kwargs(spec, ctx, s, model, tokenizer, train, evaluation)
        if self.reference:
            # TRL would rebuild the reference from config._name_or_path, which for a merged SFT adapter
            # names the pre-SFT base: hand it the starting model itself.
            kwargs["ref_model"] = None if s.lora is not None else load_causal_lm(s.model)
        return kwargs


ONLINE_SECTIONS = {
    "model": "policy to train: usually ${sft} (adapter folders are merged first)",
    "data": "prompts (a `prompt` column) and any columns the rewards read: datasets.load_dataset arguments",
    "rewards": "reward functions: module:function callables and/or reward models (${reward}, folder)",
    "reference_column": "column passed to reward functions as `reference` (default: reference, else completion)",
}
ONLINE_PROGRESS = {"reward": "reward", "kl": "kl", "entropy": "entropy"}


class OnlineStage(TrainerStage):
    """A Trainer that samples answers to prompts and scores them with `rewards:` (GRPO, RLOO).

    The reference answers reach the reward functions as `reference` (`reference_column`, default:
    `reference`, else `completion`, which TRL itself withholds from them).
    """

    data_hint = "name a dataset with a `prompt` column"
    data_target = "prompt"
    completions = True
    metrics = Metrics(
        summary=("train_loss", "first_reward", "last_reward"), progress=ONLINE_PROGRESS, trend={"reward": "reward"}
    )

    def data(self, spec: StageSpec, ctx: Context, s: Settings) -> tuple[Any, Any]:
        ds = self.load(spec, ctx, "data")
        require_columns(
            ds, ["prompt"], f"{spec.where}.data", "prompts, which the trainer reads from 'prompt'", "turns", empty=False
        )
        column = spec.cfg.get("reference_column")
        if column is None:
            column = next((c for c in ("reference", "completion") if c in ds.column_names), None)
        else:
            require_columns(ds, [column], f"{spec.where}.data", "reference answers; set reference_column")
        if column is not None and column != "reference":
            if "reference" in ds.column_names:
                ds = ds.remove_columns("reference")
            ds = ds.rename_column(column, "reference")
        return ds, None

    def check_more(self, spec: StageSpec, ctx: Context, s: Settings, train: Any, evaluation: Any) -> None:
        check_vllm(s.args, f"{spec.where}.training")
        rewards = check_rewards(spec, ctx, train)
        if any(value is not None and not callable(value) for _, value in rewards):  # reward models, loadable now
            check_reward_templates(rewards, train, self._chat_prompts(s, train), spec.where)

    def _chat_prompts(self, s: Settings, train: Any) -> bool:
        """Whether the trainer hands the rewards chat turns: chat data, or plain prompts through a template."""
        if len(train) and isinstance(train[0]["prompt"], list):
            return True
        if isinstance(s.chat, str):
            return True
        if s.chat is False or s.model is None:
            return False
        return bool(load_tokenizer(s.model.get("gguf_file", s.model["path"])).chat_template)

    def prepare(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any, evaluation: Any):
        return conversational(train, tokenizer, s.chat, s.system), None

    def tokens(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any, shown: int):
        """The prompts as the policy reads them; the answers are sampled while training."""
        return prompt_tokens(train, tokenizer, s.args, shown, import_name(self.trainer_class).__name__)

    def trainer_kwargs(self, spec, ctx, s, model, tokenizer, train, evaluation) -> dict[str, Any]:
        kwargs = super().trainer_kwargs(spec, ctx, s, model, tokenizer, train, evaluation)
        del kwargs["eval_dataset"]
        return {**kwargs, "reward_funcs": reward_functions(spec, ctx, train)}

    def build(self, spec: StageSpec, ctx: Context, s: Settings, kwargs: dict[str, Any]) -> Any:
        """With `beta > 0` and no LoRA, TRL loads the reference from `model.config._name_or_path`: for a
        merged SFT adapter that is the adapter folder, not the merged weights. The reference is the model
        the policy starts from, so the trainer is handed a frozen copy of it instead."""
        cls = import_name(self.trainer_class)
        if not getattr(s.args, "beta", 0.0) or s.lora is not None:
            return cls(**kwargs)
        import copy
        import sys
        from unittest import mock

        start = copy.deepcopy(kwargs["model"]).eval().requires_grad_(False)
        with mock.patch.object(sys.modules[cls.__module__], "create_model_from_path", lambda *a, **k: start):
            return cls(**kwargs)


def trend(history: list[dict[str, Any]], keys: dict[str, str]) -> dict[str, float]:
    """`first_NAME` and `last_NAME`: the mean of `key` over the first and the last tenth of the logged steps."""
    out: dict[str, float] = {}
    for key, name in keys.items():
        values = [h[key] for h in history if isinstance(h.get(key), (int, float))]
        if values:
            n = max(1, len(values) // 10)
            out[f"first_{name}"] = sum(values[:n]) / n
            out[f"last_{name}"] = sum(values[-n:]) / n
    return out
