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
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab import distributed, runs
from tunelab.data import signature
from tunelab.errors import TunelabError, closest
from tunelab.hub import configure_offline
from tunelab.models import WEIGHTS_NEEDED
from tunelab.plan import check_fits, device_memory, fmt_bytes
from tunelab.progress import quiet
from tunelab.recipe import Recipe
from tunelab.refs import iter_refs
from tunelab.reports import write_report
from tunelab.safeguards import Interrupted, last_checkpoint
from tunelab.stages import Context, StageResult, StageSpec, stage_module, tokenizer_origin


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
    plans = _inspect(recipe, strict_plans=False)
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
        return _inspect(recipe, strict_plans=True)
    finally:
        WEIGHTS_NEEDED.reset(token)


def _inspect(recipe: Recipe, strict_plans: bool) -> list[Any]:
    """Run every stage's checks in order, planning each stage's memory with what the checks learnt."""

    quiet()
    kinds = {name: cfg["stage"] for name, cfg in recipe.stages.items()}
    ctx = Context(seed=recipe.seed, run_dir=recipe.output_dir, checking=True, kinds=kinds)
    plans = []
    for spec in _specs(recipe):
        module = stage_module(spec.kind)
        module.check(spec, ctx)
        try:
            stage_plan = module.plan(spec, ctx)
        except (TunelabError, ValueError, TypeError, AttributeError, OSError):
            if strict_plans:
                raise
            stage_plan = None  # a plan we cannot make must not stop a run the checks accepted
        if stage_plan is not None:
            plans.append(stage_plan)
        if module.PRODUCES_MODEL:
            if spec.name not in ctx.configs and "model" in spec.cfg:
                # A fine-tuned model has its starting model's shape: later checks and plans can use it.
                from tunelab.models import model_config

                with contextlib.suppress(TunelabError):
                    ctx.configs[spec.name] = model_config(spec.cfg["model"], ctx, f"{spec.where}.model")
            origin = tokenizer_origin(module, spec, ctx)
            if origin is not None:
                ctx.tokenizers[spec.name] = origin
            ctx.outputs[spec.name] = spec.out_dir
    return plans


