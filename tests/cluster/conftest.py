"""The cluster tests' fixtures: the two-node Slurm cluster that `tests/cluster/cluster.sh run` brought up.

These tests are marked `cluster` and left out of the default suite (pyproject's addopts); `make test-cluster`
starts the cluster, runs them with `-m cluster`, and tears it down. Without a cluster they skip, saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

os.environ["OMP_NUM_THREADS"] = "1"  # every process of every job: the nodes share this machine's cores

WHY = "no two-node Slurm cluster is up: `make test-cluster` brings one up (root and apt), runs these, tears it down"


def cluster_dir() -> Path | None:
    """The cluster's state folder (hosts file, slurm.conf) when one answers, else None."""
    folder = os.environ.get("TUNELAB_CLUSTER")
    if not folder or not os.environ.get("SLURM_CONF") or shutil.which("sinfo") is None:
        return None
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    nodes = {line.split()[0] for line in out.stdout.splitlines() if line.strip()}
    return Path(folder) if out.returncode == 0 and {"n1", "n2"} <= nodes else None


@pytest.fixture(scope="session")
def cluster() -> Path:
    found = cluster_dir()
    if found is None:
        pytest.skip(WHY)
    return found


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    """`make test` deselects these; say so, and how to run them."""
    left_out = [i for i in terminalreporter.stats.get("deselected", []) if "tests/cluster/" in i.nodeid]
    if left_out and cluster_dir() is None:
        terminalreporter.write_line(f"tests/cluster: {len(left_out)} deselected ({WHY})")
