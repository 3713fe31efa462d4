"""Stages: one module each, all with the same small interface.

A stage module defines

- ``PRODUCES_MODEL``: whether later stages can name its output (``${name}``);
- ``SECTIONS``: the keys a stage of this kind accepts, each with a one-line
  description (used by `tunelab validate` and for "did you mean" hints);
- ``check(spec, ctx) -> None``: everything that can be verified without
  training (config classes, files, dataset columns); raises ``TunelabError``;
- ``run(spec, ctx) -> StageResult``: do the work, write into ``spec.out_dir``;
- ``plan(spec, ctx) -> StagePlan | None``: memory per device, from model configs only;
- ``METRICS``: a `Metrics` naming the stage's main numbers (CLI summary, report.md), its per-step
  signals (progress lines, plots) and the ones summarised as first/last;
- ``RANKS`` (optional): ``"all"`` for stages that train on every process of a distributed run
  (the Trainer shards the data); others run on the main process while the rest wait;
- ``tokenizer_source(spec, ctx)`` (optional): where the tokenizer in the stage's folder comes from,
  when not from its `model:` (pretrain trains one).

Trainer-backed stages declare a `tunelab.stages.base.TrainerStage` (``STAGE``) and take all of the
above from it. Stages import shared components (tunelab.models.adapters, .models, .data, .chat, .rewarding,
.training, ...), never each other. Modules import torch and friends inside their functions only, so
listing or structurally checking stages stays fast; tunelab's own modules are imported at the top.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

from tunelab.core.hub import MODEL_FILES
from tunelab.core.refs import REF
from tunelab.models.loading import tokenizer_origin as origin

STAGES: dict[str, str] = {
    "pretrain": "tunelab.stages.pretrain",
    "sft": "tunelab.stages.sft",
    "eval": "tunelab.stages.eval",
    "lm_eval": "tunelab.stages.lm_eval",
    "export": "tunelab.stages.export",
    "classify": "tunelab.stages.classify",
    "reward": "tunelab.stages.reward",
    "ppo": "tunelab.stages.ppo",
    "dpo": "tunelab.stages.dpo",
    "grpo": "tunelab.stages.grpo",
    "rloo": "tunelab.stages.rloo",
    "kto": "tunelab.stages.kto",
    "orpo": "tunelab.stages.orpo",
    "cpo": "tunelab.stages.cpo",
    "distill": "tunelab.stages.distill",
    "diffusion_train": "tunelab.stages.diffusion_train",
    "diffusion_sample": "tunelab.stages.diffusion_sample",
    "vlm_build": "tunelab.stages.vlm_build",
    "vlm_sft": "tunelab.stages.vlm_sft",
}


def stage_module(kind: str) -> ModuleType:
    return importlib.import_module(STAGES[kind])


@dataclass(frozen=True)
class Metrics:
    """The metric names a stage declares, so summaries, reports and progress lines show them.

    - `summary`: keys of the stage's metrics shown in the CLI's run table and report.md's stage table;
    - `progress`: per-step keys of the trainer's logs, with the short label the progress line prints
      (report.md plots the first four);
    - `trend`: per-step keys summarised in the stage's metrics as `first_NAME` / `last_NAME`;
    - `throttle`: the loop logs every step; print only every `logging_steps` (PPO).
    """

    summary: tuple[str, ...] = ()
    progress: dict[str, str] = field(default_factory=dict)
    trend: dict[str, str] = field(default_factory=dict)
    throttle: bool = False


TRAINING = ("train_loss", "eval_loss")  # what every Trainer-backed stage reports first


def metrics_of(kind: str | None) -> Metrics:
    """The declared metrics of a stage kind (empty for an unknown kind, e.g. from an older run)."""
    if kind not in STAGES:
        return Metrics()
    return getattr(stage_module(kind), "METRICS", Metrics())


@dataclass
class StageSpec:
    """One stage of a recipe, as a stage function sees it."""

    name: str
    kind: str
    cfg: dict[str, Any]
    out_dir: Path

    @property
    def where(self) -> str:
        return f"stages.{self.name}"


@dataclass
class StageResult:
    """What a stage hands back: metrics for metrics.json, and its model folder (if any)."""

    metrics: dict[str, Any] = field(default_factory=dict)
    model: Path | None = None
    files: dict[str, str] = field(default_factory=dict)
    fingerprints: dict[str, str] = field(default_factory=dict)


@dataclass
class Context:
    """What a stage may know about the run around it."""

    seed: int
    run_dir: Path
    outputs: dict[str, Path] = field(default_factory=dict)
    """Model folder of each stage that ran (or will run, during checks) before this one."""
    configs: dict[str, Any] = field(default_factory=dict)
    """Planned transformers config of models that earlier stages will build (for checks and plans)."""
    kinds: dict[str, str] = field(default_factory=dict)
    """Stage kind of each stage in the recipe (`reward`, `sft`, ...), so checks can say what a ${ref} is."""
    tokenizers: dict[str, str] = field(default_factory=dict)
    """Where each earlier stage's tokenizer comes from (see `models.tokenizer_origin`), for checks."""
    checking: bool = False
    """True during `validate`: earlier stages' outputs may not exist yet."""
    resume: bool = False

    def resolve_ref(self, value: Any) -> Any:
        """Replace a `${stage}` reference with that stage's output folder."""
        if isinstance(value, str):
            match = REF.match(value.strip())
            if match:
                return str(self.outputs[match.group(1)])
        return value

    def is_pending(self, value: Any) -> bool:
        """True when `value` names an earlier stage's output that does not exist yet.

        A stage folder's files count only once its `stage.json` says `completed` (written after the
        model and tokenizer are saved): a stage killed mid-save leaves a config without its tokenizer,
        and checks must take that model as still to come, not refuse the run that would finish it.
        """
        if not (isinstance(value, str) and REF.match(value.strip())):
            return False
        folder = Path(self.resolve_ref(value))
        record = folder / "stage.json"
        if record.is_file() and _status(record) != "completed":
            return True
        return not any((folder / name).exists() for name in MODEL_FILES)


def _status(path: Path) -> Any:
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        return None


def tokenizer_origin(module: ModuleType, spec: StageSpec, ctx: Context) -> str | None:
    """Where the tokenizer in a model-producing stage's folder comes from: the stage's own rule, else its model's."""
    if hasattr(module, "tokenizer_source"):
        return module.tokenizer_source(spec, ctx)
    if "model" not in spec.cfg:
        return None

    return origin(spec.cfg["model"], ctx, f"{spec.where}.model")
