"""One run of `tunelab run rlhf/arith`: per-stage wall time, the reward model's held-out pairwise
accuracy, and each policy's exact match and mean reward-model score on the 300 held-out questions.

Standalone (`python benchmarks/rlhf.py`) it replaces its own section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TITLE = "## RLHF pipeline"


def main() -> str:
    tunelab = str(Path(sys.executable).with_name("tunelab"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rlhf"
        start = time.perf_counter()
        subprocess.run(
            [tunelab, "run", "rlhf/arith", f"output_dir={out}"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - start
        metrics = json.loads((out / "metrics.json").read_text())
        stages = json.loads((out / "run.json").read_text())["stages"]
    return report(metrics, {name: info["seconds"] for name, info in stages.items()}, wall)


def report(metrics: dict, seconds: dict[str, float], wall: float) -> str:
    reward, ppo, ev = metrics["reward"], metrics["ppo"], metrics["eval"]
    core = sum(seconds[s] for s in ("pretrain", "sft", "reward", "ppo", "eval"))
    rows = "".join(
        f"| {label} | {ev[label]['exact_match']:.3f} | {ev[label]['reward_mean']:.3f} |\n" for label in ev
    )
    times = " | ".join(f"{seconds[s]:.0f} s" for s in seconds)
    gain = ev["ppo"]["reward_mean"] - ev["sft"]["reward_mean"]
    return (
        f"{TITLE}\n\n"
        "`tunelab run rlhf/arith` (`make rlhf`), one run, wall time from the shell (`benchmarks/rlhf.py`): "
        "pretrain a 1.1M-parameter Llama, full SFT, a reward model on the SFT model, PPO against it, DPO and "
        "GRPO from the same SFT model, then greedy answers of every policy on the 300 held-out questions, "
        "scored by exact match and by the reward model.\n\n"
        f"Reward model: pairwise accuracy on the 300 held-out pairs **{reward['pairwise_accuracy']:.3f}** "
        f"(untrained head {reward['untrained_pairwise_accuracy']:.3f}; mean margin {reward['margin']:.2f}).\n\n"
        f"PPO: mean reward-model score of sampled answers {ppo['first_score']:.2f} in the first tenth of the "
        f"steps, {ppo['last_score']:.2f} in the last; KL to the reference {ppo['last_kl']:.3f} at the end.\n\n"
        "| policy | exact match | mean reward-model score |\n|---|---|---|\n"
        f"{rows}\n"
        f"PPO minus SFT, mean reward-model score on the held-out questions: **{gain:+.3f}**.\n\n"
        f"| {' | '.join(seconds)} | total |\n|{'---|' * (len(seconds) + 1)}\n| {times} | {wall:.0f} s |\n\n"
        f"SFT -> reward -> PPO -> eval with its pretrain: {core / 60:.1f} min of stage time "
        f"(the issue's budget: 15 min); the whole recipe with DPO and GRPO: {wall / 60:.1f} min.\n"
    )


def update_doc(section: str) -> None:
    """Replace this script's section of docs/BENCHMARKS.md (or append it)."""
    from common import ROOT

    path = ROOT / "docs" / "BENCHMARKS.md"
    text = path.read_text()
    if TITLE in text:
        start = text.index(TITLE)
        end = text.find("\n## ", start + len(TITLE))
        text = text[:start] + section + (text[end + 1 :] if end != -1 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    result = main()
    update_doc(result)
    print(result)
