"""Stages: one class each, registered by kind, all with the same small interface (`Stage`).

A stage declares

- ``produces_model``: whether later stages can name its output (``${name}``);
- ``sections``: the keys a stage of this kind accepts, each with a one-line description (used by
  `tunelab validate` and for "did you mean" hints);
- ``metrics``: a `Metrics` naming the stage's main numbers (CLI summary, report.md), its per-step
  signals (progress lines, plots) and the ones summarised as first/last;
- ``ranks``: ``"all"`` for stages that train on every process of a distributed run (the Trainer
  shards the data); others run on the main process while the rest wait;
- ``streams``: whether it trains from streamed data (``streaming: true``; sft and pretrain);

and implements

- ``check(spec, ctx) -> None``: everything that can be verified without training (config classes,
  files, dataset columns); raises ``TunelabError``;
- ``run(spec, ctx) -> StageResult``: do the work, write into ``spec.out_dir``;
- ``plan(spec, ctx) -> StagePlan | None``: memory per device, from model configs only;
- ``tokenizer_source(spec, ctx)``: where the tokenizer in the stage's folder comes from (its
  `model:`'s unless the stage says otherwise: pretrain trains one).

Trainer-backed stages are declarations over `tunelab.stages.base.TrainerStage`; evaluation stages over
`tunelab.stages.scoring.ModelsStage`. Stages import shared components (tunelab.models, .data,
.training, .evaluation, ...), never each other. A stage class is imported only when its kind is used,
and its module imports torch and friends inside functions, so listing or structurally checking
stages stays fast.
"""

from __future__ import annotations

import functools
import importlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from tunelab.core.hub import MODEL_FILES
from tunelab.core.refs import REF
from tunelab.models.tokenizers import tokenizer_origin as origin

STAGES: dict[str, str] = {  # kind -> "module:Class" of its `Stage`
    "pretrain": "tunelab.stages.pretrain:Pretrain",
    "sft": "tunelab.stages.sft:SFT",
    "eval": "tunelab.stages.eval:Eval",
    "lm_eval": "tunelab.stages.lm_eval:LmEval",
    "export": "tunelab.stages.export:Export",
    "classify": "tunelab.stages.classify:Classify",
    "reward": "tunelab.stages.reward:Reward",
    "ppo": "tunelab.stages.ppo:PPO",
    "dpo": "tunelab.stages.dpo:DPO",
    "grpo": "tunelab.stages.grpo:GRPO",
    "rloo": "tunelab.stages.rloo:RLOO",
    "kto": "tunelab.stages.kto:KTO",
    "orpo": "tunelab.stages.orpo:ORPO",
    "cpo": "tunelab.stages.cpo:CPO",
    "distill": "tunelab.stages.distill:Distill",
    "diffusion_train": "tunelab.stages.diffusion_train:DiffusionTrain",
    "diffusion_sample": "tunelab.stages.diffusion_sample:DiffusionSample",
    "vlm_build": "tunelab.stages.vlm_build:VlmBuild",
    "vlm_sft": "tunelab.stages.vlm_sft:VlmSft",
}


@functools.cache
def stage(kind: str) -> Stage:
    """The registered stage of a kind (its class imported on first use, one instance per process)."""
    module, _, name = STAGES[kind].partition(":")
    return getattr(importlib.import_module(module), name)()


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
    return stage(kind).metrics


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
    data_reports: dict[str, Any] = field(default_factory=dict)
    """What each stage's data held, by "STAGE.data" / "STAGE.eval_data": `tunelab.data.sources.DataReport`
    (the format read per source, from which columns, its rows)."""
    resume: bool = False
    held_out: dict[str, list[tuple[str, Any]]] = field(default_factory=dict)
    """Per stage, the rows later stages evaluate on, as (where, rows): compared with its training rows for
    contamination (see `Stage.held_out`)."""

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


class Stage:
    """What every stage kind is: a declaration (class attributes) and three steps over a `StageSpec`."""

    produces_model: ClassVar[bool] = False
    ranks: ClassVar[str] = "main"
    """"all": runs on every process of a distributed run; "main": on the main one while the rest wait."""
    sections: ClassVar[dict[str, str]]
    """Every key the stage accepts, with one line each (validate's "did you mean" and `tunelab list`)."""
    metrics: ClassVar[Metrics] = Metrics()
    streams: ClassVar[bool] = False
    """Takes `streaming: true` data (an IterableDataset, read as it trains); others refuse it at validate."""

    def check(self, spec: StageSpec, ctx: Context) -> None:
        """Everything that can be verified without loading weights; raises `TunelabError`."""
        raise NotImplementedError

    def run(self, spec: StageSpec, ctx: Context) -> StageResult:
        raise NotImplementedError

    def plan(self, spec: StageSpec, ctx: Context) -> Any:
        """Memory per device (`StagePlan`), from model configs only; None when there is nothing to plan."""
        return None

    def held_out(self, spec: StageSpec, ctx: Context) -> list[tuple[str, Any]]:
        """The rows this stage evaluates models on, as (where, rows of {"prompt": ...}), for the contamination
        check of earlier stages' training data; none by default."""
        return []

    def tokenizer_source(self, spec: StageSpec, ctx: Context) -> str | None:
        """Where the tokenizer in this stage's output folder comes from: by default, its `model:`'s."""
        if "model" not in spec.cfg:
            return None
        return origin(spec.cfg["model"], ctx, f"{spec.where}.model")
