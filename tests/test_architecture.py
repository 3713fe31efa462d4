"""The stage layer's shape: every registered stage satisfies the interface, stages never import each
other, library modules never import a stage, and tunelab's own import graph has no cycle."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.stages import STAGES, Metrics, Stage
from tunelab.stages import stage as registered
from tunelab.stages.base import HOOKS, Settings, TrainerStage, import_name

SRC = Path(__file__).resolve().parents[1] / "src" / "tunelab"


def _module_name(path: Path) -> str:
    name = ".".join(path.relative_to(SRC.parent).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _imports() -> dict[str, set[str]]:
    """Each tunelab module's imports of tunelab modules, at its top and inside its functions alike."""
    modules = {_module_name(p): p for p in SRC.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunelab"):
                for alias in node.names:  # `from tunelab import distributed` imports a submodule
                    sub = f"{node.module}.{alias.name}"
                    found.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("tunelab"))
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_import_graph_has_no_cycle() -> None:
    graph = _imports()
    graph.pop("tunelab", None)  # the package's __init__ is the public API over everything; nothing imports it
    for deps in graph.values():
        deps.discard("tunelab")
    assert _cycles(graph) == []


def test_stages_import_components_never_each_other() -> None:
    graph = _imports()
    shared = {"tunelab.stages", "tunelab.stages.base"}
    for name, deps in graph.items():
        if name in shared:
            continue
        # A stage imports no other stage; a library module imports no stage (no stage's private helpers).
        assert {d for d in deps if d.startswith("tunelab.stages.") and d not in shared} == set(), name


# Modules that import torch at their top: loops tunelab owns, imported only by a stage's run(); metric scripts.
HEAVY_MODULES = ("tunelab.training.ppo_trainer", "tunelab.diffusion.trainer")
HEAVY_PACKAGES = ("tunelab.metrics.",)


def test_light_modules_import_no_ml_library() -> None:
    """Every module but the loops of HEAVY_MODULES and the metric scripts imports without torch: the CLI
    starts fast, and tunelab's own modules can be imported at the top of each file."""
    light = [name for name in sorted(_imports()) if name not in HEAVY_MODULES and not name.startswith(HEAVY_PACKAGES)]
    code = "import sys\n" + "".join(f"import {m}\n" for m in light) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_every_stage_satisfies_the_interface(kind: str) -> None:
    stage = registered(kind)
    assert isinstance(stage, Stage) and type(stage).__name__ == STAGES[kind].partition(":")[2]
    assert isinstance(stage.produces_model, bool)
    assert stage.ranks in ("all", "main")
    assert isinstance(stage.metrics, Metrics)
    assert all(isinstance(k, str) for k in stage.metrics.summary)
    assert isinstance(stage.sections, dict) and stage.sections
    assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in stage.sections.items())
    for name in ("check", "run", "plan", "tokenizer_source"):
        params = list(inspect.signature(getattr(stage, name)).parameters)
        assert params[:2] == ["spec", "ctx"], (kind, name, params)
    module = importlib.import_module(STAGES[kind].partition(":")[0])
    assert not {"STAGE", "check", "run", "plan", "PRODUCES_MODEL", "METRICS"} & set(vars(module)), (
        kind
    )  # no module tails
    if not isinstance(stage, TrainerStage):
        return
    # A Trainer-backed stage: a declaration over the base.
    config = import_name(stage.config_class)
    assert dataclasses.is_dataclass(config)
    from transformers import TrainingArguments

    assert issubclass(config, TrainingArguments), stage.config_class
    assert callable(import_name(stage.trainer_class))
    fields = {f.name for f in dataclasses.fields(config)}
    assert set(stage.defaults) <= fields, set(stage.defaults) - fields
    assert "training" in stage.sections and "data" in stage.sections
    assert ("quantization" in stage.sections) <= ("lora" in stage.sections)  # QLoRA needs an adapter


def test_settings_are_typed_not_a_bag() -> None:
    """What a stage parses beyond the common sections is a typed `Settings` subclass, not a dict."""
    assert "extra" not in {f.name for f in dataclasses.fields(Settings)}


@pytest.mark.parametrize("kind", sorted(k for k in STAGES if isinstance(registered(k), TrainerStage)))
def test_trainer_stages_override_only_the_hooks_with_the_bases_signatures(kind: str) -> None:
    """A method a Trainer stage defines is one of the base's `HOOKS` (or the `Stage` interface), with the
    base's parameters: a hook the base no longer calls, or one whose arguments drifted, would never run as
    written. A stage's own helpers are private (`_name`) or module functions."""
    interface = {"check", "run", "plan", "tokenizer_source"}
    assert set(HOOKS) <= set(vars(TrainerStage)), set(HOOKS) - set(vars(TrainerStage))
    for cls in type(registered(kind)).__mro__:
        if cls is TrainerStage:
            break
        for name, value in vars(cls).items():
            if name.startswith("_") or not inspect.isfunction(value):
                continue
            assert name in HOOKS or name in interface, (kind, cls.__name__, name)
            ours = list(inspect.signature(value).parameters)
            base = list(inspect.signature(getattr(TrainerStage, name)).parameters)
            assert ours == base, (kind, cls.__name__, name, ours, base)
