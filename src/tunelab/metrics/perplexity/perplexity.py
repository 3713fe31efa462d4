"""Perplexity of texts under a causal LM (a folder or hub id): exp of the mean token negative log-likelihood."""

import math

import datasets
import evaluate
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Perplexity of each text under a causal language model, and their token-weighted mean.",
            citation="",
            inputs_description="predictions: texts; model_id: model folder or hub id",
            features=datasets.Features({"predictions": datasets.Value("string")}),
        )

    def _compute(self, predictions, model_id, max_length=None):
        tokenizer = AutoTokenizer.from_pretrained(model_id)
        model = AutoModelForCausalLM.from_pretrained(model_id).eval()
        per_text, total_nll, total_tokens = [], 0.0, 0
        for text in predictions:
            ids = tokenizer(text, return_tensors="pt", truncation=max_length is not None, max_length=max_length)
            with torch.no_grad():
                logits = model(**ids).logits[:, :-1].float()
            targets = ids["input_ids"][:, 1:]
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            ).item()
            n = targets.numel()
            per_text.append(math.exp(nll / max(n, 1)))
            total_nll, total_tokens = total_nll + nll, total_tokens + n
        return {"perplexity": math.exp(total_nll / max(total_tokens, 1)), "perplexities": per_text}
