"""Run a recipe: its stages in order, each handing its model folder to later ones.

`check` verifies everything that can be verified without training, in the
order a run would need it: the output folder, then each stage against the
libraries' config classes, files and dataset columns. `run` calls `check`
first, so a bad recipe fails before any model loads.

Each stage records a fingerprint of its resolved config and inputs in
`STAGE/stage.json`; `--resume` skips stages that completed with the same
fingerprint and continues an interrupted stage from its newest checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.core import runs
from tunelab.core.errors import DownloadNeeded, TunelabError, closest
from tunelab.core.hub import configure_offline
from tunelab.core.progress import quiet
from tunelab.core.refs import iter_refs
from tunelab.data.datasets import signature
from tunelab.data.mixtures import row_metrics, streams
from tunelab.models.plan import check_fits, device_memory, fmt_bytes
from tunelab.models.spec import WEIGHTS_NEEDED
from tunelab.recipe import Recipe
from tunelab.reports import write_report
from tunelab.stages import Context, StageResult, StageSpec, stage
from tunelab.training import distributed
from tunelab.training.safeguards import Interrupted, echo, last_checkpoint

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What `run` returns: where the files are, and every stage's metrics and model folder."""

    run_dir: Path
    status: str
    metrics: dict[str, dict[str, Any]] = field(default_factory=dict)
    outputs: dict[str, Path] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    kinds: dict[str, str] = field(default_factory=dict)
    """Each stage's kind (`sft`, `reward`, ...): what its metrics are declared by (`tunelab.stages.metrics_of`)."""


def _specs(recipe: Recipe) -> list[StageSpec]:
    run_dir = recipe.output_dir
    return [
        StageSpec(
            name=name, kind=cfg["stage"], cfg={k: v for k, v in cfg.items() if k != "stage"}, out_dir=run_dir / name
        )
        for name, cfg in recipe.stages.items()
    ]


def check(
    recipe: Recipe,
    overwrite: bool = False,
    resume: bool = False,
    from_stage: str | None = None,
    processes: int | None = None,
) -> str:
    """Everything `tunelab validate` checks. Returns what would happen to the output folder.

    `processes`: how many processes the run will have (default: this one's world size); `tunelab
    launch` checks before it starts them.
    """
    return _check(recipe, overwrite, resume, from_stage, processes)[0]


def check_with_plans(
    recipe: Recipe,
    overwrite: bool = False,
    resume: bool = False,
    from_stage: str | None = None,
    processes: int | None = None,
) -> tuple[str, list[Any]]:
    """`check`, and the memory plans made on the way (what `tunelab launch --slurm` sizes the grace by)."""
    return _check(recipe, overwrite, resume, from_stage, processes)


def _check(
    recipe: Recipe, overwrite: bool, resume: bool, from_stage: str | None = None, processes: int | None = None
) -> tuple[str, list[Any]]:
    """Checks, and the memory plans made on the way (advisory: a plan that fails is skipped)."""
    configure_offline()
    if from_stage is not None:
        _check_from(recipe, from_stage, overwrite)
        resume = True
    mode = runs.check_output_dir(recipe.output_dir, overwrite, resume)
    holder = runs.lock_holder(recipe.output_dir)
    if holder is not None:
        raise runs.in_use_error(recipe.output_dir, holder)
    runs.check_writable(recipe.output_dir)
    if mode == "resume":
        _check_resumable(recipe, from_stage, processes or distributed.world()[1])
    plans = _inspect(recipe, strict_plans=False)[0]
    check_fits(plans)  # orders of magnitude past the device: an error, not a warning
    runs.check_disk(recipe.output_dir, recipe.stages, plans)
    return mode, plans


def _check_from(recipe: Recipe, from_stage: str, overwrite: bool) -> None:
    """`--from STAGE` reruns STAGE and the stages after it in an existing run."""

    if overwrite:
        raise TunelabError("--from and --overwrite contradict each other: --from keeps the stages before it")
    if from_stage not in recipe.stages:
        guess = closest(from_stage, recipe.stages)
        hint = f"did you mean '{guess}'?" if guess else f"stages: {', '.join(recipe.stages)}"
        raise TunelabError(f"--from: the recipe has no stage '{from_stage}'; {hint}")
    if runs.read_json(recipe.output_dir / "run.json") is None:
        raise TunelabError(
            f"--from {from_stage}: '{recipe.output_dir}' holds no run to continue; run the whole recipe without --from"
        )


