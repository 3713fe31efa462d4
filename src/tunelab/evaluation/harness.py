"""EleutherAI's lm-evaluation-harness as a component: its tasks, its arguments, its results.

The `lm_eval` stage and `tunelab eval --tasks` are thin over `lm_eval.simple_evaluate`: a recipe
section holds that function's own keyword arguments (checked against its signature), `model_args`
holds `HFLM`'s (the harness's Hugging Face model class), and the model itself is loaded by tunelab
(any source a stage takes: a folder, an adapter over its base, a GGUF file, 4/8-bit) and handed to
`HFLM` as an object, so the harness scores exactly what tunelab trained.

tunelab ships harness task YAMLs over its bundled data in `recipes/harness/` (`dataset_path: json`,
paths relative to the repository root). A run writes a copy of each with absolute data paths into
its folder (`tasks/`), so the harness itself can rerun them from anywhere:
``lm_eval --model hf --model_args pretrained=FOLDER --include_path RUN/STAGE/tasks --tasks ...``.
"""

from __future__ import annotations

import importlib.util
import inspect
from pathlib import Path
from typing import Any

from tunelab.core.config import check_keys
from tunelab.core.errors import TunelabError, closest
from tunelab.core.hub import bundled_root, hub_reachable, local_path
from tunelab.core.paths import recipes_root, refuse_special
from tunelab.core.runs import write_atomic

INSTALL = "pip install 'tunelab[harness]' (lm-eval)"
# simple_evaluate arguments tunelab sets itself: the model (loaded and placed by tunelab), the task
# registry (built from include_path), its own logging.
OWNED = ("model", "model_args", "device", "task_manager", "evaluation_tracker", "verbosity")
# HFLM arguments about loading the model, which tunelab does (`model:` takes from_pretrained's
# arguments, `quantization:` the bits): given an object, HFLM ignores or refuses them.
LOADING = (
    "pretrained",
    "revision",
    "subfolder",
    "tokenizer",
    "dtype",
    "device",
    "batch_size",
    "max_batch_size",
    "parallelize",
    "max_memory_per_gpu",
    "max_cpu_memory",
    "offload_folder",
    "tp_plan",
    "peft",
    "delta",
    "autogptq",
    "gptqmodel",
    "gguf_file",
    "trust_remote_code",
    "use_fast_tokenizer",
)
# Builders whose data is local files: any other dataset_path is a Hub dataset.
LOCAL_BUILDERS = ("json", "csv", "parquet", "text", "arrow", "pandas", "imagefolder", "audiofolder", "webdataset")


def require() -> None:
    """The harness is an optional extra: one line that says which, before anything loads."""
    if importlib.util.find_spec("lm_eval") is None:
        raise TunelabError(f"the lm-evaluation-harness is not installed: {INSTALL}")


def bundled_tasks() -> Path:
    """`recipes/harness/`: the task YAMLs tunelab ships (inside the wheel or the repository)."""

    return recipes_root() / "harness"


def _as_class(function: Any) -> type:
    """A class whose __init__ is `function`, so config.check_keys can check arguments against it."""
    return type(function.__name__, (), {"__init__": function, "__module__": function.__module__})


def check_arguments(values: dict[str, Any], where: str) -> dict[str, Any]:
    """simple_evaluate's arguments, names and types checked; returned coerced."""
    import lm_eval

    out = check_keys(values, _as_class(lm_eval.simple_evaluate), where, exclude=OWNED)
    limit = out.get("limit")
    number = isinstance(limit, (int, float)) and not isinstance(limit, bool)
    if limit is not None and (not number or not (limit >= 1 or 0 < limit < 1)):
        raise TunelabError(f"'{where}.limit' is {limit!r}: give a count of examples (>= 1) or a fraction in (0, 1)")
    if isinstance(limit, float) and limit >= 1:
        if not limit.is_integer():
            raise TunelabError(f"'{where}.limit' is {limit!r}: a count of examples is a whole number")
        out["limit"] = int(limit)
    _check_batch(out.get("batch_size"), f"{where}.batch_size")
    if out.get("num_fewshot") is not None and out["num_fewshot"] < 0:
        raise TunelabError(f"'{where}.num_fewshot' is {out['num_fewshot']}: use 0 or more examples")
    if out.get("samples") is not None:
        _check_sample_lists(out["samples"], f"{where}.samples")
    if out.get("gen_kwargs") is not None:
        check_gen_kwargs(out["gen_kwargs"], f"{where}.gen_kwargs")
    return out


