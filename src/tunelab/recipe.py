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

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tunelab.core.errors import TunelabError, check_path, closest, unknown_key
from tunelab.core.paths import read_bounded, shipped_recipes
from tunelab.core.refs import iter_refs
from tunelab.stages import STAGES
from tunelab.stages import stage as stage_of

TOP_LEVEL_KEYS = {"name", "description", "output_dir", "seed", "stages"}
PATH_SHORTHANDS = {"data", "eval_data", "model"}
MAX_RECIPE_BYTES = 16 * 2**20  # a recipe is a few KiB; this bounds reading a device or a wrong file
MAX_DEPTH = 64  # nesting of mappings and lists
MAX_NODES = 200_000  # values in a recipe once YAML aliases are expanded (a "billion laughs" bomb has 10^9)
# Sections that are the keyword arguments of a library class: a mapping (or null, for "absent").
MAPPING_SECTIONS = {
    "training": "{learning_rate: 2.0e-4, max_steps: 100}",
    "lora": "{r: 8, target_modules: all-linear}",
    "quantization": "{load_in_4bit: true}",
    "config": "{model_type: llama, hidden_size: 64, ...}",
    "generation": "{max_new_tokens: 32}",
    "pipeline_args": "{guidance_scale: 7.5}",
    "unet": "{block_out_channels: [32, 64]}",
    "models": "{base: Qwen/Qwen2.5-0.5B, tuned: ${sft}}",
    "sampling": "{scheduler: DDIM, num_inference_steps: 50}",
}
KIND_MAPPING_SECTIONS = {("diffusion_train", "scheduler"): "{num_train_timesteps: 1000}"}
# Keys whose strings are (or may be) file system paths, at any depth of a stage.
PATH_KEYS = {
    "model",
    "data",
    "eval_data",
    "classifier_data",
    "tokenizer",
    "reward_model",
    "value_model",
    "models",
    "rewards",
    "path",
    "data_dir",
    "data_files",
    "gguf_file",
    "include_path",
}


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file from a path, or from a shipped recipe's name (`quickstart`, `sft/lora-arith`)."""
    if not isinstance(name_or_path, (str, os.PathLike)):
        raise TunelabError(
            f"a recipe is a YAML file or the name of a shipped recipe, not {name_or_path!r} "
            f"({type(name_or_path).__name__}): pass a path or a name like 'quickstart'"
        )
    if isinstance(name_or_path, str) and not name_or_path.strip():
        raise TunelabError("the recipe name is empty: give a YAML file or a shipped name (see `tunelab list`)")
    check_path(name_or_path, "the recipe path")
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    key = os.fspath(name_or_path).removesuffix(".yaml")
    if key in shipped:
        return shipped[key]
    if path.is_dir():
        raise TunelabError(f"recipe '{path}' is a folder, not a YAML file: name the .yaml file inside it")
    if path.exists():  # a device, a pipe (`<(...)`): read like a file
        return path
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
        """The run folder, `~` expanded (a quoted "~/runs/x" is the home folder's, not a folder named `~`)."""
        return Path(self.data["output_dir"]).expanduser()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.data, sort_keys=False)


class _KeyError(yaml.constructor.ConstructorError):
    """A mapping key recipes cannot take (duplicate, not a string): an error even in an override's value."""


