"""The `tunelab` command. A thin layer over the Python API.

Only standard-library and light modules are imported at the top: `tunelab
--help` must not pay for torch. Each command imports what it needs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
import typer.core


class _OneLineUsageErrors(typer.core.TyperGroup):
    """Usage errors (an unknown option, a bad option value) as one `error:` line, exit code 2."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        click = typer.core._click  # typer's own copy of click

        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.exceptions.NoArgsIsHelpError as exc:
            typer.echo(exc.ctx.get_help() if exc.ctx else str(exc))
            sys.exit(exc.exit_code)
        except click.exceptions.UsageError as exc:
            where = f"`{exc.ctx.command_path} --help`" if exc.ctx else "`tunelab --help`"
            message = " ".join(exc.format_message().split()).translate({c: repr(chr(c))[1:-1] for c in range(32)})
            typer.secho(f"error: {message} (see {where})", fg=typer.colors.RED, err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.ClickException as exc:
            exc.show()
            sys.exit(exc.exit_code)
        except typer.Abort:  # typer's click copy raises typer's own Abort (its `exceptions` module has none)
            typer.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    cls=_OneLineUsageErrors,
    name="tunelab",
    help="Fine-tune and evaluate foundation models from YAML recipes (SFT, LoRA, pre-training, eval).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Overrides = Annotated[
    list[str] | None,
    typer.Argument(help="Overrides like training.learning_rate=1e-4 lora.r=8 (sft.training.max_steps=5 in pipelines)."),
]
RecipeArg = Annotated[str, typer.Argument(help="Recipe file, or the name of a shipped recipe (see `tunelab list`).")]


