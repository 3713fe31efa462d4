"""Write a loaded transformers model and its tokenizer as one GGUF file, through `gguf.GGUFWriter`.

Each tensor is renamed through `gguf.TensorNameMap` (the names llama.cpp looks up), changed where
the family needs it (see `tunelab.exporting.architectures`), given its type (see
`tunelab.exporting.types`) and quantized by `gguf.quants`. A tensor the name map does not know stops
the export with its name: a file missing a tensor would load in neither llama.cpp nor transformers.

As each tensor is written, the model's own parameter is replaced by what the file holds (the values
rounded to F16, or quantized and dequantized again), so after writing, the model in memory is the file
as intended: the round trip compares the file's reader against it (see `tunelab.exporting.roundtrip`).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.exporting.architectures import Architecture, permute_rows, write_metadata
from tunelab.exporting.types import GGUFType, tensor_type
from tunelab.exporting.vocab import Vocab, write_vocab

SKIPPED = (".rotary_emb.inv_freq",)  # buffers transformers keeps that llama.cpp computes itself


@dataclass
class Written:
    """What went into the file: tensor count per GGUF type, the parameters, and notes for the user."""

    types: Counter = field(default_factory=Counter)
    params: int = 0
    notes: list[str] = field(default_factory=list)


def write_gguf(model: Any, vocab: Vocab, arch: Architecture, kind: GGUFType, path: Path, name: str) -> Written:
    """Write `model` (float32, on CPU) as the GGUF file `path`; rounds the model's parameters to the file's."""
    import gguf
    import torch

    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[_arch_key(arch.gguf)], int(config.num_hidden_layers))
    writer = gguf.GGUFWriter(str(path), arch.gguf)
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    write_metadata(writer, config, arch, int(gguf.LlamaFileType[kind.file_type]), len(vocab.tokens))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_vocab(writer, vocab)
    written = Written()
    heads = int(config.num_attention_heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    fallbacks = []
    with torch.no_grad():
        for hf_name, param in model.state_dict(keep_vars=True).items():
            if hf_name.endswith(SKIPPED) or (tied and hf_name == "lm_head.weight"):
                continue
            gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gguf_name is None:
                raise TunelabError(
                    f"the model's tensor '{hf_name}' has no GGUF name for architecture '{arch.gguf}': this model "
                    "differs from the family's layout; convert it with llama.cpp's convert_hf_to_gguf.py"
                )
            data = param.detach().to(torch.float32).cpu().numpy()
            if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                data = permute_rows(data, heads)
            elif arch.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                data = permute_rows(data, kv_heads)
            if arch.norm_plus_one and gguf_name.endswith("norm.weight"):
                data = data + 1
            output = gguf_name == "output.weight" or (tied and gguf_name == "token_embd.weight")
            qtype_name, note = tensor_type(gguf_name, data.shape, kind, output)
            if note:
                fallbacks.append(note)
            qtype = gguf.GGMLQuantizationType[qtype_name]
            packed = gguf.quants.quantize(data, qtype)
            writer.add_tensor(gguf_name, packed, raw_dtype=qtype)
            written.types[qtype_name] += 1
            written.params += data.size
            _round_in_place(param, packed, qtype, data, arch, hf_name, heads, kv_heads, gguf_name)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if fallbacks:
        written.notes.append(
            f"{len(fallbacks)} tensor(s) kept at F16 (rows do not fit {kind.name}'s blocks): "
            + "; ".join(fallbacks[:3])
            + ("; ..." if len(fallbacks) > 3 else "")
        )
    return written


def _arch_key(name: str) -> str:
    """The gguf.MODEL_ARCH member whose name is `name` (e.g. 'gemma3' -> 'GEMMA3')."""
    import gguf

    for key, value in gguf.MODEL_ARCH_NAMES.items():
        if value == name:
            return key.name
    raise TunelabError(f"the installed gguf package has no architecture '{name}': pip install -U gguf")


def _round_in_place(
    param: Any,
    packed: Any,
    qtype: Any,
    data: Any,
    arch: Architecture,
    hf_name: str,
    heads: int,
    kv_heads: int,
    gguf_name: str,
) -> None:
    """Replace the parameter by the values the file holds, in transformers' layout again."""
    import gguf
    import numpy as np
    import torch

    if qtype == gguf.GGMLQuantizationType.F32:
        return  # float32 already; a norm's +1 and -1 cancel to float32 rounding
    held = gguf.quants.dequantize(packed, qtype).reshape(data.shape).astype(np.float32)
    if arch.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias", "k_proj.weight", "k_proj.bias")):
        n = heads if "q_proj" in hf_name else kv_heads
        held = _unpermute_rows(held, n)
    if arch.norm_plus_one and gguf_name.endswith("norm.weight"):
        held = held - 1
    param.copy_(torch.from_numpy(held).to(param.dtype))


def _unpermute_rows(weight: Any, heads: int) -> Any:
    shape = weight.shape
    return weight.reshape(heads, shape[0] // heads // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
