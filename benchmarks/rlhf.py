"""One run of `tunelab run rlhf/arith`: per-stage wall time, the reward model's held-out pairwise
accuracy, and each policy's exact match and mean reward-model score on the 300 held-out questions.

Standalone (`python benchmarks/rlhf.py`) it replaces its own section of docs/BENCHMARKS.md.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from common import ROOT

TITLE = "## RLHF pipeline"


def methods(ev: dict) -> str:
    """The paragraph on the methods added with the stage base: this run's figures, and the trials' (TRL 1.12)."""
    return (
        "The methods added with the stage base (same seed, same SFT start): SimPO, as the `cpo` stage with "
        f"`loss_type: simpo` and CPO's likelihood term on the chosen answers (`cpo_alpha: 1`), ends at "
        f"{ev['simpo']['exact_match']:.3f} against SFT's {ev['sft']['exact_match']:.3f}; without that term "
        "(`cpo_alpha: 0`, SimPO as published) it fell to 0.77-0.80 (TRL 1.12), as KTO, which has no such term, "
        f"falls to {ev['kto']['exact_match']:.3f} (0.75 at 5e-5, TRL 1.12). Their extra errors were near misses "
        "(TRL 1.12: of KTO's 62 wrong answers 38 were c-1 and 21 c+1). DPO needed the same cure (RPO, below). "
        "ORPO replaces SFT here, from the pretrained model with SFT's 600 steps and learning rate, and reaches "
        f"{ev['orpo']['exact_match']:.3f} (0.603 with TRL 1.12): TRL's ORPO takes its likelihood term over the "
        "whole sequence, prompts included (from the SFT model it fell to 0.15). RLOO at GRPO's learning rate "
        f"ends at {ev['rloo']['exact_match']:.3f}; at 1e-4 and temperature 1.0 it fell to 0.70 (TRL 1.12), as "
        "GRPO does at higher rates."
    )


def main() -> str:
    from common import run_recipe

    wall, metrics, seconds = run_recipe("rlhf/arith", inspect=near_misses)
    return report(metrics, seconds, wall)


def near_misses(run_dir: Path) -> dict[str, float]:
    """How often the reward model scores the right answer c above c-1 and above c+1, per held-out question,
    and (`sft c-1`, `sft c+1`) how often the SFT model it starts from gives c the higher log-likelihood.

    `best kl=B`: PPO's target in closed form, over the answers c-1, c, c+1: the policy that maximises
    score - B x KL to the SFT model is the SFT model's probability (at PPO's temperature, EOS included)
    times exp(score / B). How often its most likely answer is c is the greedy exact match PPO can reach at
    that `kl_coef` if it converges, and a ceiling a reward model sets on PPO (`best kl=0`: the reward
    model's own favourite)."""
    import torch
    import yaml
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from tunelab.models.reward_models import reward_scores

    model = AutoModelForSequenceClassification.from_pretrained(run_dir / "reward")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "reward")
    rows = [json.loads(line) for line in (ROOT / "recipes/data/arith_qa/test.jsonl").read_text().splitlines()]
    answers = {d: [f" {int(r['completion']) + d}" for r in rows] for d in (-1, 0, 1)}
    scores = {
        d: reward_scores(model, tokenizer, [r["prompt"] + a for r, a in zip(rows, answers[d], strict=True)])
        for d in answers
    }
    out = {f"c{d:+d}": sum(c > o for c, o in zip(scores[0], scores[d], strict=True)) / len(rows) for d in (-1, 1)}

    lm = AutoModelForCausalLM.from_pretrained(run_dir / "sft").eval()
    lm_tokenizer = AutoTokenizer.from_pretrained(run_dir / "sft")
    recipe = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    temperature = recipe["stages"]["ppo"]["training"]["temperature"]

    def loglik(prompt: str, answer: str) -> tuple[float, float]:
        """log p(answer | prompt) as the SFT model gives it, and log p(answer + EOS) at PPO's temperature."""
        context = lm_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        target = lm_tokenizer(prompt + answer, add_special_tokens=False)["input_ids"] + [lm_tokenizer.eos_token_id]
        with torch.no_grad():
            logits = lm(torch.tensor([target])).logits[0, :-1]
        plain, tempered = logits.log_softmax(-1), (logits / temperature).log_softmax(-1)
        span = range(len(context), len(target))
        return sum(plain[i - 1, target[i]].item() for i in span[:-1]), sum(
            tempered[i - 1, target[i]].item() for i in span
        )

    ll = {d: [loglik(r["prompt"], a) for r, a in zip(rows, answers[d], strict=True)] for d in answers}
    for d in (-1, 1):
        out[f"sft c{d:+d}"] = sum(c[0] > o[0] for c, o in zip(ll[0], ll[d], strict=True)) / len(rows)
    reference = torch.tensor([[ll[d][i][1] for d in (-1, 0, 1)] for i in range(len(rows))])
    score = torch.tensor([[scores[d][i] for d in (-1, 0, 1)] for i in range(len(rows))])
    out["best kl=0"] = (score.argmax(1) == 1).float().mean().item()
    out["sft best"] = (reference.argmax(1) == 1).float().mean().item()
    for beta in (0.1, 1.0, 3.0, 10.0):
        out[f"best kl={beta:g}"] = ((reference + score / beta).argmax(1) == 1).float().mean().item()
    return out


