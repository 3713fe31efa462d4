"""Helpers shared by the benchmark scripts: machine description and medians."""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def machine() -> str:
    """One line naming the machine the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = ""
    try:
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = f", {kb / 2**20:.0f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    gpu = ""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=10
        )
        if out.returncode == 0 and out.stdout.strip():
            gpu = f", GPU: {out.stdout.strip().splitlines()[0]}"
    except (OSError, subprocess.SubprocessError):
        pass
    return f"{cpu}, {os.cpu_count()} cores{mem}{gpu}; Python {platform.python_version()}"


def median(values: list[float]) -> float:
    return statistics.median(values)


def run_recipe(
    recipe: str, inspect=None, overrides: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> tuple[float, dict, dict[str, float]]:
    """Run a recipe with the `tunelab` CLI into a temporary folder, as a user would (with `overrides`,
    and `env` added to the environment).

    Returns (wall seconds from the shell, metrics.json, seconds per stage); `inspect(run_dir)`, if
    given, runs before the folder is removed and its result is added to the metrics as "inspect".
    """
    import json
    import sys
    import tempfile
    import time

    tunelab = str(Path(sys.executable).with_name("tunelab"))
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "run"
        start = time.perf_counter()
        subprocess.run(
            [tunelab, "run", recipe, f"output_dir={out}", *overrides],
            check=True,
            env={**os.environ, **(env or {})},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - start
        metrics = json.loads((out / "metrics.json").read_text())
        stages = json.loads((out / "run.json").read_text())["stages"]
        if inspect is not None:
            metrics["inspect"] = inspect(out)
    return wall, metrics, {name: info["seconds"] for name, info in stages.items()}


def update_doc(title: str, section: str) -> None:
    """Replace the section headed `title` in docs/BENCHMARKS.md (or append it)."""
    path = ROOT / "docs" / "BENCHMARKS.md"
    text = path.read_text()
    if title in text:
        start = text.index(title)
        end = text.find("\n## ", start + len(title))
        rest = text[end + 1 :] if end != -1 else ""
        text = text[:start] + section.rstrip("\n") + "\n" + ("\n" + rest if rest else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)
