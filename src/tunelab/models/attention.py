"""Attention heatmaps of chosen layers and heads for one text: for teaching and debugging.

Any transformers model folder, hub id or adapter folder; the model is loaded with eager attention
(the fused kernels do not return weights) and run once with `output_attentions=True`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.core.hub import resolve_model
from tunelab.models.chat_templates import messages, render, use_template
from tunelab.models.spec import adapter_base, is_adapter, model_spec, resolve_spec
from tunelab.models.tokenizers import load_tokenizer


def attention_maps(model_ref: str, text: str, chat: bool = True) -> tuple[list[str], list[Any]]:
    """(tokens, per-layer tensors of shape [heads, tokens, tokens]) for `text`.

    With `chat` and a tokenizer that has a chat template, `text` is a user turn rendered through it
    (what an instruct model reads); else the plain text.
    """
    import torch
    from transformers import AutoModel

    path = resolve_spec(model_spec(model_ref, "model"), "model")["path"]
    tokenizer = load_tokenizer(path)
    if is_adapter(path):
        import json

        from peft import PeftModel
        from transformers import AutoModelForSequenceClassification

        task = json.loads(Path(path, "adapter_config.json").read_text()).get("task_type")
        if task == "CAUSAL_LM":  # through the loader that follows adapters trained on merged adapters
            from tunelab.models.loading import load_causal_lm

            model = load_causal_lm({"path": path, "attn_implementation": "eager"})
        else:
            cls = {"SEQ_CLS": AutoModelForSequenceClassification}.get(task, AutoModel)
            base = cls.from_pretrained(resolve_model(adapter_base(path), "base model"), attn_implementation="eager")
            model = PeftModel.from_pretrained(base, path).merge_and_unload()
    else:
        model = AutoModel.from_pretrained(path, attn_implementation="eager")

    templated = chat and use_template(tokenizer, True)
    if templated:
        text = render(tokenizer, messages(text), "text")
    enc = tokenizer(text, return_tensors="pt", add_special_tokens=not templated)
    with torch.no_grad():
        out = model.eval()(**enc, output_attentions=True)
    if not out.attentions:
        raise TunelabError(f"'{model_ref}' returned no attention weights: is it a transformer with attention?")
    tokens = [tokenizer.decode([i]) for i in enc["input_ids"][0].tolist()]
    return tokens, [a[0].float() for a in out.attentions]


def _pick(values: list[int] | None, count: int, what: str) -> list[int]:
    chosen = values if values else list(range(count))
    bad = [v for v in chosen if not -count <= v < count]
    if bad:
        raise TunelabError(f"{what} {bad} out of range: the model has {count} (0..{count - 1})")
    return [v % count for v in chosen]


def out_file(out: Path) -> Path:
    """The PNG that `--out` names: a folder gets attention.png inside it, a name without a suffix gets .png (as
    matplotlib would add it, so the path printed is the path written); another suffix is refused."""
    out = Path(out).expanduser()
    if out.is_dir():
        return out / "attention.png"
    if not out.suffix:
        return out.with_name(out.name + ".png")
    if out.suffix.lower() != ".png":
        raise TunelabError(f"--out '{out}' ends in {out.suffix}: the heatmaps are a PNG file; use {out.stem}.png")
    return out


def draw(
    model_ref: str,
    text: str,
    out: Path,
    layers: list[int] | None = None,
    heads: list[int] | None = None,
    chat: bool = True,
) -> Path:
    """Draw one heatmap per (layer, head) into a PNG grid; rows are layers, columns heads.

    Returns the file written, which `out_file` decides before the model loads.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = out_file(out)
    tokens, maps = attention_maps(model_ref, text, chat)
    layer_ids = _pick(layers, len(maps), "layers")
    head_ids = _pick(heads, maps[0].shape[0], "heads")
    size = max(2.0, 0.35 * len(tokens))
    fig, axes = plt.subplots(
        len(layer_ids), len(head_ids), figsize=(size * len(head_ids), size * len(layer_ids)), squeeze=False
    )
    for row, layer in enumerate(layer_ids):
        for col, head in enumerate(head_ids):
            ax = axes[row][col]
            ax.imshow(maps[layer][head].numpy(), cmap="viridis", vmin=0, vmax=1)
            ax.set_title(f"layer {layer}, head {head}", fontsize=9)
            ax.set_xticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], rotation=90, fontsize=7)
            ax.set_yticks(range(len(tokens)), [repr(t)[1:-1] for t in tokens], fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
