"""Exact match of generated strings against references, with normalisation options (tunelab, offline).

Options (as in the Hub's exact_match): `ignore_case`, `ignore_punctuation`, `ignore_numbers`,
`regexes_to_ignore` (removed before comparing); surrounding whitespace is always stripped. The comparison is
`tunelab.evaluation.answers.matches`, which the eval stage also uses for each row of its predictions files.
"""

import datasets
import evaluate

from tunelab.evaluation.answers import matches


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of predictions equal to their reference after normalisation.",
            citation="",
            inputs_description="predictions, references: lists of strings",
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, **options):
        same = [matches(p, r, **options) for p, r in zip(predictions, references, strict=True)]
        return {"exact_match": sum(same) / len(same)}
