"""Where tunelab's shipped files are: the recipes, their data, and the folders under recipes/ that hold
other YAML; and the guards of every place a user's path is read (a FIFO, socket or device there would
wait forever). A leaf module (no tunelab imports but errors), so the Hub helpers and the recipe loader
both import it at their top without importing each other."""

from __future__ import annotations

import os
from pathlib import Path

from tunelab.core.errors import TunelabError

# Folders of recipes/ that hold other YAML: data, Accelerate configs, lm-evaluation-harness tasks.
NOT_RECIPES = ("data", "accelerate", "harness")


def recipes_root() -> Path:
    """Folder of the shipped recipes: inside the wheel, or the repo's `recipes/`."""
    package = Path(__file__).resolve().parents[1]  # src/tunelab (this file is tunelab/core/paths.py)
    for candidate in (package / "recipes", package.parents[1] / "recipes"):
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


def file_kind(mode: int) -> str | None:
    """What a special file is, in words (None for a regular file or a folder)."""
    import stat

    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def refuse_special(path: str | os.PathLike, where: str) -> None:
    """One line for a FIFO, socket or device where tunelab (or a library it calls) reads a file.

    Opening a FIFO waits for a writer and reading a terminal waits for typing: without this check a
    mistyped path hangs validate with no message. Missing paths pass: the caller names them.
    """
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return
    kind = file_kind(mode)
    if kind is not None:
        raise TunelabError(
            f"{where} '{os.fspath(path)}' is {kind}, not a regular file: reading it could wait forever; "
            "save its content to a file and name that"
        )


def read_bounded(path: str | os.PathLike, where: str, limit: int, wait: float = 5.0) -> bytes:
    """Up to `limit` + 1 bytes of a file; a pipe or device (`<(...)`, /dev/null) is read too, but given
    `wait` seconds in all: a FIFO nobody writes to, or a terminal, is one line instead of a hang.

    Opened non-blocking, so opening a FIFO does not itself wait for a writer.
    """
    import select
    import stat
    import time

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISREG(mode):
            os.set_blocking(fd, True)
            with os.fdopen(os.dup(fd), "rb") as f:
                return f.read(limit + 1)
        chunks: list[bytes] = []
        total = 0
        deadline = time.monotonic() + wait
        while total <= limit:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                raise TunelabError(
                    f"{where} '{os.fspath(path)}' is {file_kind(mode)} that gave no end of input within {wait:g} s: "
                    "save its content to a file and name that"
                )
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                continue
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)
