"""Corpus chrF (and chrF++ with word_order=2) through sacrebleu, 0-100 (tunelab, offline)."""

import datasets
import evaluate
import sacrebleu


class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="sacrebleu's corpus chrF.",
            citation="Popovic, chrF: character n-gram F-score for automatic MT evaluation, WMT 2015.",
            inputs_description="predictions: strings; references: lists of strings (same count per prediction)",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
        )

    def _compute(self, predictions, references, char_order=6, word_order=0, beta=2):
        streams = [list(r) for r in zip(*references, strict=True)]
        score = sacrebleu.corpus_chrf(predictions, streams, char_order=char_order, word_order=word_order, beta=beta)
        return {"chrf": score.score}
