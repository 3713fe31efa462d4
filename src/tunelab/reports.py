"""`report.md` with PNG plots beside it, written at the end of every run.

What a person wants to see first: each stage's main numbers, the loss (and eval loss) against
steps for training stages, the evaluated models' metrics side by side, and a confusion matrix for
classifiers. Everything is read back from the run folder, so `write_report(run_dir)` can also
redraw the report of an older run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tunelab.core.runs import read_json, write_atomic
from tunelab.data.preview import DataView
from tunelab.stages import metrics_of
from tunelab.vision.prompting import report_section


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


SIGNAL_WORDS = ("reward", "kl")  # what preference and RL trainers log beside the loss


def _signal_keys(history: list[dict[str, Any]], declared: tuple[str, ...]) -> tuple[str, ...]:
    """The stage's declared per-step signals that its log holds (the first four), else any reward/KL key."""
    keys = {k for h in history for k, v in h.items() if isinstance(v, (int, float)) and k not in ("step", "epoch")}
    known = tuple(k for k in declared if k in keys)
    return known[:4] or tuple(sorted(k for k in keys if any(w in k.lower() for w in SIGNAL_WORDS)))


def _kind(run_dir: Path, stage: str, manifest: dict[str, Any]) -> str | None:
    """A stage's kind: from run.json, else (runs made before it was recorded there) its stage.json."""
    kind = manifest.get("stages", {}).get(stage, {}).get("kind")
    if kind is None:
        kind = (read_json(run_dir / stage / "stage.json") or {}).get("stage")
    return kind if isinstance(kind, str) else None


def _loss_plot(
    history: list[dict[str, Any]], path: Path, title: str, keys=("loss", "eval_loss"), ylabel: str = "loss"
) -> bool:
    series = {key: [(h["step"], h[key]) for h in history if key in h and "step" in h] for key in keys}
    if not any(series.values()):
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for key, points in series.items():
        if points:
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 30 else None, label=key)
    ax.set(xlabel="step", ylabel=ylabel, title=title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _metrics_plot(per_model: dict[str, dict[str, float]], path: Path, title: str) -> bool:
    names = sorted({m for v in per_model.values() for m in v if m != "examples"})
    if not names:
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, len(names), figsize=(3 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        labels = list(per_model)
        ax.bar(labels, [per_model[label].get(name, 0.0) for label in labels], color="tab:blue")
        ax.set_title(name)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _confusion_plot(confusion: dict[str, Any], path: Path, title: str) -> bool:
    plt = _plt()
    labels, matrix = confusion["labels"], confusion["matrix"]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.2 * len(labels) + 1.5))
    ax.imshow(matrix, cmap="Blues")
    ax.set(
        xticks=range(len(labels)),
        yticks=range(len(labels)),
        xticklabels=labels,
        yticklabels=labels,
        xlabel="predicted",
        ylabel="true",
        title=title,
    )
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _image_sections(run_dir: Path, stage: str, values: dict[str, Any]) -> list[str]:
    """Diffusion stages: the newest training sample grid, the sample grid, each evaluated model's grid."""
    folder = run_dir / stage
    found = []
    grids = sorted((folder / "samples").glob("step-*.png")) if (folder / "samples").is_dir() else []
    if grids:
        found.append((f"samples at {grids[-1].stem.replace('-', ' ')}", grids[-1]))
    if (folder / "grid.png").is_file():
        found.append(("samples", folder / "grid.png"))
    found += [
        (f"samples of {label}", folder / label / "grid.png")
        for label in values
        if (folder / label / "grid.png").is_file()
    ]
    lines = []
    for title, path in found:
        lines += [f"## {stage}: {title}", "", f"![{stage} {title}]({path.relative_to(run_dir).as_posix()})", ""]
    return lines