def _check_sample_lists(samples: Any, where: str) -> None:
    if not isinstance(samples, dict) or not samples:
        raise TunelabError(f"'{where}' is {samples!r}: give {{task: [example indices]}}, e.g. {{my_task: [0, 1]}}")
    for task, indices in samples.items():
        ok = isinstance(indices, list) and indices
        if not ok or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in indices):
            raise TunelabError(
                f"'{where}.{task}' is {indices!r}"[:200] + ": give a list of example indices (whole numbers from 0)"
            )


def check_samples(tasks: dict[str, Any], samples: dict[str, list[int]] | None, where: str) -> None:
    """`samples:` names loaded tasks, and its indices are inside each task's examples (the harness would
    fail with an IndexError once the model is loaded)."""
    if not samples:
        return
    flat: dict[str, Any] = {}
    todo = list(tasks.items())
    while todo:
        name, task = todo.pop()
        if isinstance(task, dict):  # a group: its tasks
            todo += list(task.items())
        else:
            flat[str(name)] = task
    for name, indices in samples.items():
        task = flat.get(name)
        if task is None:
            raise TunelabError(f"'{where}.{name}' is not one of the tasks run here ({', '.join(sorted(flat))})")
        try:
            count = len(task.eval_docs)
        except Exception:  # noqa: BLE001 - a task without a countable split: the harness checks it
            continue
        if max(indices) >= count:
            raise TunelabError(
                f"'{where}.{name}' asks for example {max(indices)}, but the task has {count} (0 to {count - 1})"
            )


def check_gen_kwargs(value: Any, where: str) -> None:
    """`gen_kwargs` (a mapping, or the harness's `key=value,...` string) as generate() will get them: the
    harness's own `max_gen_toks` and `until`, the rest GenerationConfig fields checked as in the eval stage."""
    from lm_eval.utils import simple_parse_args_string

    from tunelab.models.chat import COUNTS, generation_config

    if isinstance(value, str):
        try:
            value = simple_parse_args_string(value)
        except Exception:  # noqa: BLE001 - the harness's parser raises ValueError, IndexError, ...
            raise TunelabError(f"'{where}' is {value!r}: write key=value pairs, e.g. temperature=0.7") from None
    if not isinstance(value, dict):
        raise TunelabError(f"'{where}' is {value!r}: give generation settings, e.g. {{do_sample: true}}")
    rest = {k: v for k, v in value.items() if k not in ("max_gen_toks", "until")}
    # HFLM's own handling: temperature 0 without do_sample means greedy decoding (the temperature is dropped)
    if rest.get("temperature", 0.0) == 0.0 and rest.get("do_sample") in (None, False):
        rest.pop("temperature", None)
        rest["do_sample"] = False
    tokens = value.get("max_gen_toks")
    if tokens is not None:
        low, high = COUNTS["max_new_tokens"]
        if isinstance(tokens, bool) or not isinstance(tokens, int) or not low <= tokens <= high:
            raise TunelabError(f"'{where}.max_gen_toks' is {tokens!r}: use a whole number from {low} to {high}")
    generation_config(rest, where, defaults={}, strict=False)


def _check_batch(value: Any, where: str) -> None:
    if value is None:
        return
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise TunelabError(f"'{where}' is {value}: use a positive number or `auto`")
        return
    text = str(value)
    head, _, tail = text.partition(":")
    if head != "auto" or (tail and not tail.isdigit()):
        raise TunelabError(f"'{where}' is {value!r}: use a positive number, `auto`, or `auto:N` (recompute N times)")


