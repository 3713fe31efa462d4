"""RL on the real model: `tunelab run real/smollm2-arith` over 3 seeds, and GRPO's variants side by side.

1. **Seeds.** The whole real track (SFT, QLoRA, DPO, GRPO, reward model, PPO, eval on the 300 held-out
   questions) once per seed (`REAL_RL_SEEDS`, default 42,1,2): exact match per model, mean and spread, each
   RL stage's gain over the SFT model of its own seed; the reward model's pairwise accuracy on the 300
   held-out pairs and how often it scores the right answer c above its near misses (c-1, c+1) and above
   the question's operands (a wrong answer SFT gives); stage times.
2. **GRPO variants.** From each variant seed's SFT model (`REAL_RL_VARIANT_SEEDS`, default 1,42), the recipe's
   GRPO stage with one setting changed (TRL's `loss_type` dapo/grpo/dr_grpo, GSPO's
   `importance_sampling_level: sequence`, `scale_rewards: none`, 8 answers to 2 questions a step instead of
   4 to 4, two iterations per generation with `epsilon_high`, batches of 32 for 20 steps and of 8 for 80,
   partial credit for near misses), each at the recipe's steps x batch, so at about equal wall time
   (measured), then its held-out exact match. The recipe's own
   setting is that seed's run itself. (`mask_truncated_completions` is not compared: answers are a
   number and end-of-turn, and the logs count how many reach `max_completion_length`.)

Runs are kept under runs/bench/real-rl (a finished one is reused, an unfinished one resumed), so an
interrupted benchmark goes on where it stopped. `REAL_RL_VARIANTS=N` runs the first N variants only.
`REAL_RL_JOBS=2` runs two at a time at one thread each (the machine's 2 cores): the stage times are then
not quiet-machine times, and the section says so.
Standalone (`python benchmarks/real_rl.py`) it replaces its own section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, update_doc  # noqa: E402

TITLE = "## RL on the real model: SmolLM2-135M-Instruct over 3 seeds"
RECIPE = "real/smollm2-arith"
WORK = ROOT / "runs" / "bench" / "real-rl"
SEEDS = [int(s) for s in os.environ.get("REAL_RL_SEEDS", "42,1,2").split(",")]
JOBS = int(os.environ.get("REAL_RL_JOBS", "1"))
# whose SFT models the variants start from: seed 1's SFT model is the strongest, seed 42's the weakest
VARIANT_SEEDS = [int(s) for s in os.environ.get("REAL_RL_VARIANT_SEEDS", "1,42").split(",") if s]
MODELS = ("base", "sft", "qlora", "dpo", "grpo", "ppo")
# name -> GRPOConfig fields changed from the recipe's grpo stage (`rewards`: the stage's reward functions).
# The recipe's steps x batch stay the same (equal compute), except where the name says otherwise.
VARIANTS: dict[str, dict[str, Any]] = {
    "recipe (loss_type dapo)": {},
    "loss_type grpo": {"loss_type": "grpo"},
    "loss_type dr_grpo": {"loss_type": "dr_grpo"},
    "GSPO (importance_sampling_level sequence)": {"importance_sampling_level": "sequence"},
    "num_generations 8 (2 questions a step)": {"num_generations": 8},
    "scale_rewards none": {"scale_rewards": "none"},
    "num_iterations 2, epsilon_high 0.28": {"num_iterations": 2, "epsilon_high": 0.28},
    "batch 32 (8 questions a step), 20 steps": {"per_device_train_batch_size": 32, "max_steps": 20},
    "batch 8 (2 questions a step), 80 steps": {"per_device_train_batch_size": 8, "max_steps": 80},
    "rewards: exact_match + close (partial credit for near misses)": {
        "rewards": ["tunelab.rewards:exact_match", "tunelab.rewards:close"]
    },
}


def tunelab(args: list[str], log: Path, probe: bool = False) -> subprocess.CompletedProcess[str]:
    """`tunelab ARGS` as a user runs it, output to `log` as it comes; one thread each when runs share the
    cores. A `probe` (a `--resume` check) returns its output and exit status instead of raising."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if JOBS > 1:
        env["OMP_NUM_THREADS"] = "1"
    exe = str(Path(sys.executable).with_name("tunelab"))
    with log.open("a") as out:
        if not probe:
            return subprocess.run([exe, *args], check=True, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        done = subprocess.run([exe, *args], cwd=ROOT, env=env, capture_output=True, text=True)
        out.write(done.stdout + done.stderr)
    return done


def run(recipe: str, out: Path, overrides: list[str]) -> dict[str, Any]:
    """Run, reuse or resume one recipe into `out`; its metrics and stage seconds.

    `--resume` keeps every stage that finished with today's recipe; where the recipe changed since (a new
    GRPO setting), tunelab refuses and names the first changed stage, which reruns with `--from`, keeping
    the stages before it (SFT, the reward model)."""
    args = ["run", recipe, f"output_dir={out}", *overrides]
    log = WORK / f"{out.name}.log"
    if not (out / "run.json").is_file():
        tunelab(args, log)
        return finished(out)
    done = tunelab([*args, "--resume"], log, probe=True)
    changed = re.search(r"rerun it with --from (\S+),", done.stdout + done.stderr)
    if done.returncode == 2 and changed:
        tunelab([*args, "--from", changed.group(1)], log)
    else:
        done.check_returncode()
    return finished(out)


def finished(out: Path) -> dict[str, Any]:
    """A finished run's metrics and seconds per stage."""
    stages = json.loads((out / "run.json").read_text())["stages"]
    return {
        "metrics": json.loads((out / "metrics.json").read_text()),
        "seconds": {k: v["seconds"] for k, v in stages.items()},
    }


def near_misses(reward_dir: Path) -> dict[str, float]:
    """How often the reward model scores the right answer c above c-1, c+1 and each operand of the question,
    and above all four at once, on the 300 held-out questions (as the policy is prompted: chat template)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from tunelab.models.chat_templates import reward_texts
    from tunelab.models.reward_models import reward_scores

    model = AutoModelForSequenceClassification.from_pretrained(reward_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(reward_dir)
    rows = [json.loads(line) for line in (ROOT / "recipes/data/arith_chat/test.jsonl").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    right = [int(r["completion"]) for r in rows]
    operands = [[int(n) for n in re.findall(r"\d+", p.split("How many")[0])[:2]] for p in prompts]
    wrong = {
        "c-1": [c - 1 for c in right],
        "c+1": [c + 1 for c in right],
        "first operand": [o[0] for o in operands],
        "second operand": [o[1] for o in operands],
    }

    def score(answers: list[int]) -> list[float]:
        return reward_scores(model, tokenizer, reward_texts(tokenizer, prompts, [str(a) for a in answers]), 32)

    good = score(right)
    out: dict[str, float] = {}
    beats_all = [True] * len(rows)
    for name, answers in wrong.items():
        bad = score(answers)
        # an operand equal to the answer (x + 0) is no wrong answer: it counts as beaten
        wins = [g > b or a == c for g, b, a, c in zip(good, bad, answers, right, strict=True)]
        out[name] = sum(wins) / len(rows)
        beats_all = [x and w for x, w in zip(beats_all, wins, strict=True)]
    out["all four"] = sum(beats_all) / len(rows)
    return out


def seed_run(seed: int) -> dict[str, Any]:
    out = WORK / f"seed-{seed}"
    result = run(RECIPE, out, [f"seed={seed}"])
    result["near_misses"] = near_misses(out / "reward")
    logs = json.loads((out / "grpo" / "log_history.json").read_text())
    result["clipped"] = max(e.get("completions/clipped_ratio", 0.0) for e in logs)
    result["zero_std"] = [e["frac_reward_zero_std"] for e in logs if "frac_reward_zero_std" in e]
    return result


def variant_recipe(seed: int, name: str, fields: dict[str, Any]) -> Path:
    """The recipe's grpo stage from `seed`'s SFT model, with `fields` changed, and an eval of it on the
    held-out questions."""
    import yaml

    recipe = yaml.safe_load((ROOT / "recipes" / f"{RECIPE}.yaml").read_text())
    grpo = recipe["stages"]["grpo"]
    grpo["model"] = str(WORK / f"seed-{seed}" / "sft")
    fields = dict(fields)
    if "rewards" in fields:  # the stage's reward functions; everything else is a GRPOConfig field
        grpo["rewards"] = fields.pop("rewards")
    grpo["training"].update(fields)
    evaluation = recipe["stages"]["eval"]
    evaluation["models"] = {"grpo": "${grpo}"}
    evaluation.pop("reward_model", None)
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    path = WORK / f"variant-seed{seed}-{slug}.yaml"
    path.write_text(yaml.safe_dump({"seed": seed, "stages": {"grpo": grpo, "eval": evaluation}}, sort_keys=False))
    return path


def variant_run(seed: int, name: str, fields: dict[str, Any]) -> dict[str, Any]:
    if not fields:  # the recipe's own setting: the seed run's GRPO stage and eval
        result = finished(WORK / f"seed-{seed}")
    else:
        path = variant_recipe(seed, name, fields)
        result = run(str(path), WORK / path.stem, [])
    return {"exact_match": result["metrics"]["eval"]["grpo"]["exact_match"], "seconds": result["seconds"]["grpo"]}


def spread(values: list[float]) -> str:
    mean = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:.3f} ± {sd:.3f}"


def report(seeds: dict[int, dict[str, Any]], variants: dict[int, dict[str, dict[str, Any]]]) -> str:
    em = {s: {m: r["metrics"]["eval"][m]["exact_match"] for m in MODELS} for s, r in seeds.items()}
    lines = [
        TITLE,
        "",
        f"`python benchmarks/real_rl.py` on {machine()}. `tunelab run {RECIPE}` once per seed "
        f"({', '.join(map(str, seeds))}; the seed sets LoRA initialisation, data order and sampling in every "
        "stage), exact match of the first line on the 300 held-out `arith_chat` questions, greedy, through "
        "SmolLM2's chat template."
        + (" Two runs at a time at one thread each: stage times are not quiet-machine times." if JOBS > 1 else ""),
        "",
        "| model | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd | gain over SFT, mean ± sd |",
        "|---|" + "---|" * (len(seeds) + 2),
    ]
    for m in MODELS:
        values = [em[s][m] for s in seeds]
        gain = spread([em[s][m] - em[s]["sft"] for s in seeds]) if m not in ("base", "sft") else ""
        lines.append(f"| {m} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {spread(values)} | {gain} |")
    lines += ["", "Reward model (SmolLM2 SFT model + a score head, LoRA), on the held-out questions:", ""]
    lines.append("| | " + " | ".join(f"seed {s}" for s in seeds) + " | mean |")
    lines.append("|---|" + "---|" * (len(seeds) + 1))
    rm = {s: r["metrics"]["reward"] for s, r in seeds.items()}
    rows = [("pairwise accuracy, 300 held-out pairs", [rm[s]["pairwise_accuracy"] for s in seeds])]
    rows.append(("untrained head", [rm[s].get("untrained_pairwise_accuracy", float("nan")) for s in seeds]))
    for key in next(iter(seeds.values()))["near_misses"]:
        rows.append((f"c scored above {key}", [seeds[s]["near_misses"][key] for s in seeds]))
    for label, values in rows:
        lines.append(f"| {label} | " + " | ".join(f"{v:.3f}" for v in values) + f" | {statistics.mean(values):.3f} |")
    lines += [""]
    for label, stage, first, last in (
        ("GRPO, training reward (exact match of sampled answers)", "grpo", "first_reward", "last_reward"),
        ("PPO, reward-model score of sampled answers", "ppo", "first_score", "last_score"),
        ("PPO, KL to the SFT model", "ppo", "first_kl", "last_kl"),
    ):
        values = [f"{r['metrics'][stage][first]:.3f} → {r['metrics'][stage][last]:.3f}" for r in seeds.values()]
        lines.append(f"{label}, first → last logged step: " + "; ".join(values) + ".")
    stages = next(iter(seeds.values()))["seconds"]
    lines += ["", "Stage seconds (" + ", ".join(f"seed {s}" for s in seeds) + "):", ""]
    lines.append("| " + " | ".join(stages) + " | total |")
    lines.append("|" + "---|" * (len(stages) + 1))
    for s in seeds:
        sec = seeds[s]["seconds"]
        lines.append("| " + " | ".join(f"{sec[k]:.0f} s" for k in stages) + f" | {sum(sec.values()) / 60:.1f} min |")
    if variants:
        vseeds = list(variants)
        names = list(dict.fromkeys(n for v in variants.values() for n in v))
        lines += [
            "",
            "**GRPO variants**, from the SFT model of seed " + " and of seed ".join(map(str, vseeds)) + ", each the "
            "recipe's GRPO stage (its steps, batch and learning rate) with one setting changed, then the same eval; "
            "two runs at a time at one thread each, so the seconds compare with each other, not with the seed runs "
            "(the recipe row is each seed run's own GRPO stage, timed as that run ran: see the stage seconds above):",
            "",
            "| variant | " + " | ".join(f"seed {s}: exact match, vs recipe, GRPO seconds" for s in vseeds) + " |",
            "|---|" + "---|" * len(vseeds),
            "| SFT model (the start) | " + " | ".join(f"{em[s]['sft']:.3f}" if s in em else "" for s in vseeds) + " |",
        ]
        for name in names:
            cells = []
            for s in vseeds:
                v, base = variants[s].get(name), variants[s][names[0]]["exact_match"]
                cells.append(
                    f"{v['exact_match']:.3f}, {v['exact_match'] - base:+.3f}, {v['seconds']:.0f} s" if v else ""
                )
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        clipped = max(r["clipped"] for r in seeds.values())
        zero = {s: seeds[s]["zero_std"] for s in vseeds if s in seeds}
        lines += [
            "",
            f"Share of answers cut at `max_completion_length` in the seed runs: at most {clipped:.3f}, so "
            "`mask_truncated_completions` has nothing to mask here. Share of groups whose answers all scored "
            "alike (no signal) in the seed runs' GRPO, first → last logged step: "
            + "; ".join(f"seed {s} {z[0]:.2f} → {z[-1]:.2f}" for s, z in zero.items())
            + ".",
        ]
    return "\n".join(lines) + "\n"


def main() -> str:
    WORK.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(JOBS) as pool:
        seeds = dict(zip(SEEDS, pool.map(seed_run, SEEDS), strict=True))
        names = list(VARIANTS)[: int(os.environ.get("REAL_RL_VARIANTS", len(VARIANTS)))]  # the first N; 0: none
        jobs = [(s, n) for s in VARIANT_SEEDS for n in names]
        done = pool.map(lambda job: variant_run(job[0], job[1], VARIANTS[job[1]]), jobs)
        variants: dict[int, dict[str, dict[str, Any]]] = {}
        for (s, n), result in zip(jobs, done, strict=True):
            variants.setdefault(s, {})[n] = result
    return report(seeds, variants)


if __name__ == "__main__":
    section = main()
    update_doc(TITLE, section)
    print(section)
