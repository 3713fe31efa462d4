"""Run directories: resolved recipe, manifest, metrics; written atomically.

Layout of a run::

    runs/NAME/
      recipe.yaml      the recipe after overrides, as it ran
      run.json         manifest: versions, seed, device, data fingerprints, times, status
      metrics.json     {stage: {metric: value}}
      STAGE/           one folder per stage: model files, checkpoints, stage.json

A run is `completed`, `failed`, `interrupted` or `running` (a killed process
leaves `running`). Finished runs are never overwritten without `--overwrite`.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

LIBRARIES = (
    "tunelab",
    "torch",
    "transformers",
    "trl",
    "peft",
    "accelerate",
    "datasets",
    "tokenizers",
    "bitsandbytes",
    "diffusers",
    "evaluate",
)


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that a crash leaves either the old or the new content, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def device() -> dict[str, Any]:
    """What this process trains on (imports torch)."""
    import torch

    if torch.cuda.is_available():
        return {"type": "cuda", "count": torch.cuda.device_count(), "name": torch.cuda.get_device_name(0)}
    return {"type": "cpu", "count": 1, "threads": torch.get_num_threads(), "name": platform.processor() or "cpu"}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def check_output_dir(run_dir: Path, overwrite: bool, resume: bool) -> str:
    """Decide what to do with an existing run folder: 'new', 'resume' or 'overwrite'.

    Raises a one-line error when the folder holds something we must not touch.
    """
    if overwrite and resume:
        raise TunelabError("--overwrite and --resume contradict each other: choose one")
    if run_dir.exists() and not run_dir.is_dir():
        raise TunelabError(f"output_dir '{run_dir}' is a file: choose a folder path")
    if not run_dir.exists() or not any(run_dir.iterdir()):
        if resume:
            raise TunelabError(f"--resume: '{run_dir}' holds no run to resume; run without --resume")
        return "new"
    manifest = read_json(run_dir / "run.json")
    if manifest is None:
        raise TunelabError(
            f"output_dir '{run_dir}' is not empty and holds no tunelab run: choose another output_dir "
            "(tunelab never writes into folders it did not create)"
        )
    status = manifest.get("status")
    if overwrite:
        return "overwrite"
    if resume:
        return "resume"
    if status == "completed":
        raise TunelabError(
            f"output_dir '{run_dir}' holds a finished run: pass --overwrite to replace it, "
            "or set output_dir=... to keep it"
        )
    raise TunelabError(
        f"output_dir '{run_dir}' holds an unfinished run (status: {status}): pass --resume to continue it "
        "or --overwrite to start again"
    )


def clear(run_dir: Path) -> None:
    """Remove a previous run (only folders holding a tunelab run.json get here)."""
    if (run_dir / "run.json").exists():
        shutil.rmtree(run_dir)


def compare_rows(run_dirs: list[Path], everything: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Flatten the metrics.json of several runs into rows (run, stage, model, metrics) and metric names.

    Eval stages nest metrics per model (`{model: {metric: value}}`); other stages are one row.
    """
    rows: list[dict[str, Any]] = []
    for run_dir in run_dirs:
        metrics = read_json(Path(run_dir) / "metrics.json")
        if metrics is None:
            raise TunelabError(f"'{run_dir}' has no readable metrics.json: is it a tunelab run folder?")
        for stage, values in metrics.items():
            nested = {k: v for k, v in values.items() if isinstance(v, dict)}
            flat = {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            if flat:
                rows.append({"run": str(run_dir), "stage": stage, "model": "", "metrics": flat})
            for model, inner in nested.items():
                numbers = {k: v for k, v in inner.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                rows.append({"run": str(run_dir), "stage": stage, "model": model, "metrics": numbers})
    preferred = ("exact_match", "bleu", "chrf", "rouge1", "rougeL", "eval_loss", "perplexity", "train_loss")
    seen = {name for row in rows for name in row["metrics"]}
    scored = {name for row in rows if row["model"] for name in row["metrics"]} - {"examples"}
    rest = (seen if everything else scored) - set(preferred) - {"examples"}
    names = [n for n in preferred if n in seen] + sorted(rest)
    return rows, names
