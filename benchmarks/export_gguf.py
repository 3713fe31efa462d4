"""GGUF export of the fine-tuned SmolLM2-135M-Instruct: time, size, logits agreement and eval score per type,
and llama.cpp's generation speed against transformers' on the same CPU.

The model is the real track's LoRA SFT (`recipes/real/smollm2-arith.yaml`, stage `sft`, as shipped): taken
from runs/real/smollm2-arith/sft when `make real` left it there, else trained here first. Each type is
exported with `tunelab.export` (the adapter merged first, every file read back by transformers), then every
file is scored next to the source on the track's held-out questions by one eval stage. llama.cpp runs from
.venv-llamacpp (`make llamacpp`), skipped when it is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, update_doc  # noqa: E402

TITLE = "## GGUF export: SmolLM2-135M-Instruct after SFT (CPU)"
HELD_OUT = {"path": "recipes/data/arith_chat", "split": "test[:100]"}
NEW_TOKENS = 32


def load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def sft_model(tmp: Path) -> tuple[Path, str]:
    import tunelab
    from tunelab.core import runs

    shipped = ROOT / "runs" / "real" / "smollm2-arith" / "sft"
    record = runs.read_json(shipped / "stage.json")
    if runs.is_stage_record(record) and record["status"] == "completed":
        return shipped, f"the adapter `make real` left in {shipped.relative_to(ROOT)}"
    recipe = tunelab.load_recipe("real/smollm2-arith")
    out = tmp / "real"
    tunelab.run(
        tunelab.recipe_from_dict({"output_dir": str(out), "seed": recipe.seed, "stages": {"sft": recipe.stages["sft"]}})
    )
    return out / "sft", "the real track's `sft` stage, trained here as shipped (60 steps)"


def llamacpp_speed(path: Path, fixed) -> float | None:
    python = ROOT / ".venv-llamacpp" / "bin" / "python"
    if not python.exists():
        return None
    job = {"model": str(path), "prompts": fixed.ids, "texts": fixed.texts, "new_tokens": NEW_TOKENS, "threads": 2}
    out = subprocess.run(
        [str(python), str(ROOT / "tools" / "llamacpp_probe.py")],
        input=json.dumps(job),
        capture_output=True,
        text=True,
        check=True,
    )
    runs = json.loads(out.stdout)
    return sum(NEW_TOKENS for _ in runs) / sum(NEW_TOKENS / r["tokens_per_second"] for r in runs)


def transformers_speed(model, fixed) -> float:
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0)
    seconds = 0.0
    with torch.no_grad():
        for ids in fixed.ids:
            start = time.perf_counter()
            model.generate(torch.tensor([ids]), generation_config=config)
            seconds += time.perf_counter() - start
    return NEW_TOKENS * len(fixed.ids) / seconds


def main() -> str:
    import torch

    import tunelab
    from tunelab.exporting import TYPES
    from tunelab.exporting.roundtrip import prompts, read_back

    torch.set_num_threads(2)
    started, load_before = time.perf_counter(), load()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        source, where = sft_model(tmp)
        rows, files = [], {}
        for kind in TYPES:
            result = tunelab.export(source, tmp / f"smollm2-sft-{kind}.gguf", type=kind)
            rows.append(result)
            files[kind] = str(result.path)
        stage = {
            "stage": "eval",
            "models": {"source": str(source), **files},
            "data": HELD_OUT,
            "generation": {"max_new_tokens": 8},
        }
        run = tunelab.run(tunelab.recipe_from_dict({"output_dir": str(tmp / "eval"), "stages": {"eval": stage}}))
        scores = run.metrics["eval"]
        speeds = {}
        for kind in ("f16", "q8_0", "q4_0"):
            model, tokenizer = read_back(Path(files[kind]))
            fixed = prompts(tokenizer)
            speeds[kind] = (llamacpp_speed(Path(files[kind]), fixed), transformers_speed(model.eval(), fixed))
            del model
    minutes = (time.perf_counter() - started) / 60
    params = rows[0].params
    table = [
        "| type | export s | file MB | bits/param | max abs logit diff | top-1 agreement | file vs model as written | "
        "exact match (held-out) |",
        "|---|---|---|---|---|---|---|---|",
        f"| source (float32, adapter merged) | | {4 * params / 1e6:.0f} | 32 | | | | "
        f"{scores['source']['exact_match']:.3f} |",
    ]
    for r in rows:
        f = r.figures
        table.append(
            f"| {r.type} | {r.seconds:.1f} | {r.bytes / 1e6:.1f} | {8 * r.bytes / r.params:.2f} | "
            f"{f['max_abs_diff']:.3g} | {100 * f['top1_agreement']:.1f}% | {f['written_max_abs_diff']:.1g} | "
            f"{scores[r.type]['exact_match']:.3f} |"
        )
    speed = ["| file | llama.cpp tokens/s | transformers tokens/s (float32, from the file) |", "|---|---|---|"]
    for kind, (cpp, hf) in speeds.items():
        speed.append(f"| {kind} | {f'{cpp:.1f}' if cpp else 'not run (no .venv-llamacpp)'} | {hf:.1f} |")
    return (
        f"{TITLE}\n\n"
        f"The real track's SmolLM2-135M-Instruct LoRA SFT ({where}), exported by `tunelab export` at each type "
        f"({params / 1e6:.1f}M parameters; the adapter merged first). Logit figures are the export's own round trip "
        "(transformers' GGUF reader, 4 chat-template prompts); exact match is one eval stage scoring every file next "
        f"to the source on `arith_chat` {HELD_OUT['split']}, greedy, 8 new tokens. Speed: {NEW_TOKENS} greedy new "
        "tokens on each of the 4 round-trip prompts, batch 1, 2 threads: llama.cpp (llama-cpp-python 0.3.36, "
        "prebuilt wheel) against transformers on the model read from the same file "
        f"(`benchmarks/export_gguf.py`, {minutes:.1f} min). Machine: {machine()}; load average {load_before} at the "
        f"start and {load()} at the end (other processes shared the 2 cores).\n\n"
        + "\n".join(table)
        + "\n\nQ4_x/Q5_x keep the tied embedding (the output matrix) at Q8_0, as llama-quantize keeps it above 4 bits; "
        "norms stay F32 in every type.\n\n" + "\n".join(speed) + "\n"
    )


if __name__ == "__main__":
    text = main()
    update_doc(TITLE, text)
    print(text)