def from_run(run_dir: Path) -> str:
    """The same report from a finished run folder (wall time from its manifest)."""
    from datetime import datetime

    manifest = json.loads((run_dir / "run.json").read_text())
    if manifest["status"] != "completed":
        raise SystemExit(f"{run_dir}: the run is {manifest['status']}, not completed")
    for name in manifest["stages"]:
        started = json.loads((run_dir / name / "stage.json").read_text())["started"]
        if started < manifest["started"]:
            raise SystemExit(f"{run_dir}: stage {name} was skipped (ran before this invocation): not one run")
    start, end = (datetime.fromisoformat(manifest[k]) for k in ("started", "ended"))
    seconds = {name: info["seconds"] for name, info in manifest["stages"].items()}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics["inspect"] = near_misses(run_dir)
    return report(metrics, seconds, (end - start).total_seconds())


def report(metrics: dict, seconds: dict[str, float], wall: float) -> str:
    reward, ppo, ev = metrics["reward"], metrics["ppo"], metrics["eval"]
    sampled = metrics.get("eval_sampled", {})
    near = metrics["inspect"]
    core = sum(seconds[s] for s in ("pretrain", "sft", "reward", "ppo", "eval"))
    rows = "".join(
        f"| {label} | {ev[label]['exact_match']:.3f} | {ev[label]['reward_mean']:.3f} | "
        + (
            f"{sampled[label]['exact_match']:.3f} | {sampled[label]['reward_mean']:.3f} |\n"
            if label in sampled
            else "| |\n"
        )
        for label in ev
    )
    times = " | ".join(f"{seconds[s]:.0f} s" for s in seconds)
    distilled = ""
    if "distill" in ev and "student_sft" in ev:
        import yaml

        recipe = yaml.safe_load((ROOT / "recipes/rlhf/arith.yaml").read_text())
        teacher = recipe["stages"]["distill"]["teacher"].strip("${}")  # the stage the student learns from
        distilled = (
            f"Distillation: the student, a {metrics['student']['params'] / 1e6:.2f}M-parameter Llama with the "
            f"teacher's tokenizer, pretrained and SFT-trained as the teacher's start was, answers "
            f"{ev['student_sft']['exact_match']:.3f} of the held-out questions; distilled on-policy from `{teacher}` "
            f"({metrics['pretrain']['params'] / 1e6:.2f}M parameters, {ev[teacher]['exact_match']:.3f}) it answers "
            f"**{ev['distill']['exact_match']:.3f}**.\n\n"
        )
    gain = ev["ppo"]["reward_mean"] - ev["sft"]["reward_mean"]
    import yaml

    kl_coef = yaml.safe_load((ROOT / "recipes/rlhf/arith.yaml").read_text())["stages"]["ppo"]["training"]["kl_coef"]
    return (
        f"{TITLE}\n\n"
        "`tunelab run rlhf/arith` (`make rlhf`), one run, wall time from the shell (`benchmarks/rlhf.py`): "
        "pretrain a 1.1M-parameter Llama, full SFT, a reward model on the SFT model, PPO against it; DPO, KTO, "
        "SimPO (the `cpo` stage), GRPO and RLOO from the same SFT model and ORPO from the pretrained one (it "
        "replaces SFT); a smaller student distilled on-policy from DPO's policy; then every policy's answers to "
        "the 300 held-out questions, greedy and sampled at PPO's temperature, scored by exact match and by the "
        "reward model.\n\n"
        f"Reward model: pairwise accuracy on the 300 held-out pairs **{reward['pairwise_accuracy']:.3f}** "
        f"(untrained head {reward['untrained_pairwise_accuracy']:.3f}; mean margin {reward['margin']:.2f}).\n\n"
        f"PPO: mean reward-model score of sampled answers {ppo['first_score']:.2f} in the first tenth of the "
        f"steps, {ppo['last_score']:.2f} in the last; KL to the reference {ppo['last_kl']:.3f} at the end.\n\n"
        "| policy | exact match, greedy | reward-model score, greedy | exact match, sampled (T=0.7) | "
        "reward-model score, sampled |\n|---|---|---|---|---|\n"
        f"{rows}\n"
        f"{distilled}"
        f"{methods(ev)}\n\n"
        f"PPO minus SFT, mean reward-model score on the held-out questions: **{gain:+.3f}** greedy"
        + (f", **{sampled['ppo']['reward_mean'] - sampled['sft']['reward_mean']:+.3f}** sampled" if sampled else "")
        + ".\n\n"
        f"| {' | '.join(seconds)} | total |\n|{'---|' * (len(seconds) + 1)}\n| {times} | {wall:.0f} s |\n\n"
        f"SFT -> reward -> PPO -> eval with its pretrain: {core / 60:.1f} min of stage time "
        f"(target: at most 15 min); the whole recipe, with every other method beside PPO: {wall / 60:.1f} min.\n\n"
        f"PPO's `kl_coef` is {kl_coef:g} (it was 0.1). PPO's reward is score - kl_coef x (log pi - log pi_ref), and "
        "its kl_coef x log pi_ref part is the SFT model's own log-likelihood, which knows the answers better than "
        f"the reward model: the reward model scores the right answer c above c-1 on {near['c-1']:.0%} of the "
        f"held-out questions and above c+1 on {near['c+1']:.0%}, the SFT model's log-likelihood on "
        f"{near['sft c-1']:.0%} and {near['sft c+1']:.0%} (a score head on the last token does not inherit it). "
        "At 0.1 PPO hacked the reward model, answering c-1 or c+1 where it prefers them (with TRL 1.12: greedy "
        "exact match 0.910 -> 0.550). Measured on the "
        "same SFT and reward model (PPO and the evals rerun, seed 42; greedy exact match, sampled exact match, "
        "sampled score; SFT 0.950, 0.610, 3.02): kl_coef 0.1: 0.590, 0.480, 3.15; 0.3: 0.700, 0.537, 3.25; "
        "1: 0.777, 0.563, 3.23; 3: 0.897, 0.617, 3.27; 10: 0.947, 0.623, 3.23 (seed 1: 0.943, 0.607, 3.29); "
        "10 at a learning rate of 3e-5: 0.950, 0.610, 3.18 (seed 1: 0.943); 10 with 64 prompts per batch: "
        "0.937; 20: 0.943. PPO ends within 0.01 of SFT, not reliably at or above it, and this is why: the "
        "policy PPO converges to, the SFT model's probability (at PPO's temperature) times exp(score / "
        "kl_coef) over c-1, c and c+1, answers c first on "
        + ", ".join(f"{near[f'best kl={b:g}']:.3f} at {b:g}" for b in (0.1, 1, 3, 10))
        + f" (SFT {near['sft best']:.3f}; the reward model's own favourite {near['best kl=0']:.3f}): the reward "
        "model prefers c where SFT does not on too few questions for PPO to gain more than one, and at kl_coef "
        "10 the sampling noise of 128 updates of 32 prompts flips as many near ties (0.943-0.950 over the "
        "settings and seeds above). A better reward model is what would let PPO pass SFT; reward data with half "
        "the rejected answers c-1/c+1 did not give one (c-1 72%, c+1 90% at best, TRL 1.12, one run each). "
        "GRPO's learning rate stays low: higher ones (5e-5 to 2e-4, also with beta 0.1 or 4x the batch) "
        "moved its sampled exact match to 0.55-0.60 (SFT 0.56; TRL 1.12) and lowered the greedy one to "
        "0.79-0.86 (on training questions too: 0.94 -> 0.89-0.90). DPO uses TRL's "
        "`loss_type: [sigmoid, sft]` (RPO): plain sigmoid DPO lowered exact match (0.69 in one run, TRL 1.12).\n"
    )


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    # `python benchmarks/rlhf.py runs/rlhf-arith` reports a run already made with `make rlhf`.
    from common import update_doc

    result = from_run(Path(sys.argv[1])) if len(sys.argv) > 1 else main()
    update_doc(TITLE, result)
    print(result)
