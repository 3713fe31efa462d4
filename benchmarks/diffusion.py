"""Diffusion on digits: one `tunelab run recipes/diffusion/ddpm-digits.yaml`, then from its model

1. the quality measure (Fréchet distance in a tunelab-trained classifier's feature space, the
   classifier's confidence, class spread) and wall time for DDPM 1000 steps, DDIM 50 and
   DPM-Solver++ 20 and 10, same seeds and sample count (all 297 held-out digits);
2. training steps per second through `tunelab run` against the diffusers example's plain
   Accelerate loop (train_unconditional.py's loop: same UNet, data, transform, optimizer,
   schedule, EMA, gradient clipping), interleaved, median of 3.

`python benchmarks/diffusion.py [RUN_DIR]` replaces its section of docs/BENCHMARKS.md; with
RUN_DIR it reports a finished `make diffusion` run instead of training again. The grid of the
trained model's samples is copied to docs/ddpm-digits-samples.png.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from common import ROOT, machine, median

TITLE = "## Diffusion: DDPM on digits"
RECIPE = ROOT / "recipes" / "diffusion" / "ddpm-digits.yaml"
SAMPLERS = [("DDPM", 1000), ("DDIM", 50), ("DPM-Solver++", 20), ("DPM-Solver++", 10)]
THROUGHPUT_STEPS = 120
REPEATS = 3


def _stage_cfg() -> dict:
    import yaml

    return yaml.safe_load(RECIPE.read_text())["stages"]["ddpm"]


def train_run(run_dir: Path | None) -> tuple[Path, dict]:
    """The recipe run (made here unless given): its folder and per-stage seconds."""
    import subprocess

    if run_dir is None:
        run_dir = ROOT / "runs" / "bench-ddpm-digits"
        tunelab = str(Path(sys.executable).with_name("tunelab"))
        subprocess.run(
            [tunelab, "run", str(RECIPE), f"output_dir={run_dir}", "--overwrite"],
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    manifest = json.loads((run_dir / "run.json").read_text())
    if manifest["status"] != "completed":
        raise SystemExit(f"{run_dir}: the run is {manifest['status']}, not completed")
    return run_dir, {name: info["seconds"] for name, info in manifest["stages"].items()}


def samplers(run_dir: Path) -> list[dict]:
    """Quality and time per sampler, same 297 seeds, features from the run's eval classifier."""
    from tunelab.diffusion.pipelines import generate, load_images, load_pipeline
    from tunelab.diffusion.quality import load_classifier, quality, to_batch

    net, config = load_classifier(run_dir / "eval" / "classifier")
    real = load_images({"path": "digits", "split": "test"}, "bench")
    real_batch = to_batch(real["image"], config["resolution"], config["channels"])
    rows = []
    for name, steps in SAMPLERS:
        pipe = load_pipeline(str(run_dir / "ddpm"), "bench")
        settings = {"scheduler": name, "num_inference_steps": steps, "num_images": len(real), "seed": 0}
        images, seconds = generate(pipe, {**settings, "batch_size": len(real)}, "bench")
        measured = quality(net, to_batch(images, config["resolution"], config["channels"]), real_batch)
        rows.append({"sampler": name, "steps": steps, "seconds": seconds, **measured})
        print(rows[-1], flush=True)
    return rows