def plan(recipe: Recipe) -> list[Any]:
    """Memory plans of the recipe's stages, from configs only (no weights load; the output folder is not checked)."""

    configure_offline()
    token = WEIGHTS_NEEDED.set(False)  # configs only
    try:
        return _inspect(recipe, strict_plans=True)[0]
    finally:
        WEIGHTS_NEEDED.reset(token)


def check_offline(recipe: Recipe) -> list[str]:
    """Every stage's checks up to the point where a download would start; the downloads that stop them.

    On a machine without the Hub (CI, an air-gapped login node) a recipe written for a GPU machine stops
    at its first hub model. This checks the rest: each stage's sections against the libraries' classes
    (training arguments, LoRA, quantization, generation) before its model is looked up, and the later
    stages too, as they would be checked if the earlier ones had their models. Raises the first error
    that is not a needed download; returns one line per stage that needs one.
    """
    configure_offline()
    return _inspect(recipe, strict_plans=False, downloads=[])[1]


@quiet()
def _inspect(recipe: Recipe, strict_plans: bool, downloads: list[str] | None = None) -> tuple[list[Any], list[str]]:
    """Run every stage's checks in order, planning each stage's memory with what the checks learnt.

    With a `downloads` list, a stage stopped by a needed download is recorded there and the next
    stage is checked (see `check_offline`); without one, that stop is the error it always was.
    """

    kinds = {name: cfg["stage"] for name, cfg in recipe.stages.items()}
    ctx = Context(seed=recipe.seed, run_dir=recipe.output_dir, checking=True, kinds=kinds)
    plans = []
    for spec in _specs(recipe):
        impl = stage(spec.kind)
        _check_streaming(spec, impl)
        try:
            impl.check(spec, ctx)
        except DownloadNeeded as exc:
            if downloads is None:
                raise
            downloads.append(str(exc))
            if impl.produces_model:  # later stages check against it as a stage not yet run
                ctx.outputs[spec.name] = spec.out_dir
                with contextlib.suppress(TunelabError):
                    origin = impl.tokenizer_source(spec, ctx)
                    if origin is not None:
                        ctx.tokenizers[spec.name] = origin
            continue
        try:
            stage_plan = impl.plan(spec, ctx)
        except (TunelabError, ValueError, TypeError, AttributeError, OSError):
            if strict_plans:
                raise
            stage_plan = None  # a plan we cannot make must not stop a run the checks accepted
        if stage_plan is not None:
            plans.append(stage_plan)
        if impl.produces_model:
            if spec.name not in ctx.configs and "model" in spec.cfg:
                # A fine-tuned model has its starting model's shape: later checks and plans can use it.
                from tunelab.models.spec import model_config

                with contextlib.suppress(TunelabError):
                    ctx.configs[spec.name] = model_config(spec.cfg["model"], ctx, f"{spec.where}.model")
            origin = impl.tokenizer_source(spec, ctx)
            if origin is not None:
                ctx.tokenizers[spec.name] = origin
            ctx.outputs[spec.name] = spec.out_dir
    return plans, downloads or []


def _walk(recipe: Recipe) -> Iterator[tuple[StageSpec, Any, Context]]:
    """Each stage with the context it is checked in (earlier stages' outputs known, whether they exist yet or
    not), without checking anything: what `tunelab data` needs to read one stage's data."""
    kinds = {name: cfg["stage"] for name, cfg in recipe.stages.items()}
    ctx = Context(seed=recipe.seed, run_dir=recipe.output_dir, checking=True, kinds=kinds)
    for spec in _specs(recipe):
        impl = stage(spec.kind)
        yield spec, impl, ctx
        if impl.produces_model:
            with contextlib.suppress(TunelabError):
                origin = impl.tokenizer_source(spec, ctx)
                if origin is not None:
                    ctx.tokenizers[spec.name] = origin
            ctx.outputs[spec.name] = spec.out_dir


def held_out(recipe: Recipe) -> dict[str, list[tuple[str, Any]]]:
    """Per stage, the rows the stages after it evaluate on (`Stage.held_out`): the contamination check's."""
    found = [(spec.name, impl.held_out(spec, ctx)) for spec, impl, ctx in _walk(recipe)]
    return {name: [rows for _, later in found[i + 1 :] for rows in later] for i, (name, _) in enumerate(found)}


