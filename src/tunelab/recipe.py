"""Recipes: YAML files that describe a run, with `a.b=c` overrides.

This module only parses and checks structure (known stages, known sections,
well-formed references); it imports no ML library, so errors in a recipe come
back in milliseconds. The deeper checks against the libraries' own config
classes live with each stage (``tunelab.stages.*.check``).

A recipe is either a single stage::

    stage: sft
    model: Qwen/Qwen2.5-0.5B
    data: recipes/data/arith_qa
    training: {learning_rate: 2.0e-4}

or a pipeline, a mapping of stage names to stages, in order::

    output_dir: runs/quickstart
    stages:
      pretrain: {stage: pretrain, ...}
      sft: {stage: sft, model: "${pretrain}", ...}

``${name}`` stands for the model that the earlier stage ``name`` produced.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import TunelabError, closest, unknown_key

TOP_LEVEL_KEYS = {"name", "description", "output_dir", "seed", "stages"}
PATH_SHORTHANDS = {"data", "eval_data", "model"}
REF = re.compile(r"^\$\{([A-Za-z_][\w-]*)\}$")


def recipes_root() -> Path:
    """Folder of the shipped recipes: inside the wheel, or the repo's `recipes/`."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "recipes", here.parents[1] / "recipes"):
        if candidate.is_dir():
            return candidate
    raise TunelabError("the shipped recipes are missing from this installation: reinstall tunelab")


def shipped_recipes() -> dict[str, Path]:
    """Shipped recipe names (path under recipes/ without `.yaml`) to their files."""
    root = recipes_root()
    return {
        str(p.relative_to(root).with_suffix("")): p
        for p in sorted(root.rglob("*.yaml"))
        if "data" not in p.relative_to(root).parts[:1] and "accelerate" not in p.relative_to(root).parts[:1]
    }


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file from a path, or from a shipped recipe's name (`quickstart`, `sft/lora-arith`)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    key = str(name_or_path).removesuffix(".yaml")
    if key in shipped:
        return shipped[key]
    if path.exists():
        raise TunelabError(f"recipe '{path}' is a folder, not a YAML file")
    guess = closest(key, shipped)
    hint = f"did you mean '{guess}'?" if guess else "see `tunelab list` for the shipped recipes"
    raise TunelabError(f"recipe '{name_or_path}' not found: no such file or shipped recipe; {hint}")


