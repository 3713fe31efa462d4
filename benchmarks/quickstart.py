"""Wall time of `tunelab run quickstart` as a user runs it, and its before/after exact match."""

from __future__ import annotations


def main() -> str:
    from common import run_recipe

    wall, metrics, seconds = run_recipe("quickstart")
    before, after = metrics["eval"]["pretrained"], metrics["eval"]["sft"]
    before_after = ("pretrained", "sft")
    times = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
    return (
        "## Quickstart\n\n"
        "`tunelab run quickstart` (the command `make demo` runs), one run, wall time from the shell "
        "(`benchmarks/quickstart.py`).\n\n"
        "| wall time | stages | exact match before SFT | exact match after SFT | held-out questions |\n"
        "|---|---|---|---|---|\n"
        f"| {wall:.0f} s | {times} | {before['exact_match']:.3f} | **{after['exact_match']:.3f}** | "
        f"{after['examples']} |\n\n"
        "Its `harness` stage scores the same two models through lm-evaluation-harness on tunelab's bundled tasks "
        "(300 questions each):\n\n"
        "| model | tunelab_arith exact match (regex filter) | tunelab_arith_mc acc | tunelab_arith_mc acc_norm |\n"
        "|---|---|---|---|\n" + "".join(_harness_row(label, metrics["harness"][label]) for label in before_after)
    )


def _harness_row(label: str, values: dict) -> str:
    match, acc = values["tunelab_arith/exact_match,first-number"], values["tunelab_arith_mc/acc"]
    return f"| {label} | {match:.3f} | {acc:.3f} | {values['tunelab_arith_mc/acc_norm']:.3f} |\n"


if __name__ == "__main__":
    print(main())
