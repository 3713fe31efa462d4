"""Run a GGUF file in llama.cpp (llama-cpp-python) and report what it did, as JSON on stdout.

Runs in its own virtual environment (`make llamacpp`: .venv-llamacpp), so it imports nothing of tunelab's.
Input (JSON on stdin): {"model": PATH, "prompts": [[token ids], ...], "texts": [prompt text, ...],
"new_tokens": N, "threads": T}. For each prompt: llama.cpp's own tokenization of the text (special tokens
parsed, no BOS added: the ids given are the chat template's, BOS included where it writes one), the
logits after the prompt (the first generated position), N greedy tokens (argmax, no sampler), and the
generation speed.
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
from llama_cpp import Llama


def main() -> None:
    job = json.load(sys.stdin)
    llm = Llama(model_path=job["model"], n_ctx=512, logits_all=True, n_threads=job.get("threads", 2), verbose=False)
    out = []
    for ids, text in zip(job["prompts"], job["texts"], strict=True):
        tokenized = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
        tokens = []
        started = time.perf_counter()
        for _ in range(job["new_tokens"]):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            tokens.append(token)
            llm.eval([token])
        seconds = time.perf_counter() - started
        out.append(
            {
                "tokenized": list(tokenized),
                "first_logits": first.tolist(),
                "tokens": tokens,
                "tokens_per_second": len(tokens) / seconds,
            }
        )
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
