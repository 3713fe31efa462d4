"""Datasets for stages: a `data:` section is the arguments of `datasets.load_dataset`.

``data: recipes/data/arith_qa`` is shorthand for ``data: {path: recipes/data/arith_qa}``.
A path may be a hub dataset id, a local folder (splits from file names), or a
single JSON/JSONL/CSV/Parquet/text file. Row selection uses datasets' own split
syntax: ``split: "train[:200]"``.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError, unknown_key
from tunelab.hub import HUB_ID, hub_reachable, is_cached, local_path

DATA_KEYS = ("path", "name", "data_dir", "data_files", "split", "revision")
BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}


def data_spec(value: Any, where: str, default_split: str) -> dict[str, Any]:
    """Normalise a `data:` value and check its keys (no loading)."""
    spec = {"path": value} if isinstance(value, str) else value
    if not isinstance(spec, dict):
        raise TunelabError(f"'{where}' must be a dataset path or a mapping of load_dataset arguments")
    for key in spec:
        if key not in DATA_KEYS:
            raise unknown_key(where, key, DATA_KEYS, "arguments of datasets.load_dataset")
    if not isinstance(spec.get("path"), str) or not spec["path"]:
        raise TunelabError(f"'{where}.path' is missing: name a dataset folder, file or hub id")
    return {"split": default_split, **spec}


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
    if not HUB_ID.match(ref) or ref.startswith((".", "/", "~")) or Path(ref).suffix.lower() in BUILDERS:
        raise TunelabError(f"'{where}' is '{ref}': no such file or folder (and not a hub dataset id)")
    if not hub_reachable() and not _dataset_cached(ref):
        raise TunelabError(
            f"'{where}' is hub dataset '{ref}', but the Hub is unreachable (offline) and it is not cached: "
            "download it on a connected machine or point the path at local files"
        )
    return ref, kwargs


def check_source(value: Any, where: str, default_split: str = "train") -> None:
    """The checks of `load_split` that need no loading: keys, local paths, hub ids while offline."""
    spec = data_spec(value, where, default_split)
    _load_args(spec, where, split_given=isinstance(value, dict) and "split" in value)


def _dataset_cached(ref: str) -> bool:
    return is_cached(ref, "README.md", repo_type="dataset")


def load_split(value: Any, where: str, default_split: str = "train"):
    """Load one split as a `datasets.Dataset`; one-line errors for the usual mistakes."""
    import datasets

    spec = data_spec(value, where, default_split)
    path, kwargs = _load_args(spec, where, split_given=isinstance(value, dict) and "split" in value)
    try:
        ds = datasets.load_dataset(path, **kwargs)
    except ValueError as exc:
        msg = " ".join(str(exc).split())
        if "corresponds to no data" in msg:  # datasets' words for a file with no rows
            raise TunelabError(f"'{where}': dataset '{spec['path']}' (split {spec['split']}) is empty") from None
        if "split" in msg.lower():
            raise TunelabError(f"'{where}': split '{kwargs.get('split')}' not found ({msg[:200]})") from None
        raise TunelabError(f"'{where}': cannot load '{spec['path']}': {msg[:300]}") from None
    except (FileNotFoundError, datasets.exceptions.DatasetNotFoundError) as exc:
        raise TunelabError(f"'{where}': cannot load '{spec['path']}': {' '.join(str(exc).split())[:300]}") from None
    except Exception as exc:  # malformed files surface as many different library errors
        msg = " ".join(str(exc).split())[:300]
        raise TunelabError(f"'{where}': cannot read '{spec['path']}' ({type(exc).__name__}): {msg}") from None
    if isinstance(ds, datasets.DatasetDict):
        raise TunelabError(f"'{where}' loads several splits ({', '.join(ds)}): choose one with `split:`")
    if len(ds) == 0:
        raise TunelabError(f"'{where}': dataset '{spec['path']}' (split {spec['split']}) is empty")
    return ds


def require_columns(ds, needed: Iterable[str], where: str, purpose: str) -> None:
    """Fail with the missing and present columns when `ds` lacks a column the stage needs."""
    missing = [c for c in needed if c not in ds.column_names]
    if missing:
        raise TunelabError(
            f"'{where}' has no column {', '.join(repr(m) for m in missing)} ({purpose}); "
            f"its columns are {', '.join(ds.column_names)}"
        )


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


SIGNATURE_MAX_BYTES = 512 * 2**20  # hash contents up to this much data; beyond it, sizes and times


def signature(value: Any) -> str:
    """What a `data:` value holds now, for run fingerprints: a hash of its local files' contents.

    Folders over SIGNATURE_MAX_BYTES are summarised by file sizes and modification times, so a
    pipeline over a large local corpus does not reread it on every `--resume`. Hub datasets are
    known by their arguments (path, name, revision) alone, already part of the stage's config.
    """
    import hashlib

    spec = {"path": value} if isinstance(value, str) else value
    if not isinstance(spec, dict) or not isinstance(spec.get("path"), str):
        return ""
    root = local_path(spec["path"])
    if root is None:
        return ""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    total = sum(f.stat().st_size for f in files)
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode() if f == root else str(f.relative_to(root)).encode())
        if total <= SIGNATURE_MAX_BYTES:
            digest.update(f.read_bytes())
        else:
            stat = f.stat()
            digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]
