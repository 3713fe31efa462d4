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

from tunelab.core.errors import TunelabError

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


def read_json(path: Path, kind: type = dict) -> Any:
    """JSON of the expected `kind` (an object, by default) from `path`; None when missing, unreadable or
    of another kind (a run.json holding a list is no run)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, kind) else None


TOOL = "tunelab"  # run.json's `tool`: the mark of a folder tunelab made (and may replace)


def is_tunelab_run(manifest: dict[str, Any] | None) -> bool:
    """Whether a run.json is tunelab's: marked so, or (runs written before the mark) shaped so."""
    if not isinstance(manifest, dict):
        return False
    if "tool" in manifest:
        return manifest["tool"] == TOOL
    versions = manifest.get("versions")
    return isinstance(versions, dict) and "tunelab" in versions and isinstance(manifest.get("stages"), dict)


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


def is_stage_record(record: Any) -> bool:
    """Whether a `stage.json` is tunelab's (another tool's file of that name is not)."""
    return isinstance(record, dict) and {"stage", "status", "fingerprint"} <= record.keys()


def stage_folder_of(path: Path) -> Path | None:
    """The tunelab stage folder that `path` is, or lies inside (None when it is in none).

    A stage folder holds a `stage.json`, or is a stage named by its run folder's `run.json`. Whatever
    is inside one is tunelab's to replace when the stage runs again.
    """
    path = Path(os.path.abspath(path))
    for folder in (path, *path.parents):
        if is_stage_record(read_json(folder / STAGE_FILE)):
            return folder
        manifest = read_json(folder.parent / "run.json") if folder != folder.parent else None
        stages = manifest.get("stages") if is_tunelab_run(manifest) else None
        if isinstance(stages, dict) and folder.name in stages:
            return folder
    return None


def holds_stage_folder(path: Path) -> bool:
    """Whether `path` is a tunelab run folder or has a stage folder directly in it."""
    if not path.is_dir():
        return False
    if is_tunelab_run(read_json(path / "run.json")):
        return True
    try:
        return any(is_stage_record(read_json(child / STAGE_FILE)) for child in path.iterdir() if child.is_dir())
    except OSError:
        return False


def check_output_dir(run_dir: Path, overwrite: bool, resume: bool) -> str:
    """Decide what to do with an existing run folder: 'new', 'resume' or 'overwrite'.

    Raises a one-line error when the folder holds something we must not touch.
    """
    if overwrite and resume:
        raise TunelabError("--overwrite and --resume contradict each other: choose one")
    if "\x00" in str(run_dir):
        raise TunelabError(f"output_dir {str(run_dir)!r} holds a NUL byte: no file system takes it; choose another")
    if run_dir.is_symlink() and not run_dir.exists():
        raise TunelabError(
            f"output_dir '{run_dir}' is a symbolic link to nowhere (dangling, or a loop): remove it or choose another"
        )
    if run_dir.exists() and not run_dir.is_dir():
        raise TunelabError(f"output_dir '{run_dir}' is a file: choose a folder path")
    stage = stage_folder_of(run_dir)
    if stage is not None:
        raise TunelabError(
            f"output_dir '{run_dir}' is inside stage folder '{stage}' of another run, which replaces what is "
            "in it when that stage runs again: choose an output_dir outside it"
        )
    if not run_dir.exists() or not any(p.name != LOCK for p in run_dir.iterdir()):
        if resume:
            raise TunelabError(f"--resume: '{run_dir}' holds no run to resume; run without --resume")
        return "new"
    manifest = read_json(run_dir / "run.json")
    if not is_tunelab_run(manifest):
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
    aside = backups(run_dir)
    note = ""
    if aside:
        note = f"; the run it was replacing is set aside in '{aside[-1]}': `tunelab run` puts it back first"
    raise TunelabError(
        f"output_dir '{run_dir}' holds an unfinished run (status: {status}): pass --resume to continue it "
        f"or --overwrite to start again{note}"
    )


RUN_FILES = ("recipe.yaml", "run.json", "metrics.json", "report.md")
STAGE_FILE = "stage.json"  # a stage folder's record; its status `completed` is the stage's completion mark
REPORT_PLOTS = ("loss.png", "signals.png", "metrics.png", "confusion.png")  # report.md draws these into STAGE/


