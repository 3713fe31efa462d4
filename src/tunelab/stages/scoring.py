"""One base for the stages that score models: a stage is a declaration over the per-model loop.

An evaluation stage takes one `model:` or several `models: {label: model}` and scores each on the same
data. What every such stage does the same way lives here, once:

- the models: `model:` (labelled `model`) or `models:`, each with the key path its errors name;
- `check`: the settings parsed, the data read, then every model checked (tokenizer, length, shapes)
  before any model loads, so `validate` finds a bad third model before the first one is scored;
- `run`: for each model in turn, load, score, write `predictions-LABEL.jsonl`, release, so only one
  model is in memory at a time; the per-model numbers are the stage's metrics (the CLI and report.md
  show them side by side);
- `plan`: the largest model's plan.

A mode declares its `sections` (the keys it takes: a key it does not take is refused in one line, by
the stage that picked the mode), a `Settings` dataclass that `settings()` fills once, and the steps
that differ: `data`, `check_model`, `load`, `score`, `plan_model`, `finish`. Hooks receive the parsed
settings and the data, never the raw sections twice.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from typing import Any, ClassVar

from tunelab.core.errors import TunelabError
from tunelab.core.runs import write_atomic
from tunelab.evaluation.endpoints import is_endpoint
from tunelab.models.spec import labelled_models, model_spec, resolve_spec
from tunelab.stages import Context, Metrics, Stage, StageResult, StageSpec

MODEL_SECTIONS = {
    "model": "model to evaluate: hub id, folder, adapter folder, or ${stage}",
    "models": "several models to compare, as {label: model}",
}


@dataclass(frozen=True)
class Scored:
    """One model's result: its metrics (a row of the stage's table) and its per-example rows."""

    metrics: dict[str, Any]
    rows: list[dict[str, Any]] | None = None
    """Written to `predictions-LABEL.jsonl` (None: the mode writes no per-example file)."""
    files: dict[str, str] | None = None
    """Other files the mode wrote for this model (images, harness results), by name."""


@dataclass(frozen=True)
class Entry:
    """A model to score: its label, the recipe's value, and the key path its errors name."""

    label: str
    value: Any
    where: str

    @property
    def endpoint(self) -> bool:
        """A model served over OpenAI's API (`{openai_base_url, model}`), not one tunelab loads."""
        return is_endpoint(self.value)

    @property
    def path(self) -> str | None:
        path = self.value.get("path") if isinstance(self.value, dict) else self.value
        return path if isinstance(path, str) else None

    def spec(self) -> dict[str, Any]:
        """from_pretrained arguments of the model as written (a ${stage} not yet resolved)."""
        return model_spec(self.value, self.where)

    def resolved(self, ctx: Context, materialize: bool = True) -> dict[str, Any]:
        """from_pretrained arguments with ${stage} resolved (GGUF sources materialized unless asked not to)."""
        mspec = self.spec()
        return resolve_spec({**mspec, "path": ctx.resolve_ref(mspec["path"])}, self.where, materialize=materialize)


def entries(spec: StageSpec) -> list[Entry]:
    """The stage's models, in the order written."""
    several = "models" in spec.cfg
    return [
        Entry(str(label), value, f"{spec.where}.models.{label}" if several else f"{spec.where}.model")
        for label, value in labelled_models(spec.cfg, spec.where).items()
    ]


