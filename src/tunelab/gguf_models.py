"""GGUF files as model sources: checked without loading, trained and saved as plain models.

transformers loads a GGUF file (`from_pretrained(folder, gguf_file=NAME)`) by dequantizing its
tensors, but flags the result as quantized with GGUF: the Trainer refuses to train it and
`save_pretrained` refuses to write it. So tunelab converts a GGUF file once into a plain model
folder (float32 safetensors, config, tokenizer with its chat template) in a cache, and every stage,
merge, eval, chat and attention loads that folder like any other. The conversion takes ~20 s for
SmolLM2-135M; later loads take a fraction of a second.

The cache is `$TUNELAB_CACHE/gguf` (default `~/.cache/tunelab/gguf`), one folder per GGUF file,
keyed by the file's path, size and modification time. Each folder holds `tunelab_gguf.json`
naming its source, so an adapter trained on it records how to rebuild its base.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

MAGIC = b"GGUF"
SOURCE_FILE = "tunelab_gguf.json"


def cache_root() -> Path:
    return Path(os.environ.get("TUNELAB_CACHE", Path.home() / ".cache" / "tunelab")).expanduser() / "gguf"


def split_file(spec: dict[str, Any]) -> dict[str, Any]:
    """`path: folder/model.gguf` is short for `path: folder, gguf_file: model.gguf`."""
    path = spec.get("path")
    if isinstance(path, str) and path.lower().endswith(".gguf") and "gguf_file" not in spec:
        folder, _, name = path.rpartition("/")
        spec = {**spec, "path": folder or ".", "gguf_file": name}
    return spec


def gguf_file(folder: Path, name: Any, where: str) -> Path:
    """The GGUF file a spec names, checked: it exists, it is GGUF, and its architecture loads in transformers."""
    if not isinstance(name, str) or not name:
        raise TunelabError(f"'{where}.gguf_file' must be a file name inside the model folder, got {name!r}")
    path = Path(name) if Path(name).is_absolute() else folder / name
    if not path.is_file():
        found = sorted(p.name for p in folder.glob("*.gguf")) if folder.is_dir() else []
        hint = f"; the folder holds {', '.join(found)}" if found else ""
        raise TunelabError(f"'{where}.gguf_file' is '{name}': no such file in '{folder}'{hint}")
    with path.open("rb") as fh:
        if fh.read(4) != MAGIC:
            raise TunelabError(f"'{where}.gguf_file' is '{path}', which is not a GGUF file (no GGUF header)")
    architecture(path, where)
    return path


def architecture(path: Path, where: str) -> str:
    """The file's `general.architecture`, which transformers must know how to convert."""
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise TunelabError(
            f"'{where}' is a GGUF file, which needs the `gguf` package: pip install gguf (or 'tunelab[gguf]')"
        ) from None
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    arch = _read_architecture(path)
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise TunelabError(
            f"'{where}': GGUF architecture '{arch}' cannot be loaded by transformers; it converts "
            f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES)[:20])}, ..."
        )
    return arch


def _read_architecture(path: Path) -> str:
    """`general.architecture` from the header, without reading the tensors (the gguf package's reader maps them all)."""
    import struct

    def string(fh) -> str:
        (n,) = struct.unpack("<Q", fh.read(8))
        return fh.read(n).decode("utf-8", "replace")

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    with path.open("rb") as fh:
        fh.read(4)
        (version,) = struct.unpack("<I", fh.read(4))
        if version < 2:
            return "unknown (GGUF v1)"
        _tensors, count = struct.unpack("<QQ", fh.read(16))
        for _ in range(count):
            key = string(fh)
            (kind,) = struct.unpack("<I", fh.read(4))
            if key == "general.architecture" and kind == 8:
                return string(fh)
            _skip(fh, kind, sizes, string)
    return "unknown"


def _skip(fh, kind: int, sizes: dict[int, int], string) -> None:
    import struct

    if kind == 8:
        string(fh)
    elif kind == 9:
        (inner,) = struct.unpack("<I", fh.read(4))
        (n,) = struct.unpack("<Q", fh.read(8))
        for _ in range(n):
            _skip(fh, inner, sizes, string)
    else:
        fh.read(sizes[kind])


def cache_folder(path: Path) -> Path:
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / f"{path.stem}-{key}"


def cached(path: Path) -> Path | None:
    """The plain copy of a GGUF file if it was converted already."""
    folder = cache_folder(path)
    return folder if (folder / SOURCE_FILE).is_file() else None


def plain_copy(path: Path, source: str) -> Path:
    """The plain model folder for a GGUF file, converting it on first use.

    Written to a temporary folder beside the cache entry and renamed into place, so a kill
    mid-conversion leaves nothing half-written and two processes converting at once agree.
    """
    found = cached(path)
    if found is not None:
        return found
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = cache_folder(path)
    folder.parent.mkdir(parents=True, exist_ok=True)
    print(f"   {path.name}: converting the GGUF file to a plain float32 model (once) in {folder}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    flagged = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    config = flagged.config
    config.__dict__.pop("quantization_config", None)  # dequantized weights; transformers >= 5.25 sets none
    config._name_or_path = str(folder)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(flagged.state_dict(), strict=True)
    if flagged.generation_config is not None:
        model.generation_config = flagged.generation_config
    del flagged
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"source": source, "gguf_file": str(path.resolve()), "note": "float32 copy of the dequantized GGUF"}
        (tmp / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        try:
            tmp.rename(folder)
        except OSError:  # another process finished first: keep its copy
            if not (folder / SOURCE_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def origin(folder: str | Path) -> dict[str, Any] | None:
    """For a plain copy made here, the GGUF it came from ({source, gguf_file}); else None."""
    try:
        return json.loads(Path(folder, SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return None
