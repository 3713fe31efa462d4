"""The stage layer's shape: every registered stage satisfies the interface, stages never import each
other, library modules never import a stage, and tunelab's own import graph has no cycle."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import subprocess
import sys
from pathlib import Path

import pytest

from tunelab.stages import STAGES, Metrics, stage_module
from tunelab.stages.base import TrainerStage, import_name

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


def test_light_modules_import_no_ml_library() -> None:
    """Every module but the PPO loop and metric scripts imports without torch: the CLI starts fast, and
    tunelab's own modules can be imported at the top of each file."""
    heavy = [
        name
        for name in sorted(_imports())
        if name not in ("tunelab.training.ppo_trainer",) and not name.startswith("tunelab.metrics.")
    ]
    code = "import sys\n" + "".join(f"import {m}\n" for m in heavy) + "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("kind", sorted(STAGES))
def test_every_stage_satisfies_the_interface(kind: str) -> None:
    module = stage_module(kind)
    assert isinstance(module.PRODUCES_MODEL, bool)
    assert getattr(module, "RANKS", "main") in ("all", "main")
    assert isinstance(module.METRICS, Metrics)
    assert all(isinstance(k, str) for k in module.METRICS.summary)
    assert isinstance(module.SECTIONS, dict) and module.SECTIONS
    assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in module.SECTIONS.items())
    for name in ("check", "run", "plan"):
        params = list(inspect.signature(getattr(module, name)).parameters)
        assert params[:2] == ["spec", "ctx"], (kind, name, params)
    stage = getattr(module, "STAGE", None)
    if stage is None:
        return
    # A Trainer-backed stage: a declaration over the base, its module interface taken from it.
    assert isinstance(stage, TrainerStage)
    declared = (stage.produces_model, stage.ranks, stage.sections, stage.metrics)
    assert declared == (module.PRODUCES_MODEL, module.RANKS, module.SECTIONS, module.METRICS)
    assert module.run == stage.run and module.check == stage.check and module.plan == stage.plan
    config = import_name(stage.config_class)
    assert dataclasses.is_dataclass(config)
    from transformers import TrainingArguments

    assert issubclass(config, TrainingArguments), stage.config_class
    assert callable(import_name(stage.trainer_class))
    fields = {f.name for f in dataclasses.fields(config)}
    assert set(stage.defaults) <= fields, set(stage.defaults) - fields
    assert "training" in stage.sections and "data" in stage.sections
    assert ("quantization" in stage.sections) <= ("lora" in stage.sections)  # QLoRA needs an adapter
