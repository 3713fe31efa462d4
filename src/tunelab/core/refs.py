"""`${stage}` references: the one syntax by which a stage names an earlier stage's output.

Kept apart from recipe loading so that every module that reads a reference (models, stages,
pipeline) imports this leaf module at its top, and none of them imports the recipe loader.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from tunelab.core.errors import TunelabError

REF = re.compile(r"^\$\{([A-Za-z_][\w-]*)\}$")


def ref_name(value: Any) -> str | None:
    """The stage a value names (`${sft}` -> `sft`), or None when it is not a reference."""
    if not isinstance(value, str):
        return None
    match = REF.match(value.strip())
    return match.group(1) if match else None


def iter_refs(node: Any, where: str) -> Iterator[tuple[str, str]]:
    """Yield (location, stage name) for each `${stage}` reference inside a stage."""
    if isinstance(node, str):
        name = ref_name(node)
        if name:
            yield where, name
        elif "${" in node:
            raise TunelabError(f"'{where}' is '{node}': a reference must be the whole value, like ${{sft}}")
    elif isinstance(node, dict):
        for key, value in node.items():
            yield from iter_refs(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from iter_refs(value, f"{where}[{i}]")
