"""Batched generation in the eval stage against one prompt at a time: examples per second, same scores.

The quickstart's tiny Llama (built here, briefly pre-trained), the 300 held-out arithmetic questions,
greedy decoding of 6 new tokens; batch 32 (left padding, prompts sorted by length) against batch 1,
interleaved, median of REPS runs each (`benchmarks/eval_batching.py`).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, median  # noqa: E402
from sft_overhead import build_model  # noqa: E402

REPS = 3


def evaluate(model: Path, batch: int, out: Path) -> tuple[float, float, list[str]]:
    import tunelab

    recipe = tunelab.recipe_from_dict(
        {
            "output_dir": str(out),
            "stages": {
                "eval": {
                    "stage": "eval",
                    "models": {"m": str(model)},
                    "data": {"path": str(ROOT / "recipes/data/arith_qa"), "split": "test"},
                    "generation": {"max_new_tokens": 6},
                    "batch_size": batch,
                }
            },
        }
    )
    start = time.perf_counter()
    result = tunelab.run(recipe)
    seconds = time.perf_counter() - start
    rows = (out / "eval" / "predictions-m.jsonl").read_text().splitlines()
    return len(rows) / seconds, result.metrics["eval"]["m"]["exact_match"], [json.loads(r)["output"] for r in rows]


def main() -> str:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = build_model(tmp)
        runs: dict[int, list] = {1: [], 32: []}
        for i in range(REPS):
            for batch in (32, 1):
                runs[batch].append(evaluate(model, batch, tmp / f"b{batch}-{i}"))
    speed = {b: median([r[0] for r in v]) for b, v in runs.items()}
    same = runs[1][0][2] == runs[32][0][2]
    return (
        "## Batched generation in the eval stage\n\n"
        "300 held-out questions, greedy, 6 new tokens, the quickstart's 1.1M-parameter Llama; whole `tunelab run` "
        f"of an eval stage (loading included), median of {REPS} interleaved runs (`benchmarks/eval_batching.py`).\n\n"
        "| batch size | examples / s | exact match |\n|---|---|---|\n"
        f"| 1 | {speed[1]:.1f} | {runs[1][0][1]:.3f} |\n"
        f"| 32 (left padding, sorted by length) | {speed[32]:.1f} | {runs[32][0][1]:.3f} |\n\n"
        f"Speed-up: **{speed[32] / speed[1]:.1f}x** (target: at least 2x); outputs identical: **{same}**.\n"
    )


if __name__ == "__main__":
    print(main())
