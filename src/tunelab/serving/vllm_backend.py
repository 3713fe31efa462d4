"""`tunelab serve --backend vllm`: the same HTTP server and API, generation by vLLM on a CUDA GPU.

vLLM batches continuously with paged attention and serves LoRA adapters per request (`enable_lora`, one
`LoRARequest` per adapter name), so this backend is a thin engine with the interface of
`tunelab.serving.engine.Engine` (`submit`, `load`, `stop`, `max_batch`): prompts are rendered and tokenized by
tunelab exactly as for the transformers backend and handed to vLLM as token ids.

Not tested here (no CUDA on the machines the suite runs on); checked on the command line: vLLM missing or no
CUDA device is one line and exit code 2.
"""

from __future__ import annotations

import importlib.util
import threading
from collections import deque
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.serving.engine import Event, Job, Token
from tunelab.serving.sources import Plan


def check_vllm(quantization: dict[str, Any] | None) -> None:
    """vLLM and a CUDA device present, and nothing asked that this backend does not do."""
    if importlib.util.find_spec("vllm") is None:
        raise TunelabError(
            "--backend vllm needs vLLM, which is not installed: pip install 'tunelab[vllm]' on a CUDA machine, "
            "or serve with --backend transformers"
        )
    import torch

    if not torch.cuda.is_available():
        raise TunelabError("--backend vllm needs a CUDA GPU and none is visible: serve with --backend transformers")
    if quantization:
        raise TunelabError(
            "--backend vllm loads models in vLLM's own formats: drop --load-in-4bit/--load-in-8bit, or use "
            "--backend transformers for bitsandbytes loading"
        )


def load_vllm(served: Plan, max_batch: int, think: str | None, lock: threading.Lock):
    """(engine, endpoints, context) over vLLM."""
    from vllm import EngineArgs, LLMEngine

    from tunelab.models.chat_templates import use_template
    from tunelab.models.tokenizers import load_tokenizer
    from tunelab.serving.protocol import Endpoint

    ranks = [_rank(path) for path in served.adapters.values()]
    args = EngineArgs(
        model=served.base["path"],
        max_num_seqs=max_batch,
        enable_lora=bool(served.adapters),
        max_loras=max(1, len(served.adapters)),
        max_lora_rank=max([8, *ranks]),
    )
    engine = LLMEngine.from_engine_args(args)
    endpoints = {}
    for name in served.names:
        adapter = None if name == served.base_name else name
        tokenizer = load_tokenizer(served.base["path"] if adapter is None else served.adapters[name])
        root = served.base["path"] if adapter is None else served.adapters[name]
        parent = served.base_name if adapter else None
        endpoints[name] = Endpoint(name, adapter, tokenizer, use_template(tokenizer, True), str(root), parent)
    context = engine.model_config.max_model_len
    return VllmEngine(engine, served, max_batch), endpoints, context


def _rank(path: str) -> int:
    import json
    from pathlib import Path

    return int(json.loads(Path(path, "adapter_config.json").read_text()).get("r", 8))


class VllmEngine:
    """vLLM's LLMEngine stepped on one thread; each job's outputs become tunelab's events."""

    def __init__(self, engine: Any, served: Plan, max_batch: int) -> None:
        from vllm.lora.request import LoRARequest

        self.engine, self.max_batch = engine, max_batch
        self.loras = {name: LoRARequest(name, i + 1, path) for i, (name, path) in enumerate(served.adapters.items())}
        self.pending: deque[Job] = deque()
        self.active: dict[str, tuple[Job, dict[int, tuple[int, int]]]] = {}  # id: (job, {index: (chars, tokens)})
        self.cond = threading.Condition()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="tunelab-serve-vllm", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:
                return self._end(job, "cancelled")
            self.pending.append(job)
            self.cond.notify()

    def load(self) -> dict[str, int]:
        with self.cond:
            return {"running": len(self.active), "waiting": len(self.pending)}

    def stop(self, timeout: float = 10.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        self.thread.join(timeout)

    def _params(self, job: Job) -> Any:
        from vllm import SamplingParams

        s = job.sampling
        return SamplingParams(
            n=job.n,
            temperature=s.temperature,
            top_p=s.top_p,
            seed=s.seed,
            stop=list(s.stop) or None,
            max_tokens=s.max_tokens,
            logprobs=s.top_logprobs if s.logprobs else None,
            ignore_eos=s.ignore_eos,
        )

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.active and not self.stopping:
                    self.cond.wait()
                if self.stopping:
                    for job, _ in self.active.values():
                        self._end(job, "cancelled")
                    for job in self.pending:
                        self._end(job, "cancelled")
                    return
                taken = list(self.pending)
                self.pending.clear()
            try:
                for job in taken:
                    key = str(job.id)
                    prompt = {"prompt_token_ids": job.prompt_ids}
                    lora = self.loras.get(job.adapter) if job.adapter else None
                    self.engine.add_request(key, prompt, self._params(job), lora_request=lora)
                    self.active[key] = (job, {})
                gone = [key for key, (job, _) in self.active.items() if job.cancelled.is_set()]
                if gone:
                    self.engine.abort_request(gone)
                    for key in gone:
                        self._end(self.active.pop(key)[0], "cancelled")
                if self.engine.has_unfinished_requests():
                    for output in self.engine.step():
                        self._dispatch(output)
            except Exception as exc:  # noqa: BLE001 - reported to every waiting connection
                message = f"generation failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                for job, _ in self.active.values():
                    job.events.put(Event("error", text=message))
                self.active.clear()

    def _dispatch(self, output: Any) -> None:
        if output.request_id not in self.active:
            return
        job, seen = self.active[output.request_id]
        for completion in output.outputs:
            index = job.offset + completion.index
            chars, count = seen.get(index, (0, 0))
            ids = list(completion.token_ids)
            tokens = []
            if job.sampling.logprobs and completion.logprobs:
                for token, options in zip(ids[count:], completion.logprobs[count:], strict=False):
                    k = job.sampling.top_logprobs  # vLLM adds the sampled token when it is not among the top k
                    ranked = sorted((lp for lp in options.values() if lp.rank is not None), key=lambda lp: lp.rank)
                    top = [(lp.decoded_token or "", lp.logprob) for lp in ranked if lp.rank <= k]
                    mine = options.get(token)
                    tokens.append(
                        Token(token, mine.decoded_token or "" if mine else "", mine.logprob if mine else None, top)
                    )
            job.events.put(Event("delta", index, completion.text[chars:], tokens))
            seen[index] = (len(completion.text), len(ids))
            if completion.finish_reason is not None:
                job.events.put(Event("end", index, finish=completion.finish_reason, count=len(ids)))
        if output.finished:
            self.active.pop(output.request_id, None)

    def _end(self, job: Job, finish: str) -> None:
        for index in range(job.offset, job.offset + job.n):
            job.events.put(Event("end", index=index, finish=finish))
