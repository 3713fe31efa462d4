"""The model families `tunelab export` writes, and what llama.cpp expects of each.

One entry per transformers `model_type`. Each says which GGUF architecture it becomes, and how
its tensors differ from transformers' (facts from llama.cpp's `convert_hf_to_gguf.py`, which is the
reference for what llama.cpp reads; the code here is tunelab's):

- Llama-family files keep llama.cpp's original rotary layout: the rows of the query and key
  projections are permuted, head by head, from transformers' "halves" order back to interleaved
  pairs (transformers' GGUF reader undoes exactly this);
- Mistral is written as `llama` (llama.cpp has no architecture of its own for it);
- Gemma scales each RMSNorm by (1 + weight) where llama.cpp scales by the weight: norms get +1;
- Gemma, and every model whose config ties its embeddings, has no separate output matrix: llama.cpp
  then reads the token embedding as the output.

A family is listed only where transformers' GGUF reader reads it back, since every export is checked
by that round trip. Gemma (1) is not: transformers cannot read a `gemma` file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tunelab.core.errors import TunelabError


@dataclass(frozen=True)
class Architecture:
    model_type: str  # transformers' config.model_type
    gguf: str  # GGUF `general.architecture` (a gguf.MODEL_ARCH_NAMES value)
    family: str  # how users name it
    permute_qk: bool = False
    norm_plus_one: bool = False


ARCHITECTURES: dict[str, Architecture] = {
    a.model_type: a
    for a in (
        Architecture("llama", "llama", "Llama (Llama 2/3, SmolLM2, TinyLlama)", permute_qk=True),
        Architecture("mistral", "llama", "Mistral", permute_qk=True),
        Architecture("qwen2", "qwen2", "Qwen2/Qwen2.5"),
        Architecture("qwen3", "qwen3", "Qwen3"),
        Architecture("gemma2", "gemma2", "Gemma 2", norm_plus_one=True),
        Architecture("gemma3_text", "gemma3", "Gemma 3 (text)", norm_plus_one=True),
    )
}
SUPPORTED = "Llama (SmolLM2, TinyLlama), Mistral, Qwen2/Qwen2.5, Qwen3, Gemma 2, Gemma 3 (text)"


def architecture(config: Any, where: str) -> Architecture:
    """The entry for a model's config, or one line naming the families that are written."""
    model_type = getattr(config, "model_type", None)
    if model_type == "gemma3" and getattr(config, "text_config", None) is not None:
        raise TunelabError(
            f"'{where}' is a Gemma 3 image+text model: GGUF export writes text models ({SUPPORTED}); "
            "export a text-only Gemma 3 (gemma-3-270m, gemma-3-1b)"
        )
    if model_type not in ARCHITECTURES:
        extra = " (transformers cannot read Gemma 1 GGUF files back)" if model_type == "gemma" else ""
        raise TunelabError(
            f"'{where}' is a '{model_type}' model, which GGUF export does not write{extra}: it writes {SUPPORTED}"
        )
    arch = ARCHITECTURES[model_type]
    rope(config, arch, where)  # refused here, before any weight loads
    return arch


def head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def rope(config: Any, arch: Architecture, where: str) -> tuple[float, float | None, dict[str, Any]]:
    """(base frequency, sliding-window base frequency or None, scaling {type, factor} or {}).

    Only plain and linear RoPE are written: llama3, YaRN and the other scalings need tensors or keys
    transformers' GGUF reader ignores, so the round trip could not vouch for them.
    """
    params = dict(getattr(config, "rope_parameters", None) or {})
    swa = None
    if "full_attention" in params:  # Gemma 3: a base per attention kind
        swa = (params.get("sliding_attention") or {}).get("rope_theta")
        params = dict(params["full_attention"])
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return float(theta), swa, {}
    if kind == "linear":
        return float(theta), swa, {"type": "linear", "factor": float(params["factor"])}
    raise TunelabError(
        f"'{where}' uses RoPE scaling '{kind}', which GGUF export does not write yet (plain and linear RoPE "
        "are written): export a model without it, or convert with llama.cpp's convert_hf_to_gguf.py"
    )


def write_metadata(writer: Any, config: Any, arch: Architecture, file_type: int, vocab_size: int) -> None:
    """The `{arch}.*` keys llama.cpp reads for this family (and transformers' reader maps back to a config)."""
    import gguf

    theta, swa, scaling = rope(config, arch, "model")
    dim = head_dim(config)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_freq_base(theta)
    writer.add_vocab_size(vocab_size)
    writer.add_file_type(file_type)
    if arch.gguf == "llama":
        writer.add_rope_dimension_count(dim)
    if getattr(config, "head_dim", None) is not None:
        writer.add_key_length(dim)
        writer.add_value_length(dim)
    if scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(scaling["factor"])
    if arch.model_type.startswith("gemma"):
        if getattr(config, "sliding_window", None):
            writer.add_sliding_window(int(config.sliding_window))
        for key, add in (
            ("attn_logit_softcapping", writer.add_attn_logit_softcapping),
            ("final_logit_softcapping", writer.add_final_logit_softcapping),
        ):
            if getattr(config, key, None) is not None:
                add(float(getattr(config, key)))
    if swa is not None:
        writer.add_rope_freq_base_swa(float(swa))


def permute_rows(weight: Any, heads: int) -> Any:
    """Transformers' query/key rows (per head: first halves, then second halves of each rotary pair) in
    llama.cpp's order (per head: the pairs interleaved). A numpy array of shape (heads * dim, ...)."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)
