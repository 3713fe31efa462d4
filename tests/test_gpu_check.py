"""benchmarks/gpu_check.py starts: its dry run trains every path that needs no GPU on a tiny model, and
records the others as skipped with the reason, so the script is known to work before a GPU is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINED_ON_CPU = {"sft-lora-sdpa", "sft-qlora-sdpa", "dpo-lora", "grpo-lora"}


@pytest.mark.slow  # 23 s: trains every CPU-able case of the GPU script
def test_dry_run_trains_what_a_cpu_can_and_names_what_it_skips(tmp_path: Path) -> None:
    doc = (ROOT / "docs" / "BENCHMARKS.md").read_text()
    out = tmp_path / "gpu-check.json"
    argv = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--json", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = {row["path"]: row for row in json.loads(out.read_text())}
    assert TRAINED_ON_CPU | {"memory planner", "serving", "zero2-full", "fsdp-full", "grpo-lora-vllm"} <= set(rows)
    for name in TRAINED_ON_CPU:
        row = rows[name]
        assert row["status"] == "ok" and row["tokens_per_second"] > 0 and row["planned_gib"] > 0, row
    assert rows["memory planner"]["status"] == "ok", rows["memory planner"]
    for row in rows.values():
        assert row["status"] == "ok" or row["status"].startswith("skipped: "), row
    assert "## GPU check" in proc.stdout
    assert (ROOT / "docs" / "BENCHMARKS.md").read_text() == doc  # a dry run records nothing
