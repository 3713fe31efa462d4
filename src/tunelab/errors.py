"""The one exception type users see.

Every problem tunelab can name before (or while) training raises
:class:`TunelabError` with a single line that says what is wrong and how to fix
it. The CLI prints that line and exits with code 2, without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class TunelabError(Exception):
    """A problem in the user's input, reported as one line (exit code 2)."""

    exit_code = 2


def closest(word: str, choices: Iterable[str]) -> str | None:
    """The closest valid name to a misspelt one, for "did you mean" hints."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_key(where: str, key: str, choices: Iterable[str], source: str) -> TunelabError:
    """Error for a key that the target class does not have, with the nearest valid key."""
    choices = sorted(choices)
    guess = closest(key, choices)
    hint = f"did you mean '{guess}'?" if guess else f"valid keys: {', '.join(choices[:40])}"
    if not guess and len(choices) > 40:
        hint += ", ..."
    return TunelabError(f"unknown key '{where}.{key}' ({source}): {hint}")
