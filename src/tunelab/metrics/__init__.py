"""Metrics in `evaluate`'s own module format, shipped so they work offline.

`evaluate` 0.4.6 fetches every metric from the Hub, so `evaluate.load("accuracy")` fails
without network. Each folder here is an `evaluate.Metric` module: load it with
`evaluate.load(path)` (or `tunelab.metrics.load(name)`), combine with `evaluate.combine`.
When the Hub is reachable, names tunelab does not ship are loaded from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.core.errors import TunelabError, closest
from tunelab.core.hub import hub_reachable

ROOT = Path(__file__).resolve().parent
SHIPPED = tuple(sorted(p.name for p in ROOT.iterdir() if (p / f"{p.name}.py").is_file()))


def path(name: str) -> Path:
    """Folder of a shipped metric module (what `evaluate.load` takes)."""
    return ROOT / name


def check_name(name: Any, where: str) -> str:
    """A metric name that can be loaded here; a one-line error otherwise (no import of evaluate)."""

    if not isinstance(name, str):
        raise TunelabError(f"'{where}' must be a metric name, got {name!r}")
    if name in SHIPPED or hub_reachable():
        return name
    guess = closest(name, SHIPPED)
    hint = f"did you mean '{guess}'? " if guess else ""
    raise TunelabError(
        f"'{where}': metric '{name}' is not shipped with tunelab and the Hub is unreachable (offline); "
        f"{hint}shipped: {', '.join(SHIPPED)}"
    )


def load(name: str, where: str = "metrics"):
    """An `evaluate.EvaluationModule`: a shipped module, or a Hub metric when online."""
    import evaluate

    check_name(name, where)
    target = str(path(name)) if name in SHIPPED else name
    try:
        return evaluate.load(target)
    except (FileNotFoundError, ImportError, ValueError) as exc:
        raise TunelabError(f"'{where}': cannot load metric '{name}': {' '.join(str(exc).split())[:200]}") from None
