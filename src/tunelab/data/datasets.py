"""Datasets for stages: a `data:` section is the arguments of `datasets.load_dataset`.

``data: recipes/data/arith_qa`` is shorthand for ``data: {path: recipes/data/arith_qa}``.
A path may be a hub dataset id, a local folder (splits from file names), or a
single JSON/JSONL/CSV/Parquet/text file. Row selection uses datasets' own split
syntax: ``split: "train[:200]"``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tunelab.core.errors import DownloadNeeded, TunelabError, check_path, unknown_key
from tunelab.core.hub import HUB_ID, hub_reachable, is_cached, local_path

DATA_KEYS = ("path", "name", "data_dir", "data_files", "split", "revision")
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
# datasets' packaged builders (`path: json` with `data_files:`), if datasets cannot be asked.
PACKAGED = {"arrow", "audiofolder", "csv", "imagefolder", "json", "pandas", "parquet", "text", "videofolder", "xml"}
GLOB = set("*?[")


def packaged_builders() -> set[str]:
    """Names `load_dataset` reads as one of its own builders (json, csv, parquet, text, imagefolder...)."""
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES
    except ImportError:
        return PACKAGED
    return set(_PACKAGED_DATASETS_MODULES)


def data_spec(value: Any, where: str, default_split: str) -> dict[str, Any]:
    """Normalise a `data:` value and check its keys (no loading)."""
    spec = {"path": value} if isinstance(value, str) else value
    if not isinstance(spec, dict):
        raise TunelabError(f"'{where}' must be a dataset path or a mapping of load_dataset arguments")
    for key in spec:
        if key not in DATA_KEYS:
            raise unknown_key(where, key, DATA_KEYS, "arguments of datasets.load_dataset")
    if not isinstance(spec.get("path"), str) or not spec["path"].strip():
        raise TunelabError(f"'{where}.path' is missing: name a dataset folder, file or hub id")
    for key in ("name", "data_dir", "split", "revision"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise TunelabError(f"'{where}.{key}' is {spec[key]!r} ({type(spec[key]).__name__}); set it to a string")
    check_path(spec["path"], f"{where}.path" if isinstance(value, dict) else where)
    if spec.get("data_dir") is not None:
        check_path(spec["data_dir"], f"{where}.data_dir")
    if spec.get("data_files") is not None:
        for file, file_where in _data_files(spec["data_files"], f"{where}.data_files"):
            check_path(file, file_where)
    return {"split": default_split, **spec}


def _data_files(value: Any, where: str) -> list[tuple[str, str]]:
    """(file, location) for each entry of `data_files`: a string, a list of them, or {split: those}."""
    if isinstance(value, str):
        return [(value, where)]
    if isinstance(value, list) and all(isinstance(v, str) for v in value) and value:
        return [(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict) and value:
        return [pair for split, files in value.items() for pair in _data_files(files, f"{where}.{split}")]
    raise TunelabError(
        f"'{where}' is {value!r}: give a file, a list of files, or {{split: files}} (e.g. {{train: data/train.jsonl}})"
    )


def _load_args(spec: dict[str, Any], where: str, split_given: bool = True) -> tuple[str, dict[str, Any]]:
    ref = spec["path"]
    kwargs = {k: v for k, v in spec.items() if k != "path" and v is not None}
    local = local_path(ref)
    if local is not None:
        if local.is_file():
            if local.stat().st_size == 0:
                raise TunelabError(f"'{where}' is '{ref}', an empty file: it holds no examples")
            builder = BUILDERS.get(local.suffix.lower())
            if builder is None:
                raise TunelabError(
                    f"'{where}' is '{ref}', a {local.suffix or 'extensionless'} file: "
                    f"use one of {', '.join(sorted(BUILDERS))}"
                )
            kwargs["data_files"] = {"train": str(local)}
            if not split_given:
                kwargs["split"] = "train"  # a single file is one split, whatever the stage's default
            if str(kwargs.get("split", "")).split("[")[0] != "train":
                raise TunelabError(
                    f"'{where}' is a single file, which has only a 'train' split; "
                    f"drop `split: {kwargs['split']}` or point at a folder"
                )
            return builder, kwargs
        if local.is_dir() and not any(p.suffix.lower() in BUILDERS for p in local.rglob("*") if p.is_file()):
            raise TunelabError(f"'{where}' is '{ref}', a folder with no data files ({', '.join(sorted(BUILDERS))})")
        return str(local), kwargs
    if "/" not in ref and ref in packaged_builders():
        return ref, _builder_args(ref, kwargs, where, split_given)
    if not HUB_ID.match(ref) or ref.startswith((".", "/", "~")) or Path(ref).suffix.lower() in BUILDERS:
        raise TunelabError(f"'{where}' is '{ref}': no such file or folder (and not a hub dataset id)")
    if not hub_reachable() and not _dataset_cached(ref):
        raise DownloadNeeded(
            f"'{where}' is hub dataset '{ref}', but the Hub is unreachable (offline) and it is not cached: "
            "download it on a connected machine or point the path at local files"
        )
    return ref, kwargs


def _builder_args(builder: str, kwargs: dict[str, Any], where: str, split_given: bool) -> dict[str, Any]:
    """`path: json` (a datasets builder) with `data_files:` or `data_dir:`: local files checked, splits matched."""
    files, folder = kwargs.get("data_files"), kwargs.get("data_dir")
    if files is None and folder is None:
        raise TunelabError(
            f"'{where}' names datasets' `{builder}` builder but no files: add `data_files:` (e.g. data/train.jsonl)"
        )
    if folder is not None:
        local = local_path(folder)
        if local is None or not local.is_dir():
            raise TunelabError(f"'{where}.data_dir' is '{folder}': no such folder")
        kwargs["data_dir"] = str(local)

    def resolve(entry: str, entry_where: str) -> str:
        if GLOB & set(entry) or "://" in entry:
            return entry  # patterns and remote files: datasets resolves them
        local = local_path(entry) if folder is None else local_path(Path(kwargs["data_dir"]) / entry)
        if local is None:
            raise TunelabError(f"'{entry_where}' is '{entry}': no such file")
        if local.is_file() and local.stat().st_size == 0:
            raise TunelabError(f"'{entry_where}' is '{entry}', an empty file: it holds no examples")
        return str(local)

    if files is not None:
        where_files = f"{where}.data_files"
        if isinstance(files, dict):
            kwargs["data_files"] = {
                split: [resolve(f, w) for f, w in _data_files(v, f"{where_files}.{split}")]
                for split, v in files.items()
            }
            splits = list(files)
        else:
            kwargs["data_files"] = [resolve(f, w) for f, w in _data_files(files, where_files)]
            splits = ["train"]
            if not split_given:
                kwargs["split"] = "train"  # files without split names are one split, whatever the stage's default
        split = str(kwargs.get("split", "")).split("[")[0]
        if split and split not in splits:
            raise TunelabError(
                f"'{where}': split '{split}' is not among the data_files splits ({', '.join(map(str, splits))}); "
                f"set `split:` to one of them"
            )
    return kwargs


def check_source(value: Any, where: str, default_split: str = "train") -> None:
    """The checks of `load_split` that need no loading: keys, local paths, hub ids while offline."""
    spec = data_spec(value, where, default_split)
    _load_args(spec, where, split_given=isinstance(value, dict) and "split" in value)


def _dataset_cached(ref: str) -> bool:
    return is_cached(ref, "README.md", repo_type="dataset")


def load_split(value: Any, where: str, default_split: str = "train", streaming: bool = False):
    """Load one split as a `datasets.Dataset` (with `streaming`, an `IterableDataset` that reads the files as
    it is iterated, never materialised); one-line errors for the usual mistakes."""
    import datasets

    spec = data_spec(value, where, default_split)
    path, kwargs = _load_args(spec, where, split_given=isinstance(value, dict) and "split" in value)
    if streaming and "[" in str(kwargs.get("split", "")):
        raise TunelabError(
            f"'{where}' streams, and a stream cannot take the split slice '{kwargs['split']}': "
            f"use `split: {str(kwargs['split']).partition('[')[0]}` with `samples: N` (the first N rows)"
        )
    try:
        with _datasets_silent():
            ds = datasets.load_dataset(path, **kwargs, **({"streaming": True} if streaming else {}))
            first = next(iter(ds.take(1)), None) if streaming and not isinstance(ds, dict) else True
    except Exception as exc:
        bad = _bad_json_line(path, kwargs)
        if bad is not None:
            raise TunelabError(f"'{where}': {bad}: fix or remove that line") from None
        _raise_load_error(exc, spec, kwargs, where)
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        raise TunelabError(f"'{where}' loads several splits ({', '.join(ds)}): choose one with `split:`")
    if first is None or (not streaming and len(ds) == 0):
        raise TunelabError(f"'{where}': dataset '{spec['path']}' (split {spec['split']}) is empty")
    return ds


@contextlib.contextmanager
def _datasets_silent():
    """datasets logs its own line for a file it fails to read; the error we raise says it once."""
    import logging

    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _json_files(path: str, kwargs: dict[str, Any]) -> list[Path]:
    """The local JSON/JSONL files a load reads: a single file, a builder's data_files, or a folder's."""
    files = kwargs.get("data_files")
    if files is not None:
        entries = [f for f, _ in _data_files(files, "data_files")]
    elif Path(path).is_dir():
        entries = [str(p) for p in sorted(Path(path).rglob("*")) if p.suffix.lower() in (".json", ".jsonl")]
    else:
        return []
    out = [Path(f) for f in entries if not GLOB & set(f)]
    return [f for f in out if f.is_file() and (path == "json" or f.suffix.lower() in (".json", ".jsonl"))]


def _bad_json_line(path: str, kwargs: dict[str, Any]) -> str | None:
    """'FILE' line N: what is wrong, for the first JSON file of a failed load that does not parse."""
    for file in _json_files(path, kwargs):
        try:
            text = file.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            return f"'{file}' is not UTF-8 text (byte offset {exc.start})"
        except OSError:
            continue
        try:
            json.loads(text)
            continue  # one JSON document (a list of rows): fine
        except ValueError as whole:
            document_error = whole
        lines = text.splitlines()
        first = next((i for i, line in enumerate(lines) if line.strip()), None)
        if first is None:
            continue
        try:
            json.loads(lines[first])
        except ValueError:  # not JSON lines either: report the document's error
            return f"'{file}' line {document_error.lineno} is not valid JSON ({document_error.msg})"
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as exc:
                return f"'{file}' line {number} is not valid JSON ({exc.msg}, column {exc.colno})"
            if not isinstance(row, dict):
                return f"'{file}' line {number} is {type(row).__name__} JSON, not an object ({{\"column\": value}})"
    return None


def _raise_load_error(exc: Exception, spec: dict[str, Any], kwargs: dict[str, Any], where: str) -> None:
    import datasets

    cause = exc.__cause__ or exc.__context__
    if isinstance(exc, ValueError):
        msg = " ".join(str(exc).split())
        if "corresponds to no data" in msg:  # datasets' words for a file with no rows
            raise TunelabError(f"'{where}': dataset '{spec['path']}' (split {spec['split']}) is empty") from None
        if "split" in msg.lower():
            raise TunelabError(f"'{where}': split '{kwargs.get('split')}' not found ({msg[:200]})") from None
        raise TunelabError(f"'{where}': cannot load '{spec['path']}': {msg[:300]}") from None
    if isinstance(exc, (FileNotFoundError, datasets.exceptions.DatasetNotFoundError)):
        raise TunelabError(f"'{where}': cannot load '{spec['path']}': {' '.join(str(exc).split())[:300]}") from None
    # Malformed files surface as many different library errors, the reason often in the cause.
    shown = cause if isinstance(exc, datasets.exceptions.DatasetGenerationError) and cause is not None else exc
    msg = " ".join(str(shown).split())[:300]
    raise TunelabError(f"'{where}': cannot read '{spec['path']}' ({type(shown).__name__}): {msg}") from None


def require_columns(
    ds, needed: Iterable[str], where: str, purpose: str, values: str | None = None, empty: bool = True
) -> None:
    """Fail with the missing and present columns when `ds` lacks a column the stage needs.

    With `values` ("text": strings; "turns": strings or chat turns), the columns' values are checked too,
    over the whole dataset and not only the rows validate reads: their type from the Arrow schema, and null
    rows (and, unless `empty`, blank strings or turn lists) with pyarrow.compute. A row the trainer
    cannot read would otherwise fail mid-run, or train on nothing, after the model has loaded.
    """
    needed = list(needed)
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise TunelabError(
            f"'{where}' has no column {', '.join(repr(m) for m in missing)} ({purpose}); "
            f"its columns are {', '.join(ds.column_names)}"
        )
    if values is not None:
        for column in needed:
            require_values(ds, column, where, values, empty)


def _arrow_column(ds, column: str):
    """The column as Arrow data, rows as `ds` selects them (no copy unless `ds` is an index over its table)."""
    if getattr(ds, "_indices", None) is None:
        return ds.data.column(column)
    return ds.with_format("arrow")[column]


def _is_turns(arrow_type) -> bool:
    """A list of {role, content} structs: chat turns, as datasets reads them from JSON."""
    import pyarrow as pa

    if not (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)):
        return False
    item = arrow_type.value_type
    return pa.types.is_struct(item) and {"role", "content"} <= {field.name for field in item}


def _first(mask) -> int:
    import pyarrow.compute as pc

    return pc.index(mask, True).as_py()


def require_values(ds, column: str, where: str, values: str = "text", empty: bool = True) -> None:
    """One line when `column` holds anything but text ("text"), or text or chat turns ("turns"), in any row."""
    import pyarrow as pa
    import pyarrow.compute as pc

    col = _arrow_column(ds, column)
    kind = col.type
    wanted = "text" if values == "text" else "text or chat turns (lists of {role, content})"
    text = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)
    turns = values == "turns" and _is_turns(kind)
    if not (text or turns):
        raise TunelabError(f"'{where}' column '{column}' {_holds(ds, column, kind)}: every row must hold {wanted}")
    if col.null_count:
        row = _first(pc.is_null(col))
        raise TunelabError(
            f"'{where}' column '{column}' is null (missing) in {col.null_count} row(s), the first row {row}: "
            f"give every row {wanted}, or remove those rows"
        )
    if not empty:
        size = pc.utf8_length(pc.utf8_trim_whitespace(col)) if text else pc.list_value_length(col)
        blank = pc.equal(size, 0)
        count = pc.sum(blank).as_py() or 0
        if count:
            raise TunelabError(
                f"'{where}' column '{column}' is {'blank' if text else 'an empty list'} in {count} row(s), "
                f"the first row {_first(blank)}: give every row {wanted}, or remove those rows"
            )


def _holds(ds, column: str, kind) -> str:
    """What a column of the wrong type holds, in words: its type, or the first row that differs from text."""
    import pyarrow as pa

    if getattr(kind, "extension_name", None) == "arrow.json":  # datasets reads JSON of mixed types so
        for i, value in enumerate(ds[column]):
            if not isinstance(value, str) and value is not None:
                return f"mixes types (row {i} is {_short_repr(value)}, {type(value).__name__})"
        return "mixes types"
    if pa.types.is_null(kind):
        return "is null (missing) in every row"
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        item = kind.value_type
        what = "strings" if pa.types.is_string(item) or pa.types.is_large_string(item) else str(item)
        return f"holds lists of {what}, not chat turns ({{role, content}} mappings; join a list into one string)"
    name = {"int64": "integers", "double": "numbers", "bool": "booleans"}.get(str(kind), f"{kind} values")
    return f"holds {name} (e.g. row 0 is {_short_repr(ds[0][column])})"


def _short_repr(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def fingerprint(ds) -> str:
    """datasets' own content fingerprint, recorded in run.json."""
    return str(getattr(ds, "_fingerprint", ""))


