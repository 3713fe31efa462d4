"""Score models on lm-evaluation-harness tasks: the field's benchmarks, through the tool people trust.

The stage's keys are `lm_eval.simple_evaluate`'s own arguments (`tasks`, `num_fewshot`,
`batch_size`, `limit`, `apply_chat_template`, `system_instruction`, `gen_kwargs`, ...), checked
against its signature, plus what tunelab adds: `model:` or `models: {label: model}` (any source a
stage takes: a folder, an earlier stage, an adapter over its base, a GGUF file, a hub id),
`quantization:` (4/8-bit, as everywhere), `model_args:` (HFLM's own arguments: max_length,
add_bos_token, ...), `include_path:` (folders of your own task YAMLs) and `think_end_token:`
(the answer is what follows the model's reasoning).

tunelab loads each model and hands it to the harness's `HFLM` as an object, so the scores are the
harness's own. tunelab's bundled tasks (`tunelab_arith`, `tunelab_arith_fewshot`,
`tunelab_arith_cot`, `tunelab_arith_mc`; tag `tunelab`) run offline; any other task runs where
its dataset is reachable or cached. Each model's results go to `metrics.json` as `task/metric`
(side by side for several models), the harness's full results to `harness-LABEL.json` with the
`lm_eval` command that reproduces them, and every scored example to `samples-LABEL.jsonl`.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.core.runs import write_atomic
from tunelab.evaluation.endpoints import Endpoint, check_endpoint, endpoint_spec
from tunelab.evaluation.harness import (
    check_arguments,
    check_model_args,
    check_samples,
    direct_command,
    flat_metrics,
    include_paths,
    load_tasks,
    materialize,
    output_types,
    require,
    task_manager,
    task_names,
)
from tunelab.models.loading import load_causal_lm
from tunelab.models.plan import plan_generation
from tunelab.models.preflight import check_language_model
from tunelab.models.quant import check_cpu_shapes, quant_config
from tunelab.models.spec import adapter_base, is_adapter, model_config
from tunelab.models.tokenizers import check_tokenizer, load_tokenizer
from tunelab.stages import Context, StageSpec
from tunelab.stages.scoring import Entry, ModelsStage, Scored, entries

log = logging.getLogger(__name__)

OWN = {
    "model": "model to score: hub id, folder, adapter folder (loaded over its base), GGUF, or ${stage}",
    "models": "several models to compare, as {label: model}",
    "quantization": "transformers.BitsAndBytesConfig fields: score the model loaded in 4 or 8 bits",
    "include_path": "folder (or list) of your own harness task YAMLs",
    "model_args": "HFLM arguments (max_length, add_bos_token, truncation, softmax_dtype, enable_thinking, ...)",
    "think_end_token": "end-of-reasoning marker (e.g. </think>): answers are scored on what follows it",
}
# lm_eval.simple_evaluate's keyword arguments (a test keeps this list equal to its signature).
HARNESS = {
    "tasks": "harness task names (or YAML files): [tunelab_arith_mc], `mmlu`, a group or a tag",
    "num_fewshot": "examples shown before each question (default: the task's own)",
    "batch_size": "examples scored together: a number, `auto` or `auto:N` (default 16)",
    "max_batch_size": "the largest batch `auto` tries",
    "use_cache": "a sqlite file that caches model answers between runs",
    "cache_requests": "cache the built requests (inputs)",
    "rewrite_requests_cache": "rebuild the requests cache",
    "delete_requests_cache": "delete the requests cache first",
    "limit": "examples per task: a count, or a fraction (< 1) of the task",
    "samples": "which examples of each task, as {task: [indices]} (instead of limit)",
    "bootstrap_iters": "bootstrap resamples for standard errors (0: none)",
    "check_integrity": "run the tasks' own tests first",
    "write_out": "print an example prompt of each task",
    "log_samples": "keep each example's prompt, answer and score (default true; written to samples-LABEL.jsonl)",
    "system_instruction": "system prompt (with apply_chat_template)",
    "apply_chat_template": "prompt through the model's chat template (true, or a template name)",
    "fewshot_as_multiturn": "few-shot examples as earlier chat turns (with apply_chat_template)",
    "gen_kwargs": "generation settings for generate_until tasks (do_sample, temperature, max_gen_toks, ...)",
    "predict_only": "generate answers without scoring them",
    "random_seed": "Python's random seed",
    "numpy_random_seed": "numpy's seed",
    "torch_random_seed": "torch's seed",
    "fewshot_random_seed": "seed of the few-shot sampler",
    "confirm_run_unsafe_code": "allow tasks that execute model-written code",
    "metadata": "extra settings passed to the tasks",
}
SECTIONS = {**OWN, **HARNESS}
DEFAULT_BATCH = 16  # the harness's own default is 1: slow on every device
PROMPT_TOKENS = 1024  # planning assumption: a few-shot prompt and its answer


def _on_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _manager(spec: StageSpec, names: list[str], shipped=None):

    include = include_paths(spec.cfg.get("include_path"), f"{spec.where}.include_path")
    return task_manager(names, include, f"{spec.where}.tasks", shipped)


def _evaluate(model: Any, tokenizer: Any, names, manager, args, model_args) -> dict[str, Any]:
    """One model through `simple_evaluate`, handed to HFLM as an object (tunelab loaded it)."""

    import lm_eval
    from lm_eval.models.huggingface import HFLM

    args = dict(args)
    logger = logging.getLogger("lm_eval")
    level = logger.level
    # The harness warns that an object was passed as `pretrained` (tunelab's way) and logs each
    # request's setup at INFO: errors only.
    logger.setLevel(logging.ERROR)
    try:
        lm = HFLM(
            pretrained=model,
            tokenizer=tokenizer,
            batch_size=args.pop("batch_size"),
            max_batch_size=args.pop("max_batch_size", None) or 64,
            **model_args,
        )
        return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, **args)
    finally:
        logger.setLevel(level)


def _evaluate_endpoint(endpoint: Endpoint, names, manager, args, model_args, seed: int) -> dict[str, Any]:
    """One served model through the harness's `local-chat-completions` model (requests sent concurrently)."""
    import logging

    import lm_eval
    from lm_eval.models.openai_completions import LocalChatCompletion

    args = {**args, "apply_chat_template": True}  # chat completions take messages; the server renders them
    concurrent = args.pop("batch_size")
    args.pop("max_batch_size", None)
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        lm = LocalChatCompletion(
            base_url=f"{endpoint.base_url}/chat/completions",
            model=endpoint.model,
            num_concurrent=concurrent if isinstance(concurrent, int) else DEFAULT_BATCH,
            max_retries=1,
            seed=seed,
            header={"Authorization": f"Bearer {endpoint.api_key or os.environ.get('OPENAI_API_KEY', 'none')}"},
            think_end_token=model_args.get("think_end_token"),
        )
        return lm_eval.simple_evaluate(model=lm, tasks=names, task_manager=manager, **args)
    finally:
        logger.setLevel(level)


