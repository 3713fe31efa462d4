"""report.md and its plots: written at the end of a run, from the run's own files."""

from __future__ import annotations

import json
from pathlib import Path

import tunelab
from tests.helpers import QA_TEST, classify, pretrain_stage

PNG = b"\x89PNG\r\n\x1a\n"


def test_pipeline_report_has_loss_curves_and_metrics_by_model(tmp_path: Path) -> None:
    result = tunelab.run(
        tunelab.recipe_from_dict(
            {
                "output_dir": str(tmp_path / "run"),
                "stages": {
                    "pretrain": pretrain_stage(max_steps=4),
                    "eval": {
                        "stage": "eval",
                        "models": {"a": "${pretrain}", "b": "${pretrain}"},
                        "data": QA_TEST,
                        "generation": {"max_new_tokens": 2},
                    },
                },
            }
        )
    )
    report = (result.run_dir / "report.md").read_text()
    assert "| pretrain |" in report and "## pretrain: loss" in report and "## eval: metrics by model" in report
    for png in ("pretrain/loss.png", "eval/metrics.png"):
        assert f"]({png})" in report and (result.run_dir / png).read_bytes().startswith(PNG)
    # The data summary, written as the stage ran: the corpus against the eval stage's questions too.
    assert "## pretrain: data" in report and "contamination: 0 of 16 rows of stages.eval.data" in report
    history = json.loads((result.run_dir / "pretrain" / "log_history.json").read_text())
    assert [h["step"] for h in history if "loss" in h] == [1, 2, 3, 4]


def test_classifier_report_has_a_confusion_matrix(tmp_path: Path, tiny_encoder: Path) -> None:
    result = classify(tmp_path, str(tiny_encoder))
    confusion = json.loads((result.run_dir / "cls" / "confusion.json").read_text())
    assert confusion["labels"] == ["buy", "give", "total"]
    assert sum(map(sum, confusion["matrix"])) == 48  # every held-out example counted once
    assert sum(confusion["matrix"][i][i] for i in range(3)) / 48 == result.metrics["cls"]["accuracy"]
    assert (result.run_dir / "cls" / "confusion.png").read_bytes().startswith(PNG)
    assert "## cls: confusion matrix" in (result.run_dir / "report.md").read_text()


def test_reward_and_kl_curves_are_drawn_when_logged(tmp_path: Path) -> None:
    from tunelab.reports import write_report

    run = tmp_path / "run"
    (run / "ppo").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"name": "r", "status": "completed", "stages": {}}))
    (run / "metrics.json").write_text(json.dumps({"ppo": {"train_loss": 0.5}}))
    history = [{"step": s, "loss": 1 / s, "objective/kl": 0.1 * s, "env/reward_mean": s} for s in (1, 2, 3)]
    (run / "ppo" / "log_history.json").write_text(json.dumps(history))
    report = write_report(run).read_text()
    assert "## ppo: training signals" in report and (run / "ppo" / "signals.png").read_bytes().startswith(PNG)
    assert "## ppo: loss" in report
