"""ROUGE-1/2/L/Lsum F-measures through rouge-score, averaged over examples, 0-1 (tunelab, offline)."""

import datasets
import evaluate
from rouge_score import rouge_scorer


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="rouge-score's ROUGE F-measures, mean over examples.",
            citation="Lin, ROUGE: A Package for Automatic Evaluation of Summaries, 2004.",
            inputs_description="predictions, references: lists of strings",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(
        self, predictions, references, rouge_types=("rouge1", "rouge2", "rougeL", "rougeLsum"), use_stemmer=False
    ):
        scorer = rouge_scorer.RougeScorer(list(rouge_types), use_stemmer=use_stemmer)
        scores = [scorer.score(r, p) for p, r in zip(predictions, references, strict=True)]
        return {t: sum(s[t].fmeasure for s in scores) / len(scores) for t in rouge_types}