def require_preferences(ds, where: str) -> None:
    """Preference pairs: `chosen` and `rejected` columns, with or without `prompt` (plain text or messages)."""
    missing = [c for c in ("chosen", "rejected") if c not in ds.column_names]
    if missing:
        raise TunelabError(
            f"'{where}' is not preference data: it has no {' or '.join(repr(m) for m in missing)} column "
            f"(pairs need 'chosen' and 'rejected', optionally 'prompt'); its columns are {', '.join(ds.column_names)}"
        )
    for column in ("chosen", "rejected"):  # an answer that is blank teaches nothing (and crashes tokenizing)
        require_values(ds, column, where, "turns", empty=False)
    if "prompt" in ds.column_names:
        require_values(ds, "prompt", where, "turns")


SIGNATURE_MAX_BYTES = 512 * 2**20  # hash contents up to this much data; beyond it, sizes and times


def signature(value: Any) -> str:
    """What a `data:` value holds now, for run fingerprints: a hash of its local files' contents (of each
    source's, for a mixture).

    Folders over SIGNATURE_MAX_BYTES are summarised by file sizes and modification times, so a
    pipeline over a large local corpus does not reread it on every `--resume`. Hub datasets are
    known by their arguments (path, name, revision) alone, already part of the stage's config.
    """
    import hashlib

    if isinstance(value, dict) and "sources" in value:  # a mixture: each source's files
        value = value["sources"]
    if isinstance(value, list):
        parts = [signature(source) for source in value]
        return hashlib.sha256("/".join(parts).encode()).hexdigest()[:16] if any(parts) else ""
    spec = {"path": value} if isinstance(value, str) else value
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
        return ""
    root = local_path(spec["path"])
    if root is None and spec.get("data_files") is not None and spec["path"] in packaged_builders():
        try:  # `path: json` with `data_files:`: the files named (patterns match nothing here)
            named = [local_path(f) for f, _ in _data_files(spec["data_files"], "data_files")]
        except TunelabError:
            return ""
        files = sorted({f for f in named if f is not None and f.is_file()})
        root = Path("/")
    elif root is None:
        return ""
    else:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    total = sum(f.stat().st_size for f in files)
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() if f == root else str(f.relative_to(root)).encode())
        if total <= SIGNATURE_MAX_BYTES:
            with f.open("rb") as stream:  # in blocks: a large file never sits in memory whole
                for block in iter(lambda: stream.read(2**20), b""):
                    digest.update(block)
        else:
            stat = f.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]
