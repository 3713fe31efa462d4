"""The one exception type users see.

Every problem tunelab can name before (or while) training raises
:class:`TunelabError` with a single line that says what is wrong and how to fix
it. The CLI prints that line and exits with code 2, without a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

# Characters `str.splitlines` breaks at: a message quoting user input must stay one line.
_LINE_BREAKS = {c: repr(chr(c))[1:-1] for c in (0x0A, 0x0B, 0x0C, 0x0D, 0x1C, 0x1D, 0x1E, 0x85, 0x2028, 0x2029)}


class TunelabError(Exception):
    """A problem in the user's input, reported as one line (exit code 2)."""

    exit_code = 2

    def __init__(self, message: object = "", *args: object) -> None:
        # Keys and values quoted from a recipe may hold line breaks: shown escaped, the message stays one line.
        super().__init__(str(message).translate(_LINE_BREAKS), *args)


class DownloadNeeded(TunelabError):
    """A model or dataset the recipe names is on the Hub, which is unreachable, and not cached.

    Its own class so that the checks that need no download can go on past it (see
    `tunelab.pipeline.check_offline`): a recipe written for a GPU machine is still checked here, up to
    the point where the download would start."""


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


def check_path(value: object, where: str) -> None:
    """One line for a path the OS cannot take: a NUL character, or longer than the OS allows (ENAMETOOLONG).

    Checked before any file system call, so that `Path.exists()` and friends never raise on user input.
    """
    import os

    text = os.fspath(value) if isinstance(value, os.PathLike) else value
    if not isinstance(text, str):
        return
    where = where if " " in where else f"'{where}'"  # a key path is quoted, words are not
    if "\x00" in text:
        raise TunelabError(f"{where} contains a NUL character, which no path can hold: remove it")
    name_max, path_max = _path_limits()
    longest = max((len(part.encode(errors="surrogateescape")) for part in text.split("/")), default=0)
    if longest > name_max:
        raise TunelabError(
            f"{where} has a file name of {longest} bytes, longer than the OS allows ({name_max}): use a shorter path"
        )
    if len(text.encode(errors="surrogateescape")) >= path_max:
        raise TunelabError(
            f"{where} is a path of {len(text)} characters, longer than the OS allows ({path_max - 1}): "
            "use a shorter path"
        )


def _path_limits() -> tuple[int, int]:
    import os

    try:
        return os.pathconf("/", "PC_NAME_MAX"), os.pathconf("/", "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # no pathconf (Windows): the common limits
        return 255, 4096


def one_line(exc: BaseException, limit: int = 200) -> str:
    """A library exception's text as one short line, to quote inside a TunelabError (which is one line)."""
    return " ".join(str(exc).split())[:limit] or type(exc).__name__
