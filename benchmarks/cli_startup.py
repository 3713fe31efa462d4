"""`tunelab --help` wall time against a bare `python -c pass` (median of N runs each, interleaved)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median  # noqa: E402

RUNS = 11


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> str:
    tunelab = str(Path(sys.executable).with_name("tunelab"))
    bare, cli = [], []
    timed([tunelab, "--help"])  # warm the file cache
    for _ in range(RUNS):
        bare.append(timed([sys.executable, "-c", "pass"]))
        cli.append(timed([tunelab, "--help"]))
    b, c = median(bare), median(cli)
    return (
        "## CLI start-up\n\n"
        f"Median of {RUNS} interleaved runs.\n\n"
        "| command | wall time |\n|---|---|\n"
        f"| `python -c pass` | {b * 1000:.0f} ms |\n"
        f"| `tunelab --help` | {c * 1000:.0f} ms |\n"
        f"| difference | **{(c - b) * 1000:.0f} ms** (target: under 300 ms) |\n"
    )


if __name__ == "__main__":
    print(main())