def training_stages(recipe: Recipe) -> list[str]:
    """The stages whose data a trainer reads (what `tunelab data` shows)."""
    from tunelab.stages.base import TrainerStage

    return [name for name, cfg in recipe.stages.items() if isinstance(stage(cfg["stage"]), TrainerStage)]


@quiet()
def data_views(recipe: Recipe, stages: list[str] | None = None, rows: int = 3) -> list[Any]:
    """`tunelab data`: each training stage's data as its trainer will see it (`TrainerStage.data_view`), the
    first `rows` rows tokenized; no model loads. `stages`: those stages (default: every training stage)."""
    configure_offline()
    trained = training_stages(recipe)
    for name in stages or []:
        if name not in recipe.stages:
            guess = closest(name, recipe.stages)
            hint = f"did you mean '{guess}'?" if guess else f"its stages: {', '.join(recipe.stages)}"
            raise TunelabError(f"the recipe has no stage '{name}'; {hint}")
        if name not in trained:
            which = f"the recipe's: {', '.join(trained)}" if trained else "the recipe has none"
            raise TunelabError(
                f"stage '{name}' ({recipe.stages[name]['stage']}) trains no language model on rows: `tunelab data` "
                f"shows the training data of sft, pretrain, dpo, grpo, ... stages; {which}"
            )
    wanted = set(stages if stages is not None else trained)
    later = held_out(recipe)
    return [
        impl.data_view(spec, ctx, rows, later[spec.name]) for spec, impl, ctx in _walk(recipe) if spec.name in wanted
    ]


def _check_streaming(spec: StageSpec, impl: Any) -> None:
    """`streaming: true` on a stage that reads its data whole: one line naming the stages that stream."""
    if impl.streams:
        return
    for key in DATA_KEYS:
        if key in spec.cfg and streams(spec.cfg[key], f"{spec.where}.{key}"):
            from tunelab.stages import STAGES

            kinds = [kind for kind in STAGES if stage(kind).streams]
            raise TunelabError(
                f"'{spec.where}.{key}' streams (streaming: true), but a {spec.kind} stage reads its data whole: "
                f"drop streaming (the stages that stream: {', '.join(kinds)})"
            )


def _warn_memory(plans: list[Any]) -> None:
    """Before anything loads: one line per stage whose plan exceeds the device's memory."""

    memory = device_memory()
    for p in plans if memory else []:
        if p.total > memory[1]:
            log.warning(
                "stage '%s' may need %s per device but %s has %s; `tunelab plan` shows the parts and what would fit",
                p.stage,
                fmt_bytes(p.total),
                memory[0],
                fmt_bytes(memory[1]),
            )


DATA_KEYS = ("data", "eval_data")