def _fail(message: str, code: int = 2) -> None:
    from tunelab.training.distributed import log_prefix

    typer.secho(f"{log_prefix()}error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


# Exceptions that typer turns into an exit code itself (typer.Exit from a command, usage errors).
CLI_EXITS = tuple(
    {
        typer.Exit,
        typer.Abort,
        typer.core._click.exceptions.ClickException,
    }
)
# Commands that start runs: a Ctrl-C there leaves a run marked 'interrupted' (see tunelab.pipeline).
RUNNING_COMMANDS = {"run", "launch", "eval_model", "sample"}


class PlainLines(logging.Handler):
    """tunelab's log records as the plain lines the CLI prints: the message alone on stdout, `warning: `
    before a warning, and `[HOST rank R] ` before both when the run spans hosts (their lines meet in one
    log). stdout is looked up at each line (CliRunner swaps it), and a line goes through tqdm.write when
    tqdm is loaded, so a progress bar on the terminal stays whole below it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tunelab.training.distributed import log_prefix

        try:
            text = record.getMessage()
            if record.levelno >= logging.WARNING:
                text = f"warning: {text}"
            if prefix := log_prefix():
                text = "\n".join(prefix + line if line else line for line in text.split("\n"))
            tqdm = sys.modules.get("tqdm")
            if tqdm is not None:
                tqdm.tqdm.write(text, file=sys.stdout)
            else:
                sys.stdout.write(text + "\n")
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - logging's contract: a failing handler reports, never raises
            self.handleError(record)


@contextlib.contextmanager
def log_lines() -> Iterator[None]:
    """The `tunelab` logger printed as plain lines (INFO and up) while a command runs, and as it was after:
    the CLI owns its output, the library itself configures nothing (tests call commands in-process)."""
    logger = logging.getLogger("tunelab")
    handler, level = PlainLines(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def friendly(fn):
    """TunelabError: one red line, exit code 2. Ctrl-C: exit code 130. Anything else: an internal error,
    one line naming the file that holds the traceback, exit code 1. No traceback on the terminal.

    A SystemExit is caught too: no tunelab command calls sys.exit (they raise typer.Exit), so one that
    reaches here came from code a run calls (a library, or a user's module that is not a reward function;
    those are named with exit code 2 by tunelab.models.reward_functions). It is an internal error naming where it was
    called, exit code 1, rather than a process that ends in the middle of a run with no word.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from tunelab.core.errors import TunelabError

        try:
            with log_lines():
                return fn(*args, **kwargs)
        except TunelabError as exc:
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt as exc:
            from tunelab.training.distributed import is_main

            code = 128 + getattr(exc, "signum", 2)
            if fn.__name__ not in RUNNING_COMMANDS or getattr(exc, "before_run", False):
                typer.secho(
                    "interrupted (before the run started: nothing was written)"
                    if getattr(exc, "before_run", False)
                    else "interrupted",
                    err=True,
                )
                raise typer.Exit(code) from None
            saved = getattr(exc, "checkpoint", None)
            where = f" (checkpoint saved: {saved})" if saved else ""
            if getattr(exc, "restored", None):  # --overwrite stopped before a stage ended: the old run is back
                if is_main():
                    typer.secho(f"interrupted: the previous run in {exc.restored} is back as it was", err=True)
                raise typer.Exit(code) from None
            if is_main():  # one line for the run, not one per rank
                typer.secho(f"interrupted: the run is marked 'interrupted'{where}; continue it with --resume", err=True)
            raise typer.Exit(code) from None
        except CLI_EXITS:
            raise
        except SystemExit as exc:
            _fail(_internal_error(exc, f"{_exit_call(exc)} was called in {_caller(exc)}"), 1)
        except Exception as exc:
            import errno

            if isinstance(exc, OSError) and exc.errno == errno.ENAMETOOLONG:  # always a path the user gave
                _fail(f"path '{_short(exc.filename)}' is longer than the OS allows ({exc.strerror}): use a shorter one")
            _machine_condition(exc)
            _fail(_internal_error(exc), 1)

    return wrapper


def _machine_condition(exc: BaseException) -> None:
    """A full disk or a path the OS will not let tunelab write, anywhere in the exception's chain: one line
    naming the file and what to do (exit 2). These are the machine's state, not tunelab's bugs; the plan's
    disk check cannot foresee every byte, and libraries wrap the OSError (safetensors, torch) in their own."""
    import errno

    seen: set[int] = set()
    chain: BaseException | None = exc
    while chain is not None and id(chain) not in seen:
        seen.add(id(chain))
        text = str(chain)
        full = isinstance(chain, OSError) and chain.errno in (errno.ENOSPC, errno.EDQUOT)
        if full or "No space left on device" in text or "StorageFull" in text:
            where = f" writing '{_short(chain.filename, 240)}'" if getattr(chain, "filename", None) else ""
            _fail(
                f"the disk is full{where} (No space left on device): free space there, or choose an output_dir on "
                "another disk; a run it stopped is marked failed: continue it with --resume"
            )
        if isinstance(chain, OSError) and chain.errno in (errno.EACCES, errno.EPERM, errno.EROFS) and chain.filename:
            _fail(
                f"'{_short(chain.filename, 240)}': {chain.strerror} (file permissions, or a read-only mount): fix its "
                "permissions, or choose another path (another output_dir for a run folder)"
            )
        chain = chain.__cause__ or chain.__context__


def _short(value: Any, limit: int = 80) -> str:
    text = str(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _exit_call(exc: SystemExit) -> str:
    return f"sys.exit({exc.code!r})" if exc.code is not None else "sys.exit()"


def _caller(exc: BaseException) -> str:
    """`function (file:line)` of the innermost Python frame: where sys.exit was called."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None:
        return "unknown code"
    code = tb.tb_frame.f_code
    return f"{code.co_name} ({_short(code.co_filename, 120)}:{tb.tb_lineno})"


def _internal_error(exc: BaseException, summary: str | None = None) -> str:
    """Write the traceback to a file under the temp folder; the line that says where it is."""
    import tempfile
    import traceback

    summary = summary or _short(" ".join(f"{type(exc).__name__}: {exc}".split()), 200)
    try:
        fd, path = tempfile.mkstemp(prefix="tunelab-traceback-", suffix=".txt")
        with open(fd, "w") as f:
            f.write("".join(traceback.format_exception(exc)))
        saved = f"the full traceback is in {path}"
    except OSError as write_error:
        saved = f"the traceback could not be written ({write_error.strerror})"
    return f"internal error in tunelab ({summary}); {saved}: please report it"


@app.command()
@friendly
def run(
    recipe: RecipeArg,
    overrides: Overrides = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a finished run in output_dir.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an unfinished run from its checkpoints.")] = False,
    from_stage: Annotated[
        str | None,
        typer.Option("--from", help="Rerun this stage and the ones after it in an existing run (keeps earlier ones)."),
    ] = None,
) -> None:
    """Run a recipe: every stage in order, then a summary of metrics and files.

    Rerunning a pipeline with --resume skips stages that finished with the same config and inputs.
    """
    from tunelab import load_recipe
    from tunelab.pipeline import run as run_recipe

    parsed = load_recipe(recipe, overrides or [])
    result = run_recipe(parsed, overwrite=overwrite, resume=resume, from_stage=from_stage)
    print_summary(result)


@app.command()
@friendly
def launch(
    recipe: RecipeArg,
    overrides: Overrides = None,
    num_processes: Annotated[
        int | None, typer.Option(help="Processes in all, over every host (one per GPU; on CPU, gloo).")
    ] = None,
    num_machines: Annotated[int | None, typer.Option(help="Hosts taking part.")] = None,
    machine_rank: Annotated[int | None, typer.Option(help="This host's rank (0 is the main host).")] = None,
    main_process_ip: Annotated[str | None, typer.Option(help="Address of the main host.")] = None,
    main_process_port: Annotated[int | None, typer.Option(help="Port on the main host.")] = None,
    rdzv_backend: Annotated[
        str | None, typer.Option(help="Rendezvous across hosts: static (the default) or c10d (torchrun's).")
    ] = None,
    ifname: Annotated[
        str | None,
        typer.Option(help="Network interface for gloo and NCCL (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME), e.g. eth0."),
    ] = None,
    mixed_precision: Annotated[str | None, typer.Option(help="no, fp16, bf16 (default: the recipe's).")] = None,
    config_file: Annotated[str | None, typer.Option(help="Accelerate config (see recipes/accelerate/).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a finished run in output_dir.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an unfinished run from its checkpoints.")] = False,
    from_stage: Annotated[str | None, typer.Option("--from", help="Rerun this stage and the ones after it.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the accelerate command (the sbatch script with --slurm).")
    ] = False,
    check_first: Annotated[
        bool,
        typer.Option(
            "--check/--no-check",
            help="Check the recipe before starting the processes (each checks it again; sbatch scripts skip this).",
        ),
    ] = True,
    slurm: Annotated[
        bool,
        typer.Option(
            "--slurm",
            help="Write an sbatch script for the recipe (and print its path); see --submit.",
            rich_help_panel="Slurm",
        ),
    ] = False,
    submit: Annotated[
        bool, typer.Option("--submit", help="Submit the script with sbatch; print the job id.", rich_help_panel="Slurm")
    ] = False,
    nodes: Annotated[int | None, typer.Option(help="Nodes (default 1).", rich_help_panel="Slurm")] = None,
    gpus_per_node: Annotated[
        int | None, typer.Option(help="GPUs per node: as many processes per node.", rich_help_panel="Slurm")
    ] = None,
    processes_per_node: Annotated[
        int | None, typer.Option(help="Processes per node on CPU nodes (default 1).", rich_help_panel="Slurm")
    ] = None,
    cpus_per_node: Annotated[
        int | None, typer.Option(help="CPU cores per node (the task's --cpus-per-task).", rich_help_panel="Slurm")
    ] = None,
    time: Annotated[
        str | None, typer.Option(help="Time limit, e.g. 4:00:00 or 1-00:00:00.", rich_help_panel="Slurm")
    ] = None,
    partition: Annotated[
        str | None, typer.Option(help="Partition (default: the cluster's).", rich_help_panel="Slurm")
    ] = None,
    account: Annotated[str | None, typer.Option(help="Account to charge.", rich_help_panel="Slurm")] = None,
    job_name: Annotated[
        str | None, typer.Option(help="Job name (default tunelab-RECIPE).", rich_help_panel="Slurm")
    ] = None,
    output: Annotated[
        str | None, typer.Option(help="The job's log (default RUN_DIR-slurm-%j.out).", rich_help_panel="Slurm")
    ] = None,
    sbatch: Annotated[
        list[str] | None,
        typer.Option("--sbatch", help='More sbatch options, one each: --sbatch "--qos=high".', rich_help_panel="Slurm"),
    ] = None,
    requeue: Annotated[
        bool,
        typer.Option(
            "--requeue",
            help="Requeue on pre-emption, and at the time limit after a checkpoint.",
            rich_help_panel="Slurm",
        ),
    ] = False,
    signal_: Annotated[
        str,
        typer.Option("--signal", help="Warning before the time limit: [B:]SIG@SECONDS.", rich_help_panel="Slurm"),
    ] = "B:TERM@120",
    script: Annotated[
        str | None, typer.Option(help="Where to write the script (default RUN_DIR.sbatch).", rich_help_panel="Slurm")
    ] = None,
) -> None:
    """`tunelab run` on several processes, GPUs or hosts through `accelerate launch` (checks the recipe first).

    With --slurm: an sbatch script that runs it over --nodes nodes of a Slurm cluster, resuming when requeued.
    """
    import shlex
    import signal
    import subprocess

    from tunelab import load_recipe
    from tunelab.pipeline import check
    from tunelab.training.distributed import launch_command, signal_ranks

    slurm_options = {
        "--nodes": nodes,
        "--gpus-per-node": gpus_per_node,
        "--processes-per-node": processes_per_node,
        "--cpus-per-node": cpus_per_node,
        "--time": time,
        "--partition": partition,
        "--account": account,
        "--job-name": job_name,
        "--output": output,
        "--sbatch": sbatch,
        "--script": script,
        "--requeue": requeue or None,
        "--submit": submit or None,
        "--signal": None if signal_ == "B:TERM@120" else signal_,
    }
    if slurm:
        _launch_slurm(recipe, overrides, slurm_options, locals())
        return
    given = [name for name, value in slurm_options.items() if value is not None]
    if given:
        from tunelab.core.errors import TunelabError

        raise TunelabError(f"{given[0]} belongs to a Slurm job: add --slurm (or drop {given[0]})")
    options = {
        "num_processes": num_processes,
        "num_machines": num_machines,
        "machine_rank": machine_rank,
        "main_process_ip": main_process_ip,
        "main_process_port": main_process_port,
        "rdzv_backend": rdzv_backend,
        "ifname": ifname,
        "mixed_precision": mixed_precision,
        "config_file": config_file,
    }
    _check_launch_options(num_processes, num_machines, machine_rank, main_process_port)
    flags = ["--overwrite"] * overwrite + ["--resume"] * resume + (["--from", from_stage] if from_stage else [])
    argv, env = launch_command(options, [recipe, *(overrides or []), *flags])
    processes = int(argv[argv.index("--num_processes") + 1])
    if check_first:
        check(load_recipe(recipe, overrides or []), overwrite, resume, from_stage, processes=processes)
    if dry_run:
        shown = {
            k: env[k]
            for k in ("ACCELERATE_USE_CPU", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")
            if ifname or k == "ACCELERATE_USE_CPU"
        }
        typer.echo("".join(f"{k}={v} " for k, v in shown.items() if v) + shlex.join(argv))
        return
    # The agent (torchrun, in the launcher's process) ignores SIGTERM, which it would pass on as a second
    # signal: the ranks get it from here (signal_ranks) or from the scheduler, and checkpoint once.
    ignored = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(argv, env=env, start_new_session=True)
    finally:
        signal.signal(signal.SIGTERM, ignored)
    caught: list[int] = []

    def forward(signum: int, frame: Any) -> None:
        caught.append(signum)
        signal_ranks(proc.pid, signum)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, forward)
    code = proc.wait()
    raise typer.Exit(128 + caught[0] if caught and code else code)


def _launch_slurm(
    recipe: str, overrides: list[str] | None, slurm_options: dict[str, Any], given: dict[str, Any]
) -> None:
    """`tunelab launch --slurm`: write (and with --submit, submit) the sbatch script, or print it (--dry-run)."""
    from tunelab import slurm
    from tunelab.core.errors import TunelabError

    for flag, key in (
        ("--num-processes", "num_processes"),
        ("--num-machines", "num_machines"),
        ("--machine-rank", "machine_rank"),
        ("--main-process-ip", "main_process_ip"),
        ("--main-process-port", "main_process_port"),
        ("--rdzv-backend", "rdzv_backend"),
    ):
        if given[key] is not None:
            raise TunelabError(
                f"{flag} is set by the sbatch script on each node (from --nodes and --gpus-per-node or "
                f"--processes-per-node): drop it"
            )
    if given["dry_run"] and given["submit"]:
        raise TunelabError("--dry-run and --submit contradict each other: choose one")
    options = {flag[2:].replace("-", "_"): value for flag, value in slurm_options.items()}
    options.pop("submit")
    job = slurm(
        recipe,
        overrides or [],
        overwrite=given["overwrite"],
        resume=given["resume"],
        from_stage=given["from_stage"],
        submit=given["submit"],
        dry_run=given["dry_run"],
        ifname=given["ifname"],
        config_file=given["config_file"],
        mixed_precision=given["mixed_precision"],
        **options,
    )
    if job.path is None:
        typer.echo(job.script, nl=False)
    elif job.job_id is None:
        typer.echo(f"wrote {job.path}; submit it with: sbatch {job.path}  (its log: {job.log})")
    else:
        typer.echo(f"submitted job {job.job_id}: {job.path}; its log: {job.log.replace('%j', job.job_id)}")


def _check_launch_options(
    num_processes: int | None, num_machines: int | None, machine_rank: int | None, port: int | None
) -> None:
    from tunelab.core.errors import TunelabError

    if num_processes is not None and num_processes < 1:
        raise TunelabError(f"--num-processes is {num_processes}: use 1 or more (one per GPU)")
    if num_machines is not None and num_machines < 1:
        raise TunelabError(f"--num-machines is {num_machines}: use 1 or more")
    if machine_rank is not None and not 0 <= machine_rank < (num_machines or 1):
        raise TunelabError(
            f"--machine-rank is {machine_rank}: use 0 (the main host) to {(num_machines or 1) - 1} "
            "(--num-machines minus one)"
        )
    if port is not None and not 0 < port < 65536:
        raise TunelabError(f"--main-process-port is {port}: use a port from 1 to 65535 (e.g. 29500)")


@app.command("eval")
@friendly
def eval_model(
    model: Annotated[str, typer.Argument(help="Model folder, adapter folder, hub id, or pkg:PACKAGE/folder.")],
    data: Annotated[
        str | None, typer.Argument(help="Dataset folder, file or hub id (split: test unless overridden).")
    ] = None,
    overrides: Overrides = None,
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks",
            help="lm-evaluation-harness tasks instead of DATA, comma-separated (tunelab_arith_mc, mmlu, ...).",
        ),
    ] = None,
    output_dir: Annotated[str | None, typer.Option(help="Run folder (default: runs/eval-MODELNAME).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a finished run in output_dir.")] = False,
) -> None:
    """Evaluate one model on a dataset, or on harness tasks with --tasks: one stage without a recipe.

    Overrides set the stage's keys as in `run` (`limit=50`, `num_fewshot=3`, `generation.max_new_tokens=32`).
    """
    from tunelab import recipe_from_dict
    from tunelab.core.errors import TunelabError
    from tunelab.pipeline import run as run_recipe

    if tasks is not None and data is not None and "=" in data:  # `eval MODEL --tasks T limit=5`: an override
        overrides, data = [data, *(overrides or [])], None
    if (data is None) == (tasks is None):
        raise TunelabError("give one of DATA (a dataset to generate answers for) or --tasks (harness tasks)")
    name = Path(model.rstrip("/")).name or "model"
    if tasks is not None:
        stage = {"stage": "lm_eval", "model": model, "tasks": tasks}
    else:
        stage = {"stage": "eval", "model": model, "data": data}
    recipe = recipe_from_dict(
        {"name": f"eval-{name}", "output_dir": output_dir or f"runs/eval-{name}", "stages": {"eval": stage}},
        overrides or [],
    )
    print_summary(run_recipe(recipe, overwrite=overwrite))


@app.command()
@friendly
def sample(
    model: Annotated[str, typer.Argument(help="Diffusers pipeline folder or hub id (or a tunelab LoRA folder).")],
    scheduler: Annotated[
        str, typer.Option(help="DDPM, DDIM, DPM-Solver++, UniPC, Euler, ... (or a class name).")
    ] = "DDIM",
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: 1000 for DDPM, else 50).")] = None,
    num_images: Annotated[int, typer.Option(help="How many images.")] = 16,
    seed: Annotated[int, typer.Option(help="Image i is drawn from seed + i.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Images generated together.")] = 64,
    prompt: Annotated[str | None, typer.Option(help="Prompt, for text-to-image pipelines.")] = None,
    output_dir: Annotated[str | None, typer.Option(help="Run folder (default: runs/sample-MODELNAME).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace a finished run in output_dir.")] = False,
) -> None:
    """Sample images from a diffusion pipeline: a diffusion_sample stage without a recipe."""
    from tunelab import recipe_from_dict
    from tunelab.pipeline import run as run_recipe

    name = Path(model.rstrip("/")).name or "model"
    stage: dict[str, Any] = {
        "stage": "diffusion_sample",
        "model": model,
        "scheduler": scheduler,
        "num_images": num_images,
        "seed": seed,
        "batch_size": batch_size,
    }
    if steps is not None:
        stage["num_inference_steps"] = steps
    if prompt is not None:
        stage["prompt"] = prompt
    recipe = recipe_from_dict(
        {"name": f"sample-{name}", "output_dir": output_dir or f"runs/sample-{name}", "stages": {"sample": stage}}
    )
    result = run_recipe(recipe, overwrite=overwrite)
    print_summary(result)
    typer.echo(f"grid: {result.run_dir / 'sample' / 'grid.png'}")


@app.command()
@friendly
def validate(
    recipe: RecipeArg,
    overrides: Overrides = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Validate as for `run --overwrite`.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Validate as for `run --resume`.")] = False,
    from_stage: Annotated[str | None, typer.Option("--from", help="Validate as for `run --from STAGE`.")] = None,
) -> None:
    """Check a recipe without training: keys, types, files, dataset columns, output folder."""
    from tunelab import load_recipe
    from tunelab.pipeline import check, data_views

    parsed = load_recipe(recipe, overrides or [])
    mode = check(parsed, overwrite=overwrite, resume=resume, from_stage=from_stage)
    fate = {"new": "will be created", "resume": "will be resumed", "overwrite": "will be replaced"}[mode]
    for view in data_views(parsed, rows=0):  # the data summary: `tunelab data` shows it in full
        typer.echo(view.summary_line())
    typer.secho(
        f"ok: {len(parsed.stages)} stage(s) ({', '.join(parsed.stages)}); output_dir {parsed.output_dir} {fate}",
        fg=typer.colors.GREEN,
    )


@app.command("data")
@friendly
def data_command(
    recipe: RecipeArg,
    stage: Annotated[
        str | None, typer.Argument(help="A training stage of the recipe (default: its first training stage).")
    ] = None,
    overrides: Overrides = None,
    rows: Annotated[int, typer.Option("--rows", help="Rows to show tokenized, with their loss mask.")] = 3,
    html: Annotated[Path | None, typer.Option("--html", help="Also write the view as a self-contained page.")] = None,
) -> None:
    """A training stage's data as its trainer will see it: formats, token lengths, truncation, the rows with
    the tokens that carry loss highlighted, and held-out rows found in the training data. No model loads."""
    from rich.console import Console

    from tunelab import data_preview, load_recipe
    from tunelab.cli.data_view import render
    from tunelab.core.errors import TunelabError

    if stage is not None and "=" in stage:  # `tunelab data RECIPE key=value`: an override, not a stage
        overrides, stage = [stage, *(overrides or [])], None
    if rows < 0:
        raise TunelabError(f"--rows is {rows}: give the number of rows to show (0 or more)")
    if html is not None:
        _check_html_target(html)
    view = data_preview(load_recipe(recipe, overrides or []), stage, rows)
    render(view, Console(highlight=False, soft_wrap=True))
    if html is not None:
        from tunelab.core.runs import write_atomic

        write_atomic(html, view.to_html())
        typer.echo(f"html: {html}")


def _check_html_target(path: Path) -> None:
    """`--html FILE` writes a new file, or replaces a page `tunelab data` wrote; anything else stays."""
    from tunelab.core.errors import TunelabError, check_path
    from tunelab.data.preview import HTML_MARK

    check_path(str(path), "--html")
    if path.is_dir():
        raise TunelabError(f"--html '{path}' is a folder: name the .html file to write")
    if not path.parent.is_dir():
        raise TunelabError(f"--html '{path}': folder '{path.parent}' does not exist; create it or choose another")
    if path.exists():
        try:
            head = path.open("rb").read(200).decode("utf-8", "replace")
        except OSError:
            head = ""
        if HTML_MARK not in head:
            raise TunelabError(
                f"--html '{path}' exists and is not a page `tunelab data` wrote: choose another file (it is kept)"
            )


@app.command()
@friendly
def plan(
    recipe: RecipeArg,
    overrides: Overrides = None,
    devices: Annotated[int, typer.Option(help="Devices to share the work (DDP, ZeRO-2, ZeRO-3/FSDP columns).")] = 0,
) -> None:
    """Memory each stage needs per device, from model configs only (no weights load)."""
    from tunelab import load_recipe
    from tunelab.core.errors import TunelabError
    from tunelab.pipeline import plan as plan_recipe

    if devices < 0:
        raise TunelabError(f"--devices is {devices}: use the number of devices (1 or more), or 0 for this machine's")
    parsed = load_recipe(recipe, overrides or [])
    plans = plan_recipe(parsed)
    print_plans(plans, devices)


def print_plans(plans: list[Any], devices: int = 0) -> None:
    from rich.console import Console
    from rich.table import Table

    from tunelab.models.plan import device_memory, fmt_bytes, suggestions

    console = Console()
    memory = device_memory()
    if devices <= 0:
        import torch

        devices = max(torch.cuda.device_count(), 1)
    for p in plans:
        console.print(
            f"[bold]{p.stage}[/bold] ({p.kind}, {p.mode}): {p.params / 1e6:.1f}M parameters, "
            f"{p.trainable / 1e6:.2f}M trainable"
        )
        table = Table()
        table.add_column("part")
        table.add_column("per device", justify="right")
        for part, value in p.parts.items():
            table.add_row(part, fmt_bytes(value))
        table.add_row("[bold]total[/bold]", f"[bold]{fmt_bytes(p.total)}[/bold]")
        if devices > 1:
            for strategy, label in (("ddp", "DDP"), ("zero2", "ZeRO-2"), ("zero3", "ZeRO-3 / FSDP")):
                table.add_row(f"{label} x{devices}", fmt_bytes(p.sharded(devices, strategy)))
        console.print(table)
        for note in p.notes:
            console.print(f"  note: {note}")
        if memory and p.sharded(devices, "ddp") > memory[1]:
            console.print(
                f"  [yellow]warning: needs {fmt_bytes(p.total)} but {memory[0]} has "
                f"{fmt_bytes(memory[1])}; what would fit:[/yellow]"
            )
            for tip in suggestions(p):
                console.print(f"    - {tip}")
    if memory:
        console.print(f"device: {memory[0]}, {fmt_bytes(memory[1])}")


@app.command()
@friendly
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Run folders (each with a metrics.json).")],
    everything: Annotated[bool, typer.Option("--all", help="Every metric, trainer bookkeeping included.")] = False,
) -> None:
    """A table of metrics across runs: one row per run, stage and model, one column per metric."""
    from rich.console import Console
    from rich.table import Table

    from tunelab.core.runs import compare_rows

    rows, names = compare_rows(run_dirs, everything)
    table = Table(title="metrics across runs", title_justify="left")
    for col in ("run", "stage", "model", *names):
        table.add_column(col, justify="right" if col in names else "left")
    for row in rows:
        table.add_row(row["run"], row["stage"], row["model"], *[_fmt(row["metrics"].get(n, "")) for n in names])
    Console().print(table)


@app.command()
@friendly
def attention(
    model: Annotated[str, typer.Argument(help="Model folder, adapter folder or hub id.")],
    text: Annotated[str, typer.Argument(help="The text to look at.")],
    layers: Annotated[str, typer.Option(help="Comma-separated layer indices (default: all; -1 is the last).")] = "",
    heads: Annotated[str, typer.Option(help="Comma-separated head indices (default: all).")] = "",
    out: Annotated[Path, typer.Option(help="PNG file to write.")] = Path("attention.png"),
    chat_template: Annotated[
        bool, typer.Option(help="Render the text as a user turn through the model's chat template, if it has one.")
    ] = True,
) -> None:
    """Draw the attention weights of chosen layers and heads for one text as heatmaps (PNG)."""
    from tunelab.core.errors import TunelabError
    from tunelab.core.hub import configure_offline
    from tunelab.core.progress import quiet
    from tunelab.models.attention import draw

    def ints(value: str, what: str) -> list[int] | None:
        try:
            return [int(v) for v in value.split(",") if v.strip()] or None
        except ValueError:
            raise TunelabError(f"--{what} must be comma-separated integers, got {value!r}") from None

    configure_offline()
    if not text.strip():
        raise TunelabError("the text is empty: give the words to look at")
    with quiet():
        path = draw(model, text, out, ints(layers, "layers"), ints(heads, "heads"), chat_template)
    typer.echo(f"attention heatmaps written to {path}")


@app.command("chat")
@friendly
def chat_command(
    model: Annotated[str, typer.Argument(help="Model, adapter or stage folder, hub id, or a .gguf file.")],
    generation: Annotated[
        list[str] | None, typer.Argument(help="GenerationConfig fields as key=value: max_new_tokens=64 do_sample=true")
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="Answer this one prompt on stdout and exit.")] = None,
    system: Annotated[str | None, typer.Option(help="System prompt (needs a chat template).")] = None,
    load_in_4bit: Annotated[
        bool, typer.Option("--load-in-4bit", help="Load the base in 4 bits (bitsandbytes).")
    ] = False,
    load_in_8bit: Annotated[
        bool, typer.Option("--load-in-8bit", help="Load the base in 8 bits (bitsandbytes).")
    ] = False,
    image: Annotated[
        list[Path] | None, typer.Option("--image", help="Image(s) for the first turn (image+text models).")
    ] = None,
) -> None:
    """Talk to a model: an interactive loop with history (/reset, /system TEXT, /exit), or one --prompt."""
    from tunelab.core.errors import TunelabError
    from tunelab.models.chat import Chat, generation_config, load, parse_overrides

    config = generation_config(parse_overrides(generation or []), "generation")
    if load_in_4bit and load_in_8bit:
        raise TunelabError("--load-in-4bit and --load-in-8bit are both given: choose one (4 bits take half the memory)")
    if prompt is not None and not prompt.strip():
        raise TunelabError("--prompt is empty: give the text for the model to answer")
    if prompt is None and (sys.stdin is None or sys.stdin.closed):  # `<&-`: input() would raise, not see EOF
        typer.echo("stdin is closed: nothing to chat about (give --prompt TEXT for one answer)", err=True)
        return
    quant = {"load_in_4bit": True} if load_in_4bit else {"load_in_8bit": True} if load_in_8bit else None
    from tunelab.vision.prompting import is_vlm_ref, open_chat

    if image or is_vlm_ref(model):  # an image+text model: tunelab.vision.prompting
        session = open_chat(model, config, system, image or [], quant)
    else:
        lm, tokenizer = load(model, quant)
        session = Chat(lm, tokenizer, config, system)
    if prompt is not None:
        typer.echo(session.say(prompt))
        return
    typer.echo(
        f"chatting with {model} ({'chat template' if session.templated else 'plain text'}); "
        "/reset, /system TEXT, /exit",
        err=True,
    )
    while True:
        try:
            text = input("you> ")
        except EOFError:  # Ctrl-D, or the end of piped input: end the line the prompt started
            typer.echo(err=True)
            break
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            session.reset()
            typer.echo("(history cleared)", err=True)
            continue
        if text.startswith("/system"):
            session.reset(text.removeprefix("/system").strip() or None)
            typer.echo("(system prompt set; history cleared)", err=True)
            continue
        if not text.strip():
            continue
        typer.echo("model> ", nl=False)
        session.say(text, on_token=lambda piece: typer.echo(piece, nl=False))
        typer.echo()


@app.command("serve")
@friendly
def serve_command(
    model: Annotated[
        str, typer.Argument(help="Hub id, model folder, .gguf file, adapter, stage folder, or run folder.")
    ],
    adapter: Annotated[
        list[str] | None,
        typer.Option("--adapter", help="NAME=PATH: a LoRA adapter over the same base, chosen by `model: NAME`."),
    ] = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None, typer.Option("--api-key", help="Key clients must send (Authorization: Bearer KEY).")
    ] = None,
    load_in_4bit: Annotated[
        bool, typer.Option("--load-in-4bit", help="Load the base in 4 bits (bitsandbytes).")
    ] = False,
    load_in_8bit: Annotated[
        bool, typer.Option("--load-in-8bit", help="Load the base in 8 bits (bitsandbytes).")
    ] = False,
    backend: Annotated[str, typer.Option(help="transformers (any machine) or vllm (CUDA and vLLM).")] = "transformers",
    max_batch: Annotated[int, typer.Option("--max-batch", help="Most answers generated together.")] = 32,
    think_end_token: Annotated[
        str | None,
        typer.Option("--think-end-token", help="End-of-reasoning marker (e.g. </think>): reasoning_content apart."),
    ] = None,
    drain: Annotated[
        float, typer.Option(help="Seconds to finish the requests in flight on SIGTERM before cancelling them.")
    ] = 30.0,
    log_requests: Annotated[bool, typer.Option("--log-requests", help="One stderr line per request.")] = False,
) -> None:
    """Serve a model with OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models) until SIGTERM."""
    from tunelab.core.errors import TunelabError
    from tunelab.serving.service import run_until_signalled, start

    if load_in_4bit and load_in_8bit:
        raise TunelabError("--load-in-4bit and --load-in-8bit are both given: choose one (4 bits take half the memory)")
    if not 0 <= port <= 65535:
        raise TunelabError(f"--port is {port}: use a port from 1 to 65535 (0: any free port)")
    if drain < 0:
        raise TunelabError(f"--drain is {drain:g}: use a number of seconds, 0 or more")
    quant = {"load_in_4bit": True} if load_in_4bit else {"load_in_8bit": True} if load_in_8bit else None
    server = start(
        model,
        adapter or [],
        host=host,
        port=port,
        api_key=api_key,
        quantization=quant,
        backend=backend,
        max_batch=max_batch,
        think_end_token=think_end_token,
        log_requests=log_requests,
    )
    for note in server.plan.notes:
        typer.echo(f"not served: {note}", err=True)
    typer.echo(
        f"serving {', '.join(server.models)} at {server.url} (OpenAI API; stop with Ctrl-C or SIGTERM)", err=True
    )
    run_until_signalled(server, drain)


@app.command("list")
@friendly
def list_recipes() -> None:
    """The shipped recipes, one line each."""
    from tunelab.core.paths import shipped_recipes

    for name, path in shipped_recipes().items():
        typer.echo(f"{name:<28} {_first_comment(path)}")


def _first_comment(path: Path) -> str:
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


@app.command()
@friendly
def cp(
    name: Annotated[str, typer.Argument(help="Shipped recipe name (see `tunelab list`).")],
    dest: Annotated[Path, typer.Argument(help="File or folder to copy it to.")],
) -> None:
    """Copy a shipped recipe to edit it."""
    from tunelab.core.errors import TunelabError, check_path
    from tunelab.core.paths import shipped_recipes
    from tunelab.recipe import find_recipe

    if name.removesuffix(".yaml") not in shipped_recipes():
        find_recipe(name)  # raises with a "did you mean" when it names nothing
        raise TunelabError(  # a path to some other file: `cp` copies shipped recipes only (see `tunelab list`)
            f"'{name}' is not a shipped recipe: name one from `tunelab list` (copy your own files with cp)"
        )
    source = find_recipe(name)
    check_path(dest, "the destination")
    target = dest / source.name if dest.is_dir() else dest
    if target.exists():
        raise TunelabError(f"'{target}' exists: choose another destination")
    above = target.parent.absolute()
    while not above.exists() and above != above.parent:
        above = above.parent
    if not above.is_dir():
        raise TunelabError(f"cannot copy to '{target}': '{above}' is a file, not a folder; choose another destination")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
    except OSError as exc:
        raise TunelabError(
            f"cannot copy to '{target}': {exc.strerror or exc}; choose a destination you can write to"
        ) from None
    typer.echo(f"copied {name} to {target}; run it with: tunelab run {target}")


@app.command()
@friendly
def env() -> None:
    """Versions of the stack, the device, and whether the Hub is reachable."""
    from tunelab.core.hub import hub_reachable
    from tunelab.core.runs import device, versions

    for name, version in versions().items():
        typer.echo(f"{name:<14} {version}")
    dev = device()
    typer.echo(f"{'device':<14} {dev['type']} x{dev['count']} ({dev['name']})")
    typer.echo(f"{'hub':<14} {'reachable' if hub_reachable() else 'unreachable (offline: local models and data only)'}")


@app.command()
@friendly
def merge(
    adapter_dir: Annotated[Path, typer.Argument(help="Folder holding a LoRA adapter (adapter_config.json).")],
    out_dir: Annotated[Path, typer.Argument(help="Where to save the merged full model.")],
    base: Annotated[str | None, typer.Option(help="Base model, if not the one the adapter records.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace out_dir if it exists.")] = False,
) -> None:
    """Merge a LoRA adapter into its base model and save a full model."""
    from tunelab import merge as merge_adapter

    out = merge_adapter(adapter_dir, out_dir, base=base, overwrite=overwrite)
    typer.echo(f"merged model saved to {out} (load it with AutoModelForCausalLM.from_pretrained)")


@app.command("export")
@friendly
def export_command(
    model: Annotated[str, typer.Argument(help="Model, adapter, stage or run folder, hub id, or a .gguf file.")],
    out: Annotated[Path, typer.Argument(help="The .gguf file to write.")],
    type: Annotated[
        str, typer.Option("--type", help="f16, bf16, q8_0, q4_0, q4_1, q5_0 or q5_1 (norms stay float32).")
    ] = "f16",
    ollama: Annotated[bool, typer.Option("--ollama", help="Also write an Ollama Modelfile beside OUT.")] = False,
    system: Annotated[str | None, typer.Option(help="The Modelfile's SYSTEM prompt (with --ollama).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT, its Modelfile and OUT-eval.")] = False,
    eval_data: Annotated[
        str | None,
        typer.Option(
            "--eval", help="Score the source and the file on this dataset's test split (prompt/completion rows)."
        ),
    ] = None,
) -> None:
    """Write a model as one GGUF file (llama.cpp, Ollama, LM Studio) and check it by reading it back."""
    from tunelab import export
    from tunelab.exporting.exporter import summary

    result = export(model, out, type=type, overwrite=overwrite, ollama=ollama, system=system, eval_data=eval_data)
    for line in summary(result):
        typer.echo(line)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if not value.is_integer() else f"{int(value)}"
    return str(value)


def print_summary(result: Any) -> None:
    """A table of each stage's main metrics, eval comparisons, and where the files are (main process only)."""
    from tunelab.training.distributed import is_main

    if not is_main():
        return
    from rich.console import Console
    from rich.table import Table

    from tunelab.stages import metrics_of

    console = Console()
    table = Table(title=f"run {result.status}: {result.run_dir}", title_justify="left")
    for col in ("stage", "time", "metrics"):
        table.add_column(col)
    for stage, metrics in result.metrics.items():
        seconds = result.seconds.get(stage, 0.0)
        when = "skipped" if stage in result.skipped else f"{seconds:.0f}s"
        keys = metrics_of(result.kinds.get(stage)).summary  # what the stage declares as its main numbers
        flat = {k: metrics[k] for k in keys if k in metrics}
        text = "  ".join(f"{k} {_fmt(v)}" for k, v in flat.items())
        table.add_row(stage, when, text)
    console.print(table)
    for stage, metrics in result.metrics.items():
        nested = {k: v for k, v in metrics.items() if isinstance(v, dict)}
        if not nested:
            continue
        names = sorted({m for v in nested.values() for m in v if m != "examples"})
        cmp = Table(title=f"{stage}: " + ", ".join(names), title_justify="left")
        cmp.add_column("model")
        for name in names:
            cmp.add_column(name, justify="right")
        counted = any("examples" in v for v in nested.values())
        if counted:
            cmp.add_column("examples", justify="right")
        for label, values in nested.items():
            count = [_fmt(values.get("examples", ""))] if counted else []
            cmp.add_row(label, *[_fmt(values.get(n, "")) for n in names], *count)
        console.print(cmp)
    for stage, path in result.outputs.items():
        console.print(f"  {stage}: {path}")
    console.print(f"files: {result.run_dir} (recipe.yaml, run.json, metrics.json)")


def main() -> None:
    plain_progress()
    app()


def plain_progress() -> None:
    """Off a terminal (CI, nohup, a Slurm log), progress bars are floods of carriage returns: turn them off.

    Training then prints one line per logging step instead (`training.training_args` reads TQDM_DISABLE).
    Only the CLI decides this: a notebook's stderr is not a terminal either, and bars work there.
    """
    import os

    if sys.stderr.isatty():
        return
    for name in ("TQDM_DISABLE", "HF_DATASETS_DISABLE_PROGRESS_BARS", "HF_HUB_DISABLE_PROGRESS_BARS"):
        os.environ.setdefault(name, "1")


if __name__ == "__main__":
    sys.exit(main())
