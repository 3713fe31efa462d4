"""Exact match of generated strings against references, with normalisation options (tunelab, offline).

Options (as in the Hub's exact_match): `ignore_case`, `ignore_punctuation`, `ignore_numbers`,
`regexes_to_ignore` (removed before comparing); surrounding whitespace is always stripped.
"""

import re
import string

import datasets
import evaluate


def normalise(text, ignore_case=False, ignore_punctuation=False, ignore_numbers=False, regexes_to_ignore=None):
    for pattern in regexes_to_ignore or []:
        text = re.sub(pattern, "", text)
    if ignore_case:
        text = text.lower()
    if ignore_punctuation:
        text = text.translate(str.maketrans("", "", string.punctuation))
    if ignore_numbers:
        text = text.translate(str.maketrans("", "", string.digits))
    return text.strip()


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
        same = [
            normalise(p, **options) == normalise(r, **options) for p, r in zip(predictions, references, strict=True)
        ]
        return {"exact_match": sum(same) / len(same)}
