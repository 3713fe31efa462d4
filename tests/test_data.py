"""Dataset loading: local files of each format, folders with splits, bundled paths, split slicing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab import TunelabError
from tunelab.data.datasets import load_split

ROWS = [{"prompt": f"Question: {i}+1?\nAnswer:", "completion": f" {i + 1}"} for i in range(5)]


def write(path: Path, fmt: str) -> Path:
    import pandas as pd

    frame = pd.DataFrame(ROWS)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    elif fmt == "json":
        path.write_text(json.dumps(ROWS))
    elif fmt == "csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "csv", "parquet"])
def test_local_files(tmp_path: Path, fmt: str) -> None:
    ds = load_split(str(write(tmp_path / f"d.{fmt}", fmt)), "data")
    assert ds.column_names == ["prompt", "completion"] and len(ds) == 5
    assert str(ds[2]["completion"]).strip() == "3"  # CSV readers infer numbers


def test_folder_splits_and_slices(tmp_path: Path) -> None:
    write(tmp_path / "train.jsonl", "jsonl")
    write(tmp_path / "test.jsonl", "jsonl")
    assert len(load_split({"path": str(tmp_path), "split": "test[:2]"}, "data")) == 2
    with pytest.raises(TunelabError, match="split 'validation' not found"):
        load_split({"path": str(tmp_path), "split": "validation"}, "data")


def test_bundled_data_resolves_from_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    ds = load_split({"path": "recipes/data/arith_qa", "split": "test"}, "data")
    assert len(ds) == 300 and set(ds.column_names) == {"prompt", "completion"}


def test_bad_data_specs(tmp_path: Path) -> None:
    (tmp_path / "notes.md").write_text("x")
    with pytest.raises(TunelabError, match="use one of"):
        load_split(str(tmp_path / "notes.md"), "data")
    with pytest.raises(TunelabError, match="unknown key 'data.splits'.*did you mean 'split'"):
        load_split({"path": "x", "splits": "train"}, "data")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(TunelabError, match="no data files"):
        load_split(str(tmp_path / "empty_dir"), "data")
    with pytest.raises(TunelabError, match="single file, which has only a 'train' split"):
        load_split({"path": str(write(tmp_path / "d.jsonl", "jsonl")), "split": "test"}, "data")
    (tmp_path / "blank.jsonl").write_text("\n")
    with pytest.raises(TunelabError, match=r"^'data': dataset '.*blank.jsonl' \(split train\) is empty$"):
        load_split(str(tmp_path / "blank.jsonl"), "data")


def test_a_single_file_is_its_only_split_whatever_the_stage_default(tmp_path: Path) -> None:
    path = str(write(tmp_path / "d.jsonl", "jsonl"))
    assert len(load_split(path, "eval_data", "test")) == len(load_split(path, "data", "train")) > 0


def test_missing_and_empty_data_files(tmp_path: Path) -> None:
    with pytest.raises(TunelabError, match="'data' is 'nope.jsonl': no such file or folder"):
        load_split("nope.jsonl", "data")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(TunelabError, match="an empty file: it holds no examples"):
        load_split(str(tmp_path / "empty.jsonl"), "data")
