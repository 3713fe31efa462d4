"""SFT steps per second: `tunelab run` against a plain script calling `trl.SFTTrainer`.

Same model (the quickstart's tiny Llama, built here), same data, same SFTConfig
values and LoRA config, in one process, runs interleaved, median of REPS each.
Two figures: the training loop alone (Trainer's own train_runtime) and end to
end (loading, data preparation, training, saving).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, median  # noqa: E402

REPS = 3
STEPS = 200
TRAINING = {
    "max_steps": STEPS,
    "per_device_train_batch_size": 16,
    "max_length": 128,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 10,
    "logging_steps": 50,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 42,
    "disable_tqdm": False,  # explicit: transformers decides it from the log level otherwise
}
LORA = {"r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"}
DATA = str(ROOT / "recipes/data/arith_qa")


def build_model(tmp: Path) -> Path:
    import tunelab

    recipe = tunelab.load_recipe(
        "quickstart",
        [f"output_dir={tmp / 'base'}", "pretrain.training.max_steps=1", "pretrain.training.save_strategy=no"],
    )
    recipe.data["stages"] = {"pretrain": recipe.stages["pretrain"]}
    return tunelab.run(recipe).outputs["pretrain"]


def plain(model_dir: Path, out: Path) -> tuple[float, float]:
    """What a user would write by hand with TRL."""
    start = time.perf_counter()
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    data = load_dataset(DATA, split="train")
    args = SFTConfig(output_dir=str(out), use_cpu=True, bf16=False, **TRAINING)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=LoraConfig(task_type="CAUSAL_LM", **LORA),
    )
    result = trainer.train()
    trainer.save_model(str(out))
    return result.metrics["train_steps_per_second"], STEPS / (time.perf_counter() - start)


def through_tunelab(model_dir: Path, out: Path) -> tuple[float, float]:
    import tunelab

    start = time.perf_counter()
    recipe = tunelab.recipe_from_dict(
        {
            "output_dir": str(out),
            "stages": {
                "sft": {"stage": "sft", "model": str(model_dir), "data": DATA, "lora": LORA, "training": TRAINING}
            },
        }
    )
    result = tunelab.run(recipe)
    return result.metrics["sft"]["train_steps_per_second"], STEPS / (time.perf_counter() - start)


def main() -> str:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir = build_model(tmp)
        rows: dict[str, list[tuple[float, float]]] = {"plain": [], "tunelab": []}
        for i in range(REPS):
            rows["plain"].append(plain(model_dir, tmp / f"plain{i}"))
            rows["tunelab"].append(through_tunelab(model_dir, tmp / f"tunelab{i}"))
    loop = {k: median([r[0] for r in v]) for k, v in rows.items()}
    e2e = {k: median([r[1] for r in v]) for k, v in rows.items()}
    return (
        "## SFT throughput: tunelab against plain TRL\n\n"
        f"LoRA SFT (r=16, all linear layers) of the quickstart's 1.1M-parameter Llama on `arith_qa`, "
        f"{STEPS} steps of batch 16, same SFTConfig values; median of {REPS} interleaved runs each "
        "(`benchmarks/sft_overhead.py`).\n\n"
        "| | plain `SFTTrainer` script | `tunelab run` | ratio (tunelab / plain) |\n|---|---|---|---|\n"
        f"| training loop, steps/s | {loop['plain']:.2f} | {loop['tunelab']:.2f} | "
        f"**{loop['tunelab'] / loop['plain']:.3f}** |\n"
        f"| end to end (load, prepare, train, save), steps/s | {e2e['plain']:.2f} | {e2e['tunelab']:.2f} | "
        f"{e2e['tunelab'] / e2e['plain']:.3f} |\n"
    )


if __name__ == "__main__":
    print(main())
