"""Run every benchmark and write docs/BENCHMARKS.md (`make bench`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cli_startup  # noqa: E402
import data_view  # noqa: E402
import diffusion  # noqa: E402
import distributed  # noqa: E402
import eval_batching  # noqa: E402
import harness  # noqa: E402
import memory_plan  # noqa: E402
import ppo_loop  # noqa: E402
import quickstart  # noqa: E402
import real_model  # noqa: E402
import rlhf  # noqa: E402
import serve_throughput  # noqa: E402
import sft_overhead  # noqa: E402
from common import ROOT, machine  # noqa: E402


def main() -> None:
    header = (
        "# Benchmarks\n\n"
        f"Written by `make bench` (`benchmarks/run_all.py`) on {time.strftime('%Y-%m-%d')}.\n\n"
        f"Machine: {machine()}.\n\n"
    )
    path = ROOT / "docs" / "BENCHMARKS.md"
    sections: list[str] = []
    modules = (cli_startup, sft_overhead, quickstart, eval_batching, harness, memory_plan)
    modules += (rlhf, ppo_loop, diffusion, distributed, real_model, serve_throughput, data_view)
    for module in modules:
        sections.append(module.main())
        path.write_text(header + "\n".join(sections))  # after each section: a failure later keeps these
    print(path.read_text())


if __name__ == "__main__":
    main()
