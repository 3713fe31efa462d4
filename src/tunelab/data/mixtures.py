"""Mixtures of data sources: `data:` as a list of sources, combined with datasets' own functions.

    data:                                  # concatenated, in order
      - recipes/data/arith_qa
      - {path: chats.jsonl, samples: 2000}   # the first 2000 rows, repeated if the file holds fewer

    data:
      mix: interleave                      # datasets.interleave_datasets
      stopping: all_exhausted              # its stopping_strategy (default first_exhausted)
      streaming: true                      # every source streams (an IterableDataset)
      sources:
        - {path: chat.jsonl, weight: 0.7}  # sampling probabilities (normalised)
        - {path: alpaca.json, weight: 0.3}

`concat` is `datasets.concatenate_datasets`, `interleave` is `datasets.interleave_datasets` with the
weights as `probabilities` and the recipe's seed, so the same seed gives the same rows in the same order.
`samples: N` is the source's first N rows, cycling through it when N exceeds its rows (upsampling); on a
stream it is `take(N)` (of the stream repeated). A single source with `samples` or `streaming` is a
mixture of one. Everything parsed here is checked without loading anything, so `tunelab validate` says
what is wrong with a weight before it reads a file; loading a source is the caller's (`load_one`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunelab.core.errors import TunelabError, unknown_key
from tunelab.data.datasets import packaged_builders

MIX_KEYS = ("sources", "mix", "stopping", "streaming")
MIXES = ("concat", "interleave")
# Keys of a source that this module reads; the rest are the source's own (path, split, format, ...).
PER_SOURCE = ("weight", "samples", "streaming")
TAG = "__tunelab_source"
"""A column added to each source while mixing, to count the rows each one contributed; removed after."""
PREVIEW_ROWS = 64
"""Rows of a stream read at validate, for the checks that look at rows (columns, chat template)."""


def stopping_strategies() -> tuple[str, ...]:
    """`datasets.interleave_datasets`' own `stopping_strategy` values (first_exhausted, all_exhausted, ...)."""
    import typing

    try:
        import inspect

        import datasets

        annotation = inspect.signature(datasets.interleave_datasets).parameters["stopping_strategy"].annotation
        values = tuple(typing.get_args(annotation))
        if values and all(isinstance(v, str) for v in values):
            return values
    except (ImportError, KeyError, ValueError, TypeError):
        pass
    return ("first_exhausted", "all_exhausted")


@dataclass(frozen=True)
class Source:
    """One source of a mixture, its mixing keys parsed and the rest left for the loader."""

    index: int
    where: str
    """Where the recipe holds it, e.g. `stages.sft.data[1]`."""
    value: Any
    """The source without the mixing keys: a path, or a mapping of load_dataset arguments and format keys."""
    path: str
    weight: float | None = None
    samples: int | None = None
    streaming: bool | None = None
    """`streaming:` of the source itself (None: as the mixture says)."""

    @property
    def named(self) -> str:
        """How errors name it: `'stages.sft.data[1]' (chats.jsonl)`."""
        return f"'{self.where}' ({self.path})"


@dataclass(frozen=True)
class Mixture:
    """A `data:` value parsed: its sources and how they combine. A single source is a mixture of one."""

    where: str
    sources: tuple[Source, ...]
    mix: str = "concat"
    stopping: str = "first_exhausted"
    streaming: bool = False
    """The combined data is an IterableDataset: the mixture or one of its sources says `streaming: true`."""
    listed: bool = False
    """`data:` was a list or a `{sources: ...}` mapping (not a single source)."""

    @property
    def probabilities(self) -> list[float] | None:
        """The weights normalised to sum to 1 (None without weights: datasets alternates the sources)."""
        weights = [s.weight for s in self.sources]
        if any(w is None for w in weights):
            return None
        total = sum(weights)
        return [w / total for w in weights]

    @property
    def plain(self) -> bool:
        """One source, loaded as it is: nothing for this module to do."""
        one = self.sources[0]
        return not self.listed and not self.streaming and one.samples is None and one.weight is None


