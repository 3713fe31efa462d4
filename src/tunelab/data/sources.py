"""A stage's `data:` (and `eval_data:`): one source, loaded, its columns renamed, its format detected and
converted into the stage's shape, and a report of what was read.

A source is a path (`data: data/chats.jsonl`) or a mapping: the arguments of `datasets.load_dataset`
(DATA_KEYS) plus

- `format:` one of `tunelab.data.formats.FORMATS` (default `auto`: detected, and said from which columns);
- `columns:` renames columns before detection, e.g. `{question: prompt, answer: completion}`;
- `system:` the system turn of conversations that have none;
- `roles:` the data's role names mapped to chat roles, e.g. `{bot: assistant, fn: function_call}`.

`load_data` is what every stage calls; `check_data` is the part that needs no loading. `load_split`
(tunelab.data.datasets) stays the low-level loader underneath. Errors name the source as
`'STAGE.data' (path)`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from tunelab.core.errors import TunelabError, closest, unknown_key
from tunelab.data.datasets import DATA_KEYS, check_source, load_split, packaged_builders
from tunelab.data.formats import (
    FORMATS,
    KNOWN_COLUMNS,
    NATIVE,
    ROLE_TARGETS,
    accepted,
    check_format,
    column_names,
    convert,
    detect,
    first_rows,
)
from tunelab.data.mixtures import Source, check_streaming, is_mixture, load, parse

FORMAT_KEYS = ("format", "columns", "system", "roles")
MIX_KEYS = ("weight", "samples", "streaming")
SOURCE_KEYS = DATA_KEYS + FORMAT_KEYS + MIX_KEYS


@dataclass(frozen=True)
class SourceReport:
    """What one source contributed: where it is, the format read (and from which columns), its rows."""

    index: int
    where: str
    path: str
    format: str
    detected_from: str
    rows: int | None  # None when streaming


@dataclass(frozen=True)
class DataReport:
    """A stage's data as read: its sources, how they were mixed (None: one source), the rows in all."""

    sources: tuple[SourceReport, ...]
    mix: str | None
    rows: int | None

    def as_dict(self) -> dict:
        return {"sources": [asdict(s) for s in self.sources], "mix": self.mix, "rows": self.rows}


def source_path(value: Any) -> str:
    """A source's path as users wrote it, for messages and reports (`path: json` shows its data_files)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        return repr(value)
    path = str(value.get("path"))
    files = value.get("data_files")
    if files is not None and path in packaged_builders():
        first = files if isinstance(files, str) else next(iter(files.values() if isinstance(files, dict) else files))
        first = first[0] if isinstance(first, list) and first else first
        return f"{path}: {first}"
    return path


def label(where: str, value: Any) -> str:
    """`'sft.data' (data/chats.jsonl)`: how errors name a source."""
    return f"'{where}' ({source_path(value)})"


def split_source(value: Any, where: str) -> tuple[Any, dict[str, Any]]:
    """(the load_dataset part of a source, its format options), the options checked (no loading)."""
    if isinstance(value, str):
        return value, {"format": "auto", "columns": {}, "system": None, "roles": None}
    if not isinstance(value, dict):
        raise TunelabError(f"'{where}' must be a dataset path or a mapping of load_dataset arguments and format keys")
    for key in value:
        if key not in SOURCE_KEYS:
            raise unknown_key(where, key, SOURCE_KEYS, "load_dataset arguments and format, columns, system, roles")
    for key in MIX_KEYS:
        if key in value:
            raise TunelabError(
                f"'{where}.{key}' applies to the sources of a mixture (`data:` as a list of sources): "
                f"remove `{key}`, or list the sources"
            )
    load = {k: v for k, v in value.items() if k in DATA_KEYS}
    fmt = value.get("format", "auto")
    if fmt is None:
        fmt = "auto"
    if not isinstance(fmt, str) or fmt not in FORMATS:
        guess = closest(str(fmt), FORMATS)
        raise TunelabError(
            f"'{where}.format' is {fmt!r}, not a known format"
            + (f"; did you mean '{guess}'?" if guess else "")
            + f" (formats: {', '.join(FORMATS)})"
        )
    columns = value.get("columns") or {}
    if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in columns.items()):
        raise TunelabError(
            f"'{where}.columns' is {columns!r}: give {{old name: new name}}, "
            "e.g. {question: prompt, answer: completion}"
        )
    targets = list(columns.values())
    twice = next((t for t in targets if targets.count(t) > 1), None)
    if twice is not None:
        raise TunelabError(f"'{where}.columns' renames two columns to '{twice}': rename one column to each name")
    system = value.get("system")
    if system is not None and not isinstance(system, str):
        raise TunelabError(
            f"'{where}.system' must be a string (the system turn of rows that have none), got {system!r}"
        )
    roles = value.get("roles")
    if roles is not None:
        if not isinstance(roles, dict) or not roles:
            raise TunelabError(f"'{where}.roles' is {roles!r}: give {{data role: chat role}}, e.g. {{bot: assistant}}")
        for name, role in roles.items():
            if role not in ROLE_TARGETS:
                guess = closest(str(role), ROLE_TARGETS)
                raise TunelabError(
                    f"'{where}.roles.{name}' is {role!r}, not a chat role"
                    + (f"; did you mean '{guess}'?" if guess else "")
                    + f" (roles: {', '.join(ROLE_TARGETS)})"
                )
    return load, {"format": fmt, "columns": columns, "system": system, "roles": roles}


def _stage(where: str) -> str:
    return where.split(".")[0]


def check_data(value: Any, where: str, default_split: str, target: str) -> None:
    """The checks of `load_data` that need no loading: keys, format names, options, paths, hub ids offline;
    for a mixture (`tunelab.data.mixtures`), its weights, samples and streaming, and each source's."""
    if mixing(value):
        mixture = parse(value, where)
        check_streaming(mixture, default_split)
        for source in mixture.sources:
            check_data(source.value, source.where, default_split, target)
        return
    load, options = split_source(value, where)
    fmt = options["format"]
    if fmt != "auto" and fmt not in accepted(target):
        check_format(fmt, [], [], label(where, value), target)  # raises: the stage cannot take it
    check_source(load, where, default_split)


