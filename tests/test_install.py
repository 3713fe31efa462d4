"""The environment the suite runs in is the one constraints.txt pins: what `make setup` installs.

A fresh clone's `make test` must pass with the versions a fresh install takes. Those are pinned in
constraints.txt (moved forward by `make upgrade-deps` only when the whole suite passes), so this test fails
when the venv drifted from them (a hand-installed upgrade, a constraint pip did not apply), naming each
package, rather than letting a dependency change show up as a mysterious regression elsewhere.
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: '{line}' is not an exact pin"
            out[_norm(name)] = version
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_installed_versions_are_the_constraints() -> None:
    wanted = pins()
    assert {"torch", "transformers", "trl", "peft", "accelerate", "datasets", "tokenizers"} <= set(wanted)
    installed = {_norm(d.metadata["Name"]): d.version for d in metadata.distributions()}
    wrong = {
        name: (version, installed.get(name))
        for name, version in wanted.items()
        if installed.get(name, "").split("+")[0] != version
    }
    assert not wrong, f"installed versions differ from constraints.txt (run `make setup`): {wrong}"
    unpinned = set(installed) - set(wanted) - {"tunelab", "pip", "setuptools", "wheel"}
    assert not unpinned, f"installed but not in constraints.txt (run `make upgrade-deps`): {sorted(unpinned)}"


def test_pyproject_ranges_admit_the_constraints() -> None:
    """The pins must be installable by a library user too: each lies in pyproject's range for it."""
    import tomllib

    from packaging.requirements import Requirement

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = pins()
    requirements = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    for text in requirements:
        req = Requirement(text)
        version = wanted.get(_norm(req.name))
        assert version is not None, f"{req.name} is a dependency but not in constraints.txt"
        assert req.specifier.contains(version, prereleases=True), f"{req.name}=={version} is outside '{text}'"
