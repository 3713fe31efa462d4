"""Wall time of `tunelab run quickstart` as a user runs it, and its before/after exact match."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> str:
    tunelab = str(Path(sys.executable).with_name("tunelab"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "quickstart"
        start = time.perf_counter()
        subprocess.run(
            [tunelab, "run", "quickstart", f"output_dir={out}"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - start
        metrics = json.loads((out / "metrics.json").read_text())
        stages = json.loads((out / "run.json").read_text())["stages"]
    before, after = metrics["eval"]["pretrained"], metrics["eval"]["sft"]
    times = ", ".join(f"{name} {info['seconds']:.0f} s" for name, info in stages.items())
    return (
        "## Quickstart\n\n"
        "`tunelab run quickstart` (the command `make demo` runs), one run, wall time from the shell "
        "(`benchmarks/quickstart.py`).\n\n"
        "| wall time | stages | exact match before SFT | exact match after SFT | held-out questions |\n"
        "|---|---|---|---|---|\n"
        f"| {wall:.0f} s | {times} | {before['exact_match']:.3f} | **{after['exact_match']:.3f}** | "
        f"{after['examples']} |\n"
    )


if __name__ == "__main__":
    print(main())
