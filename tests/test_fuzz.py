"""Property: whatever is done to a shipped recipe, `tunelab validate` answers in seconds with exit 0 or
2, a few lines, no traceback, and touches nothing outside the run folder.

The mutations: values of other types, keys added, removed and renamed (names YAML reads as numbers,
booleans or null among them), deeper nesting, unicode, huge and empty values, YAML aliases (a
"billion laughs" bomb too), duplicated lines, binary files, files and folders in place of each other,
and overrides. Derandomized with a fixed budget here; TUNELAB_FUZZ_EXAMPLES=2000 runs longer.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tunelab.cli import app
from tunelab.paths import recipes_root, shipped_recipes

EXAMPLES = int(os.environ.get("TUNELAB_FUZZ_EXAMPLES", "30"))
RECIPES = {name: path.read_text() for name, path in shipped_recipes().items()}
BOMB = "[" + ",".join(["*l"] * 9) + "]"
BOMB_YAML = 'l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"l{i}: &l{i} [{','.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 9)
)
KEYS = [
    "1",
    "yes",
    "no",
    "null",
    "~",
    "true",
    "stage",
    "stages",
    "training",
    "lora",
    "data",
    "model",
    "config",
    "output_dir",
    "seed",
    "name",
    "path",
    "split",
    "ü",
    "a.b",
    "${sft}",
    "max_steps",
    "learning_rate",
]
TEXTS = [
    "",
    " ",
    "${sft}",
    "${pretrain}",
    "${nope}",
    "${",
    "yes",
    "null",
    "1e-4",
    "-1",
    "nan",
    "sft",
    "eval",
    "ünïcødé ✓ 🚀 \u202e",
    "a" * 5000,
    "x/" * 3000,
    "recipes/data/arith_qa",
    "recipes/data/arith_qa/train.jsonl",
    "recipes/data/arith_corpus",
    "no/such/path",
    "/dev/null",
    "train[:2]",
    "test",
    "all-linear",
    "pkg:nope",
]
runner = CliRunner()

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(TEXTS),
    st.sampled_from(["@file", "@folder", "@junk_folder", "@recipe"]),  # replaced by real paths below
)
keys = st.one_of(st.sampled_from(KEYS), st.text(max_size=8))
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3), max_leaves=6
)


def paths_of(node: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path of the recipe tree (mapping keys and list indices)."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out += paths_of(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out += paths_of(value, (*prefix, i))
    return out


def parent(data: Any, path: tuple) -> Any:
    for part in path[:-1]:
        data = data[part]
    return data


def real_paths(value: Any, places: dict[str, str]) -> Any:
    if isinstance(value, str) and value in places:
        return places[value]
    if isinstance(value, list):
        return [real_paths(v, places) for v in value]
    if isinstance(value, dict):
        return {k: real_paths(v, places) for k, v in value.items()}
    return value


def mutate(data: dict[str, Any], draw: Any, places: dict[str, str]) -> None:
    for _ in range(draw(st.integers(1, 3))):
        paths = paths_of(data)
        if not paths:
            data[draw(keys)] = real_paths(draw(values), places)
            continue
        path = draw(st.sampled_from(paths))
        node, last = parent(data, path), path[-1]
        op = draw(st.sampled_from(["replace", "delete", "add", "rename", "wrap_list", "wrap_dict"]))
        if op == "replace":
            node[last] = real_paths(draw(values), places)
        elif op == "delete":
            del node[last]
        elif op == "add" and isinstance(node, dict):
            node[draw(keys)] = real_paths(draw(values), places)
        elif op == "rename" and isinstance(node, dict):
            node[draw(keys)] = node.pop(last)
        elif op == "wrap_list":
            node[last] = [node[last]]
        elif op == "wrap_dict":
            node[last] = {draw(keys): node[last]}


def mutate_text(text: str, draw: Any) -> str | bytes:
    op = draw(st.sampled_from(["none", "none", "bomb", "alias", "duplicate_line", "truncate", "binary", "unicode"]))
    lines = text.splitlines()
    if op == "bomb":
        return BOMB_YAML + text + f"\nextra: {BOMB.replace('*l', '*l8')}\n"
    if op == "alias" and lines:
        i = draw(st.integers(0, len(lines) - 1))
        return "\n".join([*lines[:i], "anchor: &a {x: [1, 2]}", *lines[i:], "also: *a", ""])
    if op == "duplicate_line" and lines:
        i = draw(st.integers(0, len(lines) - 1))
        return "\n".join([*lines[: i + 1], lines[i], *lines[i + 1 :]]) + "\n"
    if op == "truncate":
        return text[: draw(st.integers(0, len(text)))]
    if op == "binary":
        return draw(st.binary(min_size=1, max_size=64))
    if op == "unicode":
        i = draw(st.integers(0, len(text)))
        return text[:i] + draw(st.text(min_size=1, max_size=8)) + text[i:]
    return text


def overrides(data: dict[str, Any], draw: Any) -> list[str]:
    out = []
    for _ in range(draw(st.integers(0, 2))):
        paths = [p for p in paths_of(data) if all(isinstance(part, str) for part in p)]
        key = ".".join(draw(st.sampled_from(paths))) if paths and draw(st.booleans()) else draw(keys)
        raw = draw(
            st.one_of(
                st.sampled_from([*TEXTS[:14], "{1: 2}", "[", "&a [*a]", "{a: 1, a: 2}", BOMB_YAML]),
                st.text(max_size=12),
            )
        )
        out.append(f"{key}={raw}" if draw(st.integers(0, 9)) else key)  # now and then no `=` at all
    return out


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def tracebacks() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("tunelab-traceback-*")}


SHIPPED = snapshot(recipes_root())


@settings(
    derandomize=True,
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=30),  # the first example pays for importing torch and friends
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.data())
def test_validate_never_crashes_on_mutated_recipes(data: st.DataObject) -> None:
    draw = data.draw
    name = draw(st.sampled_from(sorted(RECIPES)))
    with tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        root = Path(tmp)
        (root / "file.txt").write_bytes(b"\x00\x01 not a model, not data")
        (root / "folder").mkdir()
        (root / "junk_folder").mkdir()
        (root / "junk_folder" / "config.json").write_text("[1, 2")
        (root / "junk_folder" / "train.jsonl").write_text('{"text": 1}\n{bad\n')
        recipe_file = root / "recipe.yaml"
        places = {
            "@file": str(root / "file.txt"),
            "@folder": str(root / "folder"),
            "@junk_folder": str(root / "junk_folder"),
            "@recipe": str(recipe_file),
        }
        recipe = yaml.safe_load(RECIPES[name])
        recipe["output_dir"] = str(root / "run")
        mutate(recipe, draw, places)
        text = mutate_text(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True), draw)
        if isinstance(text, bytes):
            recipe_file.write_bytes(text)
        else:
            recipe_file.write_text(text, encoding="utf-8")
        target = draw(st.sampled_from([str(recipe_file)] * 8 + [str(root / "folder"), "/dev/null", name]))
        args = ["validate", target, *overrides(recipe if isinstance(recipe, dict) else {}, draw)]
        before, traces = snapshot(root), tracebacks()

        start = time.monotonic()
        result = runner.invoke(app, args)
        seconds = time.monotonic() - start

        output = result.output.strip()
        lines = [line for line in output.splitlines() if line.strip()]
        assert result.exit_code in (0, 2), f"{args}\n{output}\n{result.exception!r}"
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert "Traceback" not in output, output
        assert len(lines) <= 5, output
        if result.exit_code == 2:
            assert lines[-1].startswith("error: "), output
        assert seconds < 30, f"{seconds:.1f}s for {args}"
        after = snapshot(root)
        touched = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
        assert all(Path(p).is_relative_to(root / "run") for p in touched), touched
        assert tracebacks() == traces, "an internal error wrote a traceback"
    assert snapshot(recipes_root()) == SHIPPED