def _plain_loop(cfg: dict, steps: int, seed: int) -> float:
    """diffusers' examples/unconditional_image_generation/train_unconditional.py, its training loop."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler, UNet2DModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from tunelab.diffusion.pipelines import load_images, to_tensor

    set_seed(seed)
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    res, train = cfg["resolution"], cfg["training"]
    model = UNet2DModel(sample_size=res, in_channels=1, out_channels=1, **cfg["unet"])
    noise_scheduler = DDPMScheduler(**cfg["scheduler"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=float(train["learning_rate"]), weight_decay=0.0)
    ds = load_images("digits", "bench").with_transform(
        lambda b: {"pixel_values": [to_tensor(im, res, 1) for im in b["image"]]}
    )
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=train["per_device_train_batch_size"],
        shuffle=True,
        collate_fn=lambda rows: torch.stack([r["pixel_values"] for r in rows]),
        drop_last=False,
    )
    lr_scheduler = get_scheduler(
        train["lr_scheduler_type"], optimizer, num_warmup_steps=train["warmup_steps"], num_training_steps=steps
    )
    ema = EMAModel(model.parameters(), **{k: v for k, v in cfg["ema"].items()})
    model, optimizer, loader, lr_scheduler = accelerator.prepare(model, optimizer, loader, lr_scheduler)
    model.train()
    done = 0
    start = time.perf_counter()
    while done < steps:
        for clean in loader:
            noise = torch.randn_like(clean)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (clean.shape[0],)).long()
            noisy = noise_scheduler.add_noise(clean, noise, t)
            with accelerator.accumulate(model):
                loss = F.mse_loss(model(noisy, t).sample.float(), noise.float())
                accelerator.backward(loss)
                accelerator.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            ema.step(model.parameters())
            done += 1
            if done == steps:
                break
    return steps / (time.perf_counter() - start)


def _tunelab(cfg: dict, steps: int, out: Path) -> float:
    import tunelab

    stage = json.loads(json.dumps(cfg))
    stage.pop("samples", None)
    stage["training"].update({"max_steps": steps, "save_strategy": "no", "logging_steps": 100})
    result = tunelab.run(tunelab.recipe_from_dict({"output_dir": str(out), "stages": {"ddpm": stage}}), overwrite=True)
    return result.metrics["ddpm"]["train_steps_per_second"]


def throughput() -> dict[str, float]:
    import tempfile

    cfg = _stage_cfg()
    plain, ours = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(REPEATS):  # interleaved, so drift in machine speed hits both alike
            plain.append(_plain_loop(cfg, THROUGHPUT_STEPS, seed=i))
            ours.append(_tunelab(cfg, THROUGHPUT_STEPS, Path(tmp) / f"r{i}"))
            print("steps/s plain", plain[-1], "tunelab", ours[-1], flush=True)
    return {"plain": median(plain), "tunelab": median(ours), "plain_all": plain, "tunelab_all": ours}


def report(run_dir: Path, seconds: dict, rows: list[dict], speed: dict) -> str:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    ev = metrics["eval"]["model"]
    train = metrics["ddpm"]
    shutil.copyfile(
        run_dir / "ddpm" / "samples" / max(p.name for p in (run_dir / "ddpm" / "samples").iterdir()),
        ROOT / "docs" / "ddpm-digits-samples.png",
    )
    shutil.copyfile(run_dir / "sample" / "grid.png", ROOT / "docs" / "ddpm-digits-dpmsolver20.png")
    full = next(r for r in rows if r["sampler"] == "DDPM")
    dpm20 = next(r for r in rows if r["sampler"] == "DPM-Solver++" and r["steps"] == 20)
    lines = [
        TITLE,
        "",
        f"`python benchmarks/diffusion.py` on {machine()}.",
        "",
        f"`tunelab run recipes/diffusion/ddpm-digits.yaml`: a {train['parameters'] / 1e6:.2f}M-parameter UNet, "
        f"{int(train['global_step'])} steps of 64 digits (16x16), EMA weights. Stage times: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in seconds.items())
        + f"; training {seconds['ddpm'] / 60:.1f} min (budget: 10 min). Samples (DDIM 50 steps, EMA weights):",
        "",
        "![DDPM digits](ddpm-digits-samples.png)",
        "",
        f"The recipe's own eval (DPM-Solver++ 20 steps, {int(ev['num_images'])} images): Fréchet distance "
        f"{ev['frechet_distance']:.1f} (real held-out vs real training digits: {ev['real_frechet_distance']:.1f}), "
        f"classifier confidence {ev['confidence']:.3f}, class entropy {ev['class_entropy']:.3f}, "
        f"{int(ev['classes_covered'])}/10 classes.",
        "",
        "### Samplers, same model, same 297 seeds (one image per seed), all 297 held-out digits as reference",
        "",
        "| sampler | steps | Fréchet distance | vs DDPM 1000 | confidence | class entropy | seconds (297 images) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['sampler']} | {r['steps']} | {r['frechet_distance']:.1f} | "
            f"{r['frechet_distance'] / full['frechet_distance']:.2f} | {r['confidence']:.3f} | "
            f"{r['class_entropy']:.3f} | {r['seconds']:.1f} |"
        )
    ratio = dpm20["frechet_distance"] / full["frechet_distance"]
    floor = ev["real_frechet_distance"]
    excess = (dpm20["frechet_distance"] - floor) / max(full["frechet_distance"] - floor, 1e-9)
    ddim = next((r for r in rows if r["sampler"] == "DDIM"), None)
    verdict = (
        "this model agrees: 20 steps is within 10% of 1000."
        if ratio <= 1.1
        else f"this model does not reach that: {100 * (ratio - 1):.0f}% higher Fréchet distance, "
        f"{excess:.1f}x DDPM-1000's distance above the real-vs-real floor ({floor:.1f})."
    )
    if ddim is not None and ratio > 1.1:
        verdict += (
            f" It does match DDIM with 50 steps ({ddim['frechet_distance']:.1f}) in "
            f"{ddim['seconds'] / dpm20['seconds']:.1f}x less time."
        )
    lines += [
        "",
        f"DPM-Solver++ with 20 steps / DDPM with 1000: Fréchet distance ratio **{ratio:.2f}**, "
        f"{full['seconds'] / dpm20['seconds']:.0f}x faster. The DPM-Solver++ paper (Lu et al. 2022) reports "
        f"20 steps close to full-length sampling quality; {verdict} One sample of 297 images per sampler, "
        "so differences of a unit or two are within sampling noise.",
        "",
        "### Training throughput: `tunelab run` vs diffusers' plain loop",
        "",
        f"Same UNet, digits, per-image transform, AdamW, cosine schedule, EMA, clipping; {THROUGHPUT_STEPS} steps, "
        f"interleaved, median of {REPEATS}: tunelab {speed['tunelab']:.2f} steps/s, plain loop "
        f"{speed['plain']:.2f} steps/s, ratio **{speed['tunelab'] / speed['plain']:.2f}** (target >= 0.95). "
        f"Runs: tunelab {', '.join(f'{v:.2f}' for v in speed['tunelab_all'])}; "
        f"plain {', '.join(f'{v:.2f}' for v in speed['plain_all'])}.",
        "",
    ]
    return "\n".join(lines)


def main(run_dir: Path | None = None) -> str:
    run_dir, seconds = train_run(run_dir)
    rows = samplers(run_dir)
    speed = throughput()
    return report(run_dir, seconds, rows, speed)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from common import update_doc

    section = main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
    update_doc(TITLE, section)
    print(section)