class _Loader(yaml.SafeLoader):
    """YAML as recipes need it: each key of a mapping once, and keys that are names (strings)."""

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                line = key_node.start_mark.line + 1
                if not isinstance(key_node, yaml.ScalarNode):
                    raise _KeyError(
                        None, None, "a key must be a plain name, not a list or mapping", key_node.start_mark
                    )
                key = self.construct_object(key_node)
                if not isinstance(key, str):
                    raise _KeyError(
                        None,
                        None,
                        f"key '{key_node.value}' is read by YAML as {key!r} ({type(key).__name__}), not a name: "
                        f"quote it ('{key_node.value}')",
                        key_node.start_mark,
                    )
                if key in seen:
                    raise _KeyError(
                        None,
                        None,
                        f"duplicate key '{key}' (first at line {seen[key]}): YAML keeps only the last one; "
                        "rename or remove one of them",
                        key_node.start_mark,
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        raw = read_bounded(path, "recipe", MAX_RECIPE_BYTES)  # a FIFO without a writer: one line, not a hang
    except OSError as exc:
        raise TunelabError(f"cannot read recipe '{path}': {exc.strerror or exc}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise TunelabError(f"recipe '{path}' is over {MAX_RECIPE_BYTES // 2**20} MiB: is it a YAML recipe?")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise TunelabError(
            f"recipe '{path}' is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}): "
            "is it a YAML recipe? save it as UTF-8"
        ) from None
    try:
        data = _load_yaml(text)
    except RecursionError:
        raise TunelabError(f"recipe '{path}' nests too deeply to read: flatten it") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or (str(exc).splitlines() or [type(exc).__name__])[0]
        raise TunelabError(f"recipe '{path}' is not valid YAML{where}: {problem}") from None
    if data is None or data == "":
        raise TunelabError(f"recipe '{path}' is empty: it needs at least a `stage:` or `stages:`")
    if not isinstance(data, dict):
        raise TunelabError(f"recipe '{path}' must be a YAML mapping (key: value), not {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """An override's value, read as YAML (`1e-4`, `true`, `[q_proj, v_proj]`, `null`)."""
    try:
        return _load_yaml(text) if text != "" else ""
    except _KeyError as exc:
        raise TunelabError(f"value '{text}': {exc.problem}") from None
    except RecursionError:
        raise TunelabError(f"value '{text[:40]}...' nests too deeply: flatten it") from None
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
    try:
        value = _plain(parse_value(raw), "value")
    except TunelabError as exc:
        raise TunelabError(f"override '{override}': {exc}") from None
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
        if not isinstance(node, dict):
            raise TunelabError(f"override '{override}': stage '{parts[0]}' is {node!r}, not a mapping with `stage:`")
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

    kinds = {s.get("stage") for s in stages.values() if isinstance(s, dict) and isinstance(s.get("stage"), str)}
    kinds &= set(STAGES)
    return {key for kind in kinds for key in stage_of(kind).sections}


def _normalise(data: dict[str, Any], origin: str) -> dict[str, Any]:
    """Single-stage recipes become a one-stage pipeline; defaults filled in."""
    if "stages" not in data:
        if "stage" not in data:
            raise TunelabError(f"recipe '{origin}' names no stage: add `stage: sft` (or another stage) or `stages:`")
        kind = data["stage"]
        if not isinstance(kind, str):
            raise TunelabError(
                f"'stage' is {kind!r} ({type(kind).__name__}); set it to one stage kind: {', '.join(STAGES)}"
            )
        stage = {k: v for k, v in data.items() if k not in TOP_LEVEL_KEYS}
        data = {k: v for k, v in data.items() if k in TOP_LEVEL_KEYS}
        data["stages"] = {str(kind): stage}
    for key in data:
        if key not in TOP_LEVEL_KEYS:
            raise unknown_key("recipe", key, TOP_LEVEL_KEYS, "top level of the recipe")
    stages = data["stages"]
    if not isinstance(stages, dict) or not stages:
        raise TunelabError("'stages' must be a non-empty mapping of stage names to stages")
    for key in ("name", "description"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise TunelabError(f"'{key}' is {data[key]!r} ({type(data[key]).__name__}); set it to a string")
    name = data.get("name") or (Path(origin).stem if origin else "run")
    check_path(name, "name")
    data.setdefault("name", name)
    data.setdefault("output_dir", f"runs/{name}")
    data.setdefault("seed", 42)
    seed = data["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise TunelabError(f"'seed' must be an integer from 0 to 2**32 - 1, got {seed!r}: set seed: 42 (or another)")
    if data["output_dir"] is None:
        raise TunelabError(
            "'output_dir' is null: YAML reads `~`, `null` and an empty value as no value; set a path, and quote one "
            'that starts with ~ (output_dir: "~/runs/NAME")'
        )
    if not isinstance(data["output_dir"], str) or not data["output_dir"].strip():
        raise TunelabError(f"'output_dir' must be a path, got {data['output_dir']!r}: set output_dir: runs/NAME")
    check_path(data["output_dir"], "output_dir")
    return data


def check_structure(data: dict[str, Any]) -> None:
    """Stage kinds, section names and `${stage}` references, without importing ML libraries."""

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
        if not isinstance(kind, str):
            raise TunelabError(
                f"'{where}.stage' is {kind!r} ({type(kind).__name__}); set it to one stage kind: {', '.join(STAGES)}"
            )
        if kind not in STAGES:
            guess = closest(str(kind), STAGES)
            hint = f"did you mean '{guess}'?" if guess else f"one of: {', '.join(STAGES)}"
            raise TunelabError(f"'{where}.stage' is '{kind}', not a tunelab stage; {hint}")
        sections = stage_of(kind).sections
        for key in stage:
            if key != "stage" and key not in sections:
                if closest(key, TOP_LEVEL_KEYS - {"stages"}) and not closest(key, sections):
                    raise TunelabError(
                        f"unknown key '{where}.{key}': did you mean the top-level key '{closest(key, TOP_LEVEL_KEYS)}'?"
                    )
                raise unknown_key(where, key, sections, f"sections of a `{kind}` stage")
        _check_shapes(stage, kind, where)
        _check_paths(stage, where, False)
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
            if not stage_of(data["stages"][ref]["stage"]).produces_model:
                raise TunelabError(f"'{ref_where}' refers to stage '{ref}', which produces no model")
        seen.append(name)
    _check_output_outside_data(data)


def _check_output_outside_data(data: dict[str, Any]) -> None:
    """A run folder inside a stage's data folder would be read as data by the next load of that folder (its
    predictions-*.jsonl, metrics.json), and a `--overwrite` would replace files next to the data."""
    from tunelab.core.hub import local_path

    out = Path(os.path.realpath(Path(data["output_dir"]).expanduser()))  # realpath: a link loop is runs.py's to name
    for name, stage in data["stages"].items():
        for key, value in stage.items():
            if not key.endswith("data"):
                continue
            ref = value.get("path") if isinstance(value, dict) else value
            folder = local_path(ref) if isinstance(ref, str) and ref and "\x00" not in ref else None
            if folder is not None and folder.is_dir() and out.is_relative_to(folder):
                raise TunelabError(
                    f"output_dir '{data['output_dir']}' is inside 'stages.{name}.{key}' ('{ref}'): the run's files "
                    "would be read as data the next time that folder loads; choose an output_dir outside it"
                )


def _check_shapes(stage: dict[str, Any], kind: str, where: str) -> None:
    """Sections that are a library class's keyword arguments must be mappings (or null, as if absent)."""
    for key, value in stage.items():
        example = KIND_MAPPING_SECTIONS.get((kind, key)) or MAPPING_SECTIONS.get(key)
        if example is not None and value is not None and not isinstance(value, dict):
            raise TunelabError(
                f"'{where}.{key}' is {_short(value)} ({type(value).__name__}), not a mapping of keys: "
                f"write it like `{key}: {example}`" + (" (or remove it for full fine-tuning)" if key == "lora" else "")
            )


def _check_paths(node: Any, where: str, is_path: bool) -> None:
    """Strings that name files or folders must be paths the OS can take (checked before any `exists()`)."""
    if isinstance(node, str):
        if is_path:
            check_path(node, where)
    elif isinstance(node, dict):
        for key, value in node.items():
            _check_paths(value, f"{where}.{key}", is_path or key in PATH_KEYS)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _check_paths(value, f"{where}[{i}]", is_path)


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _plain(data: Any, where: str, budget: list[int] | None = None, stack: list[int] | None = None) -> Any:
    """A tree-shaped copy of recipe data: mappings with string keys, lists, strings, numbers, booleans, null.

    YAML aliases make shared (or recursive) nodes; copying expands them, so the copy is bounded by
    MAX_NODES: a few hundred bytes of nested aliases ("billion laughs") fail at once, and everything
    that walks a recipe later (`${ref}` scans, fingerprints, deep copies) walks a small tree.
    Paths (os.PathLike) become strings, tuples lists.
    """
    budget = [MAX_NODES] if budget is None else budget
    stack = [] if stack is None else stack
    budget[0] -= 1
    if budget[0] < 0:
        raise TunelabError(
            f"the recipe expands to more than {MAX_NODES} values (YAML aliases of aliases?): "
            "write the values out instead of nesting aliases"
        )
    if isinstance(data, str):
        if "\x00" in data:
            raise TunelabError(f"'{where}' contains a NUL character: remove it")
        return data
    if data is None or isinstance(data, (bool, int, float)):
        return data
    if isinstance(data, os.PathLike):
        return _plain(os.fspath(data), where, budget, stack)
    if isinstance(data, (dict, list, tuple)):
        if id(data) in stack:
            raise TunelabError(f"'{where}' contains itself (a recursive YAML alias): write the value out")
        if len(stack) >= MAX_DEPTH:
            raise TunelabError(f"'{where}' nests more than {MAX_DEPTH} levels deep: flatten it")
        stack.append(id(data))
        try:
            if isinstance(data, dict):
                out = {}
                for key, value in data.items():
                    if not isinstance(key, str):
                        raise TunelabError(
                            f"key {key!r} ({type(key).__name__}) in '{where or 'the recipe'}' is not a name: "
                            f"quote it ('{key}') so that YAML reads a string"
                        )
                    out[key] = _plain(value, f"{where}.{key}" if where else key, budget, stack)
                return out
            return [_plain(value, f"{where}[{i}]", budget, stack) for i, value in enumerate(data)]
        finally:
            stack.pop()
    raise TunelabError(
        f"'{where}' is {_short(data)} ({type(data).__name__}): a recipe holds only strings, numbers, "
        "booleans, null, lists and mappings; quote it to make it a string"
    )


def load_recipe(name_or_path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read a recipe (path or shipped name), apply overrides and check its structure."""
    path = find_recipe(name_or_path)
    data = _read_yaml(path)
    return recipe_from_dict(data, overrides, path=path)


def recipe_from_dict(
    data: dict[str, Any], overrides: list[str] | tuple[str, ...] = (), path: str | os.PathLike | None = None
) -> Recipe:
    """Build a :class:`Recipe` from a mapping, as if it had been read from YAML."""
    if not isinstance(data, dict):
        raise TunelabError(
            f"a recipe must be a mapping (key: value), not {_short(data)} ({type(data).__name__}): "
            "pass a dict with `stage:` or `stages:`"
        )
    if overrides is None:
        overrides = ()
    elif isinstance(overrides, str):
        overrides = [overrides]
    if not isinstance(overrides, (list, tuple)) or not all(isinstance(o, str) for o in overrides):
        raise TunelabError(f"overrides must be a list of 'key.path=value' strings, not {_short(overrides)}")
    path = Path(path) if path is not None else None
    data = _plain(data, "")
    name = data.get("name")
    origin = str(path) if path else (name if isinstance(name, str) and name else "run")
    if "stages" not in data and "stage" in data:
        data = _normalise(data, origin)
    for override in overrides:
        apply_override(data, override)
    data = _normalise(data, origin)
    check_structure(data)
    return Recipe(data=data, path=path, overrides=list(overrides))