def _endpoint_command(endpoint: Endpoint, names: list[str], tasks_dir, args: dict[str, Any]) -> str:
    """The harness command that scores the same served model without tunelab."""
    include = f" --include_path {tasks_dir}" if tasks_dir else ""
    return (
        f"lm_eval --model local-chat-completions --model_args model={endpoint.model},"
        f"base_url={endpoint.base_url}/chat/completions --tasks {','.join(names)} --apply_chat_template{include}"
    )


def _command(mspec: dict[str, Any], names: list[str], tasks_dir, args: dict[str, Any]) -> str:
    """The harness command that scores the same model without tunelab (adapters through `peft=`)."""

    path = mspec["path"]
    if not is_adapter(path):
        return direct_command(path, None, names, tasks_dir, args)
    base = adapter_base(path)
    if is_adapter(base):
        return "tunelab merge " + path + " MERGED, then " + direct_command("MERGED", None, names, tasks_dir, args)
    return direct_command(base, path, names, tasks_dir, args)


def _fingerprint(folders: list, names: list[str]) -> str:
    """The tasks' definitions (tunelab's and the user's YAMLs): `--resume` reruns the stage when they change."""
    import hashlib

    digest = hashlib.sha256(",".join(names).encode())
    for folder in folders:
        for path in sorted([folder] if folder.is_file() else folder.rglob("*.yaml")):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def _print_table(label: str, values: dict[str, Any]) -> None:
    shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if "/" in k)
    log.info(f"   {label}: {shown} ({values['examples']} examples, {values['examples_per_second']:.3g}/s)")


@dataclass(frozen=True)
class HarnessSettings:
    names: list[str]
    """Task names (or YAML files) as the harness reads them."""
    args: dict[str, Any]
    """`simple_evaluate`'s keyword arguments."""
    model_args: dict[str, Any]
    """HFLM's keyword arguments."""
    quantization: Any


