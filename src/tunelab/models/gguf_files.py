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
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.core.paths import refuse_special

log = logging.getLogger(__name__)

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
    refuse_special(path, f"'{where}.gguf_file'")
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


class _Malformed(Exception):
    """A GGUF file whose header cannot be what it claims (truncated, or a count or length past its end)."""


# Bytes of each scalar metadata type (GGUFValueType: 8 is a string, 9 an array).
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_MAX_DIMS = 8  # ggml has 4; a larger count is a corrupt header, not a tensor


class _Header:
    """A bounded reader of a GGUF header: every count and length it reads is checked against the bytes
    left in the file before anything is allocated or looped over, so a corrupt or truncated file costs a
    failed check, not a `MemoryError` or an endless loop (a header may claim 2**62 tensors)."""

    def __init__(self, fh: Any, size: int) -> None:
        self.fh, self.size, self.pos = fh, size, 0

    def left(self) -> int:
        return self.size - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.left():
            raise _Malformed(
                f"{what} needs {n} bytes at offset {self.pos}, past the end of the file ({self.size} bytes)"
            )
        data = self.fh.read(n)
        if len(data) != n:
            raise _Malformed(f"the file ends at offset {self.pos + len(data)} while reading {what}")
        self.pos += n
        return data

    def uint(self, fmt: str, what: str) -> int:
        import struct

        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def count(self, what: str, each: int) -> int:
        """A uint64 count of items of at least `each` bytes: no larger than the rest of the file can hold."""
        n = self.uint("<Q", what)
        if n * each > self.left():
            raise _Malformed(f"{what} is {n}, more than the {self.left()} bytes left in the file can hold")
        return n

    def string(self, what: str) -> bytes:
        return self.take(self.count(f"the length of {what}", 1), what)

    def skip_value(self, kind: int, what: str, depth: int = 0) -> None:
        if kind == 8:
            self.string(what)
        elif kind == 9:
            if depth > 4:
                raise _Malformed(f"{what} nests arrays more than 4 deep")
            inner = self.uint("<I", f"the element type of {what}")
            each = 8 if inner == 8 else 12 if inner == 9 else _SCALAR_SIZES.get(inner, 1)
            n = self.count(f"the element count of {what}", each)
            if inner in _SCALAR_SIZES:
                self.take(n * _SCALAR_SIZES[inner], what)  # scalars: one read, not n
            else:
                for _ in range(n):
                    self.skip_value(inner, what, depth + 1)
        elif kind in _SCALAR_SIZES:
            self.take(_SCALAR_SIZES[kind], what)
        else:
            raise _Malformed(f"{what} has value type {kind}, which GGUF does not define")


def _read_architecture(path: Path) -> str:
    """`general.architecture` from the header, without reading the tensors (the gguf package's reader maps them
    all), after checking the whole header: every metadata entry and tensor record, and that the tensors' data
    lies inside the file. transformers' own GGUF reader trusts the header; tunelab checks it first so a
    malformed file is one line at validate, not a struct error or a MemoryError once loading starts."""
    try:
        with path.open("rb") as fh:
            return _parse(_Header(fh, os.fstat(fh.fileno()).st_size))
    except _Malformed as exc:
        raise TunelabError(f"'{path}' is not a readable GGUF file: {exc}; download or convert it again") from None
    except OSError as exc:
        raise TunelabError(f"'{path}' is not a readable GGUF file: {exc.strerror or exc}") from None


def _parse(h: _Header) -> str:
    h.take(4, "the magic")
    version = h.uint("<I", "the version")
    if version < 2:
        return "unknown (GGUF v1)"
    if version > 3:
        raise _Malformed(f"GGUF version {version} is not one transformers reads (2 or 3; a big-endian file?)")
    tensors = h.count("the tensor count", 8 + 4 + 4 + 8)  # name length, dims, type, offset
    entries = h.count("the metadata entry count", 8 + 4 + 1)  # key length, type, a 1-byte value
    arch, alignment = "unknown", 32
    for i in range(entries):
        key = h.string(f"metadata key {i}").decode("utf-8", "replace")
        kind = h.uint("<I", f"the type of metadata '{key}'")
        if key == "general.architecture" and kind == 8:
            arch = h.string(f"metadata '{key}'").decode("utf-8", "replace")
        elif key == "general.alignment" and kind == 4:
            alignment = h.uint("<I", f"metadata '{key}'")
            if alignment == 0 or alignment & (alignment - 1):
                raise _Malformed(f"general.alignment is {alignment}, not a power of two")
        else:
            h.skip_value(kind, f"metadata '{key}'")
    from gguf import GGML_QUANT_SIZES

    sizes = {int(k): v for k, v in GGML_QUANT_SIZES.items()}
    ends = []
    for i in range(tensors):
        name = h.string(f"the name of tensor {i}").decode("utf-8", "replace")
        dims = h.uint("<I", f"the dimension count of tensor '{name}'")
        if dims > _MAX_DIMS:
            raise _Malformed(f"tensor '{name}' claims {dims} dimensions")
        shape = [h.uint("<Q", f"the shape of tensor '{name}'") for _ in range(dims)]
        kind = h.uint("<I", f"the type of tensor '{name}'")
        offset = h.uint("<Q", f"the data offset of tensor '{name}'")
        if kind not in sizes:
            raise _Malformed(f"tensor '{name}' has type {kind}, which ggml does not define")
        block, nbytes = sizes[kind]
        count = 1
        for d in shape:
            count *= d
        ends.append((offset + count // block * nbytes, name))
    start = -(-h.pos // alignment) * alignment
    end, name = max(ends, default=(0, ""))
    if ends and start + end > h.size:
        raise _Malformed(
            f"tensor '{name}' ends at byte {start + end}, past the end of the file ({h.size} bytes): it is cut short"
        )
    return arch


_CONFIGS: dict[tuple[str, int, int], Any] = {}


def gguf_config(path: Path) -> Any:
    """The transformers config of a GGUF file, without `quantization_config` (tunelab trains and writes the
    dequantized weights). Read once per process and file version: transformers parses the whole header into
    numpy arrays for it (seconds), and validate asks for it from several checks and the plan."""
    import copy

    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _CONFIGS:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        except Exception as exc:  # noqa: BLE001 - the header passed `architecture`; its values may still be wrong
            message = " ".join(str(exc).split())[:200] or type(exc).__name__
            raise TunelabError(f"'{path}' is not a readable GGUF file: {message}") from None
        config.__dict__.pop("quantization_config", None)
        _CONFIGS[key] = config
    return copy.deepcopy(_CONFIGS[key])


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
    log.info("   %s: converting the GGUF file to a plain float32 model (once) in %s", path.name, folder)
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
