"""Reward models: sequence classifiers loaded (from a causal LM, an SFT adapter, or a classifier adapter)
and their scores of full texts. The `reward`, `ppo` and `eval` stages and the `rewards:` functions of
`reward_functions` share them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tunelab.models.loading import load_causal_lm
from tunelab.models.spec import adapter_base, is_adapter, load_kwargs
from tunelab.models.tokenizers import load_tokenizer


def load_sequence_classifier(spec: dict[str, Any], num_labels: int = 1, quantization: Any = None):
    """A sequence classifier (a reward model when `num_labels=1`) from a model, adapter or classifier folder.

    A causal LM (or an SFT adapter on one) gets a new, seeded score head on its
    backbone: the usual start of a reward model. A classifier adapter (task type
    SEQ_CLS, saved with its head) is loaded on its base; merged unless quantized.
    """
    from transformers import AutoModelForSequenceClassification

    path, kwargs = spec["path"], load_kwargs(spec)
    if is_adapter(path) and _adapter_task(path) == "SEQ_CLS":
        from peft import PeftModel

        base = load_sequence_classifier({**spec, "path": adapter_base(path)}, num_labels, quantization)
        model = PeftModel.from_pretrained(base, path)
        return model if quantization is not None else model.merge_and_unload()
    if is_adapter(path):
        return _classifier_on_adapter(spec, num_labels, quantization)
    if quantization is not None:
        kwargs["quantization_config"] = quantization
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels, **kwargs)
    return _with_pad(model, path)


def _adapter_task(path: str | Path) -> str | None:
    return json.loads(Path(path, "adapter_config.json").read_text()).get("task_type")


def _classifier_on_adapter(spec: dict[str, Any], num_labels: int, quantization: Any):
    """A classifier whose backbone is a causal LM adapter merged into its base."""
    import tempfile

    from transformers import AutoModelForSequenceClassification

    causal = load_causal_lm({**spec, "path": spec["path"]})
    if quantization is not None:
        # Quantization happens at load time: materialise the merged model, then load it quantized.
        with tempfile.TemporaryDirectory(prefix="tunelab-merged-") as tmp:
            causal.save_pretrained(tmp)
            del causal
            kwargs = {**load_kwargs(spec), "quantization_config": quantization}
            model = AutoModelForSequenceClassification.from_pretrained(tmp, num_labels=num_labels, **kwargs)
    else:
        config = causal.config
        config.num_labels = num_labels
        model = AutoModelForSequenceClassification.from_config(config, dtype=causal.dtype)
        prefix = causal.base_model_prefix
        getattr(model, prefix).load_state_dict(getattr(causal, prefix).state_dict())
    model.config.name_or_path = str(spec["path"])
    return _with_pad(model, spec["path"])


def _with_pad(model: Any, path: str):
    """Classifiers find each sequence's last token through pad_token_id; take the tokenizer's."""
    if model.config.pad_token_id is None:
        model.config.pad_token_id = load_tokenizer(path).pad_token_id
    return model


def reward_scores(model: Any, tokenizer: Any, texts: list[str], batch_size: int = 32) -> list[float]:
    """A reward model's score of each full text (prompt + answer).

    Texts end with the EOS token, as `trl.RewardTrainer` trains on them and as
    PPO scores a response that stopped at EOS.
    """
    import torch

    tokenizer.padding_side = "right"
    eos = tokenizer.eos_token or ""
    out: list[float] = []
    model.eval()
    for start in range(0, len(texts), batch_size):
        batch = [t if t.endswith(eos) else t + eos for t in texts[start : start + batch_size]]
        enc = tokenizer(batch, return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            out += model(**enc).logits[:, 0].float().tolist()
    return out
