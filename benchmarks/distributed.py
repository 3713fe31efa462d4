"""Data-parallel scaling on this machine: samples per second of training with 1 process and with 2
(`tunelab launch --num-processes 2`, gloo on CPU), same global batch, for LM pre-training (the
quickstart's model) and for DDPM on digits; interleaved, median of 3. Trainer's own
`train_samples_per_second` (training loop only, no start-up).

`python benchmarks/distributed.py` replaces its section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from common import ROOT, machine, median

TITLE = "## Data-parallel scaling (1 vs 2 processes)"
REPEATS = 3


def _pretrain(batch: int) -> dict:
    recipe = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    stage = recipe["stages"]["pretrain"]
    stage["training"].update(
        {"max_steps": 60, "per_device_train_batch_size": batch, "save_strategy": "no", "report_to": "none"}
    )
    return stage


def _ddpm(batch: int) -> dict:
    stage = yaml.safe_load((ROOT / "recipes" / "diffusion" / "ddpm-digits.yaml").read_text())["stages"]["ddpm"]
    stage["training"].update(
        {"max_steps": 80, "per_device_train_batch_size": batch, "save_strategy": "no", "report_to": "none"}
    )
    stage.pop("samples")
    return stage


def _one(stage: dict, processes: int, tmp: Path, name: str) -> float:
    path = tmp / f"{name}.yaml"
    out = tmp / name
    path.write_text(yaml.safe_dump({"output_dir": str(out), "seed": 0, "stages": {"s": stage}}))
    tunelab = [sys.executable, "-m", "tunelab"]
    argv = [*tunelab, "run", str(path)] if processes == 1 else [*tunelab, "launch", "--num-processes", "2", str(path)]
    subprocess.run([*argv, "--overwrite"], check=True, capture_output=True, cwd=ROOT)
    return json.loads((out / "metrics.json").read_text())["s"]["train_samples_per_second"]


def main() -> str:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, make, global_batch in (("LM pre-training (1.1M Llama)", _pretrain, 16), ("DDPM digits", _ddpm, 64)):
            one, two = [], []
            for i in range(REPEATS):
                one.append(_one(make(global_batch), 1, Path(tmp), f"one{i}"))
                two.append(_one(make(global_batch // 2), 2, Path(tmp), f"two{i}"))
                print(label, one[-1], two[-1], flush=True)
            rows.append((label, global_batch, median(one), median(two), one, two))
    lines = [
        TITLE,
        "",
        f"`python benchmarks/distributed.py` on {machine()}. Training samples per second (the Trainer's "
        f"`train_samples_per_second`), same global batch, interleaved, median of {REPEATS}; 2 processes are "
        "`tunelab launch --num-processes 2` (gloo). On 2 cores one process already uses both (PyTorch intra-op "
        "threads); two processes get one core each (torchrun sets OMP_NUM_THREADS=1), so there is no compute to "
        "add: the ratio shows what splitting the batch and all-reducing gradients over gloo costs or gains. "
        "On a GPU machine each process has its own device.",
        "",
        "| workload | global batch | 1 process | 2 processes | speed-up |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, batch, a, b, _, _ in rows:
        lines.append(f"| {label} | {batch} | {a:.1f} | {b:.1f} | {b / a:.2f}x |")
    lines += [
        "",
        "Runs (1 / 2 processes): "
        + "; ".join(
            f"{label}: {', '.join(f'{v:.1f}' for v in one)} / {', '.join(f'{v:.1f}' for v in two)}"
            for label, _, _, _, one, two in rows
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import update_doc

    section = main()
    update_doc(TITLE, section)
    print(section)