def is_mixture(value: Any) -> bool:
    """A list of sources, or a mapping with `sources:`."""
    return isinstance(value, list) or (isinstance(value, dict) and "sources" in value)


def _path_of(value: Any) -> str:
    """A source's path as written (`json: FILE` for a builder with data_files), as `sources.source_path` says it."""
    if isinstance(value, str):
        return value
    if not isinstance(value, dict):
        return repr(value)[:60]
    path, files = str(value.get("path")), value.get("data_files")
    while isinstance(files, (dict, list)) and files and path in packaged_builders():
        files = next(iter(files.values())) if isinstance(files, dict) else files[0]
    return f"{path}: {files}" if isinstance(files, str) and path in packaged_builders() else path


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise TunelabError(f"'{where}' is {value!r}: set it to true or false")
    return value


def _source(value: Any, index: int, where: str) -> Source:
    """One source: its weight, samples and streaming checked; the rest is the loader's to check."""
    path = _path_of(value)
    if not isinstance(value, dict):
        if not isinstance(value, str):
            raise TunelabError(
                f"'{where}' is {value!r}: each source is a dataset path or a mapping (path, split, format, ...)"
            )
        return Source(index=index, where=where, value=value, path=path)
    named = f"'{where}' ({path})"
    weight, samples, streaming = value.get("weight"), value.get("samples"), value.get("streaming")
    if "weight" in value and "samples" in value:
        raise TunelabError(
            f"{named} sets both weight and samples: keep `weight:` (a sampling probability) or "
            "`samples:` (a row count), not both"
        )
    if "weight" in value:
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise TunelabError(f"{named} has weight {weight!r}: a weight is a number, e.g. 0.7")
        if weight < 0:
            raise TunelabError(f"{named} has weight {weight!r}: a weight is a probability, 0 or more")
        weight = float(weight)
    if "samples" in value:
        if isinstance(samples, bool) or not isinstance(samples, int):
            raise TunelabError(f"{named} has samples {samples!r}: samples is a whole number of rows, e.g. 1000")
        if samples <= 0:
            raise TunelabError(
                f"{named} has samples {samples}: give 1 or more rows, or remove the source from the mixture"
            )
    if "streaming" in value:
        streaming = _bool(streaming, f"{where}.streaming")
    rest = {k: v for k, v in value.items() if k not in PER_SOURCE}
    return Source(index=index, where=where, value=rest, path=path, weight=weight, samples=samples, streaming=streaming)


def parse(value: Any, where: str) -> Mixture:
    """A `data:` value as a `Mixture`: one-line errors for the mixing keys, naming each source by index and
    path. Nothing is loaded."""
    if isinstance(value, dict) and "sources" in value:
        for key in value:
            if key not in MIX_KEYS:
                raise unknown_key(
                    where,
                    key,
                    MIX_KEYS,
                    "a mixture takes sources, mix, stopping, streaming; put source keys on each source",
                )
        items, at, options = value["sources"], f"{where}.sources", value
        if not isinstance(items, list):
            raise TunelabError(f"'{at}' must be a list of sources (paths or mappings), got {type(items).__name__}")
    elif isinstance(value, list):
        items, at, options = value, where, {}
    else:
        return Mixture(where=where, sources=(_source(value, 0, where),), streaming=_single_streaming(value, where))
    if not items:
        raise TunelabError(f"'{at}' is an empty list: name at least one data source")
    sources = tuple(_source(item, i, f"{at}[{i}]") for i, item in enumerate(items))
    weighted = [s for s in sources if s.weight is not None]
    if weighted and len(weighted) < len(sources):
        bare = next(s for s in sources if s.weight is None)
        raise TunelabError(
            f"{bare.named} has no weight, but {weighted[0].named} has one: give every source a `weight:` "
            "(sampling probabilities), or none (sources are then concatenated, or alternated with mix: interleave)"
        )
    if weighted and not sum(s.weight for s in weighted):
        raise TunelabError(f"'{at}': every weight is 0, so nothing would be sampled: give some source a weight above 0")
    mix = options.get("mix", "interleave" if weighted else "concat")
    if mix not in MIXES:
        raise TunelabError(f"'{where}.mix' is {mix!r}: use concat or interleave")
    if weighted and mix == "concat":
        raise TunelabError(
            f"'{where}' sets weights with mix: concat, which takes every row once: use mix: interleave to "
            "sample by weight, or `samples:` (row counts) to concatenate"
        )
    strategies = stopping_strategies()
    stopping = options.get("stopping", "first_exhausted")
    if stopping not in strategies:
        raise TunelabError(f"'{where}.stopping' is {stopping!r}: use one of {', '.join(strategies)}")
    if "stopping" in options and mix != "interleave":
        raise TunelabError(
            f"'{where}.stopping' applies to mix: interleave (when to stop sampling); drop it, or set mix: interleave"
        )
    streaming = _bool(options["streaming"], f"{where}.streaming") if "streaming" in options else False
    streaming = streaming or any(s.streaming for s in sources)
    return Mixture(where=where, sources=sources, mix=mix, stopping=stopping, streaming=streaming, listed=True)


