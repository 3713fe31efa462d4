"""On-policy distillation with `trl.DistillationTrainer`: the student answers the prompts itself, and
learns the teacher's next-token distribution on its own answers (generalised JSD; Agarwal et al. 2024,
GKD with every batch on-policy).

`model` is the student, `teacher` any causal LM with the same vocabulary (a folder, a hub id, or an
earlier stage: `${dpo}`). Data are prompts (a `prompt` column, plain or chat). `training` is
`trl.DistillationConfig`: `beta` chooses the divergence (0: forward KL, 1: reverse KL, 0.5: JSD),
`temperature` the sampling and the loss, `max_completion_length` the student's answers. The teacher is
loaded as tunelab loads every model (adapters merged, GGUF files converted) and handed to the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.data.datasets import require_columns
from tunelab.models.chat_templates import conversational
from tunelab.models.loading import load_causal_lm
from tunelab.models.preflight import check_language_model
from tunelab.models.spec import model_config, stage_model
from tunelab.models.tokenizers import same_tokenizer, tokenizer_origin
from tunelab.stages import TRAINING, Context, Metrics, StageSpec
from tunelab.stages.base import Settings, TrainerStage, sections
from tunelab.training.tokenized import prompt_tokens

# TRL's Trainer would not read these: the recipe names the teacher with `teacher:`.
NOT_TRAINER_KEYS = ("teacher_model_name_or_path", "teacher_model_init_kwargs")


@dataclass(kw_only=True)
class DistillSettings(Settings):
    teacher: dict[str, Any] | None
    """from_pretrained arguments of `teacher:` (None while checking, when an earlier stage makes it)."""


class Distill(TrainerStage):
    config_class = "trl:DistillationConfig"
    trainer_class = "trl:DistillationTrainer"
    data_hint = "name a dataset with a `prompt` column (the student answers the prompts)"
    data_target = "prompt"
    completions = True  # the student learns on its own sampled answers
    model_hint = "the student: a model smaller than the teacher, with its vocabulary (usually an SFT model)"
    metrics = Metrics(summary=TRAINING, progress={"entropy": "entropy", "completions/mean_length": "length"})
    sections = sections(
        {
            "model": "the student: a hub id, a folder or ${stage} (adapter folders are merged first)",
            "teacher": "the teacher: a causal LM with the student's vocabulary (${stage}, folder, hub id, GGUF)",
            "data": "prompts (a `prompt` column): datasets.load_dataset arguments",
            "eval_data": "held-out prompts (default split: test); eval_loss is the divergence on them",
            "training": "trl.DistillationConfig fields (beta, temperature, max_completion_length, learning_rate, ...)",
        }
    )

    def training_values(self, spec: StageSpec, ctx: Context) -> dict[str, Any]:
        values = super().training_values(spec, ctx)
        for key in NOT_TRAINER_KEYS:
            if key in values:
                raise TunelabError(f"'{spec.where}.training.{key}' is not read by the trainer: set `teacher:`")
        return values

    def settings(self, spec: StageSpec, ctx: Context) -> DistillSettings:
        common = super().settings(spec, ctx)
        teacher = stage_model(spec, ctx, "the teacher: a causal LM with the student's vocabulary", "teacher")
        check_language_model(spec.cfg["teacher"], ctx, f"{spec.where}.teacher", "the teacher of a distill stage is")
        _check_vocabularies(spec, ctx)
        return DistillSettings(**vars(common), teacher=teacher)

    def data(self, spec: StageSpec, ctx: Context, s: Settings) -> tuple[Any, Any]:
        out = []
        for key in ("data", "eval_data"):
            if key == "eval_data" and spec.cfg.get(key) is None:
                out.append(None)
                continue
            ds = self.load(spec, ctx, key)
            require_columns(
                ds, ["prompt"], f"{spec.where}.{key}", "prompts for the student to answer", "turns", empty=False
            )
            out.append(ds.select_columns(["prompt"]))  # the student answers: reference answers are not used
        return out[0], out[1]

    def prepare(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any, evaluation: Any):
        return [None if ds is None else conversational(ds, tokenizer, s.chat, s.system) for ds in (train, evaluation)]

    def trainer_kwargs(self, spec, ctx, s, model, tokenizer, train, evaluation) -> dict[str, Any]:
        kwargs = super().trainer_kwargs(spec, ctx, s, model, tokenizer, train, evaluation)
        return {**kwargs, "teacher_model": load_causal_lm(s.teacher).eval()}

    def plan(self, spec: StageSpec, ctx: Context):
        """The student's training plan plus the frozen teacher's weights (approximate: answers are short,
        so activations are the student's)."""
        from tunelab.models.plan import model_structure

        plan = super().plan(spec, ctx)
        teacher = model_config(spec.cfg["teacher"], ctx, f"{spec.where}.teacher")
        if plan is not None and teacher is not None:
            plan.parts["teacher"] = model_structure(teacher)[1] * 4.0
            plan.notes.append("teacher frozen, in fp32")
        return plan

    def tokens(self, spec: StageSpec, ctx: Context, s: Settings, tokenizer: Any, train: Any, shown: int):
        """The prompts as the student reads them; its answers are sampled while training."""
        return prompt_tokens(train, tokenizer, s.args, shown, "DistillationTrainer")


def _check_vocabularies(spec: StageSpec, ctx: Context) -> None:
    """The teacher scores the student's token ids: both need one vocabulary (TRL checks only its size, late)."""
    student = model_config(spec.cfg["model"], ctx, f"{spec.where}.model")
    teacher = model_config(spec.cfg["teacher"], ctx, f"{spec.where}.teacher")
    if student is not None and teacher is not None and student.vocab_size != teacher.vocab_size:
        raise TunelabError(
            f"'{spec.where}.teacher' has a vocabulary of {teacher.vocab_size} tokens and the student "
            f"{student.vocab_size}: on-policy distillation compares their next-token distributions, so both "
            "need the same tokenizer; pick a student of the teacher's family"
        )
    ours = tokenizer_origin(spec.cfg["model"], ctx, f"{spec.where}.model")
    theirs = tokenizer_origin(spec.cfg["teacher"], ctx, f"{spec.where}.teacher")
    if not same_tokenizer(ours, theirs):
        raise TunelabError(
            f"'{spec.where}.teacher' uses a different tokenizer ({theirs}) from the student ({ours}): the "
            "teacher scores the student's token ids, so both need the same one"
        )
