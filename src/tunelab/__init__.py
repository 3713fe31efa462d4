"""tunelab: fine-tune and evaluate foundation models from YAML recipes.

Python API (the CLI calls the same functions)::

    from tunelab import load_recipe, validate, run

    recipe = load_recipe("quickstart", ["training.max_steps=20"])
    validate(recipe)               # raises TunelabError with one line on bad input
    result = run(recipe)           # RunResult: run_dir, metrics, outputs
    print(result.metrics["eval"])

Heavy libraries (torch, transformers, TRL) load only when a run needs them.

tunelab logs what it does (stage starts, per-step training lines, warnings) to the `tunelab` logger and
configures no handler but a NullHandler: your logging setup decides what shows. To see the lines the CLI
prints: `logging.basicConfig(level=logging.INFO)`, or a handler on `logging.getLogger("tunelab")`.
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

from tunelab.core.errors import TunelabError
from tunelab.recipe import Recipe, load_recipe, recipe_from_dict

# A library's logger: silent unless the application configures logging (the CLI does, in tunelab.cli.app).
logging.getLogger(__name__).addHandler(logging.NullHandler())

__version__ = "0.1.0"
__all__ = [
    "Recipe",
    "RunResult",
    "TunelabError",
    "chat",
    "data_preview",
    "export",
    "generate",
    "load_recipe",
    "merge",
    "recipe_from_dict",
    "run",
    "serve",
    "slurm",
    "validate",
]

if TYPE_CHECKING:
    from pathlib import Path

    from tunelab.data.preview import DataView
    from tunelab.exporting import ExportResult
    from tunelab.pipeline import RunResult
    from tunelab.serving.service import Server
    from tunelab.training.slurm import SlurmJob


def validate(
    recipe: Recipe | str | os.PathLike,
    overwrite: bool = False,
    resume: bool = False,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    from_stage: str | None = None,
) -> str:
    """Check a recipe (a Recipe, a path or a shipped name) without training, as `tunelab validate` does.

    Returns 'new', 'resume' or 'overwrite' (the output folder's fate); raises TunelabError with one line.
    """
    from tunelab.pipeline import check

    _flags(overwrite=overwrite, resume=resume)
    _optional_text(from_stage, "from_stage", "the name of a stage of the recipe")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise TunelabError("overrides apply to a recipe being loaded: pass a path or a name, or edit the Recipe")
    return check(recipe, overwrite=overwrite, resume=resume, from_stage=from_stage)


def _flags(**flags: Any) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise TunelabError(f"{name} must be True or False, not {value!r}; pass overrides=[...] by name")


# The API's arguments are checked here, in one line each: a wrong type would otherwise reach pathlib or a
# tokenizer and fail with their words (or, for a string where a list goes, be read one character at a time).


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{text if len(text) <= 60 else text[:57] + '...'} ({type(value).__name__})"


def _optional_text(value: Any, name: str, what: str) -> None:
    if value is not None and not isinstance(value, str):
        raise TunelabError(f"{name} must be {what} (a string) or None, not {_shown(value)}")


def _prompt(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise TunelabError(f"{name} must be a string (the text for the model to answer), not {_shown(value)}")
    if not value.strip():
        raise TunelabError(f"{name} is empty: give the text for the model to answer")
    return value


def _path(value: Any, name: str, what: str) -> str:
    """A str or os.PathLike argument, as a string the rest of tunelab takes."""
    from tunelab.core.errors import check_path

    if not isinstance(value, (str, os.PathLike)):
        raise TunelabError(f"{name} must be {what} (a string or a Path), not {_shown(value)}")
    text = os.fspath(value)
    if not isinstance(text, str) or not text.strip():
        raise TunelabError(f"{name} is empty: give {what}")
    check_path(text, name)
    return text


def _model(value: Any) -> str | dict:
    """A model reference: a path or hub id, or a mapping of from_pretrained arguments with `path:`."""
    if isinstance(value, dict):
        return value  # checked by tunelab.models.spec.model_spec, as a recipe's `model:` mapping is
    return _path(value, "model", "a model folder, an adapter or stage folder, a hub id or a .gguf file")


def _history(value: Any) -> list:
    if value is None:
        return []
    ok = isinstance(value, list) and all(
        isinstance(t, dict) and isinstance(t.get("role"), str) and isinstance(t.get("content"), str) for t in value
    )
    if not ok:
        raise TunelabError(
            f"history must be a list of {{'role': ..., 'content': ...}} turns (strings), not {_shown(value)}"
        )
    return value


def run(
    recipe: Recipe | str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    overwrite: bool = False,
    resume: bool = False,
    from_stage: str | None = None,
) -> RunResult:
    """Run a recipe (a Recipe, a path or a shipped name) and return its metrics and outputs.

    `from_stage` reruns that stage and the ones after it in an existing run (`tunelab run --from`).
    """
    from tunelab.pipeline import run as _run

    _flags(overwrite=overwrite, resume=resume)
    _optional_text(from_stage, "from_stage", "the name of a stage of the recipe")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    return _run(recipe, overwrite=overwrite, resume=resume, from_stage=from_stage)


def data_preview(
    recipe: Recipe | str | os.PathLike,
    stage: str | None = None,
    rows: int = 3,
    *,
    overrides: list[str] | tuple[str, ...] = (),
) -> DataView:
    """A training stage's data as its trainer will see it, as `tunelab data` prints it; no model weights load.

    `stage`: a stage name (default: the recipe's first training stage); `rows`: how many rows to tokenize for
    display. Returns a `tunelab.data.preview.DataView`: its `sources` (format detected, rows), `tokens`
    (lengths, truncation, rows with no trained token, the rows with their loss mask), `contamination`
    (held-out rows found in the training data); `summary_lines()`, `as_dict()` and `to_html()` render it.
    """
    from tunelab.pipeline import data_views, training_stages

    _optional_text(stage, "stage", "the name of a training stage of the recipe")
    if not isinstance(rows, int) or isinstance(rows, bool) or rows < 0:
        raise TunelabError(f"rows must be a whole number of rows to show (0 or more), not {_shown(rows)}")
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe, overrides)
    elif overrides:
        raise TunelabError("overrides apply to a recipe being loaded: pass a path or a name, or edit the Recipe")
    if stage is None:
        trained = training_stages(recipe)
        if not trained:
            raise TunelabError(
                f"the recipe has no training stage (its stages: {', '.join(recipe.stages)}): `tunelab data` shows "
                "the data a trainer reads"
            )
        stage = trained[0]
    return data_views(recipe, [stage], rows)[0]


def merge(adapter_dir: str | Path, out_dir: str | Path, base: str | None = None, overwrite: bool = False) -> Path:
    """Merge a LoRA adapter into its base model; saves a full model with its tokenizer."""
    from tunelab.core.hub import configure_offline
    from tunelab.core.progress import quiet
    from tunelab.models.merge import merge as _merge

    adapter_dir = _path(adapter_dir, "adapter_dir", "the folder of a LoRA adapter")
    out_dir = _path(out_dir, "out_dir", "the folder to save the merged model in")
    if base is not None:
        base = _path(base, "base", "the base model (a folder or a hub id)")
    _flags(overwrite=overwrite)
    configure_offline()
    with quiet():  # the caller's warning filters and log levels are theirs again after
        return _merge(adapter_dir, out_dir, base=base, overwrite=overwrite)


def export(
    model: str | os.PathLike | dict,
    out: str | os.PathLike,
    type: str = "f16",
    overwrite: bool = False,
    ollama: bool = False,
    system: str | None = None,
    eval_data: str | dict | None = None,
) -> ExportResult:
    """Write a model (folder, adapter, stage or run folder, hub id, .gguf) as one GGUF file for llama.cpp and
    Ollama, then read it back through transformers and compare logits (`ExportResult.figures`).

    `type` is f16, bf16, q8_0, q4_0, q4_1, q5_0 or q5_1; `ollama` also writes a Modelfile beside it, with
    `system` as its SYSTEM line. `eval_data` (a dataset of prompt/completion rows: a folder, file or hub id,
    split `test`; or `load_dataset` arguments) scores the source and the file side by side on it, with the eval
    stage's defaults, in the run folder `OUT-eval` beside OUT (`ExportResult.scores`): what the quantization
    cost on your own task. For other settings, write an eval stage with the file as one of its `models:`.
    """
    from tunelab.core.hub import configure_offline
    from tunelab.core.progress import quiet
    from tunelab.exporting import export_model

    model = _model(model)
    out = _path(out, "out", "the .gguf file to write")
    if not isinstance(type, str):
        raise TunelabError(f"type must be a GGUF type name (f16, q8_0, ...), not {_shown(type)}")
    _flags(overwrite=overwrite, ollama=ollama)
    _optional_text(system, "system", "the Modelfile's system prompt")
    configure_offline()
    scoring = None
    if eval_data is not None:  # checked before anything is written: a bad dataset costs no export
        scoring = _export_eval(model, out, eval_data)
        validate(recipe_from_dict(scoring), overwrite=overwrite)
    with quiet():  # the caller's warning filters and log levels are theirs again after
        result = export_model(model, out, type, overwrite=overwrite, ollama=ollama, system=system)
    if scoring is not None:
        scoring["stages"]["eval"]["models"][result.type] = str(result.path)
        result.scores = run(recipe_from_dict(scoring), overwrite=overwrite).metrics["eval"]
    return result


def _export_eval(model: Any, out: str, data: Any) -> dict[str, Any]:
    """The eval run that scores an export against its source: models {source, TYPE}, held-out rows of `data`."""
    from pathlib import Path

    if not isinstance(data, (str, dict)) or not data:
        raise TunelabError(
            f"eval_data must name a dataset (a folder, file or hub id) or be its arguments, not {_shown(data)}"
        )
    rows = {"path": data, "split": "test"} if isinstance(data, str) else dict(data)
    folder = Path(out).with_name(Path(out).stem + "-eval")
    return {"output_dir": str(folder), "stages": {"eval": {"stage": "eval", "models": {"source": model}, "data": rows}}}


def chat(
    model: str | os.PathLike | dict,
    prompt: str,
    system: str | None = None,
    history: list | None = None,
    **generation: Any,
) -> str:
    """One reply from a model (folder, adapter, stage folder, hub id, .gguf) through its chat template."""
    from tunelab.models.chat import chat as _chat

    model = _model(model)
    _prompt(prompt, "prompt")
    _optional_text(system, "system", "the system prompt")
    return _chat(model, prompt, system=system, history=_history(history), **generation)


def generate(
    model: str | os.PathLike | dict,
    prompts: list[str] | str,
    batch_size: int = 16,
    system: str | None = None,
    **generation: Any,
) -> list[str] | str:
    """Replies to many prompts, batched (left padding, sorted by length), through the chat template.

    A single string is one prompt, and its reply comes back as a string (a string is not a list of
    one-character prompts).
    """
    from tunelab.models.chat import generate as _generate

    model = _model(model)
    if isinstance(prompts, str):
        return generate(model, [prompts], batch_size, system, **generation)[0]
    if not isinstance(prompts, (list, tuple)):
        raise TunelabError(f"prompts must be a list of strings (or one string), not {_shown(prompts)}")
    for i, prompt in enumerate(prompts):
        _prompt(prompt, f"prompts[{i}]")
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise TunelabError(f"batch_size must be a positive integer, not {_shown(batch_size)}")
    _optional_text(system, "system", "the system prompt")
    if not prompts:
        return []
    return _generate(model, list(prompts), batch_size=batch_size, system=system, **generation)


def serve(
    model: str | os.PathLike,
    adapters: dict[str, str | os.PathLike] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    quantization: dict[str, Any] | None = None,
    backend: str = "transformers",
    **options: Any,
) -> Server:
    """Serve a model with OpenAI's API on background threads, as `tunelab serve` does; returns the running server.

    `adapters` maps names to LoRA adapter folders over the same base; `port=0` takes a free port. The server's
    `url` is the OpenAI base URL and `models` the names to give as `model`::

        with tunelab.serve("runs/quickstart") as server:
            client = openai.OpenAI(base_url=server.url, api_key="none")

    `options`: max_batch, think_end_token, max_body, read_timeout, log_requests. `close()` (or leaving the
    `with` block) finishes the requests in flight, then stops.
    """
    from tunelab.serving.service import start

    model = _path(model, "model", "a model folder, an adapter, stage or run folder, a hub id or a .gguf file")
    if adapters is not None and not isinstance(adapters, dict):
        raise TunelabError(f"adapters must be a dict of {{name: adapter folder}}, not {_shown(adapters)}")
    named = {str(k): _path(v, f"adapters[{k!r}]", "an adapter folder") for k, v in (adapters or {}).items()}
    _optional_text(api_key, "api_key", "the key clients must send")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise TunelabError(f"port must be a whole number from 0 (any free port) to 65535, not {_shown(port)}")
    return start(
        model, named, host=host, port=port, api_key=api_key, quantization=quantization, backend=backend, **options
    )


def slurm(
    recipe: str | os.PathLike,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    overwrite: bool = False,
    resume: bool = False,
    from_stage: str | None = None,
    submit: bool = False,
    dry_run: bool = False,
    **options: Any,
) -> SlurmJob:
    """An sbatch script that runs the recipe on a Slurm cluster, as `tunelab launch --slurm` writes it.

    The recipe is checked first (as `validate` does, for the job's process count), then the time limit,
    the partition's size and, with `submit`, that sbatch is there. Returns `SlurmJob(script, path, log,
    job_id)`: `dry_run` writes nothing (`path` is None); `submit` also runs sbatch (`job_id`).

    `options` (`tunelab.training.slurm.SlurmOptions`): nodes, gpus_per_node, processes_per_node,
    cpus_per_node, time, partition, account, job_name, output, sbatch (a list of extra sbatch options),
    requeue, signal ('B:TERM@120'), ifname, config_file, mixed_precision, script (where to write it).
    The run folder must be on storage every node sees.
    """
    import dataclasses
    from pathlib import Path

    from tunelab.core.errors import closest
    from tunelab.pipeline import check_with_plans
    from tunelab.training import slurm as slurm_jobs

    _flags(overwrite=overwrite, resume=resume, submit=submit, dry_run=dry_run)
    _optional_text(from_stage, "from_stage", "the name of a stage of the recipe")
    known = {f.name for f in dataclasses.fields(slurm_jobs.SlurmOptions)}
    for key in options:
        if key not in known:
            guess = closest(key, known)
            hint = f"did you mean '{guess}'?" if guess else f"options: {', '.join(sorted(known))}"
            raise TunelabError(f"slurm() has no option '{key}'; {hint}")
    opts = slurm_jobs.SlurmOptions(**{k: v for k, v in options.items() if v is not None})  # None: the default
    opts.sbatch = [opts.sbatch] if isinstance(opts.sbatch, str) else list(opts.sbatch)
    slurm_jobs.check_options(opts)
    name = _path(recipe, "recipe", "a recipe file or the name of a shipped recipe")
    overrides = list(overrides)
    parsed = load_recipe(name, overrides)
    processes = opts.nodes * slurm_jobs.per_node(opts)
    _, plans = check_with_plans(parsed, overwrite=overwrite, resume=resume, from_stage=from_stage, processes=processes)
    slurm_jobs.check_time(opts, plans)
    slurm_jobs.check_nodes(opts)
    if submit:
        slurm_jobs.sbatch_path()
    run_dir = parsed.output_dir.resolve()
    script, log = slurm_jobs.default_paths(run_dir)
    script = Path(opts.script).resolve() if opts.script else script
    log = str(Path(opts.output).resolve()) if opts.output else log
    arg = str(Path(name).resolve()) if Path(name).exists() else name  # a shipped recipe's name stays a name
    flags = ["--overwrite"] * overwrite + ["--resume"] * resume + (["--from", from_stage] if from_stage else [])
    name_of = str(parsed.data.get("name") or run_dir.name)
    text = slurm_jobs.render(arg, overrides, flags, run_dir, name_of, opts, log, script)
    if dry_run:
        return slurm_jobs.SlurmJob(text, None, log)
    slurm_jobs.write(script, text)
    job = slurm_jobs.SlurmJob(text, script, log)
    if submit:
        job.job_id = slurm_jobs.submit(script)
    return job


def __getattr__(name: str) -> Any:
    if name == "RunResult":
        from tunelab.pipeline import RunResult

        return RunResult
    raise AttributeError(name)
