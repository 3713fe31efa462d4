"""Pairwise preference accuracy of a reward model: the share of pairs it scores chosen above rejected."""

import datasets
import evaluate


class PreferenceAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Share of (chosen, rejected) pairs whose chosen score is higher.",
            citation="",
            inputs_description="chosen, rejected: reward scores of the two answers of each pair",
            features=datasets.Features({"chosen": datasets.Value("float64"), "rejected": datasets.Value("float64")}),
        )

    def _compute(self, chosen, rejected):
        wins = sum(c > r for c, r in zip(chosen, rejected, strict=True))
        return {
            "preference_accuracy": wins / len(chosen),
            "mean_margin": sum(chosen) / len(chosen) - sum(rejected) / len(rejected),
        }
