"""tunelab: fine-tune and evaluate foundation models from YAML recipes.

Python API (the CLI calls the same functions)::

    from tunelab import load_recipe, validate, run

    recipe = load_recipe("quickstart", ["training.max_steps=20"])
    validate(recipe)               # raises TunelabError with one line on bad input
    result = run(recipe)           # RunResult: run_dir, metrics, outputs
    print(result.metrics["eval"])

Heavy libraries (torch, transformers, TRL) load only when a run needs them.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from tunelab.errors import TunelabError
from tunelab.recipe import Recipe, load_recipe, recipe_from_dict

__version__ = "0.1.0"
__all__ = [
    "Recipe",
    "RunResult",
    "TunelabError",
    "chat",
    "generate",
    "load_recipe",
    "merge",
    "recipe_from_dict",
    "run",
    "validate",
]

if TYPE_CHECKING:
    from pathlib import Path

    from tunelab.pipeline import RunResult


def validate(
    recipe: Recipe | str | os.PathLike,
    overwrite: bool = False,
    resume: bool = False,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    from_stage: str | None = None,
) -> str:
    """Check a recipe (a Recipe, a path or a shipped name) without training, as `tunelab validate` does.

    Returns 'new', 'resume' or 'overwrite' (the output folder's fate); raises TunelabError with one line.
    """
    from tunelab.pipeline import check

    _flags(overwrite=overwrite, resume=resume)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise TunelabError("overrides apply to a recipe being loaded: pass a path or a name, or edit the Recipe")
    return check(recipe, overwrite=overwrite, resume=resume, from_stage=from_stage)


def _flags(**flags: Any) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TunelabError(f"{name} must be True or False, not {value!r}; pass overrides=[...] by name")


def run(
    recipe: Recipe | str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    overwrite: bool = False,
    resume: bool = False,
    from_stage: str | None = None,
) -> RunResult:
    """Run a recipe (a Recipe, a path or a shipped name) and return its metrics and outputs.

    `from_stage` reruns that stage and the ones after it in an existing run (`tunelab run --from`).
    """
    from tunelab.pipeline import run as _run

    _flags(overwrite=overwrite, resume=resume)
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    return _run(recipe, overwrite=overwrite, resume=resume, from_stage=from_stage)


def merge(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None, overwrite: bool = False) -> Path:
    """Merge a LoRA adapter into its base model; saves a full model with its tokenizer."""
    from tunelab.hub import configure_offline
    from tunelab.models import merge as _merge
    from tunelab.progress import quiet

    configure_offline()
    quiet()
    return _merge(adapter_dir, out_dir, base=base, overwrite=overwrite)


def chat(model: str, prompt: str, system: str | None = None, history: list | None = None, **generation: Any) -> str:
    """One reply from a model (folder, adapter, stage folder, hub id, .gguf) through its chat template."""
    from tunelab.talk import chat as _chat

    return _chat(model, prompt, system=system, history=history, **generation)


def generate(model: str, prompts: list[str], batch_size: int = 16, system: str | None = None, **generation: Any):
    """Replies to many prompts, batched (left padding, sorted by length), through the chat template."""
    from tunelab.talk import generate as _generate

    return _generate(model, prompts, batch_size=batch_size, system=system, **generation)


def __getattr__(name: str) -> Any:
    if name == "RunResult":
        from tunelab.pipeline import RunResult

        return RunResult
    raise AttributeError(name)
