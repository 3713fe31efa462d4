"""Run every benchmark and write docs/BENCHMARKS.md (`make bench`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_startup  # noqa: E402
import memory_plan  # noqa: E402
import quickstart  # noqa: E402
import sft_overhead  # noqa: E402
from common import ROOT, machine  # noqa: E402


def main() -> None:
    sections = [cli_startup.main(), sft_overhead.main(), quickstart.main(), memory_plan.main()]
    text = (
        "# Benchmarks\n\n"
        f"Written by `make bench` (`benchmarks/run_all.py`) on {time.strftime('%Y-%m-%d')}.\n\n"
        f"Machine: {machine()}.\n\n" + "\n".join(sections)
    )
    path = ROOT / "docs" / "BENCHMARKS.md"
    path.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