def _single_streaming(value: Any, where: str) -> bool:
    if isinstance(value, dict) and "streaming" in value:
        return _bool(value["streaming"], f"{where}.streaming")
    return False


def streams(value: Any, where: str = "data") -> bool:
    """Whether a `data:` value trains from a stream (`streaming: true` on it or one of its sources)."""
    try:
        return parse(value, where).streaming
    except TunelabError:
        return False  # the data's own check says what is wrong


def check_streaming(mixture: Mixture, default_split: str) -> None:
    """A stream cannot take a split slice (`train[:100]`): say so, with the fix (`samples:`)."""
    if not mixture.streaming:
        return
    for source in mixture.sources:
        if source.streaming is False:
            continue  # loaded as a Dataset, then streamed with the rest
        split = source.value.get("split", default_split) if isinstance(source.value, dict) else default_split
        if isinstance(split, str) and "[" in split:
            base, _, rest = split.partition("[")
            hint = ""
            stop = rest.rstrip("]").partition(":")
            if stop[1] and not stop[0].strip() and stop[2].strip().isdigit():
                hint = f" `samples: {stop[2].strip()}` (the first {stop[2].strip()} rows)"
            raise TunelabError(
                f"{source.named} streams, and a stream cannot take the split slice '{split}': "
                f"use `split: {base}` with{hint or ' `samples: N` (the first N rows)'}, or drop streaming"
            )


def sources_where(mixture: Mixture) -> list[str]:
    return [s.where for s in mixture.sources]


# --- combining ------------------------------------------------------------------------------------------


def _take(ds: Any, count: int) -> Any:
    """The first `count` rows, cycling through `ds` when it holds fewer (upsampling by repetition)."""
    import datasets

    if isinstance(ds, datasets.IterableDataset):
        return ds.repeat(None).take(count)
    size = len(ds)
    if count <= size:
        return ds.select(range(count))
    return ds.select([i % size for i in range(count)])


@dataclass(frozen=True)
class Part:
    """One source as loaded, in the stage's shape: its data, the shape's name (the format its rows now read as,
    e.g. `messages`) and the columns that make that shape (the rest are the source's own extras)."""

    source: Source
    ds: Any
    shape: str | None = None
    shape_columns: frozenset[str] = frozenset()


OPTIONAL = ("tools",)
"""Shape columns some sources of a shape have and others lack: filled with nulls where missing (chats without tools)."""