def stage_entries(stage_dir: Path) -> list[str]:
    """Names of what tunelab wrote in a stage folder; anything else there is the user's.

    `stage.json` lists a stage's `entries` when it ends (completed, failed or interrupted) and, from its
    start, the `foreign` names already in the folder (a user's files, left by an earlier set-aside). A
    stage killed outright has no list: everything but its foreign names is taken as its own. A folder
    without `stage.json` is no stage folder tunelab wrote: nothing in it is tunelab's.
    """
    if not stage_dir.is_dir() or stage_dir.is_symlink():
        return []
    record = read_json(stage_dir / STAGE_FILE)
    if record is None:
        return []
    present = sorted(p.name for p in stage_dir.iterdir() if not p.is_symlink())  # a link is the user's
    listed = record.get("entries")
    if isinstance(listed, list):
        own = {str(n) for n in listed} | {STAGE_FILE, *REPORT_PLOTS}
        return [n for n in present if n in own]
    foreign = {str(n) for n in record.get("foreign") or []}
    return [n for n in present if n not in foreign]


def own_entries(run_dir: Path) -> list[str]:
    """What tunelab wrote in a run folder, as paths relative to it: its files, and in each stage folder
    its manifest names, what the stage wrote there (see `stage_entries`).

    Anything else (a user's notes beside the run, or inside a stage folder, a data folder) is not
    tunelab's, and is never moved or deleted.
    """
    manifest = read_json(run_dir / "run.json") or {}
    stages = manifest.get("stages")
    out = [name for name in RUN_FILES if (run_dir / name).is_file() and not (run_dir / name).is_symlink()]
    for stage in sorted(stages) if isinstance(stages, dict) else []:
        if stage in RUN_FILES or stage == LOCK or "/" in stage or stage in ("", ".", ".."):
            continue
        out += [f"{stage}/{name}" for name in stage_entries(run_dir / stage)]
    return out


BACKUP_INDEX = ".tunelab-set-aside.json"  # in a set-aside folder: the paths moved into it, written first


def backups(folder: Path) -> list[Path]:
    """The set-aside folders of `folder` (`.NAME.replaced-*` beside it), oldest first."""
    parent = folder.parent
    if not parent.is_dir():
        return []
    found = [p for p in parent.glob(f".{folder.name}.replaced-*") if p.is_dir() and not p.is_symlink()]
    return sorted(found, key=lambda p: p.stat().st_mtime)


def set_aside_in(run_dir: Path) -> list[Path]:
    """Every set-aside folder of a run: beside it (`--overwrite`) and in it (a stage that ran again)."""
    inside = [p for p in run_dir.glob(".*.replaced-*") if p.is_dir()] if run_dir.is_dir() else []
    return backups(run_dir) + sorted(inside)


def set_aside(folder: Path, entries: list[str] | None = None) -> Path:
    """Move tunelab's `entries` of `folder` (default: a run folder's own entries) into a hidden folder
    beside it, `.NAME.replaced-*` (renames: instant, same disk); stage folders left empty are removed.

    Nothing is deleted: `restore` puts it back when the work replacing it stops before it is done,
    `discard` removes it once that work is done. The index of moved paths is written before the first
    move, so a process killed half-way leaves a folder that `restore` understands.
    """
    entries = own_entries(folder) if entries is None else entries
    backup = Path(tempfile.mkdtemp(prefix=f".{folder.name}.replaced-", dir=folder.parent))
    write_json(backup / BACKUP_INDEX, entries)
    for rel in entries:
        target = backup / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).rename(target)
    for rel in entries:  # a stage folder with nothing of the user's in it goes too (the new run makes its own)
        parent = (folder / rel).parent
        if parent != folder and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()
    return backup


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def clear(folder: Path, entries: list[str]) -> None:
    """Remove `entries` of `folder` (what a stopped run or stage wrote), and stage folders they leave empty."""
    for rel in entries:
        _remove(folder / rel)
        parent = (folder / rel).parent
        if parent != folder and parent.is_dir() and not any(parent.iterdir()):
            parent.rmdir()


