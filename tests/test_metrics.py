"""Shipped metric modules load offline with `evaluate.load(path)` and agree with the reference libraries."""

from __future__ import annotations

import math
from pathlib import Path

import evaluate
import pytest
import sacrebleu
import torch
from rouge_score import rouge_scorer
from sklearn.metrics import accuracy_score, precision_recall_fscore_support
from transformers import AutoModelForCausalLM, AutoTokenizer

import tunelab.metrics as metrics
from tunelab import TunelabError

PRED = [0, 1, 2, 1, 0, 2, 2, 1, 0, 1]
REF = [0, 1, 1, 1, 0, 2, 0, 2, 0, 1]
HYP = ["the cat sat on the mat", "a quick brown fox jumps", "hello there general kenobi"]
REFS = ["the cat is on the mat", "the quick brown fox jumped", "hello there"]


def test_every_shipped_module_loads_offline_by_path() -> None:
    for name in metrics.SHIPPED:
        module = evaluate.load(str(metrics.path(name)))
        assert isinstance(module, evaluate.EvaluationModule)


def test_accuracy_and_f1_match_sklearn() -> None:
    assert metrics.load("accuracy").compute(predictions=PRED, references=REF)["accuracy"] == accuracy_score(REF, PRED)
    f1 = metrics.load("f1")
    for average in ("macro", "micro", "weighted"):
        p, r, f, _ = precision_recall_fscore_support(REF, PRED, average=average, zero_division=0)
        got = f1.compute(predictions=PRED, references=REF, average=average)
        assert got == pytest.approx({"precision": p, "recall": r, "f1": f})
    binary = [int(x > 0) for x in PRED], [int(x > 0) for x in REF]
    p, r, f, _ = precision_recall_fscore_support(binary[1], binary[0], average="binary")
    assert f1.compute(predictions=binary[0], references=binary[1]) == pytest.approx(
        {"precision": p, "recall": r, "f1": f}
    )


def test_bleu_and_chrf_match_sacrebleu() -> None:
    bleu = metrics.load("bleu").compute(predictions=HYP, references=[[r] for r in REFS])
    assert bleu["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYP, [REFS]).score)
    assert 0 < bleu["bleu"] < 100
    chrf = metrics.load("chrf").compute(predictions=HYP, references=[[r] for r in REFS])
    assert chrf["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYP, [REFS]).score)
    two = metrics.load("bleu").compute(predictions=HYP, references=[[r, h] for r, h in zip(REFS, HYP, strict=True)])
    assert two["bleu"] == pytest.approx(100.0)  # a reference equal to the hypothesis


def test_rouge_matches_rouge_score() -> None:
    got = metrics.load("rouge").compute(predictions=HYP, references=REFS)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"])
    expected = [scorer.score(r, h) for h, r in zip(HYP, REFS, strict=True)]
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert got[key] == pytest.approx(sum(e[key].fmeasure for e in expected) / 3)


def test_exact_match_normalisation() -> None:
    em = metrics.load("exact_match")
    assert em.compute(predictions=[" 7", "Seven!"], references=["7", "seven"])["exact_match"] == 0.5
    both = em.compute(
        predictions=[" 7", "Seven!"], references=["7", "seven"], ignore_case=True, ignore_punctuation=True
    )
    assert both["exact_match"] == 1.0


def test_preference_accuracy() -> None:
    got = metrics.load("preference_accuracy").compute(chosen=[1.0, 0.2, 3.0, -1.0], rejected=[0.0, 0.5, 1.0, -2.0])
    assert got == pytest.approx({"preference_accuracy": 0.75, "mean_margin": (3.2 - (-0.5)) / 4})


def test_perplexity_matches_the_model_loss(tiny_lm: Path) -> None:
    text = "Mia had 3 pears. She bought 4 more, so now Mia has 7 pears."
    got = metrics.load("perplexity").compute(predictions=[text], model_id=str(tiny_lm))
    tokenizer, model = AutoTokenizer.from_pretrained(tiny_lm), AutoModelForCausalLM.from_pretrained(tiny_lm)
    ids = tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    assert got["perplexity"] == pytest.approx(math.exp(loss), rel=1e-4)


def test_unknown_metric_offline_lists_the_shipped_ones() -> None:
    with pytest.raises(TunelabError, match="did you mean 'bleu'.*shipped: accuracy, bleu"):
        metrics.check_name("bleuu", "stages.eval.metrics")
    with pytest.raises(TunelabError, match="Hub is unreachable"):
        metrics.load("meteor")
