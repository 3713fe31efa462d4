"""Property: whatever is done to a shipped recipe, `tunelab validate` answers in seconds with exit 0 or
2, a few lines, no traceback, and touches nothing outside the run folder.

The mutations: values of other types, keys added, removed and renamed (names YAML reads as numbers,
booleans or null among them), deeper nesting, unicode, huge and empty values, YAML aliases (a
"billion laughs" bomb too), duplicated lines, binary files, files and folders in place of each other,
and overrides. Beyond recipes, the same properties hold for data files (values of every type in any row,
nulls and blanks past the rows validate reads, huge lines, binary: a value the trainer cannot read is refused),
image folders (zero bytes, truncated, decompression bombs, odd modes) and the Python API's arguments (they
return or raise TunelabError). Each example gets a temp folder of its own, so a traceback file another tunelab
process writes is not taken for one of ours. Derandomized with a fixed budget here (30 examples each, under
a minute in all); TUNELAB_FUZZ_EXAMPLES=2000 runs longer.
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

from tests.helpers import assert_one_line_answer
from tunelab.cli.app import app
from tunelab.core.paths import recipes_root, shipped_recipes

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


@contextlib.contextmanager
def own_temp():
    """A temp folder of the test's own for the duration: the traceback files it watches are then its own, not
    those of another tunelab process on the machine (the CLI runs in-process and writes them with tempfile)."""
    with tempfile.TemporaryDirectory(prefix="tunelab-fuzz-temp-") as folder:
        saved, saved_env = tempfile.tempdir, os.environ.get("TMPDIR")
        tempfile.tempdir, os.environ["TMPDIR"] = folder, folder
        try:
            yield Path(folder)
        finally:
            tempfile.tempdir = saved
            if saved_env is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = saved_env


def check_answer(result: Any, args: list[str], seconds: float, root: Path, before: dict, traces: set[str]) -> None:
    """The fuzz properties: exit 0 or 2, a few lines, no traceback, in seconds, nothing touched outside the run."""
    assert_one_line_answer(result, str(args), seconds, 30)
    after = snapshot(root)
    touched = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert all(Path(p).is_relative_to(root / "run") for p in touched), touched
    assert tracebacks() == traces, "an internal error wrote a traceback"


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
    with own_temp(), tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
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
        check_answer(result, args, time.monotonic() - start, root, before, traces)
    assert snapshot(recipes_root()) == SHIPPED


# --- data files: values of every type per column, nulls in later rows, empty and huge values, binary ----------

FUZZ_SETTINGS = settings(
    derandomize=True,
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=30),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# The columns each stage reads, and what a good row holds.
DATA_STAGES = {
    "sft": {"prompt": "Q?", "completion": " 1"},
    "dpo": {"prompt": "Q?", "chosen": " 1", "rejected": " 2"},
    "kto": {"prompt": "Q?", "completion": " 1", "label": True},
    "orpo": {"prompt": "Q?", "chosen": " 1", "rejected": " 2"},
    "grpo": {"prompt": "Q?", "completion": " 1"},
}
cell = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["", " ", "\n", "a" * 100_000, "ü✓🚀\u202e", "${sft}"]),
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.lists(st.text(max_size=4), max_size=3),
    st.lists(
        st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "x"]), "content": st.text(max_size=4)}),
        max_size=3,
    ),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


# Columns whose every value validate checks (tunelab.data.datasets.require_values): text (or chat turns) in every row,
# not blank where marked True; KTO's labels booleans. A value of another type there must be refused (exit 2).
CHECKED = {
    "dpo": {"prompt": False, "chosen": True, "rejected": True},
    "orpo": {"prompt": False, "chosen": True, "rejected": True},
    "kto": {"prompt": False, "completion": True, "label": None},
    "grpo": {"prompt": True},
}


def data_file(draw: Any, stage: str) -> tuple[bytes, bool]:
    """JSON lines of good rows with some cells replaced (often past the first rows), and the file mutated;
    and whether a replaced cell is one validate must refuse."""
    import json

    good, checked = DATA_STAGES[stage], CHECKED.get(stage, {})
    rows = [dict(good) for _ in range(draw(st.integers(1, 12)))]
    refuse = False
    for _ in range(draw(st.integers(0, 4))):
        row = draw(st.integers(0, len(rows) - 1))
        column = draw(st.sampled_from([*good, "extra"]))
        if draw(st.integers(0, 5)):
            rows[row][column] = value = draw(cell)
            if column in checked and checked[column] is None:
                refuse |= not isinstance(value, bool)
            elif column in checked:
                refuse |= not isinstance(value, str) or (checked[column] and not value.strip())
        else:
            rows[row].pop(column, None)
    text = "".join(json.dumps(row, ensure_ascii=draw(st.booleans())) + "\n" for row in rows).encode()
    op = draw(st.sampled_from(["none", "none", "none", "binary_line", "truncate", "empty", "bom", "huge_line"]))
    if op == "binary_line":
        return text + draw(st.binary(min_size=1, max_size=32)) + b"\n", False
    if op == "truncate":
        return text[: draw(st.integers(0, len(text)))], False
    if op == "empty":
        return b"", False
    if op == "bom":
        return b"\xef\xbb\xbf" + text, refuse
    if op == "huge_line":
        return text + b'{"prompt": "' + b"x" * 2_000_000 + b'"}\n', False
    return text, refuse


@FUZZ_SETTINGS
@given(st.data())
def test_validate_never_crashes_on_fuzzed_data(tiny_lm: Path, data: st.DataObject) -> None:
    draw = data.draw
    stage = draw(st.sampled_from(sorted(DATA_STAGES)))
    with own_temp(), tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        root = Path(tmp)
        content, refuse = data_file(draw, stage)
        (root / "train.jsonl").write_bytes(content)
        cfg: dict[str, Any] = {"stage": stage, "model": str(tiny_lm), "data": str(root / "train.jsonl")}
        if stage == "grpo":
            cfg["rewards"] = ["tunelab.rewards:exact_match"]
        recipe = {"output_dir": str(root / "run"), "stages": {stage: cfg}}
        (root / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        args = ["validate", str(root / "recipe.yaml")]
        before, traces = snapshot(root), tracebacks()
        start = time.monotonic()
        result = runner.invoke(app, args)
        check_answer(result, args, time.monotonic() - start, root, before, traces)
        assert result.exit_code == 2 or not refuse, f"a value the trainer cannot read was accepted:\n{content[:500]!r}"


# --- images: zero bytes, truncated, non-images, decompression bombs, odd modes and sizes -------------------


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height and holds no pixels: a decompression bomb's first bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def image_bytes(draw: Any) -> tuple[str, bytes]:
    """(suffix, bytes) of one image file: most of them real images in assorted modes, some of them broken."""
    import io

    from PIL import Image

    kind = draw(st.sampled_from(["image"] * 4 + ["zero", "truncated", "junk", "bomb"]))
    if kind == "zero":
        return ".png", b""
    if kind == "junk":
        return draw(st.sampled_from([".png", ".jpg"])), draw(st.binary(min_size=1, max_size=64))
    if kind == "bomb":
        return ".png", png_header(draw(st.sampled_from([40_000, 2**31 - 1])), draw(st.sampled_from([40_000, 1])))
    mode = draw(st.sampled_from(["1", "L", "P", "RGB", "RGBA", "LA", "CMYK", "I", "I;16", "F"]))
    size = (draw(st.integers(1, 24)), draw(st.integers(1, 24)))
    fmt = "TIFF" if mode in ("I", "I;16", "F", "CMYK") else draw(st.sampled_from(["PNG", "TIFF"]))
    out = io.BytesIO()
    Image.new(mode, size).save(out, format=fmt)
    data = out.getvalue()
    if kind == "truncated":
        data = data[: draw(st.integers(0, len(data) - 1))]
    return (".tif" if fmt == "TIFF" else ".png"), data


@FUZZ_SETTINGS
@given(st.data())
def test_validate_never_crashes_on_fuzzed_images(data: st.DataObject) -> None:
    draw = data.draw
    with own_temp(), tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        root = Path(tmp)
        (root / "images").mkdir()
        for i in range(draw(st.integers(1, 4))):
            suffix, content = image_bytes(draw)
            (root / "images" / f"{i}{suffix}").write_bytes(content)
        args = [
            "validate",
            "diffusion/ddpm-digits",
            f"data={root / 'images'}",
            f"output_dir={root / 'run'}",
            *draw(st.sampled_from([[], ["resolution=8"], ["channels=3"], ["resolution=8", "channels=1"]])),
        ]
        before, traces = snapshot(root), tracebacks()
        start = time.monotonic()
        result = runner.invoke(app, args)
        check_answer(result, args, time.monotonic() - start, root, before, traces)


# --- the Python API's arguments --------------------------------------------------------------------------

anything = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-5, 5),
    st.floats(allow_nan=True),
    st.text(max_size=6),
    st.sampled_from(["", " ", "\x00", "a" * 5000, "quickstart", "no/such/model", "@model"]),
    st.binary(max_size=4),
    st.lists(st.text(max_size=3), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
    st.builds(Path, st.sampled_from(["", ".", "no-such", "@model"])),
)


def api_call(draw: Any, model: str) -> tuple[str, Any]:
    """(name, thunk) of one API call with drawn arguments ("@model" is the tiny model's folder)."""
    import tunelab

    def arg() -> Any:
        value = draw(anything)
        if value == "@model" or (isinstance(value, Path) and str(value) == "@model"):
            return model if isinstance(value, str) else Path(model)
        return value

    name = draw(st.sampled_from(["validate", "load_recipe", "recipe_from_dict", "chat", "generate", "merge"]))
    if name == "validate":
        kwargs = draw(st.sampled_from([{}, {"overrides": arg()}, {"from_stage": arg()}, {"overwrite": arg()}]))
        return name, lambda: tunelab.validate(arg(), **kwargs)
    if name == "load_recipe":
        return name, lambda: tunelab.load_recipe(arg(), arg())
    if name == "recipe_from_dict":
        return name, lambda: tunelab.recipe_from_dict(arg(), arg())
    if name == "chat":
        return name, lambda: tunelab.chat(arg(), arg(), system=arg(), history=arg(), max_new_tokens=1)
    if name == "generate":
        return name, lambda: tunelab.generate(arg(), arg(), batch_size=arg(), max_new_tokens=1)
    return name, lambda: tunelab.merge(arg(), arg(), base=arg())


@settings(
    derandomize=True,
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=30),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.data())
def test_api_never_crashes_on_fuzzed_arguments(tiny_lm: Path, data: st.DataObject) -> None:
    """Every call returns or raises TunelabError (one line), in seconds, and writes nothing outside its folder."""
    import tunelab

    name, call = api_call(data.draw, str(tiny_lm))
    with own_temp(), tempfile.TemporaryDirectory() as tmp, contextlib.chdir(tmp):
        root = Path(tmp)
        (root / "run").mkdir()
        before, traces = snapshot(root), tracebacks()
        start = time.monotonic()
        try:
            call()
        except tunelab.TunelabError as exc:
            assert len(str(exc).splitlines()) == 1, str(exc)
        assert time.monotonic() - start < 30, name
        after = snapshot(root)
        touched = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
        assert all(Path(p).is_relative_to(root / "run") or Path(p).name == "runs" for p in touched), touched
        assert tracebacks() == traces