def restore(folder: Path, backup: Path, written: list[str] | None = None) -> None:
    """Put set-aside entries back, removing first what the stopped work wrote in their place.

    `written`: what that work wrote (default: the run folder's own entries now, the new run's). Each
    set-aside path then replaces whatever still sits at its place (the stopped work's file of that name).
    """
    index = [str(rel) for rel in read_json(backup / BACKUP_INDEX, list) or []]
    unmoved = {rel for rel in index if not ((backup / rel).exists() or (backup / rel).is_symlink())}
    # A set-aside killed half-way left some entries in place: they are the old work, not the stopped one's.
    clear(folder, [rel for rel in (own_entries(folder) if written is None else written) if rel not in unmoved])
    for rel in index:
        source = backup / rel
        if rel in unmoved:
            continue
        target = folder / rel
        _remove(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        source.rename(target)
    discard(backup)


def discard(backup: Path) -> None:
    shutil.rmtree(backup, ignore_errors=True)


@contextlib.contextmanager
def shielded():
    """Hold SIGINT and SIGTERM back while tunelab moves a run's entries: a signal then arrives once every
    rename is done, never between two of them (the main thread only; elsewhere it does nothing)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _replacer(record: Any, backup: Path) -> bool:
    return isinstance(record, dict) and record.get("replaces") == backup.name


def recover(run_dir: Path) -> list[str]:
    """Settle what a killed process left set aside in and beside `run_dir`; one line per folder settled.

    Work is set aside (see `set_aside`) by `--overwrite` (the whole run, beside the run folder) and by a
    stage that runs again (`--from`, a changed stage: that stage's entries, in the run folder). The new
    work records the folder it replaces (`replaces`). A kill leaves the folder behind; then:

    - the new work finished (its run has a completed stage; the stage itself completed): the set-aside
      copy is what would have been removed a moment later, and is removed;
    - otherwise the new work never finished, and the finished work it was replacing is put back.

    Call it only with the run folder's lock free (no process is writing the folder).
    """
    lines: list[str] = []
    if run_dir.is_dir():
        for backup in sorted(run_dir.glob(".*.replaced-*")):
            stage = backup.name[1:].rsplit(".replaced-", 1)[0]
            stage_dir = run_dir / stage
            if not backup.is_dir() or backup.is_symlink() or "/" in stage or not stage:
                continue
            if "run.json" in (read_json(backup / BACKUP_INDEX, list) or []):
                continue  # a run of its own inside this folder set it aside: that run settles it
            record = read_json(stage_dir / STAGE_FILE)
            if _replacer(record, backup) and record.get("status") == "completed":
                discard(backup)
                lines.append(f"removed '{backup}': stage '{stage}' ran again to the end and replaces it")
            else:
                restore(stage_dir, backup, stage_entries(stage_dir) if _replacer(record, backup) else [])
                lines.append(
                    f"restored stage '{stage}' in '{run_dir}' as it was: the run that replaced it stopped before "
                    "the stage finished"
                )
    found = backups(run_dir)
    if len(found) > 1:
        names = ", ".join(f"'{p}'" for p in found)
        return [*lines, f"'{run_dir}' has {len(found)} runs set aside by --overwrite ({names}): keep one, by hand"]
    for backup in found:
        manifest = read_json(run_dir / "run.json")
        stages = manifest.get("stages") if _replacer(manifest, backup) else None
        finished = isinstance(stages, dict) and any(
            isinstance(e, dict) and e.get("status") == "completed" for e in stages.values()
        )
        if finished:
            discard(backup)
            lines.append(f"removed '{backup}': the run that replaced it with --overwrite finished a stage")
        else:
            restore(run_dir, backup, own_entries(run_dir) if run_dir.is_dir() else [])
            lines.append(
                f"restored the previous run in '{run_dir}': the --overwrite run that replaced it stopped before its "
                "first stage finished"
            )
    return lines


LOCK = ".tunelab.lock"


def lock_holder(run_dir: Path) -> str | None:
    """Who holds the run folder's lock ('pid 123 on host, since ...'), or None when it is free.

    It probes with a shared lock: the ranks of one distributed run all check at once, and
    exclusive probes would find each other and report the lock's stale text as its holder.
    """
    import fcntl

    path = run_dir / LOCK
    if not path.is_file():
        return None
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            return f.read().strip() or "another process"
        fcntl.flock(f, fcntl.LOCK_UN)
    return None


def in_use_error(run_dir: Path, holder: str) -> TunelabError:
    return TunelabError(
        f"output_dir '{run_dir}' is in use by tunelab ({holder}); wait for it, or choose another output_dir. "
        "Several processes started on one recipe are not one distributed run: use `tunelab launch --num-processes N`"
    )


@contextlib.contextmanager
def locked(run_dir: Path):
    """Hold an exclusive lock on the run folder while a run writes to it.

    A second `tunelab run` on the same folder (or N copies that believe they are distributed but
    never joined one process group) fails in one line instead of interleaving checkpoints. The
    kernel drops the lock when the holder dies, so a killed run does not block `--resume`.
    """
    import fcntl
    import socket

    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / LOCK, "a+")  # noqa: SIM115 - held open for the whole run
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            raise in_use_error(run_dir, f.read().strip() or "another process") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {now()}")
        f.flush()
        yield
    finally:
        f.close()  # closing releases the lock


def compare_rows(run_dirs: list[Path], everything: bool = False) -> tuple[list[dict[str, Any]], list[str]]:
    """Flatten the metrics.json of several runs into rows (run, stage, model, metrics) and metric names.

    Eval stages nest metrics per model (`{model: {metric: value}}`); other stages are one row.
    """
    rows: list[dict[str, Any]] = []
    for run_dir in run_dirs:
        file = Path(run_dir) / "metrics.json"
        try:
            metrics = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise TunelabError(f"'{run_dir}' has no readable metrics.json: is it a tunelab run folder?") from None
        if not isinstance(metrics, dict):
            raise TunelabError(
                f"'{file}' holds a JSON {type(metrics).__name__}, not {{stage: {{metric: value}}}}: "
                "is it a tunelab run folder? compare the folders `tunelab run` wrote"
            )
        for stage, values in metrics.items():
            if not isinstance(values, dict):
                raise TunelabError(
                    f"'{file}': stage '{stage}' holds {str(values)[:40]!r}, not {{metric: value}}: "
                    "is it a tunelab run folder? compare the folders `tunelab run` wrote"
                )
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


def existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable(run_dir: Path) -> None:
    """Write (and remove) a probe file where the run will go: permissions, read-only mounts, a full disk."""
    base = existing_ancestor(run_dir)
    if not base.is_dir():
        raise TunelabError(f"output_dir '{run_dir}': '{base}' is a file, not a folder; choose another output_dir")
    try:
        fd, probe = tempfile.mkstemp(dir=base, prefix=".tunelab-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise TunelabError(
            f"output_dir '{run_dir}' cannot be written ({exc.strerror or exc} in '{base}'); choose another output_dir"
        ) from None


def saved_weight_bytes(plan: Any) -> float:
    """Bytes of the weights a stage saves: the adapter alone for LoRA, else the whole model."""
    return plan.trainable * 4 if plan.trainable < plan.params else plan.parts.get("weights", plan.params * 4)


def checkpoint_bytes(plan: Any) -> float:
    """Bytes one checkpoint of a stage takes on disk: saved weights (PPO: and its value model) and optimizer state."""
    return saved_weight_bytes(plan) + plan.parts.get("value_model", 0.0) + plan.parts.get("optimizer", 0.0)


def planned_disk(stages: dict[str, dict[str, Any]], plans: list[Any]) -> dict[str, float]:
    """Bytes each training stage will leave on disk: kept checkpoints plus its final model."""
    out = {}
    for plan in plans:
        if not plan.trainable or plan.stage not in stages:
            continue
        training = stages[plan.stage].get("training") or {}
        kept = 0
        if training.get("save_strategy", "steps") != "no":
            limit = training.get("save_total_limit")
            steps, every = plan.steps or training.get("max_steps"), training.get("save_steps", 500)
            count = steps // every if isinstance(steps, int) and isinstance(every, int) and every > 0 else 3
            kept = min(count, limit) if isinstance(limit, int) else count
        out[plan.stage] = kept * checkpoint_bytes(plan) + saved_weight_bytes(plan)
    return out


# What planned_disk does not count: tokenizer files, logs, TensorBoard events, report plots, run.json and
# stage.json, the trainer's own state files. A share of the plan plus a little per stage keeps a run that
# "fits" from filling the disk in its last checkpoint.
DISK_MARGIN = 0.10
DISK_SLACK_PER_STAGE = 64 * 2**20


def fmt_size(value: float) -> str:
    """Bytes in the unit that shows them (KB, MB, GB): a 2 MB disk must not read as "0.00 GB"."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if value >= size:
            return f"{value / size:.3g} {unit}" if value < 100 * size else f"{value / size:.0f} {unit}"
    return f"{value:.0f} bytes"


def check_disk(run_dir: Path, stages: dict[str, dict[str, Any]], plans: list[Any]) -> None:
    """Fail before training when the output file system cannot hold the planned checkpoints and models,
    with DISK_MARGIN and DISK_SLACK_PER_STAGE for the files the plan does not count."""
    need = planned_disk(stages, plans)
    if not need:
        return
    free = shutil.disk_usage(existing_ancestor(run_dir)).free
    total = sum(need.values()) * (1 + DISK_MARGIN) + DISK_SLACK_PER_STAGE * len(need)
    if total > free:
        biggest = max(need, key=need.get)
        raise TunelabError(
            f"output_dir '{run_dir}': {fmt_size(free)} free, but the run plans {fmt_size(total)} of checkpoints, "
            f"models and logs (most in stage '{biggest}': {fmt_size(need[biggest])}); free space, lower "
            "training.save_total_limit, or choose another output_dir"
        )
