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
    shared = {"tunelab.stages", "tunelab.stages.base", "tunelab.stages.scoring"}
    for name, deps in graph.items():
        if name in shared:
            continue
        # A stage imports no other stage; a library module imports no stage (no stage's private helpers).
        assert {d for d in deps if d.startswith("tunelab.stages.") and d not in shared} == set(), name


# Modules that import torch (or transformers) at their top, so that their classes are ordinary classes: only
# code that trains or scores imports them, from inside its functions. Everything else is light.
HEAVY_MODULES = {
    "tunelab.training.ppo",  # the PPO trainer, a transformers Trainer subclass
    "tunelab.training.ppo_config",  # its TrainingArguments subclass
    "tunelab.training.callbacks",  # the Trainer callbacks tunelab adds
    "tunelab.diffusion.classifier",  # the image-quality CNN (an nn.Module)
    "tunelab.diffusion.trainer",  # the diffusion Trainer, its EMA and sample-grid callbacks
}
HEAVY_PACKAGES = ("tunelab.metrics.",)  # `evaluate` metric scripts, loaded by path


def test_light_modules_import_no_ml_library() -> None:
    """Every module but the heavy ones above imports without torch: the CLI starts fast, and tunelab's own
    modules can be imported at the top of each file. A light module imports a heavy one only inside a
    function (where it trains or scores), never at its top."""
    modules = sorted(_imports())
    assert set(modules) >= HEAVY_MODULES, HEAVY_MODULES - set(modules)  # the list names real modules
    light = [m for m in modules if m not in HEAVY_MODULES and not m.startswith(HEAVY_PACKAGES)]
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


# Which packages each package may import: a layer imports only those below it (and itself). The top level
# (the Python API, recipe, pipeline, reports, the CLI) may import anything; nothing below imports it.
LAYERS: dict[str, set[str]] = {
    "core": set(),
    "metrics": {"core", "data", "models", "diffusion", "evaluation"},  # the scripts score with the components
    "models": {"core"},
    "data": {"core"},
    "diffusion": {"core", "data", "models"},
    "evaluation": {"core", "data", "models", "diffusion"},
    "training": {"core", "data", "models"},
    "vision": {"core", "data", "models", "evaluation"},
    "serving": {"core", "data", "models", "vision"},
    "exporting": {"core", "data", "models", "evaluation"},
    "stages": {"core", "data", "models", "diffusion", "evaluation", "training", "vision", "metrics", "exporting"},
}
TOP = {"tunelab", "tunelab.__main__", "tunelab.recipe", "tunelab.pipeline", "tunelab.reports", "tunelab.rewards"}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_packages_import_only_the_layers_below() -> None:
    graph = _imports()
    packages = {_package(m) for m in graph if m not in TOP}
    assert packages - {"cli"} <= set(LAYERS), packages - set(LAYERS)  # a new package declares its layer here
    wrong = []
    for name, deps in sorted(graph.items()):
        package = _package(name)
        if name in TOP or package == "cli":
            continue
        allowed = LAYERS[package] | {package}
        wrong += [f"{name} -> {d}" for d in sorted(deps) if d in TOP or _package(d) not in allowed]
    assert wrong == []


def test_top_level_holds_only_the_api_and_the_run() -> None:
    """Everything else lives in a package that names what it holds."""
    flat = {p.stem for p in SRC.glob("*.py")}
    assert flat == {"__init__", "__main__", "recipe", "pipeline", "reports", "rewards"}


def test_eval_modes_are_declarations_over_one_base() -> None:
    """Each way of scoring models is a `ModelsStage`: the keys it takes, its settings, its steps. The eval
    stage's keys are exactly its modes' keys, so a key no mode takes cannot be accepted silently."""
    from tunelab.stages.eval import MODES, SECTIONS, Eval
    from tunelab.stages.lm_eval import LmEval
    from tunelab.stages.scoring import ModelsStage

    assert issubclass(LmEval, ModelsStage)
    for mode in MODES:
        assert issubclass(mode, ModelsStage) and mode.title != ModelsStage.title, mode
        assert set(mode.sections) <= set(SECTIONS) and {"model", "models"} <= set(mode.sections), mode
        assert callable(mode.claims)
        # A mode overrides the steps, never the loop.
        assert {"check", "run", "plan"}.isdisjoint(vars(mode)) or mode is LmEval, mode
    assert set().union(*(m.sections for m in MODES)) == set(SECTIONS) == set(Eval.sections)


def _private_uses(path: Path, modules: set[str]) -> list[str]:
    """`from tunelab.x import _name` and `x._name` (x a tunelab module) in one file, as "line: what"."""
    tree = ast.parse(path.read_text())
    aliases: dict[str, str] = {}  # local name -> the tunelab module it is
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("tunelab"):
            for alias in node.names:
                if alias.name.startswith("_"):
                    found.append(f"{node.lineno}: from {node.module} import {alias.name}")
                elif f"{node.module}.{alias.name}" in modules:
                    aliases[alias.asname or alias.name] = f"{node.module}.{alias.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("tunelab"):
                    aliases[alias.asname or alias.name] = alias.name if alias.asname else "tunelab"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            base = node.value
            while isinstance(base, ast.Attribute):
                base = base.value
            if isinstance(base, ast.Name) and base.id in aliases:
                found.append(f"{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_module_uses_another_modules_private_names() -> None:
    """An underscore name is its module's own: a name another module needs is public (or moves to where it is
    used), so a module can change its private helpers without breaking a distant import."""
    modules = {_module_name(p) for p in SRC.rglob("*.py")}
    found = {_module_name(path): uses for path in sorted(SRC.rglob("*.py")) if (uses := _private_uses(path, modules))}
    assert found == {}


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