def _data_section(folder: Path, stage: str) -> list[str]:
    """The stage's data: each source, the format it was read as and the rows it contributed (`stage.json`'s
    data reports), then the data summary written as the stage ran (`data.json`: token lengths, truncation,
    contamination; `tunelab data` shows it in full)."""
    lines = []
    reports = (read_json(folder / "stage.json") or {}).get("data_reports")
    if isinstance(reports, dict) and reports:
        lines += ["| data | source | format | rows |", "|---|---|---|---|"]
        for key, report in reports.items():
            sources = report.get("sources") if isinstance(report, dict) else None
            for source in sources if isinstance(sources, list) else []:
                rows = source.get("rows")
                lines.append(
                    f"| {source.get('where', key)} | {source.get('path')} | {source.get('format')} | "
                    f"{'streamed' if rows is None else rows} |"
                )
            if isinstance(report, dict) and report.get("mix"):
                total = report.get("rows")
                lines.append(f"| {key} | {report['mix']} of the above | | {'streamed' if total is None else total} |")
        lines.append("")
    data = read_json(folder / "data.json")
    summary: list[str] = []
    if isinstance(data, dict):
        try:
            view = DataView.from_dict(data)
            summary = (view.source_lines() if not lines else []) + view.length_lines()
            summary += ([view.tokens.rule] if view.tokens is not None else []) + view.contamination_lines()
        except (KeyError, TypeError, ValueError):  # a data.json from another version: the report goes on without it
            summary = []
    if summary:
        lines += ["```", *summary, "```", ""]
    return [f"## {stage}: data", "", *lines] if lines else []


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_report(run_dir: Path) -> Path:
    """Write `run_dir/report.md` (and PNGs in the stage folders) from the run's files."""
    run_dir = Path(run_dir)
    manifest = read_json(run_dir / "run.json") or {}
    metrics = read_json(run_dir / "metrics.json") or {}
    lines = [
        f"# {manifest.get('name', run_dir.name)}",
        "",
        f"Status **{manifest.get('status')}**, seed {manifest.get('seed')}, "
        f"started {manifest.get('started')}, ended {manifest.get('ended')}; "
        f"device {manifest.get('device', {}).get('type')}.",
        "",
    ]
    declared = {stage: metrics_of(_kind(run_dir, stage, manifest)) for stage in metrics}
    # Columns: each stage's declared main numbers, in stage order, then the step count of training stages.
    wanted = [k for m in declared.values() for k in m.summary] + ["global_step"]
    columns = [k for k in dict.fromkeys(wanted) if any(k in values for values in metrics.values())]
    lines += ["| stage | seconds | " + " | ".join(columns) + " |", "|---" * (len(columns) + 2) + "|"]
    stages = manifest.get("stages", {})
    for stage, values in metrics.items():
        row = [stage, _fmt(stages.get(stage, {}).get("seconds", ""))]
        row += [_fmt(values.get(k, "")) for k in columns]
        lines.append("| " + " | ".join(row) + " |")
    lines.append("")
    for stage, values in metrics.items():
        folder = run_dir / stage
        history = read_json(folder / "log_history.json", list)
        if isinstance(history, list) and _loss_plot(history, folder / "loss.png", f"{stage}: loss"):
            lines += [f"## {stage}: loss", "", f"![{stage} loss]({stage}/loss.png)", ""]
        signals = _signal_keys(history, tuple(declared[stage].progress)) if isinstance(history, list) else ()
        if signals and _loss_plot(history, folder / "signals.png", f"{stage}: training signals", signals, "value"):
            lines += [f"## {stage}: training signals", "", f"![{stage} signals]({stage}/signals.png)", ""]
        per_model = {k: v for k, v in values.items() if isinstance(v, dict)}
        if per_model and _metrics_plot(per_model, folder / "metrics.png", f"{stage}: metrics by model"):
            names = sorted({m for v in per_model.values() for m in v})
            lines += [
                f"## {stage}: metrics by model",
                "",
                "| model | " + " | ".join(names) + " |",
                "|---" * (len(names) + 1) + "|",
            ]
            lines += [
                "| " + " | ".join([label] + [_fmt(v.get(n, "")) for n in names]) + " |"
                for label, v in per_model.items()
            ]
            lines += ["", f"![{stage} metrics]({stage}/metrics.png)", ""]
        lines += _data_section(folder, stage)
        lines += _image_sections(run_dir, stage, values)
        lines += report_section(run_dir, stage)  # image+text evals: sample images with each model's answers
        confusion = read_json(folder / "confusion.json")
        if confusion and _confusion_plot(confusion, folder / "confusion.png", f"{stage}: confusion matrix"):
            lines += [f"## {stage}: confusion matrix", "", f"![{stage} confusion]({stage}/confusion.png)", ""]
    path = run_dir / "report.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path
