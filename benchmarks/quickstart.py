"""Wall time of `tunelab run quickstart` as a user runs it, and its before/after exact match."""

from __future__ import annotations


def main() -> str:
    from common import run_recipe

    wall, metrics, seconds = run_recipe("quickstart")
    before, after = metrics["eval"]["pretrained"], metrics["eval"]["sft"]
    times = ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())
    return (
        "## Quickstart\n\n"
        "`tunelab run quickstart` (the command `make demo` runs), one run, wall time from the shell "
        "(`benchmarks/quickstart.py`).\n\n"
        "| wall time | stages | exact match before SFT | exact match after SFT | held-out questions |\n"
        "|---|---|---|---|---|\n"
        f"| {wall:.0f} s | {times} | {before['exact_match']:.3f} | **{after['exact_match']:.3f}** | "
        f"{after['examples']} |\n"
    )


if __name__ == "__main__":
    print(main())