class ModelsStage(Stage):
    """A stage that scores one or more models on the same data, one model in memory at a time."""

    produces_model: ClassVar[bool] = False
    ranks: ClassVar[str] = "main"
    metrics: ClassVar[Metrics] = Metrics()  # per-model metrics: the CLI and report.md show them as a table
    title: ClassVar[str] = "models"
    """What this mode scores, for messages: "generated answers", "diffusion pipelines", ..."""
    endpoints: ClassVar[bool] = False
    """Whether it can score a served model (`{openai_base_url, model}`): only what the API returns counts."""

    # --- the steps a mode declares ----------------------------------------------------------------
    def settings(self, spec: StageSpec, ctx: Context) -> Any:
        """Every section the mode takes, parsed and checked once (a dataclass); `check`, `plan`, `run` share it."""
        return None

    def data(self, spec: StageSpec, ctx: Context, s: Any, running: bool) -> Any:
        """What every model is scored against, read once. `running` is False during validate."""
        return None

    def check_model(self, spec: StageSpec, ctx: Context, s: Any, data: Any, entry: Entry) -> None:
        """What can be checked of one model without its weights (its stage may not have run yet)."""

    def load(self, spec: StageSpec, ctx: Context, s: Any, entry: Entry) -> Any:
        """The model, ready to score."""
        raise NotImplementedError

    def score(self, spec: StageSpec, ctx: Context, s: Any, data: Any, entry: Entry, model: Any) -> Scored:
        raise NotImplementedError

    def finish(self, spec: StageSpec, ctx: Context, s: Any, data: Any, scored: dict[str, Scored]) -> dict[str, str]:
        """After every model: files of the whole stage (report samples, ...), by name."""
        return {}

    def fingerprints(self, spec: StageSpec, s: Any, data: Any) -> dict[str, str]:
        """What `--resume` compares to decide whether the stage's results still hold."""
        return {}

    def plan_model(self, spec: StageSpec, ctx: Context, s: Any, entry: Entry) -> Any:
        """Memory plan of scoring one model (None: nothing to plan)."""
        return None

    # --- the loop, the same for every mode --------------------------------------------------------
    def entries(self, spec: StageSpec) -> list[Entry]:
        """The stage's models; a served one where this mode needs the model itself is one line."""
        found = entries(spec)
        for entry in found:
            if entry.endpoint and not self.endpoints:
                raise TunelabError(
                    f"'{entry.where}' is a served endpoint, but {self.title} need the model itself: name its folder, "
                    "hub id or ${stage} to score it in-process"
                )
        return found

    def check(self, spec: StageSpec, ctx: Context) -> None:
        s = self.settings(spec, ctx)
        data = self.data(spec, ctx, s, running=False)
        for entry in self.entries(spec):
            self.check_model(spec, ctx, s, data, entry)

    def run(self, spec: StageSpec, ctx: Context) -> StageResult:
        from transformers import set_seed

        s = self.settings(spec, ctx)
        data = self.data(spec, ctx, s, running=True)
        spec.out_dir.mkdir(parents=True, exist_ok=True)
        scored: dict[str, Scored] = {}
        files: dict[str, str] = {}
        for entry in self.entries(spec):
            set_seed(ctx.seed)  # each model scored as if alone: sampling does not depend on the order
            model = self.load(spec, ctx, s, entry)
            try:
                result = self.score(spec, ctx, s, data, entry, model)
            finally:
                del model
                release()
            if result.rows is not None:
                path = spec.out_dir / f"predictions-{entry.label}.jsonl"
                write_atomic(path, "".join(json.dumps(row, default=str) + "\n" for row in result.rows))
                files[f"predictions-{entry.label}"] = str(path)
            files.update(result.files or {})
            scored[entry.label] = result
        files.update(self.finish(spec, ctx, s, data, scored))
        metrics = {label: result.metrics for label, result in scored.items()}
        return StageResult(metrics=metrics, files=files, fingerprints=self.fingerprints(spec, s, data))

    def plan(self, spec: StageSpec, ctx: Context) -> Any:
        """The plan of the largest model: the models are scored one at a time."""
        s = self.settings(spec, ctx)
        plans = [p for entry in self.entries(spec) if (p := self.plan_model(spec, ctx, s, entry)) is not None]
        return max(plans, key=lambda p: p.total) if plans else None


def release() -> None:
    """Give a scored model's memory back before the next one loads."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