@dataclass
class Tasks:
    manager: Any
    folder: Path
    """The bundled tasks as run writes them (absolute data paths), in the stage folder."""


class LmEval(ModelsStage):
    """Score models on lm-evaluation-harness tasks: the field's benchmarks, through the tool people trust."""

    title = "harness tasks"
    endpoints = True  # generate_until tasks through the harness's own `local-chat-completions` model
    sections = SECTIONS

    def settings(self, spec: StageSpec, ctx: Context) -> HarnessSettings:
        """(task names, simple_evaluate arguments, HFLM arguments), checked; one line for the first problem."""
        require()
        if "tasks" not in spec.cfg:
            raise TunelabError(f"'{spec.where}' has no `tasks:`: name harness tasks, e.g. [tunelab_arith_mc]")
        names = task_names(spec.cfg["tasks"], f"{spec.where}.tasks")
        args = check_arguments({k: v for k, v in spec.cfg.items() if k in HARNESS and k != "tasks"}, spec.where)
        if args.get("limit") is not None and args.get("samples") is not None:
            raise TunelabError(f"'{spec.where}' sets both `limit` and `samples`: keep one")
        model_args = check_model_args(spec.cfg.get("model_args"), f"{spec.where}.model_args")
        think = spec.cfg.get("think_end_token")
        if think is not None:
            if not isinstance(think, (str, int)) or isinstance(think, bool) or think == "":
                raise TunelabError(f"'{spec.where}.think_end_token' must be a token (e.g. </think>) or its id")
            if "think_end_token" in model_args:
                raise TunelabError(f"'{spec.where}' sets think_end_token twice (also in model_args): keep one")
            model_args["think_end_token"] = think
        args.setdefault("batch_size", DEFAULT_BATCH)
        if str(args["batch_size"]).startswith("auto") and not _on_gpu():
            raise TunelabError(
                f"'{spec.where}.batch_size' is {args['batch_size']!r}, which searches for the largest batch that fits "
                "GPU memory by running out of it; on CPU give a number (e.g. 16)"
            )
        quant = quant_config(spec.cfg.get("quantization"), f"{spec.where}.quantization")
        return HarnessSettings(names, args, model_args, quant)

    def data(self, spec: StageSpec, ctx: Context, s: HarnessSettings, running: bool) -> Tasks | None:
        """The tasks, read as the harness reads them (each task's data too)."""
        if running:
            folder = materialize(spec.out_dir / "tasks")
            manager = _manager(spec, s.names, shipped=folder)
            load_tasks(manager, s.names, f"{spec.where}.tasks")
            return Tasks(manager, folder)
        with tempfile.TemporaryDirectory() as tmp:
            manager = _manager(spec, s.names, shipped=materialize(Path(tmp)))
            tasks = load_tasks(manager, s.names, f"{spec.where}.tasks")
            check_samples(tasks, s.args.get("samples"), f"{spec.where}.samples")
            return Tasks(manager, Path(tmp))  # for the checks only: the folder is gone when they run

    def check_model(self, spec: StageSpec, ctx: Context, s: HarnessSettings, data: Tasks, entry: Entry) -> None:
        if entry.endpoint:
            self.check_endpoint(spec, s, data, entry)
            return
        check_language_model(entry.value, ctx, entry.where, "lm_eval scores")
        if not ctx.is_pending(entry.spec()["path"]):
            resolved = entry.resolved(ctx, materialize=False)
            path = resolved.get("gguf_file", resolved["path"])
            check_tokenizer(path, entry.where)
            if s.args.get("apply_chat_template") is True and not load_tokenizer(path).chat_template:
                raise TunelabError(
                    f"'{spec.where}.apply_chat_template' is true, but the tokenizer of '{entry.where}' has no chat "
                    "template: drop it for this model, or score a chat model"
                )
        config = model_config(entry.value, ctx, entry.where) if s.quantization is not None else None
        if config is not None:
            check_cpu_shapes(config, spec.cfg["quantization"], f"{spec.where}.quantization")

    def check_endpoint(self, spec: StageSpec, s: HarnessSettings, data: Tasks, entry: Entry) -> None:
        """A served model answers through chat completions: generated answers only, the server's template."""
        for key in ("quantization", "model_args"):
            if spec.cfg.get(key) is not None:
                raise TunelabError(
                    f"'{spec.where}.{key}' applies to models tunelab loads; '{entry.where}' is served: remove it"
                )
        if s.args.get("apply_chat_template") is False:
            raise TunelabError(
                f"'{spec.where}.apply_chat_template' is false, but '{entry.where}' is served over chat completions, "
                "which the server renders with its own template: drop it"
            )
        for task, kind in output_types(data.manager, s.names).items():
            if kind != "generate_until":
                raise TunelabError(
                    f"'{entry.where}' is served over chat completions, which return no log-likelihoods; task "
                    f"'{task}' is {kind}: score that task with the model itself (its folder, hub id or ${{stage}})"
                )
        check_endpoint(endpoint_spec(entry.value, entry.where), entry.where)

    def load(self, spec: StageSpec, ctx: Context, s: HarnessSettings, entry: Entry) -> Any:
        if entry.endpoint:
            return endpoint_spec(entry.value, entry.where)
        import torch

        mspec = entry.resolved(ctx)
        tokenizer = load_tokenizer(mspec["path"])
        model = load_causal_lm(mspec, quantization=s.quantization, merge_adapter=s.quantization is None).eval()
        if torch.cuda.is_available() and s.quantization is None and "device_map" not in mspec:
            model = model.to("cuda")
        return model, tokenizer, mspec

    def score(self, spec: StageSpec, ctx: Context, s: HarnessSettings, data: Tasks, entry: Entry, model) -> Scored:
        started = time.perf_counter()
        if isinstance(model, Endpoint):
            results = _evaluate_endpoint(model, s.names, data.manager, s.args, s.model_args, ctx.seed)
            mspec = {"path": f"{model.base_url} ({model.model})"}
        else:
            model, tokenizer, mspec = model
            results = _evaluate(model, tokenizer, s.names, data.manager, s.args, s.model_args)
        seconds = time.perf_counter() - started
        samples = results.pop("samples", None) or {}
        counted = sum(int(v.get("effective", 0)) for v in results.get("n-samples", {}).values())
        metrics = {**flat_metrics(results), "examples": counted, "examples_per_second": counted / seconds}
        command = _endpoint_command(model, s.names, data.folder, s.args) if isinstance(model, Endpoint) else None
        command = command or _command(mspec, s.names, data.folder, s.args)
        results["tunelab"] = {"model": mspec["path"], "command": command}
        path = spec.out_dir / f"harness-{entry.label}.json"
        write_atomic(path, json.dumps(results, indent=2, default=str) + "\n")
        files = {f"harness-{entry.label}": str(path)}
        if samples:
            rows = [json.dumps({"task": t, **row}, default=str) + "\n" for t, got in samples.items() for row in got]
            write_atomic(spec.out_dir / f"samples-{entry.label}.jsonl", "".join(rows))
            files[f"samples-{entry.label}"] = str(spec.out_dir / f"samples-{entry.label}.jsonl")
        _print_table(entry.label, metrics)
        return Scored(metrics, None, files)

    def fingerprints(self, spec: StageSpec, s: HarnessSettings, data: Tasks) -> dict[str, str]:
        folders = [data.folder, *include_paths(spec.cfg.get("include_path"), f"{spec.where}.include_path")]
        return {"tasks": _fingerprint(folders, s.names)}

    def held_out(self, spec: StageSpec, ctx: Context) -> list[tuple[str, Any]]:
        """Its documents come from the harness's tasks, which tunelab does not read: said, not compared."""
        return [(f"{spec.where}.tasks", None)]

    def plan(self, spec: StageSpec, ctx: Context) -> Any:
        """Memory plan of scoring with the largest of the models: a batch of PROMPT_TOKENS-token prompts, with
        every position's logits kept (log-likelihood tasks do), so `batch_size` is planned as it will be used.
        Planned from the sections as written: a plan must not need the harness installed."""
        batch = spec.cfg.get("batch_size", DEFAULT_BATCH)
        batch = (
            batch if isinstance(batch, int) and not isinstance(batch, bool) else spec.cfg.get("max_batch_size") or 64
        )
        plans = []
        for entry in entries(spec):
            if entry.endpoint:
                continue  # the server's memory is the server's
            config = model_config(entry.value, ctx, entry.where)
            if config is not None:
                quant = spec.cfg.get("quantization")
                dtype = entry.spec().get("dtype")
                plans.append(plan_generation(spec.name, config, batch, PROMPT_TOKENS, quant, dtype, PROMPT_TOKENS))
        return max(plans, key=lambda p: p.total) if plans else None