@dataclass
class Recipe:
    """A parsed recipe: normalised to a pipeline of named stages."""

    data: dict[str, Any]
    path: Path | None = None
    overrides: list[str] = field(default_factory=list)

    @property
    def stages(self) -> dict[str, dict[str, Any]]:
        return self.data["stages"]

    @property
    def seed(self) -> int:
        return self.data["seed"]

    @property
    def output_dir(self) -> Path:
        return Path(self.data["output_dir"])

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.data, sort_keys=False)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise TunelabError(f"cannot read recipe '{path}': {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise TunelabError(f"recipe '{path}' is not valid YAML{where}: {problem}") from None
    if data is None:
        raise TunelabError(f"recipe '{path}' is empty: it needs at least a `stage:` or `stages:`")
    if not isinstance(data, dict):
        raise TunelabError(f"recipe '{path}' must be a YAML mapping (key: value), not {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """An override's value, read as YAML (`1e-4`, `true`, `[q_proj, v_proj]`, `null`)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` override in place.

    In a pipeline, a path that starts with a stage name addresses that stage
    (`sft.training.max_steps=5`), and one that starts with a section name
    addresses every stage that has that section (`training.use_cpu=true`).
    """
    if "=" not in override:
        raise TunelabError(f"override '{override}' must look like key.path=value (e.g. training.learning_rate=1e-4)")
    key, _, raw = override.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise TunelabError(f"override '{override}' has an empty key")
    value = parse_value(raw)
    stages = data.get("stages")
    if parts[0] in TOP_LEVEL_KEYS or not isinstance(stages, dict):
        targets = [(data, parts)]
    elif parts[0] in stages:
        targets = [(stages[parts[0]], parts[1:])]
    elif len(stages) == 1:
        targets = [(next(iter(stages.values())), parts)]
    else:
        targets = [(s, parts) for s in stages.values() if isinstance(s, dict) and parts[0] in s]
        if not targets:
            guess = closest(parts[0], [*TOP_LEVEL_KEYS, *stages, *_section_names(stages)])
            hint = f"did you mean '{guess}'?" if guess else f"start it with a stage name ({', '.join(stages)})"
            raise TunelabError(f"override '{override}': no stage has a '{parts[0]}' section; {hint}")
    for node, path in targets:
        if not path:
            raise TunelabError(f"override '{override}' replaces a whole stage; set its keys one by one")
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif isinstance(child, str) and part in PATH_SHORTHANDS:
                child = node[part] = {"path": child}  # `data: x` is short for `data: {path: x}`
            elif not isinstance(child, dict):
                raise TunelabError(f"override '{override}': '{part}' is {child!r}, not a section with keys")
            node = child
        node[path[-1]] = value


def _section_names(stages: dict[str, Any]) -> set[str]:
    from tunelab.stages import STAGES, stage_module

    kinds = {s.get("stage") for s in stages.values() if isinstance(s, dict)} & set(STAGES)
    return {key for kind in kinds for key in stage_module(kind).SECTIONS}


def _normalise(data: dict[str, Any], origin: str) -> dict[str, Any]:
    """Single-stage recipes become a one-stage pipeline; defaults filled in."""
    if "stages" not in data:
        if "stage" not in data:
            raise TunelabError(f"recipe '{origin}' names no stage: add `stage: sft` (or another stage) or `stages:`")
        kind = data["stage"]
        stage = {k: v for k, v in data.items() if k not in TOP_LEVEL_KEYS}
        data = {k: v for k, v in data.items() if k in TOP_LEVEL_KEYS}
        data["stages"] = {str(kind): stage}
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise unknown_key("recipe", key, TOP_LEVEL_KEYS, "top level of the recipe")
    stages = data["stages"]
    if not isinstance(stages, dict) or not stages:
        raise TunelabError("'stages' must be a non-empty mapping of stage names to stages")
    name = data.get("name") or (Path(origin).stem if origin else "run")
    data.setdefault("name", name)
    data.setdefault("output_dir", f"runs/{name}")
    data.setdefault("seed", 42)
    if not isinstance(data["seed"], int) or isinstance(data["seed"], bool):
        raise TunelabError(f"'seed' must be an integer, got {data['seed']!r}")
    if not isinstance(data["output_dir"], str) or not data["output_dir"]:
        raise TunelabError(f"'output_dir' must be a path, got {data['output_dir']!r}")
    return data


def check_structure(data: dict[str, Any]) -> None:
    """Stage kinds, section names and `${stage}` references, without importing ML libraries."""
    from tunelab.stages import STAGES, stage_module

    seen: list[str] = []
    for name, stage in data["stages"].items():
        where = f"stages.{name}"
        if not re.fullmatch(r"[A-Za-z_][\w-]*", str(name)):
            raise TunelabError(f"stage name '{name}' must be letters, digits, '_' or '-'")
        if not isinstance(stage, dict):
            raise TunelabError(f"'{where}' must be a mapping with at least `stage:`, not {stage!r}")
        kind = stage.get("stage")
        if kind is None:
            raise TunelabError(f"'{where}' has no `stage:` key; one of: {', '.join(STAGES)}")
        if kind not in STAGES:
            guess = closest(str(kind), STAGES)
            hint = f"did you mean '{guess}'?" if guess else f"one of: {', '.join(STAGES)}"
            raise TunelabError(f"'{where}.stage' is '{kind}', not a tunelab stage; {hint}")
        sections = stage_module(kind).SECTIONS
        for key in stage:
            if key != "stage" and key not in sections:
                if closest(key, TOP_LEVEL_KEYS - {"stages"}) and not closest(key, sections):
                    raise TunelabError(
                        f"unknown key '{where}.{key}': did you mean the top-level key '{closest(key, TOP_LEVEL_KEYS)}'?"
                    )
                raise unknown_key(where, key, sections, f"sections of a `{kind}` stage")
        for ref_where, ref in iter_refs(stage, where):
            if ref not in data["stages"]:
                guess = closest(ref, data["stages"])
                hint = f"did you mean '${{{guess}}}'?" if guess else f"stages: {', '.join(data['stages'])}"
                raise TunelabError(f"'{ref_where}' refers to unknown stage '{ref}'; {hint}")
            if ref not in seen:
                raise TunelabError(
                    f"'{ref_where}' refers to stage '{ref}', which runs later (or is this stage): "
                    "a stage can only use outputs of the stages above it"
                )
            if not stage_module(data["stages"][ref]["stage"]).PRODUCES_MODEL:
                raise TunelabError(f"'{ref_where}' refers to stage '{ref}', which produces no model")
        seen.append(name)


def iter_refs(node: Any, where: str):
    """Yield (location, stage name) for each `${stage}` reference inside a stage."""
    if isinstance(node, str):
        match = REF.match(node.strip())
        if match:
            yield where, match.group(1)
        elif "${" in node:
            raise TunelabError(f"'{where}' is '{node}': a reference must be the whole value, like ${{sft}}")
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from iter_refs(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from iter_refs(value, f"{where}[{i}]")


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe (path or shipped name), apply overrides and check its structure."""
    path = find_recipe(name_or_path)
    data = _read_yaml(path)
    return recipe_from_dict(data, overrides, path=path)


def recipe_from_dict(
    data: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), path: Path | None = None
) -> Recipe:
    """Build a :class:`Recipe` from a mapping, as if it had been read from YAML."""
    data = copy.deepcopy(data)
    origin = str(path) if path else str(data.get("name", "run"))
    if "stages" not in data and "stage" in data:
        data = _normalise(data, origin)
    for override in overrides:
        apply_override(data, override)
    data = _normalise(data, origin)
    check_structure(data)
    return Recipe(data=data, path=path, overrides=list(overrides))
