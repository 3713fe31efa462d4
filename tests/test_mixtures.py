"""Mixtures (`data:` as a list of sources): concat and interleave by datasets' own functions, weights and
samples, stopping strategies, determinism under the seed, rows per source in metrics.json and the report,
--resume refusing a finished stage whose weights changed, and every bad input as one line."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import tunelab
from tests.helpers import fails, tiny_training, write
from tunelab.core.errors import TunelabError
from tunelab.data.datasets import signature
from tunelab.data.sources import check_data, load_data


def _rows(path: Path, name: str, count: int) -> str:
    """A JSONL file of prompt/completion rows whose prompts say where they come from: `name-i`."""
    path.write_text("".join(json.dumps({"prompt": f"{name}-{i}", "completion": " x"}) + "\n" for i in range(count)))
    return str(path)


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    return {
        "a": _rows(tmp_path / "a.jsonl", "a", 1000),
        "b": _rows(tmp_path / "b.jsonl", "b", 1000),
        "small": _rows(tmp_path / "small.jsonl", "s", 10),
        "three": _rows(tmp_path / "three.jsonl", "t", 3),
        "five": _rows(tmp_path / "five.jsonl", "f", 5),
    }


def _load(value, seed: int = 0, target: str = "lm"):
    ds, report = load_data(value, "stages.s.data", "train", target, seed=seed)
    return [row["prompt"] for row in ds], report


def test_interleave_follows_the_weights_and_the_seed(files: dict[str, str]) -> None:
    value = [{"path": files["a"], "weight": 3}, {"path": files["b"], "weight": 1}]
    prompts, report = _load(value, seed=0)
    counts = Counter(p.split("-")[0] for p in prompts)
    # first_exhausted: `a` (p=0.75) runs out first, after ~1000/0.75 draws, ~333 of them from `b`
    assert counts["a"] == 1000 and 280 <= counts["b"] <= 390, counts
    assert report.mix == "interleave" and [s.rows for s in report.sources] == [counts["a"], counts["b"]]
    assert report.rows == len(prompts) and [s.format for s in report.sources] == ["prompt_completion"] * 2
    again, _ = _load(value, seed=0)
    other, _ = _load(value, seed=1)
    assert again == prompts and other != prompts  # the same seed, the same rows in the same order


def test_samples_upsample_to_the_exact_count_and_concat_keeps_order(files: dict[str, str]) -> None:
    prompts, report = _load([{"path": files["small"], "samples": 25}, {"path": files["a"], "samples": 3}])
    assert len(prompts) == 28 and report.mix == "concat" and [s.rows for s in report.sources] == [25, 3]
    assert prompts[:12] == [f"s-{i}" for i in range(10)] + ["s-0", "s-1"]  # the source cycled through
    assert prompts[-3:] == ["a-0", "a-1", "a-2"]  # concat: the second source after the first
    one, single = _load({"path": files["small"], "samples": 4})  # one source with samples: a mixture of one
    assert one == ["s-0", "s-1", "s-2", "s-3"] and single.mix is None and single.rows == 4


def test_interleave_without_weights_alternates_and_stopping_decides_the_end(files: dict[str, str]) -> None:
    sources = [files["three"], files["five"]]
    first, _ = _load({"sources": sources, "mix": "interleave"})
    assert first == ["t-0", "f-0", "t-1", "f-1", "t-2", "f-2"]  # stops when `three` runs out
    every, report = _load({"sources": sources, "mix": "interleave", "stopping": "all_exhausted"})
    assert Counter(p[0] for p in every) == {"t": 5, "f": 5} and [s.rows for s in report.sources] == [5, 5]


def test_a_stage_records_rows_per_source_and_resume_refuses_a_changed_weight(
    tmp_path: Path, tiny_lm: Path, files: dict[str, str]
) -> None:
    stage = {
        "stage": "sft",
        "model": str(tiny_lm),
        "data": [{"path": files["small"], "weight": 0.5}, {"path": files["five"], "weight": 0.5}],
        "eval_data": [{"path": files["three"], "samples": 4}, files["five"]],  # eval_data mixes the same way
        "training": tiny_training(max_steps=1),
    }
    recipe = {"output_dir": str(tmp_path / "run"), "seed": 0, "stages": {"s": stage}}
    result = tunelab.run(tunelab.recipe_from_dict(recipe))
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["s"]
    assert metrics["data[0]_rows"] + metrics["data[1]_rows"] == metrics["data_rows"] == result.metrics["s"]["data_rows"]
    assert metrics["data[1]_rows"] == 5  # first_exhausted: the 5-row source ran out
    assert (metrics["eval_data[0]_rows"], metrics["eval_data[1]_rows"], metrics["eval_data_rows"]) == (4, 5, 9)
    assert metrics["eval_loss"] > 0
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## s: data" in report and f"| stages.s.data[1] | {files['five']} | prompt_completion | 5 |" in report

    stage["data"][0]["weight"] = 0.6
    with pytest.raises(TunelabError, match=r"--resume: stage 's' finished, and its recipe changed since .*weight"):
        tunelab.run(tunelab.recipe_from_dict(recipe), resume=True)


def test_the_fingerprint_reads_every_source(tmp_path: Path, files: dict[str, str]) -> None:
    mixture = {"sources": [files["three"], {"path": files["five"], "samples": 2}], "mix": "concat"}
    before = signature(mixture)
    _rows(Path(files["five"]), "changed", 5)
    assert before and signature(mixture) != before


def test_sources_of_other_formats_become_one_shape(tmp_path: Path) -> None:
    """Alpaca and ShareGPT rows become messages for sft; columns beyond the shape (arith_chat's prompt and
    completion beside its messages) are dropped where not every source has them."""
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": "Add 2 and 3.", "input": "", "output": "5"}] * 4))
    sharegpt = tmp_path / "sharegpt.jsonl"
    turns = [{"from": "human", "value": "1+1?"}, {"from": "gpt", "value": "2"}]
    sharegpt.write_text(json.dumps({"conversations": turns}) + "\n")
    chat = {"path": "recipes/data/arith_chat", "split": "train[:3]"}
    ds, report = load_data([chat, str(alpaca), str(sharegpt)], "stages.s.data", "train", "lm")
    assert ds.column_names == ["messages"] and len(ds) == 8
    assert [s.format for s in report.sources] == ["messages", "alpaca", "sharegpt"]
    assert ds[3]["messages"] == [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
    assert ds[7]["messages"] == [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]


def test_sources_that_become_different_shapes(files: dict[str, str]) -> None:
    with pytest.raises(
        TunelabError,
        match=r"^'stages.s.data\[1\]' \(recipes/data/arith_chat\) becomes messages data .* but 'stages.s.data\[0\]' "
        r"\(.*three.jsonl\) becomes prompt_completion data",
    ):
        _load([files["three"], {"path": "recipes/data/arith_chat", "format": "messages"}])
    with pytest.raises(TunelabError, match=r"'stages.s.data\[1\]' \(recipes/data/arith_pref\)"):
        _load(["recipes/data/arith_corpus", "recipes/data/arith_pref"], target="text")


BAD = [
    ([{"path": "A", "weight": -1}, {"path": "B", "weight": 1}], r"'stages.s.data\[0\]' \(A\) has weight -1: .* 0 or"),
    ([{"path": "A", "weight": "high"}, {"path": "B", "weight": 1}], r"'stages.s.data\[0\]' \(A\) has weight 'high'"),
    ([{"path": "A", "weight": True}, {"path": "B", "weight": 1}], r"has weight True: a weight is a number"),
    ([{"path": "A", "weight": 0}, {"path": "B", "weight": 0.0}], r"every weight is 0"),
    ([{"path": "A", "samples": 0}, "B"], r"'stages.s.data\[0\]' \(A\) has samples 0: give 1 or more rows"),
    ([{"path": "A", "samples": -3}, "B"], r"has samples -3"),
    ([{"path": "A", "samples": 2.5}, "B"], r"has samples 2.5: samples is a whole number"),
    ([{"path": "A", "samples": 5, "weight": 1}], r"'stages.s.data\[0\]' \(A\) sets both weight and samples"),
    ([{"path": "A", "weight": 1}, "B"], r"'stages.s.data\[1\]' \(B\) has no weight, but .*give every source a"),
    ({"sources": ["A", "B"], "mix": "shuffle"}, r"'stages.s.data.mix' is 'shuffle': use concat or interleave"),
    ({"sources": ["A", "B"], "mix": "interleave", "stopping": "never"}, r"'stages.s.data.stopping' is 'never'"),
    ({"sources": ["A", "B"], "stopping": "all_exhausted"}, r"applies to mix: interleave"),
    ({"sources": [{"path": "A", "weight": 1}], "mix": "concat"}, r"weights with mix: concat"),
    ({"sources": ["A"], "shuffle": True}, r"unknown key 'stages.s.data.shuffle'"),
    ({"sources": []}, r"'stages.s.data.sources' is an empty list"),
    ({"sources": ["A"], "streaming": "yes"}, r"'stages.s.data.streaming' is 'yes': set it to true or false"),
    ([42], r"'stages.s.data\[0\]' is 42: each source is a dataset path or a mapping"),
]


@pytest.mark.parametrize(("value", "message"), BAD)
def test_bad_mixtures_are_one_line_before_loading(value, message: str) -> None:
    with pytest.raises(TunelabError, match=message):
        check_data(value, "stages.s.data", "train", "lm")


def test_bad_mixture_at_validate(tmp_path: Path, tiny_lm: Path, files: dict[str, str]) -> None:
    stage = {
        "stage": "sft",
        "model": str(tiny_lm),
        "data": [{"path": files["a"], "weight": 2}, {"path": files["b"], "weight": -1}],
        "training": tiny_training(),
    }
    path = write(tmp_path, {"stages": {"s": stage}})
    fails(["validate", str(path)], rf"'stages.s.data\[1\]' \({files['b']}\) has weight -1")