def _one_shape(parts: list[Part], target: str) -> list[Part]:
    """Every source in the first one's shape, with the same columns: the shape's columns must match (an optional
    one, `tools`, is added as nulls where missing); columns beyond the shape (ids, a `prompt` beside `messages`)
    are kept only where every source has them."""
    first = parts[0]
    names = {id(p): _columns(p.ds) for p in parts}
    for part in parts[1:]:
        if part.shape != first.shape:
            raise TunelabError(
                f"{part.source.named} becomes {part.shape} data ({', '.join(names[id(part)])}) but "
                f"{first.source.named} becomes {first.shape} data ({', '.join(names[id(first)])}): a mixture's "
                f"sources must become one shape for this stage ({target} data); mix sources of one kind "
                "(alpaca, sharegpt and messages all become messages), or train on them in separate stages"
            )
    shape = set(first.shape_columns)
    for part in parts[1:]:
        mine = set(names[id(first)]) & shape - set(OPTIONAL)
        theirs = set(names[id(part)]) & shape - set(OPTIONAL)
        if mine != theirs:
            raise TunelabError(
                f"{part.source.named} has columns {', '.join(sorted(theirs))} but {first.source.named} has "
                f"{', '.join(sorted(mine))}: both are {first.shape} data, but a mixture's rows need the same "
                "columns; give every source the same ones (e.g. a prompt column in each)"
            )
    every = set.intersection(*(set(names[id(p)]) for p in parts))
    optional = {c for p in parts for c in names[id(p)] if c in OPTIONAL and c in shape}
    keep = [c for c in names[id(first)] if c in every] + sorted(optional - every)
    out = []
    for part in parts:
        ds = part.ds
        missing = [c for c in optional if c not in names[id(part)]]
        for column in missing:
            ds = _null_column(ds, column)
        if list(_columns(ds)) != keep:
            ds = ds.select_columns(keep)
        out.append(Part(part.source, ds, part.shape, part.shape_columns))
    return out


def _null_column(ds: Any, column: str) -> Any:
    if hasattr(ds, "__len__"):
        return ds.add_column(column, [None] * len(ds))  # typed by the other sources' column (`_aligned`)
    return ds.map(lambda row: {column: None})


def _columns(ds: Any) -> list[str]:
    names = ds.column_names
    if names is None:  # a stream after a map: the first row says
        first = next(iter(ds.take(1)), None)
        names = list(first) if first is not None else []
    return list(names)


def _aligned(parts: list[Part]) -> list[Any]:
    """The sources with one set of column types where theirs differ but convert (int and float, chat turns
    with and without tool fields): the first source's types that every other source casts to."""
    known = [p.ds.features for p in parts]
    if any(f is None for f in known) or all(f == known[0] for f in known):
        return [p.ds for p in parts]
    failure = None
    for features in known:
        try:
            return [p.ds if p.ds.features == features else p.ds.cast(features) for p in parts]
        except Exception as exc:  # datasets raises many kinds for an impossible cast
            failure = failure or exc
    from tunelab.core.errors import one_line

    raise TunelabError(
        f"{parts[1].source.named} holds columns of other types than {parts[0].source.named} "
        f"({one_line(failure, 160)}): make the sources' columns hold the same kinds of values"
    )


