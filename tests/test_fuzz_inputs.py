"""Property: malformed GGUF files, hostile chat templates and out-of-range generation settings get from
`tunelab validate` an exit code of 0 or 2, a few lines, no traceback, an answer in seconds, and no file
written anywhere.

The inputs: the real SmolLM2 GGUF file cut at any offset, or with one of its header's counts or lengths
(tensor count, metadata count, string and array lengths) replaced; chat templates built from pieces
that fail to parse, loop (nested ranges, bare loops over long strings), build huge strings (repeats,
powers, widths, doubling, joins) or render normally; GenerationConfig fields with values of every kind.
Derandomized with a fixed budget (well under a minute); TUNELAB_FUZZ_EXAMPLES=N multiplies it, and
TUNELAB_FUZZ_DEBUG=1 prints each answer (with `-s`).
"""

from __future__ import annotations

import os
import struct
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from tests.helpers import assert_one_line_answer, gguf_source, tiny_training
from tunelab.cli.app import app

SCALE = max(1, int(os.environ.get("TUNELAB_FUZZ_EXAMPLES", "1")))
runner = CliRunner()
CHATS = {"path": "recipes/data/arith_chat", "split": "train[:4]"}


def fuzz_settings(examples: int):
    return settings(
        derandomize=True,
        max_examples=examples * SCALE,
        deadline=timedelta(seconds=60),  # the first example pays for importing torch and friends
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
    )


@pytest.fixture
def own_tmpdir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """TMPDIR for this test alone: a traceback file tunelab writes there is this test's own."""
    folder = tmp_path_factory.mktemp("tmpdir")
    monkeypatch.setenv("TMPDIR", str(folder))
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def validate_answers(recipe: Path, tmpdir: Path, seconds: float = 30) -> tuple[int, str]:
    """Run `tunelab validate`; assert the properties; (exit code, last line)."""
    before = snapshot(tmpdir)
    start = time.monotonic()
    result = runner.invoke(app, ["validate", str(recipe)])
    took = time.monotonic() - start
    assert_one_line_answer(result, recipe.read_text()[:500], took, seconds)
    output = result.output.strip()
    lines = [line for line in output.splitlines() if line.strip()]
    assert snapshot(tmpdir) == before, "validate wrote under the temp folder (a traceback file?)"
    if os.environ.get("TUNELAB_FUZZ_DEBUG"):
        print("FUZZ", result.exit_code, round(took, 2), lines[-1][:150] if lines else "")
    return result.exit_code, lines[-1] if lines else ""


def write_recipe(folder: Path, stage: dict[str, Any]) -> Path:
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(folder / "run"), "stages": {"s": stage}}, sort_keys=False))
    return path


# --- GGUF files -------------------------------------------------------------------------------------


def header_fields(data: bytes) -> list[tuple[int, str]]:
    """(offset, what) of every uint64 count or length in the header of a well-formed GGUF file."""
    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    out = [(8, "tensor count"), (16, "metadata count")]
    tensors, entries = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(what: str) -> None:
        nonlocal pos
        out.append((pos, what))
        pos += 8 + struct.unpack_from("<Q", data, pos)[0]

    for _ in range(entries):
        string("key length")
        kind = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        if kind == 8:
            string("string length")
        elif kind == 9:
            inner = struct.unpack_from("<I", data, pos)[0]
            out.append((pos + 4, "array count"))
            n = struct.unpack_from("<Q", data, pos + 4)[0]
            pos += 12
            for _ in range(n):
                if inner == 8:
                    if len(out) < 400:  # the vocabulary's strings: a sample is enough
                        string("array string length")
                    else:
                        pos += 8 + struct.unpack_from("<Q", data, pos)[0]
                else:
                    pos += sizes[inner]
        else:
            pos += sizes[kind]
    for _ in range(tensors):
        string("tensor name length")
        dims = struct.unpack_from("<I", data, pos)[0]
        out.append((pos, "dimension count (uint32)"))
        out += [(pos + 4 + 8 * d, "tensor dimension") for d in range(dims)]
        pos += 4 + 8 * dims
        out.append((pos + 4, "tensor data offset"))
        pos += 12
    return out


GGUF = gguf_source().read_bytes()
FIELDS = header_fields(GGUF)
HEADER_END = max(offset for offset, _ in FIELDS) + 64


@fuzz_settings(12)
@given(st.data())
def test_validate_answers_malformed_gguf_files(tiny_lm: Path, own_tmpdir: Path, data: st.DataObject) -> None:
    draw = data.draw
    how = draw(st.sampled_from(["cut_header", "cut_anywhere", "field", "field"]))
    if how == "cut_header":
        blob = GGUF[: draw(st.integers(4, HEADER_END))]
    elif how == "cut_anywhere":
        blob = GGUF[: draw(st.integers(4, len(GGUF) - 1))]
    else:  # a count or length past what the file holds, or a length a little off (the rest misaligned)
        offset, what = draw(st.sampled_from(FIELDS))
        width = 4 if "uint32" in what else 8
        old = int.from_bytes(GGUF[offset : offset + width], "little")
        huge = st.one_of(
            st.sampled_from([2**31, 2**32 - 1, 2 ** (8 * width) - 1] + ([2**60, 2**62] if width == 8 else [])),
            st.integers(2 ** (8 * width - 8), 2 ** (8 * width) - 1),
        )
        nudged = st.sampled_from([-3, -2, -1, 1, 2, 3]).map(lambda d, old=old: max(old + d, 0))
        value = draw(st.one_of(huge, nudged) if "length" in what else huge)
        how = "huge" if value > 2**31 - 1 or what.startswith("dimension count") else "nudged"
        blob = GGUF[:offset] + value.to_bytes(width, "little") + GGUF[offset + width :]
    with tempfile.TemporaryDirectory(dir=own_tmpdir.parent) as tmp:
        folder = Path(tmp)
        (folder / "m").mkdir()
        (folder / "m" / "x.gguf").write_bytes(blob)
        # sft on plain data reads the model's config only (the tokenizer of a GGUF file takes seconds more)
        stage = {
            "stage": "sft",
            "model": {"path": str(folder / "m"), "gguf_file": "x.gguf"},
            "data": {"path": "recipes/data/arith_qa", "split": "train[:4]"},
            "training": tiny_training(),
        }
        code, last = validate_answers(write_recipe(folder, stage), own_tmpdir, seconds=60)
        if how != "nudged":  # a cut file, a count or length past its end: refused by the header check
            assert code == 2 and "is not a readable GGUF file" in last, last


