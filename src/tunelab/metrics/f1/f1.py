"""Precision, recall and F1 for class labels, binary or averaged (tunelab, offline).

`average`: "binary" (scores of `pos_label`), "macro" (unweighted mean over labels), "micro"
(from pooled counts), or "weighted" (mean weighted by each label's support), as in scikit-learn.
"""

from collections import Counter

import datasets
import evaluate


def _prf(tp, fp, fn):
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Precision, recall and F1 of class labels.",
            citation="",
            inputs_description="predictions, references: lists of integer class labels",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, average="binary", pos_label=1):
        pairs = list(zip(predictions, references, strict=True))
        labels = sorted(set(predictions) | set(references))
        tp = Counter(r for p, r in pairs if p == r)
        fp = Counter(p for p, r in pairs if p != r)
        fn = Counter(r for p, r in pairs if p != r)
        if average == "binary":
            precision, recall, f1 = _prf(tp[pos_label], fp[pos_label], fn[pos_label])
        elif average == "micro":
            precision, recall, f1 = _prf(sum(tp.values()), sum(fp.values()), sum(fn.values()))
        elif average in ("macro", "weighted"):
            support = Counter(references)
            weights = {c: (support[c] / len(references) if average == "weighted" else 1 / len(labels)) for c in labels}
            scores = {c: _prf(tp[c], fp[c], fn[c]) for c in labels}
            precision, recall, f1 = (sum(weights[c] * scores[c][i] for c in labels) for i in range(3))
        else:
            raise ValueError(f"average must be binary, micro, macro or weighted, not {average!r}")
        return {"precision": precision, "recall": recall, "f1": f1}