def _fingerprint(spec: StageSpec, seed: int, upstream: dict[str, str]) -> str:
    """Config, seed, the fingerprints of the stages it reads from, and the contents of its local data."""

    refs = sorted({ref for _, ref in iter_refs(spec.cfg, spec.where)})
    payload = {
        "kind": spec.kind,
        "cfg": spec.cfg,
        "seed": seed,
        "inputs": {r: upstream.get(r) for r in refs},
        "data": {key: signature(spec.cfg[key]) for key in DATA_KEYS if key in spec.cfg},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _diff(old: Any, new: Any, where: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in list(old) + [k for k in new if k not in old]:
            out += _diff(old.get(key), new.get(key), f"{where}.{key}")
        return out
    return [] if old == new else [f"{where}: {old!r} -> {new!r}"]


def _check_resumable(recipe: Recipe, from_stage: str | None, processes: int) -> None:
    """An interrupted stage can only continue from its checkpoint with the same config, and with the
    same number of processes: its checkpoints hold one RNG state per rank, and its data position
    counts batches of the global batch that many processes made."""

    fingerprints: dict[str, str] = {}
    for spec in _specs(recipe):
        if spec.name == from_stage:
            return  # this stage and the ones after it start again
        fingerprints[spec.name] = fp = _fingerprint(spec, recipe.seed, fingerprints)
        record = runs.read_json(spec.out_dir / "stage.json")
        if not record or record.get("status") == STALE:
            continue  # a stale stage runs again from the start (see _run_stages)
        if record.get("status") == "completed":
            if record.get("fingerprint") != fp:  # --resume never replaces finished work
                changes = _diff(record.get("cfg", {}), spec.cfg, spec.where) or ["its data or an earlier stage"]
                raise TunelabError(
                    f"--resume: stage '{spec.name}' finished, and its recipe changed since "
                    f"({'; '.join(changes[:3])}); rerun it with --from {spec.name}, or replace the run with "
                    "--overwrite (or undo the change)"
                )
            continue
        changes = _diff(record.get("cfg", {}), spec.cfg, spec.where)
        if changes:
            raise TunelabError(
                f"cannot resume stage '{spec.name}': its recipe changed since it was interrupted "
                f"({'; '.join(changes[:3])}); undo the change or pass --overwrite"
            )
        ran = record.get("processes", processes)  # unknown in folders from before it was recorded
        if ran != processes and last_checkpoint(spec.out_dir):
            how = f"tunelab launch --num-processes {ran} ... --resume" if ran > 1 else "tunelab run ... --resume"
            raise TunelabError(
                f"cannot resume stage '{spec.name}' on {processes} process(es): it was interrupted running on "
                f"{ran}, and its checkpoints hold that many ranks' RNG states and a data position in that "
                f"global batch; resume with `{how}`, or pass --overwrite"
            )


@quiet()
def run(recipe: Recipe, overwrite: bool = False, resume: bool = False, from_stage: str | None = None) -> RunResult:
    """Check the recipe, then run its stages; returns metrics and output folders.

    `resume` skips stages that completed with the same fingerprint and continues interrupted ones;
    `from_stage` also reruns that stage and every stage after it.
    """
    distributed.init()
    try:
        if distributed.is_main() and runs.lock_holder(recipe.output_dir) is None:
            _recover(recipe.output_dir)
        distributed.barrier("settling the run folder")
        mode, plans = _check(recipe, overwrite, resume, from_stage)  # every rank, before any rank writes
    except KeyboardInterrupt as exc:
        exc.before_run = True  # nothing was written: there is no run to mark or resume
        raise
    distributed.barrier("the recipe checks")
    _warn_memory(plans)
    rank, size = distributed.world()
    if rank == 0:
        log.info(
            f"tunelab: {recipe.data['name']} ({', '.join(recipe.stages)}) -> {recipe.output_dir}"
            + {"resume": " (resuming)", "overwrite": " (replacing the previous run)"}.get(mode, "")
            + (f" on {size} processes" if size > 1 else "")
            + (f" over {len(hosts)} hosts ({', '.join(hosts)})" if len(hosts := distributed.hosts()) > 1 else "")
        )
        with runs.locked(recipe.output_dir):
            return _run_locked(recipe, mode, from_stage)
    return _run_locked(recipe, mode, from_stage)


def _recover(run_dir: Path) -> None:
    """What a killed run left set aside (see `runs.recover`) is settled before anything reads the folder."""
    if not runs.set_aside_in(run_dir):
        return  # nothing to settle: the folder is not touched (not even locked)
    with runs.locked(run_dir), runs.shielded():
        for line in runs.recover(run_dir):
            log.info(line)


def _run_locked(recipe: Recipe, mode: str, from_stage: str | None) -> RunResult:
    """--overwrite: the old run is set aside, deleted once the new run's first stage completes, and put
    back if the new run stops before that, failed or interrupted (Ctrl-C, SIGTERM): a new run that never
    finished a stage is worth less than the finished one. A kill -9 leaves it set aside, and the next
    command on the folder puts it back (`runs.recover`).
    """
    run_dir = recipe.output_dir
    main = distributed.is_main()
    previous = runs.read_json(run_dir / "run.json") or {}
    with _sigterm_interrupts():
        backup = None
        if mode == "overwrite" and main:
            with runs.shielded():
                backup = runs.set_aside(run_dir)
        try:
            return _run_new(recipe, mode, from_stage, previous, backup)
        except BaseException as exc:
            if backup is not None and backup.exists():
                with runs.shielded():
                    runs.restore(run_dir, backup)
                why = "was interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                log.info(
                    "the previous run in %s was restored (the new one %s before its first stage ended)", run_dir, why
                )
                if isinstance(exc, KeyboardInterrupt):
                    exc.restored = str(run_dir)  # the CLI says so, instead of "continue it with --resume"
            raise


def _run_new(
    recipe: Recipe, mode: str, from_stage: str | None, previous: dict[str, Any], backup: Path | None
) -> RunResult:
    run_dir = recipe.output_dir
    main = distributed.is_main()
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest: dict[str, Any] = {
        "tool": runs.TOOL,
        "name": recipe.data.get("name"),
        "status": "running",
        "started": runs.now(),
        "ended": None,
        "seed": recipe.seed,
        "versions": runs.versions(),
        "device": runs.device(),
        "recipe": str(recipe.path) if recipe.path else None,
        "overrides": recipe.overrides,
        "resumed": mode == "resume",
        "first_started": previous.get("first_started") or previous.get("started") or runs.now(),
        "stages": {},
    }
    if backup is not None:
        manifest["replaces"] = backup.name  # the set-aside run: see runs.recover
    if main:
        runs.write_atomic(run_dir / "recipe.yaml", recipe.to_yaml())
        _write(run_dir / "run.json", manifest)
    distributed.barrier("the run folder")
    distributed.check_shared(run_dir / "run.json")  # across hosts: every one sees the run folder
    result = RunResult(run_dir=run_dir, status="running", kinds={n: c["stage"] for n, c in recipe.stages.items()})
    ctx = Context(seed=recipe.seed, run_dir=run_dir, resume=mode == "resume")
    if main:
        ctx.held_out = _held_out_or_none(recipe)
    _run_stages(recipe, run_dir, ctx, manifest, result, from_stage, backup)
    manifest.update(status="completed", ended=runs.now())
    _write(run_dir / "run.json", manifest)
    result.status = "completed"
    if main:
        _report(run_dir)
    return result


def _held_out_or_none(recipe: Recipe) -> dict[str, list[tuple[str, Any]]]:
    """The contamination check's held-out rows for the stages' data summaries; the summaries only report, so
    rows that cannot be read leave them without the check, with a warning."""
    try:
        return held_out(recipe)
    except Exception as exc:  # noqa: BLE001 - checked already; a summary must not stop the run
        log.warning("no contamination check in the data summaries (%s: %s)", type(exc).__name__, exc)
        return {}


def _write(path: Path, data: Any) -> None:
    """Pipeline bookkeeping (run.json, stage.json, metrics.json): the main process writes it, alone."""
    if distributed.is_main():
        runs.write_json(path, data)


@contextlib.contextmanager
def _sigterm_interrupts():
    """SIGTERM (a scheduler's kill, `timeout`) ends the run like Ctrl-C: marked interrupted, resumable.

    During training `safeguards.stop_on_signals` takes over and saves a checkpoint first.
    """
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        if not echo(signum):  # the same request again (a scheduler and a launcher each pass it on): one stop
            raise Interrupted(signum, None)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_stages(
    recipe: Recipe,
    run_dir: Path,
    ctx: Context,
    manifest: dict[str, Any],
    result: RunResult,
    from_stage: str | None,
    backup: Path | None = None,
) -> None:
    """Run the stages in order, skipping finished ones.

    A stage runs again (`--from`, or a changed config, data or upstream stage) without loss:

    1. the finished stages after it are marked `stale` (`_mark_stale`): interrupted, a run never
       leaves a later stage `completed` on a base that is gone; a stale stage runs again;
    2. only what tunelab wrote in the stage folder (`runs.stage_entries`) is set aside, beside it in
       the run folder (`.STAGE.replaced-*`); a user's files stay where they are. A stage that had not
       finished (interrupted, failed, stale) has no finished work to keep: tunelab's files are removed,
       so that the new attempt, if interrupted in turn, is what `--resume` continues;
    3. the stage runs; its `stage.json` names the set-aside folder (`replaces`);
    4. finished, the set-aside folder is deleted; stopped (an error, Ctrl-C, SIGTERM), it is put back
       and so are the later stages' marks (`_put_back`); killed outright, the next command on the run
       folder does either, whichever the stage's record says (`runs.recover`).
    """
    fingerprints: dict[str, str] = {}
    rerun = False
    main = distributed.is_main()
    specs = _specs(recipe)
    marks: dict[Path, dict[str, Any]] | None = None  # later stages' records, as before the first stage ran again
    try:
        for i, spec in enumerate(specs):
            fp = _fingerprint(spec, recipe.seed, fingerprints)
            record = distributed.broadcast(runs.read_json(spec.out_dir / runs.STAGE_FILE) or {})
            rerun = rerun or spec.name == from_stage
            if record and not rerun and record.get("fingerprint") != fp and main:
                log.info("-- %s: its config, data or upstream stages changed since it ran: running it again", spec.name)
            stage_backup = None
            if record and (rerun or record.get("fingerprint") != fp or record.get("status") == STALE):
                # Its checkpoints and model do not apply to the new config or inputs: set aside (see above).
                if main:
                    first = marks is None
                    marked = _mark_stale(specs[i + 1 :])
                    marks = marked if first else marks
                    with runs.shielded():
                        if record.get("status") == "completed":
                            stage_backup = runs.set_aside(spec.out_dir, runs.stage_entries(spec.out_dir))
                        else:  # unfinished work of another config or base: no finished work to keep
                            runs.clear(spec.out_dir, runs.stage_entries(spec.out_dir))
                record = {}
                distributed.barrier(f"clearing stage '{spec.name}'")
            if record.get("status") == "completed":
                stage_result = StageResult(
                    metrics=record.get("metrics", {}), model=Path(record["model"]) if record.get("model") else None
                )
                result.skipped.append(spec.name)
                seconds = record.get("seconds", 0.0)
                if record.get("data"):  # a resumed run's manifest keeps the data it was trained on
                    manifest.setdefault("data", {})[spec.name] = record["data"]
            else:
                try:
                    stage_result, seconds = _run_stage(spec, ctx, fp, manifest, run_dir, stage_backup)
                except BaseException:
                    if stage_backup is not None:
                        _put_back(spec, stage_backup, marks if first else None)
                    raise
            if stage_backup is not None:
                runs.discard(stage_backup)  # the stage ran again to the end: what it replaces can go
            fingerprints[spec.name] = fp
            result.metrics[spec.name] = stage_result.metrics
            result.seconds[spec.name] = seconds
            if stage_result.model is not None:
                result.outputs[spec.name] = stage_result.model
                ctx.outputs[spec.name] = stage_result.model
            manifest["stages"][spec.name] = {
                "status": "completed",
                "kind": spec.kind,
                "seconds": round(seconds, 2),
                "fingerprint": fp,
            }
            _write(run_dir / "metrics.json", result.metrics)
            _write(run_dir / "run.json", manifest)
            if backup is not None:
                runs.discard(backup)  # the new run's first stage is done: the old run can go
                backup = None
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
        for entry in manifest["stages"].values():
            if entry.get("status") == "running":
                entry["status"] = status  # the stage that was running when it stopped
        manifest.update(status=status, ended=runs.now(), error=f"{type(exc).__name__}: {exc}"[:500])
        _write(run_dir / "run.json", manifest)
        raise


STALE = "stale"  # a finished stage whose upstream stage is running again: it runs again too


def _mark_stale(later: list[StageSpec]) -> dict[Path, dict[str, Any]]:
    """Before a stage runs again, the finished stages after it stop counting as finished (their model was
    made from the one being replaced). Returns their records as they were, for `_put_back`."""
    before = {}
    for spec in later:
        path = spec.out_dir / runs.STAGE_FILE
        record = runs.read_json(path)
        if record and record.get("status") == "completed":
            before[path] = record
            runs.write_json(path, {**record, "status": STALE})
    return before


def _put_back(spec: StageSpec, stage_backup: Path, marks: dict[Path, dict[str, Any]] | None) -> None:
    """A stage that ran again stopped (failed, Ctrl-C, SIGTERM) before it finished: what it replaces comes back.

    `_run_stages` explains the whole scheme. `marks`: the later stages' records, put back when this
    was the first stage to run again (nothing they depend on has changed then).
    """
    with runs.shielded():
        runs.restore(spec.out_dir, stage_backup, runs.stage_entries(spec.out_dir))
        for path, record in (marks or {}).items():
            runs.write_json(path, record)
    log.info("-- %s: stopped before it finished; its previous files were put back in %s", spec.name, spec.out_dir)


def _report(run_dir: Path) -> None:
    """report.md and its plots. A finished run stays finished if drawing fails: say so, go on."""

    try:
        write_report(run_dir)
    except (ImportError, OSError, ValueError, TypeError, KeyError) as exc:
        log.warning("report.md not written (%s: %s)", type(exc).__name__, exc)


def _run_stage(
    spec: StageSpec, ctx: Context, fp: str, manifest: dict[str, Any], run_dir: Path, replaces: Path | None = None
) -> tuple[StageResult, float]:
    """Run one stage, recording it in `STAGE/stage.json`.

    The record is tunelab's ledger of the folder: `foreign` names what was there before the stage
    (a user's files: never moved or deleted), `entries` what the stage wrote (set aside when it runs
    again), and `status: completed`, written last, is the stage's completion mark: a folder torn by a
    kill mid-save (config written, tokenizer not yet) is not completed, so checks take its model as
    still to come and `--resume` runs the stage again (see `Context.is_pending`).
    """
    from transformers import set_seed

    earlier = runs.read_json(spec.out_dir / runs.STAGE_FILE)
    if earlier is None:  # a user's folder, or files left beside a set-aside stage: theirs
        present = sorted(p.name for p in spec.out_dir.iterdir()) if spec.out_dir.is_dir() else []
    else:  # resuming this stage: what was foreign still is
        present = [n for n in earlier.get("foreign") or [] if (spec.out_dir / str(n)).exists()]
    record: dict[str, Any] = {
        "stage": spec.kind,
        "status": "running",
        "fingerprint": fp,
        "cfg": spec.cfg,
        "processes": distributed.world()[1],
        "started": runs.now(),
        "foreign": present,
    }
    if replaces is not None:
        record["replaces"] = replaces.name
    main = distributed.is_main()
    impl = stage(spec.kind)
    everywhere = impl.ranks == "all"  # training stages run on every rank
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    _write(spec.out_dir / "stage.json", record)
    manifest["stages"][spec.name] = {"status": "running", "kind": spec.kind}
    _write(run_dir / "run.json", manifest)
    set_seed(ctx.seed)
    if main:
        where = "" if everywhere or not distributed.distributed() else " (main process; the others wait)"
        log.info("-- %s (%s) -> %s%s", spec.name, spec.kind, spec.out_dir, where)
    start = time.perf_counter()
    # TensorBoard events in the stage folder; transformers would otherwise write `./runs/DATE` when a
    # trainer logs before training (an evaluation first).
    tb_dir = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = tb_dir or str(spec.out_dir / "runs")
    try:
        out = impl.run(spec, ctx) if everywhere or main else StageResult(model=None)
        distributed.barrier(f"the end of stage '{spec.name}'")
    except BaseException as exc:
        lost = distributed.lost_peer(exc, f"stage '{spec.name}'")  # another host's ranks died: name it
        record.update(status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", ended=runs.now())
        record["entries"] = _written(spec.out_dir, record["foreign"])
        if not isinstance(exc, KeyboardInterrupt):
            record["error"] = f"{type(lost or exc).__name__}: {lost or exc}"[:500]
        _write(spec.out_dir / "stage.json", record)
        if lost is not None:
            raise lost from exc
        raise
    finally:
        if tb_dir is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
    seconds = time.perf_counter() - start
    reports = {
        key: ctx.data_reports[f"{spec.name}.{key}"] for key in DATA_KEYS if f"{spec.name}.{key}" in ctx.data_reports
    }
    per_model = any(isinstance(value, dict) for value in out.metrics.values())  # eval's {model: scores}
    for key, report in reports.items():  # the rows each source contributed, beside a trainer's own numbers
        if not per_model:  # an eval stage's rows are each model's `examples` already
            out.metrics.update(row_metrics(key, report))
    if main and out.model is not None:
        from tunelab.models.spec import record_base

        record_base(out.model)  # an adapter on a GGUF file's plain copy says where that file is
    record.update(
        status="completed",
        ended=runs.now(),
        seconds=round(seconds, 2),
        metrics=out.metrics,
        model=str(out.model) if out.model else None,
        files=out.files,
        data=out.fingerprints,
    )
    if reports:
        record["data_reports"] = {key: report.as_dict() for key, report in reports.items()}
    record["entries"] = _written(spec.out_dir, record["foreign"])
    _write(spec.out_dir / "stage.json", record)
    manifest.setdefault("data", {})[spec.name] = out.fingerprints
    return out, seconds


def _written(stage_dir: Path, foreign: list[str]) -> list[str]:
    """What a stage wrote in its folder: everything there but the foreign names."""
    if not stage_dir.is_dir():
        return []
    return sorted(p.name for p in stage_dir.iterdir() if p.name not in set(foreign) and p.name != runs.STAGE_FILE)