# --- chat templates ---------------------------------------------------------------------------------

PIECES = [
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}",
    "{% if add_generation_prompt %}assistant:{% endif %}",
    "{{ bos_token }}",
    "{% for i in range(N) %}{% for j in range(N) %}{% endfor %}{% endfor %}",
    "{% for i in range(N) %}{% for j in range(N) %}{{ 'xxxxxxxx' }}{% endfor %}{% endfor %}",
    "{% set s = 'x' * N %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "{{ 'x' * N }}",
    "{{ N ** N }}",
    "{{ 'x' | center(N) }}",
    "{{ 'x'.ljust(N) }}",
    "{{ '{:>N}'.format('x') }}",
    "{{ '%Ns' % 'x' }}",
    "{{ range(100000) | join('x' * N) }}",
    "{{ ('x' * N).replace('x', 'yy' * N) }}",
    "{% set ns = namespace(s='x') %}{% for i in range(N) %}{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}",
    "{% macro m(k) %}{% for i in range(N) %}{{ caller() if caller else k }}{% endfor %}{% endmacro %}{{ m(1) }}",
    "{{ raise_exception('no') }}",
    "{% for m in messages %}",
    "{{ messages[0]['nope'].x.y }}",
    "{{ messages | tojson }}",
    "{{ undefined_name | upper }}",
    "{% endfor %}",
    "{{ ''.__class__ }}",
    "{{ 1 / 0 }}",
]
SIZES = [0, 7, 1000, 30000, 10**5, 10**9, 10**10, 2**62]


@fuzz_settings(20)
@given(st.data())
def test_validate_answers_hostile_chat_templates(
    tiny_lm: Path, own_tmpdir: Path, monkeypatch: pytest.MonkeyPatch, data: st.DataObject
) -> None:
    from tunelab.models import chat_templates as chat

    monkeypatch.setattr(chat, "RENDER_SECONDS", 1.0)  # the bound is what is tested, not its value
    draw = data.draw
    pieces = draw(st.lists(st.sampled_from(PIECES), min_size=1, max_size=3))
    template = "".join(p.replace("N", str(draw(st.sampled_from(SIZES)))) for p in pieces)
    if "{" not in template:
        template += "{{ '' }}"
    kind = draw(st.sampled_from(["sft", "dpo", "eval"]))
    with tempfile.TemporaryDirectory(dir=own_tmpdir.parent) as tmp:
        folder = Path(tmp)
        stage: dict[str, Any] = {"stage": kind, "model": str(tiny_lm), "chat_template": template}
        if kind == "sft":
            stage.update(data=CHATS, training=tiny_training())
        elif kind == "dpo":
            stage.update(data={"path": "recipes/data/arith_pref", "split": "train[:4]"}, training=tiny_training())
        else:
            stage.update(data={"path": "recipes/data/arith_qa", "split": "test[:4]"})
        code, last = validate_answers(write_recipe(folder, stage), own_tmpdir, seconds=20)
        if code == 2 and ("took longer" in last or "rendered more" in last):
            import resource

            assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < 4 * 2**20, "gigabytes were built"


# --- generation settings ----------------------------------------------------------------------------

FIELDS_GEN = [
    "max_new_tokens",
    "max_length",
    "min_new_tokens",
    "num_beams",
    "num_return_sequences",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "typical_p",
    "repetition_penalty",
    "no_repeat_ngram_size",
    "do_sample",
    "length_penalty",
    "epsilon_cutoff",
]
GEN_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, 1, -1, 2, 16, 127, 128, 129, 1024, 1025, 10**6, 10**9, 2**63, -(2**63)]),
    st.sampled_from([0.0, -0.0, 0.5, 1.0, 1.5, -1.0, 1e9, 1e-9, float("nan"), float("inf"), 64.0]),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["", "1", "fast", [1], {"a": 1}]),
)


@fuzz_settings(25)
@given(st.data())
def test_validate_answers_generation_settings(tiny_lm: Path, own_tmpdir: Path, data: st.DataObject) -> None:
    draw = data.draw
    generation = draw(st.dictionaries(st.sampled_from(FIELDS_GEN), GEN_VALUES, min_size=1, max_size=4))
    if draw(st.booleans()):
        generation["do_sample"] = True  # the sampling settings are only checked (and used) with sampling
    with tempfile.TemporaryDirectory(dir=own_tmpdir.parent) as tmp:
        folder = Path(tmp)
        stage = {
            "stage": "eval",
            "model": str(tiny_lm),
            "data": {"path": "recipes/data/arith_qa", "split": "test[:4]"},
            "generation": generation,
            "batch_size": draw(st.sampled_from([1, 32, 10**4])),
        }
        validate_answers(write_recipe(folder, stage), own_tmpdir, seconds=20)