def rename(ds: Any, columns: dict[str, str], where: str) -> Any:
    """`columns:` applied: each named column must exist; a new name may not clash with a kept column."""
    if not columns:
        return ds
    names = column_names(ds)
    for old, new in columns.items():
        if old not in names:
            guess = closest(old, names)
            raise TunelabError(
                f"{where}: `columns:` renames '{old}', which is not a column"
                + (f" (did you mean '{guess}'?)" if guess else "")
                + f"; its columns are {', '.join(names)}"
            )
        if new in names and new not in columns:
            raise TunelabError(
                f"{where}: `columns:` renames '{old}' to '{new}', but '{new}' is a column already: rename or drop "
                f"that one too (e.g. columns: {{{new}: {new}_old, {old}: {new}}})"
            )
    return ds.rename_columns({old: new for old, new in columns.items() if old != new})


def read_source(
    ds: Any, options: dict[str, Any], where: str, target: str, own: tuple[str, ...] = ()
) -> tuple[Any, str, str]:
    """A loaded source renamed, detected and converted: (dataset, format, detected from). `where` is its label.

    `own`: columns a stage reads under names the recipe chose (`prompt_column:`...): data holding them all is
    taken as it is by `auto`."""
    ds = rename(ds, options["columns"], where)
    names, rows = column_names(ds), first_rows(ds)
    fmt = options["format"]
    if fmt == "auto" and own and all(c in names for c in own):
        try:  # the stage's columns are there: a native format is named, anything else read as it is
            fmt, why = detect(names, rows, where, target)
        except TunelabError:
            fmt = "auto"
        if fmt not in NATIVE[target]:
            fmt, why = "as_is", f"the stage's own columns {', '.join(own)}"
    elif fmt == "auto":
        fmt, why = detect(names, rows, where, target)
    else:
        why = check_format(fmt, names, rows, where, target)
    out = convert(ds, fmt, target, system=options["system"], roles=options["roles"], where=where)
    return out, fmt, why


def load_data(
    value: Any, where: str, default_split: str, target: str, *, seed: int = 0, own: tuple[str, ...] = ()
) -> tuple[Any, DataReport]:
    """A stage's `data:` (or `eval_data:`) in the stage's shape (`target`, see tunelab.data.formats), and
    what was read. `seed` orders mixtures; `own` is the stage's custom column names (see `read_source`)."""
    if mixing(value):
        return _load_mixture(value, where, default_split, target, seed, own)
    load, options = split_source(value, where)
    check_data(value, where, default_split, target)
    ds = load_split(load, where, default_split)
    out, fmt, why = read_source(ds, options, label(where, value), target, own)
    rows = len(out) if hasattr(out, "__len__") else None
    source = SourceReport(0, where, source_path(value), fmt, why, rows)
    return out, DataReport((source,), None, rows)


def _shape(ds: Any, where: str, target: str) -> tuple[str, set[str]]:
    """The format a converted source now reads as (alpaca, sharegpt and messages all read as messages), and the
    columns known to that format: what must match across a mixture's sources."""
    try:
        shape, _ = detect(column_names(ds), first_rows(ds), where, target)
    except TunelabError:
        shape = "as_is"
    return shape, KNOWN_COLUMNS.get(shape, set(column_names(ds)))


def mixing(value: Any) -> bool:
    """A mixture (a list of sources, `{sources: ...}`), or one source with `samples` or `streaming`."""
    return is_mixture(value) or (isinstance(value, dict) and any(key in value for key in MIX_KEYS))


def _load_mixture(
    value: Any, where: str, default_split: str, target: str, seed: int, own: tuple[str, ...]
) -> tuple[Any, DataReport]:
    """Each source read as `load_data` reads one (renamed, detected, converted), then mixed (`mixtures.load`)."""
    read: dict[int, tuple[str, str]] = {}

    def one(source: Source, streaming: bool) -> Any:
        load, options = split_source(source.value, source.where)
        check_data(source.value, source.where, default_split, target)
        ds = load_split(load, source.where, default_split, streaming=streaming)
        named = label(source.where, source.value)
        out, fmt, why = read_source(ds, options, named, target, own)
        read[source.index] = (fmt, why)
        return out, *_shape(out, named, target)

    ds, mixture, rows = load(value, where, default_split, one, seed, target)
    sources = tuple(
        SourceReport(s.index, s.where, source_path(s.value), *read[s.index], count)
        for s, count in zip(mixture.sources, rows, strict=True)
    )
    total = None if mixture.streaming else len(ds)
    return ds, DataReport(sources, mixture.mix if mixture.listed else None, total)