def check_model_args(values: Any, where: str) -> dict[str, Any]:
    """`model_args`: HFLM's arguments that are not about loading (max_length, think_end_token, ...)."""
    from lm_eval.models.huggingface import HFLM

    if values is None:
        return {}
    if isinstance(values, dict):
        for key in values:
            if key in LOADING:
                raise TunelabError(
                    f"'{where}.{key}' is about loading the model, which tunelab does: set it in `model:` "
                    "(from_pretrained arguments; an adapter folder loads over its base) or `quantization:`"
                )
    return check_keys(values, HFLM, where, exclude=LOADING)


def task_names(value: Any, where: str) -> list[str]:
    """`tasks:` as a list of names (or YAML file paths): a string may list several, comma-separated."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise TunelabError(
            f"'{where}' must name harness tasks, e.g. [tunelab_arith_mc] or `tunelab_arith, mmlu`; got {value!r}"
        )
    return [v.strip() for v in value]


def include_paths(value: Any, where: str) -> list[Path]:
    """`include_path:` folders (or files) of the user's own task YAMLs, each parsed now."""

    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    paths = []
    for item in values:
        if not isinstance(item, str) or not item:
            raise TunelabError(f"'{where}' must be a folder of task YAMLs (or a list of them), got {item!r}")
        path = local_path(item)
        if path is None:
            raise TunelabError(f"'{where}' is '{item}': no such folder")
        refuse_special(path, f"'{where}'")
        for file in [path] if path.is_file() else sorted(path.rglob("*.yaml")):
            refuse_special(file, f"'{where}' holds")  # the harness reads every YAML under the folder
            parse_task_file(file, where)
        paths.append(path)
    return paths


def parse_task_file(path: Path, where: str) -> dict[str, Any]:
    """A task YAML read with the harness's own loader (`!function` tags and all); one line if it fails."""
    from lm_eval.tasks._yaml_loader import load_yaml

    try:
        config = load_yaml(path, resolve_func=False)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunelabError(f"'{where}': task file {path} does not parse: {first}") from None
    if not isinstance(config, dict):
        raise TunelabError(f"'{where}': task file {path} is not a mapping of task settings")
    return config


def materialize(folder: Path) -> Path:
    """Copy tunelab's task YAMLs into `folder` with absolute data paths: the harness runs them anywhere."""
    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    root = bundled_root()
    for source in sorted(bundled_tasks().glob("*.yaml")):
        text = source.read_text()
        config = yaml.safe_load(text)
        files = (config.get("dataset_kwargs") or {}).get("data_files")
        if isinstance(files, dict):
            for split, name in files.items():
                local = Path(name)
                files[split] = str(local if local.is_absolute() else _bundled(root, local))
            text = "# Written by tunelab from " + source.name + " with absolute data paths.\n"
            text += yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
        write_atomic(folder / source.name, text)
    return folder


def _bundled(root: Path, relative: Path) -> Path:

    found = local_path(str(relative))
    return found if found is not None else root / relative


def task_manager(names: list[str], include: list[Path], where: str, shipped: Path | None = None):
    """A TaskManager that knows `names`: tunelab's and the user's tasks only when that is enough (fast),
    else the harness's whole registry too (about 10 s: it indexes thousands of YAMLs)."""
    from lm_eval.tasks import TaskManager

    paths = [shipped or bundled_tasks(), *include]
    local = TaskManager(include_path=[str(p) for p in paths], include_defaults=False)
    missing = [n for n in names if n not in local.all_tasks and not _is_yaml_file(n)]
    if not missing:
        return local
    full = TaskManager(include_path=[str(p) for p in paths])
    for name in missing:
        if name not in full.all_tasks:
            guesses = _close_names(name, full.all_tasks)
            hint = f"did you mean {', '.join(guesses)}?" if guesses else "see `lm_eval ls tasks` for the task names"
            raise TunelabError(f"'{where}': '{name}' is not a harness task: {hint}")
    return full


