"""Where tunelab's shipped files are: the recipes, their data, and the folders under recipes/ that hold
other YAML. A leaf module (no tunelab imports but errors), so the Hub helpers and the recipe loader
both import it at their top without importing each other."""

from __future__ import annotations

from pathlib import Path

from tunelab.errors import TunelabError

# Folders of recipes/ that hold other YAML: data, Accelerate configs, lm-evaluation-harness tasks.
NOT_RECIPES = ("data", "accelerate", "harness")


def recipes_root() -> Path:
    """Folder of the shipped recipes: inside the wheel, or the repo's `recipes/`."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "recipes", here.parents[1] / "recipes"):
        if candidate.is_dir():
            return candidate
    raise TunelabError("the shipped recipes are missing from this installation: reinstall tunelab")


def shipped_recipes() -> dict[str, Path]:
    """Shipped recipe names (path under recipes/ without `.yaml`) to their files."""
    root = recipes_root()
    return {
        str(p.relative_to(root).with_suffix("")): p
        for p in sorted(root.rglob("*.yaml"))
        if p.relative_to(root).parts[0] not in NOT_RECIPES
    }
