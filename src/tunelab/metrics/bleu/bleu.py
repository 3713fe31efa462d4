"""Corpus BLEU through sacrebleu (0-100), with one or several references per prediction (tunelab, offline)."""

import datasets
import evaluate
import sacrebleu


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="sacrebleu's corpus BLEU.",
            citation="Post, A Call for Clarity in Reporting BLEU Scores, WMT 2018.",
            inputs_description="predictions: strings; references: lists of strings (same count per prediction)",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, tokenize="13a", lowercase=False):
        streams = [list(r) for r in zip(*references, strict=True)]  # sacrebleu wants one list per reference slot
        score = sacrebleu.corpus_bleu(predictions, streams, tokenize=tokenize, lowercase=lowercase)
        return {"bleu": score.score, "bleu_brevity_penalty": score.bp}