def _warn_memory(plans: list[Any]) -> None:
    """Before anything loads: one line per stage whose plan exceeds the device's memory."""

    memory = device_memory()
    for p in plans if memory else []:
        if p.total > memory[1]:
            print(
                f"warning: stage '{p.stage}' may need {fmt_bytes(p.total)} per device but {memory[0]} has "
                f"{fmt_bytes(memory[1])}; `tunelab plan` shows the parts and what would fit",
                flush=True,
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
        if not record:
            continue
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


def run(recipe: Recipe, overwrite: bool = False, resume: bool = False, from_stage: str | None = None) -> RunResult:
    """Check the recipe, then run its stages; returns metrics and output folders.

    `resume` skips stages that completed with the same fingerprint and continues interrupted ones;
    `from_stage` also reruns that stage and every stage after it.
    """
    distributed.init()
    try:
        mode, plans = _check(recipe, overwrite, resume, from_stage)  # every rank, before any rank writes
    except KeyboardInterrupt as exc:
        exc.before_run = True  # nothing was written: there is no run to mark or resume
        raise
    distributed.barrier("the recipe checks")
    _warn_memory(plans)
    rank, size = distributed.world()
    if rank == 0:
        print(
            f"tunelab: {recipe.data['name']} ({', '.join(recipe.stages)}) -> {recipe.output_dir}"
            + {"resume": " (resuming)", "overwrite": " (replacing the previous run)"}.get(mode, "")
            + (f" on {size} processes" if size > 1 else ""),
            flush=True,
        )
        with runs.locked(recipe.output_dir):
            return _run_locked(recipe, mode, from_stage)
    return _run_locked(recipe, mode, from_stage)


def _run_locked(recipe: Recipe, mode: str, from_stage: str | None) -> RunResult:
    run_dir = recipe.output_dir
    main = distributed.is_main()
    previous = runs.read_json(run_dir / "run.json") or {}
    # --overwrite: the old run is moved aside, deleted once the new run's first stage completes, and put
    # back if the new run fails before that (an error no check could foresee must not cost the old run).
    backup = runs.set_aside(run_dir) if mode == "overwrite" and main else None
    try:
        return _run_new(recipe, mode, from_stage, previous, backup)
    except BaseException as exc:
        if backup is not None and backup.exists():
            if isinstance(exc, KeyboardInterrupt):
                runs.discard(backup)  # the new run is interrupted, and resumable: it is the run now
            else:
                runs.restore(run_dir, backup)
                print(f"the previous run in {run_dir} was restored (the new one failed before its first stage ended)")
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
    if main:
        runs.write_atomic(run_dir / "recipe.yaml", recipe.to_yaml())
        _write(run_dir / "run.json", manifest)
    distributed.barrier("the run folder")
    result = RunResult(run_dir=run_dir, status="running", kinds={n: c["stage"] for n, c in recipe.stages.items()})
    ctx = Context(seed=recipe.seed, run_dir=run_dir, resume=mode == "resume")
    with _sigterm_interrupts():
        _run_stages(recipe, run_dir, ctx, manifest, result, from_stage, backup)
    manifest.update(status="completed", ended=runs.now())
    _write(run_dir / "run.json", manifest)
    result.status = "completed"
    if main:
        _report(run_dir)
    return result


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
    fingerprints: dict[str, str] = {}
    rerun = False
    try:
        for spec in _specs(recipe):
            fp = _fingerprint(spec, recipe.seed, fingerprints)
            record = distributed.broadcast(runs.read_json(spec.out_dir / "stage.json") or {})
            rerun = rerun or spec.name == from_stage
            if record and not rerun and record.get("fingerprint") != fp and distributed.is_main():
                print(f"-- {spec.name}: its config, data or upstream stages changed since it ran: running it again")
            if record and (rerun or record.get("fingerprint") != fp):
                # Config or inputs changed since this folder was written: its checkpoints do not apply.
                if distributed.is_main():
                    shutil.rmtree(spec.out_dir)
                record = {}
                distributed.barrier(f"clearing stage '{spec.name}'")
            if record.get("status") == "completed":
                stage_result = StageResult(
                    metrics=record.get("metrics", {}), model=Path(record["model"]) if record.get("model") else None
                )
                result.skipped.append(spec.name)
                seconds = record.get("seconds", 0.0)
            else:
                stage_result, seconds = _run_stage(spec, ctx, fp, manifest, run_dir)
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


def _report(run_dir: Path) -> None:
    """report.md and its plots. A finished run stays finished if drawing fails: say so, go on."""

    try:
        write_report(run_dir)
    except (ImportError, OSError, ValueError, TypeError, KeyError) as exc:
        print(f"warning: report.md not written ({type(exc).__name__}: {exc})", flush=True)


def _run_stage(
    spec: StageSpec, ctx: Context, fp: str, manifest: dict[str, Any], run_dir: Path
) -> tuple[StageResult, float]:
    from transformers import set_seed

    record: dict[str, Any] = {
        "stage": spec.kind,
        "status": "running",
        "fingerprint": fp,
        "cfg": spec.cfg,
        "processes": distributed.world()[1],
        "started": runs.now(),
    }
    main = distributed.is_main()
    module = stage_module(spec.kind)
    everywhere = getattr(module, "RANKS", "main") == "all"  # training stages run on every rank
    spec.out_dir.mkdir(parents=True, exist_ok=True)
    _write(spec.out_dir / "stage.json", record)
    manifest["stages"][spec.name] = {"status": "running", "kind": spec.kind}
    _write(run_dir / "run.json", manifest)
    set_seed(ctx.seed)
    if main:
        where = "" if everywhere or not distributed.distributed() else " (main process; the others wait)"
        print(f"-- {spec.name} ({spec.kind}) -> {spec.out_dir}{where}", flush=True)
    start = time.perf_counter()
    # TensorBoard events in the stage folder; transformers would otherwise write `./runs/DATE` when a
    # trainer logs before training (an evaluation first).
    tb_dir = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = tb_dir or str(spec.out_dir / "runs")
    try:
        out = module.run(spec, ctx) if everywhere or main else StageResult(model=None)
        distributed.barrier(f"the end of stage '{spec.name}'")
    except BaseException as exc:
        record.update(status="interrupted" if isinstance(exc, KeyboardInterrupt) else "failed", ended=runs.now())
        if not isinstance(exc, KeyboardInterrupt):
            record["error"] = f"{type(exc).__name__}: {exc}"[:500]
        _write(spec.out_dir / "stage.json", record)
        raise
    finally:
        if tb_dir is None:
            os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
    seconds = time.perf_counter() - start
    if main and out.model is not None:
        from tunelab.models import record_base

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
    _write(spec.out_dir / "stage.json", record)
    manifest.setdefault("data", {})[spec.name] = out.fingerprints
    return out, seconds
