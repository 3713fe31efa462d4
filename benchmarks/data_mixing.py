"""Conversion and mixing overhead: tunelab's `load_data` on a weighted mixture of an Alpaca and a ShareGPT file,
against the same work written by hand with `datasets.load_dataset` + `map` + `interleave_datasets`.

Both sides read the same two generated files (--rows rows each, in a temporary folder deleted after), turn
both formats into chat `messages`, and interleave them 70/30 under one seed; rows/s is the mixture's rows
over the seconds from the first `load_dataset` to the mixed dataset. Each measurement runs in its own process
with an empty datasets cache (nothing is reused from an earlier run: JSON to Arrow, map results), the sides
interleaved, median of --reps. tunelab's side also detects each format, checks the rows, and counts the rows
each source contributed. Ratio = tunelab rows/s / plain rows/s (the issue asks >= 0.95).

    python benchmarks/data_mixing.py                     # writes its section of docs/BENCHMARKS.md
    python benchmarks/data_mixing.py --rows 2000 --reps 1 --no-doc   # a quick check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, median, update_doc  # noqa: E402

TITLE = "## Data: conversion and mixing overhead"
WEIGHTS = (0.7, 0.3)
SEED = 0


def write_files(folder: Path, rows: int) -> tuple[Path, Path]:
    """An Alpaca JSON file and a ShareGPT JSONL file of `rows` arithmetic questions each."""
    rng = random.Random(0)
    alpaca, sharegpt = [], []
    for i in range(rows):
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        alpaca.append(
            {"instruction": f"Add {a} and {b}.", "input": "" if i % 2 else "Show the sum.", "output": str(a + b)}
        )
        turns = [{"from": "human", "value": f"What is {a} minus {b}?"}, {"from": "gpt", "value": str(a - b)}]
        sharegpt.append(json.dumps({"conversations": turns}))
    first, second = folder / "alpaca.json", folder / "sharegpt.jsonl"
    first.write_text(json.dumps(alpaca))
    second.write_text("\n".join(sharegpt) + "\n")
    return first, second


def plain(alpaca: str, sharegpt: str) -> int:
    """What a user writes by hand with datasets: load, map each format to messages, interleave."""
    import datasets

    roles = {"human": "user", "gpt": "assistant", "system": "system"}

    def from_alpaca(row: dict) -> dict:
        user = row["instruction"] + ("\n" + row["input"] if row["input"] else "")
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}

    def from_sharegpt(row: dict) -> dict:
        return {"messages": [{"role": roles[t["from"]], "content": t["value"]} for t in row["conversations"]]}

    first = datasets.load_dataset("json", data_files={"train": alpaca}, split="train")
    first = first.map(from_alpaca, remove_columns=first.column_names)
    second = datasets.load_dataset("json", data_files={"train": sharegpt}, split="train")
    second = second.map(from_sharegpt, remove_columns=second.column_names)
    mixed = datasets.interleave_datasets([first, second], probabilities=list(WEIGHTS), seed=SEED)
    return len(mixed)


def through_tunelab(alpaca: str, sharegpt: str) -> int:
    from tunelab.data.sources import load_data

    value = [{"path": alpaca, "weight": WEIGHTS[0]}, {"path": sharegpt, "weight": WEIGHTS[1]}]
    ds, report = load_data(value, "stages.sft.data", "train", "lm", seed=SEED)
    assert ds.column_names == ["messages"] and report.rows == len(ds)
    return len(ds)


def child(side: str, alpaca: str, sharegpt: str) -> None:
    """One measurement, in a fresh process whose datasets cache is an empty folder: rows and seconds as JSON."""
    import datasets

    datasets.disable_progress_bars()
    import tunelab.data.sources  # noqa: F401  (imports are not what is measured)

    start = time.perf_counter()
    rows = (plain if side == "plain" else through_tunelab)(alpaca, sharegpt)
    print(json.dumps({"rows": rows, "seconds": time.perf_counter() - start}))


def measure(side: str, alpaca: Path, sharegpt: Path, cache: Path) -> dict:
    env = {**os.environ, "HF_DATASETS_CACHE": str(cache), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    args = [sys.executable, __file__, "--child", side, str(alpaca), str(sharegpt)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{side} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(rows: int, reps: int) -> str:
    runs: dict[str, list[dict]] = {"plain": [], "tunelab": []}
    with tempfile.TemporaryDirectory(prefix="tl-mix-") as tmp_name:
        tmp = Path(tmp_name)
        alpaca, sharegpt = write_files(tmp, rows)
        for rep in range(reps):
            for side in runs:
                runs[side].append(measure(side, alpaca, sharegpt, tmp / f"cache-{side}-{rep}"))
    speed = {side: median([r["rows"] / r["seconds"] for r in found]) for side, found in runs.items()}
    mixed = {side: found[0]["rows"] for side, found in runs.items()}
    return (
        f"{TITLE}\n\n"
        "A 70/30 interleave (`mix: interleave`, weights 0.7/0.3, one seed) of an Alpaca JSON file and a ShareGPT "
        f"JSONL file, {rows:,} rows each, both turned into chat `messages`: `tunelab.data.sources.load_data` "
        "against the same work by hand (`load_dataset` + `map` + `interleave_datasets`), each run in a fresh "
        f"process with an empty datasets cache, median of {reps} interleaved runs (`benchmarks/data_mixing.py`). "
        f"Machine: {machine()}.\n\n"
        "| | plain `datasets` | tunelab `load_data` | ratio (tunelab / plain) |\n|---|---|---|---|\n"
        f"| rows in the mixture | {mixed['plain']:,} | {mixed['tunelab']:,} | |\n"
        f"| rows/s | {speed['plain']:,.0f} | {speed['tunelab']:,.0f} | **{speed['tunelab'] / speed['plain']:.3f}** |\n"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000, help="rows of each source file (default 100000)")
    parser.add_argument("--reps", type=int, default=3, help="runs of each side (default 3)")
    parser.add_argument("--no-doc", action="store_true", help="print the section; leave docs/BENCHMARKS.md alone")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
    else:
        text = main(args.rows, args.reps)
        if not args.no_doc:
            update_doc(TITLE, text)
        print(text)
