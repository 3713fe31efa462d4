"""What crossing a network costs: the quickstart's LM pre-training as a Slurm job on 2 nodes x 1 process
against 1 node x 2 processes (the same 2 gloo ranks, the same global batch), interleaved, median of 3, on
the two-node cluster of tests/cluster/ (two network namespaces on this machine). Also the time from `sbatch`
to the first training step, and to the job's end.

Both nodes share this machine's cores: the ratio measures the overhead of rendezvous and gradients over
TCP between hosts against the same ranks on one host, not a speed-up.

Needs root (network namespaces, Slurm):

    tests/cluster/cluster.sh run python benchmarks/cluster.py            # replaces its section of docs/BENCHMARKS.md
    tests/cluster/cluster.sh run python benchmarks/cluster.py --repeats 1 --no-write   # a check that it runs

Not part of `make bench` (which needs no root).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import ROOT, machine, median

TITLE = "## Across hosts: 2 Slurm nodes x 1 process against 1 node x 2 processes"
STEPS, GLOBAL_BATCH = 60, 16
LAYOUTS = {
    "2 nodes x 1 process": ["--nodes", "2"],
    "1 node x 2 processes": ["--nodes", "1", "--processes-per-node", "2"],
}


def _recipe(tmp: Path, name: str) -> Path:
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    stage = recipe["stages"]["pretrain"]
    stage["training"].update(
        {
            "max_steps": STEPS,
            "per_device_train_batch_size": GLOBAL_BATCH // 2,  # 2 ranks either way
            "save_strategy": "no",
            "report_to": "none",
            "logging_steps": 1,
        }
    )
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp / name), "seed": 0, "stages": {"pretrain": stage}}))
    return path


def _job_state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=30).stdout
    found = re.search(r"JobState=(\w+)", out)
    return found.group(1) if found else "UNKNOWN"


def _one(tmp: Path, name: str, layout: list[str]) -> dict[str, float]:
    """Write the script (the recipe checked, untimed), then time sbatch -> first step -> end."""
    tunelab = [sys.executable, "-m", "tunelab"]
    recipe = _recipe(tmp, name)
    subprocess.run(
        [*tunelab, "launch", "--slurm", str(recipe), *layout, "--ifname", "eth0", "--time", "30:00"],
        check=True,
        capture_output=True,
        cwd=ROOT,
    )
    script, log_pattern = tmp / f"{name}.sbatch", str(tmp / f"{name}-slurm-%j.out")
    start = time.perf_counter()
    job = subprocess.run(["sbatch", "--parsable", str(script)], check=True, capture_output=True, text=True)
    job_id = job.stdout.strip().split(";")[0]
    log = Path(log_pattern.replace("%j", job_id))
    first = None
    while (state := _job_state(job_id)) in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
        if first is None and log.exists() and f"step 1/{STEPS}" in log.read_text(errors="replace"):
            first = time.perf_counter() - start
        time.sleep(0.2)
    end = time.perf_counter() - start
    if state != "COMPLETED":
        raise SystemExit(f"job {job_id} ({name}) ended {state}; see {log}")
    metrics = json.loads((tmp / name / "metrics.json").read_text())["pretrain"]
    return {"samples_per_s": metrics["train_samples_per_second"], "first_step_s": first or end, "job_s": end}


def main(repeats: int = 3) -> str:
    if not os.environ.get("SLURM_CONF") or not os.environ.get("TUNELAB_CLUSTER"):
        raise SystemExit("no cluster: run it as `tests/cluster/cluster.sh run python benchmarks/cluster.py` (root)")
    os.environ["OMP_NUM_THREADS"] = "1"  # one core's worth per rank in both layouts (sbatch passes it on)
    runs: dict[str, list[dict[str, float]]] = {label: [] for label in LAYOUTS}
    with tempfile.TemporaryDirectory(prefix="tl-bench-cluster-") as tmp:
        for i in range(repeats):  # interleaved: the machine's drift touches both layouts alike
            for label, layout in LAYOUTS.items():
                runs[label].append(_one(Path(tmp), f"{'two' if '2 nodes' in label else 'one'}{i}", layout))
                print(label, runs[label][-1], flush=True)
    medians = {label: {k: median([r[k] for r in rs]) for k in rs[0]} for label, rs in runs.items()}
    two, one = medians["2 nodes x 1 process"], medians["1 node x 2 processes"]
    lines = [
        TITLE,
        "",
        f"`tests/cluster/cluster.sh run python benchmarks/cluster.py` on {machine()}. The quickstart's LM pre-training "
        f"(1.1M Llama, {STEPS} steps, global batch {GLOBAL_BATCH}) as a Slurm job written by `tunelab launch --slurm`, "
        "on the two-node cluster of `tests/cluster/` (two network namespaces on this machine joined by a bridge; gloo "
        f"over TCP on eth0), interleaved, median of {repeats}. Both layouts run the same 2 ranks with "
        "OMP_NUM_THREADS=1; both nodes share this machine's 2 cores, so this measures what crossing hosts costs "
        "(rendezvous, gradients over TCP between network namespaces), not a speed-up.",
        "",
        "| layout | training samples/s | sbatch to first step | sbatch to job end |",
        "|---|---:|---:|---:|",
    ]
    for label, m in medians.items():
        lines.append(f"| {label} | {m['samples_per_s']:.1f} | {m['first_step_s']:.0f} s | {m['job_s']:.0f} s |")
    lines += [
        "",
        f"2 nodes / 1 node: {two['samples_per_s'] / one['samples_per_s']:.2f}x the training throughput. "
        "Runs (samples/s): "
        + "; ".join(label + ": " + ", ".join(f"{r['samples_per_s']:.1f}" for r in rs) for label, rs in runs.items()),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the section; leave docs/BENCHMARKS.md alone")
    args = parser.parse_args()
    section = main(args.repeats)
    if not args.no_write:
        from common import update_doc

        update_doc(TITLE, section)
    print(section)