def _is_yaml_file(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and Path(name).is_file()


def _close_names(name: str, names: list[str]) -> list[str]:
    import difflib

    guesses = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
    best = closest(name, names)
    return guesses or ([best] if best else [])


def load_tasks(manager: Any, names: list[str], where: str) -> dict[str, Any]:
    """The harness's Task objects for `names` (datasets read now); one line when a dataset is out of reach."""
    import logging

    offline = not hub_reachable()
    for leaf in _leaf_configs(manager, names):
        dataset = leaf.get("dataset_path")
        hub = isinstance(dataset, str) and dataset not in LOCAL_BUILDERS and not Path(dataset).exists()
        if offline and hub and not _dataset_cached(dataset):
            raise TunelabError(
                f"'{where}': task '{leaf.get('task')}' reads Hub dataset '{dataset}', which is not in the local "
                "cache and the Hub is unreachable: run once where the Hub is reachable, or use a local task"
            )
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        return manager.load(names)["tasks"]
    except TunelabError:
        raise
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TunelabError(f"'{where}': the harness could not load tasks {', '.join(names)}: {first}") from None
    finally:
        logger.setLevel(level)


def output_types(manager: Any, names: list[str]) -> dict[str, str]:
    """Each task's output type (generate_until, multiple_choice, loglikelihood, ...), from its YAML."""
    return {
        str(leaf.get("task")): str(leaf.get("output_type", "generate_until")) for leaf in _leaf_configs(manager, names)
    }


def _leaf_configs(manager: Any, names: list[str]) -> list[dict[str, Any]]:
    """The YAML settings of each task `names` reach (through groups and tags), without building them."""
    seen: set[str] = set()
    out: list[dict[str, Any]] = []
    todo = list(names)
    index = manager.task_index
    while todo:
        name = todo.pop()
        entry = index.get(name)
        if name in seen or entry is None:
            continue
        seen.add(name)
        kind = entry.kind.name
        if kind == "TAG":
            todo += sorted(entry.tags)
        elif kind == "GROUP":
            members = (entry.cfg or {}).get("task", [])
            todo += [m if isinstance(m, str) else m.get("task", "") for m in members if isinstance(m, (str, dict))]
        elif entry.cfg:
            out.append(entry.cfg)
    return out


def _dataset_cached(path: str) -> bool:
    """True when this Hub dataset is in the local caches (datasets' or the Hub's), so it loads offline."""
    import os

    home = Path(os.environ.get("HF_HOME", "~/.cache/huggingface")).expanduser()
    datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", home / "datasets")).expanduser()
    hub_cache = Path(os.environ.get("HF_HUB_CACHE", home / "hub")).expanduser()
    return (datasets_cache / path.replace("/", "___")).is_dir() or (
        hub_cache / f"datasets--{path.replace('/', '--')}"
    ).is_dir()


def flat_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The harness's scores as `task/metric` (`task/metric,filter` for a filter other than none).

    Only the metrics a task declares (its `higher_is_better` entries) count: not stderrs, not
    bookkeeping such as `sample_len`.
    """
    out: dict[str, float] = {}
    declared = results.get("higher_is_better", {})
    for task, values in results.get("results", {}).items():
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if metric not in declared.get(task, {}) or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            out[f"{task}/{metric}" + (f",{filt}" if filt and filt != "none" else "")] = float(value)
    return out


def direct_command(model_path: str, adapter: str | None, names: list[str], tasks_dir: Path, args: dict) -> str:
    """The `lm_eval` command that scores the same model on the same tasks without tunelab."""
    model_args = f"pretrained={model_path}" + (f",peft={adapter}" if adapter else "")
    parts = ["lm_eval", "--model", "hf", "--model_args", model_args, "--tasks", ",".join(names)]
    parts += ["--include_path", str(tasks_dir)]
    for key, flag in (("num_fewshot", "--num_fewshot"), ("limit", "--limit"), ("batch_size", "--batch_size")):
        if args.get(key) is not None:
            parts += [flag, str(args[key])]
    if args.get("apply_chat_template"):
        parts.append("--apply_chat_template")
    return " ".join(parts)


def signature_names() -> list[str]:
    """simple_evaluate's parameter names (for the stage's documentation and its conformance test)."""
    import lm_eval

    return list(inspect.signature(lm_eval.simple_evaluate).parameters)