def combine(
    mixture: Mixture, load_one: Callable[[Source, bool], Any], seed: int, target: str = "the stage's"
) -> tuple[Any, list[int | None]]:
    """Load every source, apply `samples`, and combine them as the mixture says. Returns the data and the rows
    each source contributed (None for streams, whose length is unknown until they are read).

    `load_one(source, streaming)` gives the source converted to the stage's shape: a dataset, or
    (dataset, shape name, the shape's columns), which lets sources of one shape differ in their other columns.
    """
    import datasets

    parts: list[Part] = []
    for source in mixture.sources:
        stream = mixture.streaming and source.streaming is not False
        loaded = load_one(source, stream)
        ds, shape, columns = loaded if isinstance(loaded, tuple) else (loaded, None, None)
        if source.samples is not None:
            ds = _take(ds, source.samples)
        if mixture.streaming and not isinstance(ds, datasets.IterableDataset):
            ds = ds.to_iterable_dataset()  # `streaming: false` in a streamed mixture: read, then streamed
        shape_columns = frozenset(columns if columns is not None else _columns(ds))
        parts.append(Part(source, ds, shape, shape_columns))
    if len(parts) == 1:
        ds = parts[0].ds
        return ds, [None if mixture.streaming else len(ds)]
    parts = _one_shape(parts, target)
    probabilities = mixture.probabilities
    if probabilities is not None:  # a weight of 0 switches a source off (and would never exhaust)
        parts = [p for p, w in zip(parts, probabilities, strict=True) if w > 0]
        probabilities = [w for w in probabilities if w > 0]
    members = _aligned(parts)
    if mixture.streaming:
        if mixture.mix == "concat":
            return datasets.concatenate_datasets(members), [None] * len(mixture.sources)
        mixed = datasets.interleave_datasets(
            members, probabilities=probabilities, seed=seed, stopping_strategy=mixture.stopping
        )
        return mixed, [None] * len(mixture.sources)
    if mixture.mix == "concat":
        mixed = datasets.concatenate_datasets(members)
        rows = {part.source.index: len(ds) for part, ds in zip(parts, members, strict=True)}
    else:
        tagged = [ds.add_column(TAG, [part.source.index] * len(ds)) for part, ds in zip(parts, members, strict=True)]
        mixed = datasets.interleave_datasets(
            tagged, probabilities=probabilities, seed=seed, stopping_strategy=mixture.stopping
        )
        rows = _counts(mixed)
        mixed = mixed.remove_columns(TAG)
    if len(mixed) == 0:
        raise TunelabError(f"'{mixture.where}': the mixture holds no rows")
    return mixed, [rows.get(source.index, 0) for source in mixture.sources]


def _counts(mixed: Any) -> dict[int, int]:
    """Rows per source of an interleaved mixture, from its `TAG` column counted in Arrow (not row by row)."""
    import pyarrow.compute as pc

    column = mixed.select_columns([TAG]).with_format("arrow")[:][TAG]
    return {item["values"].as_py(): item["counts"].as_py() for item in pc.value_counts(column)}


def preview(ds: Any, rows: int = PREVIEW_ROWS) -> Any:
    """A stream's first rows as a `datasets.Dataset`, for the checks that read rows; a Dataset as it is."""
    import datasets

    if ds is None or not isinstance(ds, datasets.IterableDataset):
        return ds
    head = list(ds.take(rows))
    if not head:
        return datasets.Dataset.from_dict({name: [] for name in ds.column_names or []})
    features = ds.features
    try:
        return (
            datasets.Dataset.from_list(head, features=features)
            if features is not None
            else (datasets.Dataset.from_list(head))
        )
    except (TypeError, ValueError):
        return datasets.Dataset.from_list(head)


def is_stream(ds: Any) -> bool:
    """An IterableDataset: no length, no indexing; read once, in order."""
    import datasets

    return isinstance(ds, datasets.IterableDataset)


def row_metrics(key: str, report: Any) -> dict[str, float]:
    """A stage's data rows as metrics.json numbers: `data_rows` in all, and for a mixture `data[i]_rows`, the
    rows source i contributed (a stream's are unknown: none). `report` is a `tunelab.data.sources.DataReport`."""
    out: dict[str, float] = {}
    if report.rows is not None:
        out[f"{key}_rows"] = float(report.rows)
    if report.mix is not None:
        out.update({f"{key}[{s.index}]_rows": float(s.rows) for s in report.sources if s.rows is not None})
    return out


def load(
    value: Any,
    where: str,
    default_split: str,
    load_one: Callable[[Source, bool], Any],
    seed: int = 0,
    target: str = "the stage's",
) -> tuple[Any, Mixture, list[int | None]]:
    """A `data:` value loaded: parsed and checked (`parse`, `check_streaming`), each source loaded by
    `load_one(source, streaming)`, then combined (`combine`). Returns the data, the parsed mixture and the
    rows each source contributed (None where streamed)."""
    mixture = parse(value, where)
    check_streaming(mixture, default_split)
    ds, rows = combine(mixture, load_one, seed, target)
    return ds, mixture, rows
