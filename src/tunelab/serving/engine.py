"""Generation for `tunelab serve`: the requests of many connections answered in shared batches.

Why a decoding loop of its own rather than `model.generate`: a server needs, row by row within one batch, what
generate applies to a whole batch: each request's own sampling settings and seed, stop strings, `max_tokens`,
adapter, logprobs, and leaving (its client is gone) or joining (a request that arrives mid-batch) at any step.
Each step is generate's own (a forward pass over a KV cache, the last position's logits, argmax or
temperature/top-p sampling; left padding with the position ids generate derives from the attention mask), so a
greedy answer is the one `tunelab chat` gives for the same prompt.

Batching (one thread runs every forward pass, so the model is never used concurrently):
- requests waiting when the loop comes round are prefilled together, left-padded as the eval stage pads;
- with a plain KV cache (`DynamicCache` of `DynamicLayer`s: Llama, Qwen, SmolLM, Mistral without sliding
  windows), newly prefilled rows JOIN the running batch at the next step (their cache left-padded to its
  length), so a request waits for one prefill, not for the batch ahead of it to finish; other caches
  (sliding windows, hybrid models) take new rows when the batch ends;
- a finished or cancelled row LEAVES at once (the cache keeps the other rows);
- adapters are chosen per row: peft's mixed-batch forward (`adapter_names`), the base as `__base__`.
"""

from __future__ import annotations

import itertools
import queue
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from tunelab.models.prompting import keep_marker

BASE = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class Sampling:
    """One request's decoding settings (already checked by `tunelab.serving.protocol`)."""

    max_tokens: int
    temperature: float = 0.0  # 0: greedy (argmax), as `tunelab chat` answers
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    ignore_eos: bool = False  # vLLM's extension: generate max_tokens tokens whatever the model says


@dataclass
class Token:
    """One generated token with its log-probability and, when asked, the most likely alternatives."""

    id: int
    text: str
    logprob: float | None = None
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Event:
    """What a job's `events` queue carries to the connection that waits for it.

    kind `delta`: `text` is new visible text of choice `index` (possibly empty), `tokens` the tokens generated
    since the last event; `end`: choice `index` finished for `finish` (stop, length, cancelled) after `count`
    tokens; `error`: generation failed, `text` says why (every choice of the job ends with it)."""

    kind: str
    index: int = 0
    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish: str | None = None
    count: int = 0


_ids = itertools.count(1)


@dataclass
class Job:
    """One prompt to answer `n` times (choices), with one tokenizer (its served model's) and adapter.

    The jobs of one request (a completions request may hold several prompts) share `events` and `cancelled`."""

    prompt_ids: list[int]
    sampling: Sampling
    tokenizer: Any
    adapter: str | None = None  # a peft adapter name; None: the base model
    n: int = 1
    offset: int = 0  # the index of its first choice among its request's (a request of several prompts)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=lambda: next(_ids))
    queued: float = field(default_factory=time.monotonic)


class Row:
    """One choice of a job being generated: its tokens, its visible text, and what has been sent."""

    def __init__(self, job: Job, index: int) -> None:
        self.job, self.index = job, index
        self.generated: list[int] = []
        self.position = len(job.prompt_ids)  # the position id of the next token fed
        self.sent = 0  # characters of the visible text already sent
        self.pending: list[Token] = []  # tokens not yet sent in an event
        self.finish: str | None = None
        seed = job.sampling.seed
        self.generator = None
        if job.sampling.temperature > 0:
            import torch

            self.generator = torch.Generator()
            # Each choice its own stream: n=2 gives two answers, and a seed gives the same ones again.
            self.generator.manual_seed((seed + index) % 2**63 if seed is not None else secrets.randbits(63))


class Engine:
    """The batching loop over one model (a PeftModel when adapters are served) on its own thread."""

    def __init__(
        self,
        model: Any,
        eos_ids: set[int],
        pad_id: int,
        context: int | None,
        max_batch: int = 32,
        think: str | None = None,
        lock: threading.Lock | None = None,
    ) -> None:
        self.model, self.eos_ids, self.pad_id, self.context = model, eos_ids, pad_id, context
        self.max_batch, self.think = max_batch, think
        self.tokenizer_lock = lock or threading.Lock()  # fast tokenizers are not safe to share across threads
        self.peft = hasattr(model, "peft_config")
        self.cache_key = cache_argument(model)
        self.active = getattr(model, "active_adapter", None)  # the adapter peft applies without adapter_names
        self.pending: deque[Job] = deque()
        self.rows: list[Row] = []
        self.cache: Any = None
        self.mask: Any = None
        self.cond = threading.Condition()
        self.stopping = False
        # What tests and /health read: the most rows decoded together, and each finished choice.
        self.largest_batch = 0
        self.finished: deque[tuple[int, int, str, int]] = deque(maxlen=1000)  # (job id, index, finish, tokens)
        self.thread = threading.Thread(target=self._loop, name="tunelab-serve-engine", daemon=True)
        self.thread.start()

    # --- the connections' side -------------------------------------------------------------------------

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.stopping:  # the loop has ended (or is ending): nothing would ever answer this job
                return self._end_job(job, "cancelled")
            self.pending.append(job)
            self.cond.notify()

    def load(self) -> dict[str, int]:
        """Rows being generated and jobs waiting (for /health)."""
        with self.cond:
            return {"running": len(self.rows), "waiting": len(self.pending)}

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything and end the loop (the server drains its requests before calling this)."""
        with self.cond:
            self.stopping = True
            for job in list(self.pending) + [row.job for row in self.rows]:
                job.cancelled.set()
            self.cond.notify()
        self.thread.join(timeout)

    # --- the loop ----------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.rows and not self.stopping:
                    self.cond.wait()
                if self.stopping and not self.rows:
                    for job in self.pending:
                        self._end_job(job, "cancelled")
                    self.pending.clear()
                    return
                taken = self._take()
            try:
                if taken:
                    self._admit(taken)
                self._drop_cancelled()
                if self.rows:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - reported to every waiting connection, the loop goes on
                message = f"generation failed: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
                failed = {job.id: job for job in [row.job for row in self.rows] + taken}
                for job in failed.values():
                    job.events.put(Event("error", text=message))
                self.rows, self.cache, self.mask = [], None, None

    def _take(self) -> list[Job]:
        """Waiting jobs that fit beside the running rows (all of them can join a cache that allows it)."""
        if self.rows and not self._joinable():
            return []
        room = self.max_batch - len(self.rows)
        taken: list[Job] = []
        while self.pending:
            job = self.pending[0]
            if job.cancelled.is_set():
                self.pending.popleft()
                self._end_job(job, "cancelled")
                continue
            if job.n > room and (taken or self.rows):
                break
            taken.append(self.pending.popleft())
            room -= job.n
        return taken

    def _end_job(self, job: Job, finish: str) -> None:
        for index in range(job.offset, job.offset + job.n):
            job.events.put(Event("end", index=index, finish=finish))

    def _joinable(self) -> bool:
        from transformers.cache_utils import DynamicCache, DynamicLayer

        layers = getattr(self.cache, "layers", None)
        return (
            type(self.cache) is DynamicCache
            and bool(layers)
            and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)
        )

    def _new_cache(self) -> Any:
        from transformers.cache_utils import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # a transformers whose DynamicCache takes no config
            return DynamicCache()

    def _forward(self, input_ids: Any, mask: Any, positions: Any, cache: Any, rows: list[Row]) -> Any:
        """The last position's logits (float32, as generate takes them), each row through its adapter."""
        import torch

        kwargs: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": mask,
            "position_ids": positions,
            self.cache_key: cache,
            "use_cache": True,
            "logits_to_keep": 1,
        }
        if self.peft:
            names = {row.job.adapter for row in rows}
            if len(names) == 1 and None not in names:
                name = names.pop()
                if name != self.active:  # set_adapter walks every module: only when the adapter changes
                    self.model.set_adapter(name)
                    self.active = name
            else:  # the base, or several adapters: peft's mixed batch, each row through its own (or none)
                kwargs["adapter_names"] = [row.job.adapter or BASE for row in rows]
        with torch.inference_mode():
            out = self.model(**kwargs)
        return out.logits[:, -1, :].to(dtype=torch.float32)

    def _admit(self, jobs: list[Job]) -> None:
        """Prefill the new rows (left-padded), take their first tokens, and join them to the batch."""
        import torch

        rows = [Row(job, job.offset + i) for job in jobs for i in range(job.n)]
        width = max(len(row.job.prompt_ids) for row in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            prompt = row.job.prompt_ids
            ids[i, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
            mask[i, width - len(prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)  # as generate derives them
        device = self._device()
        cache = self._new_cache()
        logits = self._forward(ids.to(device), mask.to(device), positions.to(device), cache, rows)
        if self.rows:
            self._join(rows, cache, mask.to(device))
        else:
            self.rows, self.cache, self.mask = rows, cache, mask.to(device)
        self.largest_batch = max(self.largest_batch, len(self.rows))
        self._emit(rows, logits)
        self._compact()

    def _device(self) -> Any:
        return next(self.model.parameters()).device

    def _join(self, rows: list[Row], cache: Any, mask: Any) -> None:
        """Concatenate the new rows' cache to the running one, the shorter left-padded to the longer."""
        import torch
        import torch.nn.functional as F

        old, new = self.mask.shape[1], mask.shape[1]
        width = max(old, new)
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            for name in ("keys", "values"):
                a, b = getattr(mine, name), getattr(theirs, name)
                a = F.pad(a, (0, 0, width - old, 0))
                b = F.pad(b, (0, 0, width - new, 0))
                setattr(mine, name, torch.cat([a, b], dim=0))
        self.mask = torch.cat([F.pad(self.mask, (width - old, 0)), F.pad(mask, (width - new, 0))], dim=0)
        self.rows = self.rows + rows

    def _step(self) -> None:
        import torch

        device = self._device()
        last = torch.tensor([[row.generated[-1]] for row in self.rows], dtype=torch.long, device=device)
        positions = torch.tensor([[row.position] for row in self.rows], dtype=torch.long, device=device)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        logits = self._forward(last, self.mask, positions, self.cache, self.rows)
        self._emit(self.rows, logits)
        self._compact()

    def _drop_cancelled(self) -> None:
        for row in self.rows:
            if row.finish is None and row.job.cancelled.is_set():
                self._finish(row, "cancelled")
        self._compact()

    def _compact(self) -> None:
        """Remove finished rows from the batch and the cache, and padding columns no row needs any more."""
        import torch

        keep = [i for i, row in enumerate(self.rows) if row.finish is None]
        if len(keep) == len(self.rows):
            return
        if not keep:
            self.rows, self.cache, self.mask = [], None, None
            return
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.rows = [self.rows[i] for i in keep]
        if self._joinable():
            unused = int((self.mask.cumsum(-1) == 0).sum(-1).min())  # leading padding shared by every row
            if unused:
                self.mask = self.mask[:, unused:]
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]

    # --- choosing tokens and telling the connections --------------------------------------------------

    def _emit(self, rows: list[Row], logits: Any) -> None:
        import torch

        chosen = logits.argmax(dim=-1).tolist()
        wants_logprobs = any(row.job.sampling.logprobs for row in rows)
        logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
        for i, row in enumerate(rows):
            sampling = row.job.sampling
            if sampling.temperature > 0:
                chosen[i] = sample(logits[i], sampling.temperature, sampling.top_p, row.generator)
            row.generated.append(chosen[i])
            row.position += 1
            if sampling.logprobs:
                row.pending.append(self._token(row.job.tokenizer, chosen[i], logprobs[i], sampling.top_logprobs))
            self._advance(row)

    def _token(self, tokenizer: Any, token: int, logprobs: Any, top: int) -> Token:
        with self.tokenizer_lock:
            text = tokenizer.decode([token])
            alternatives = []
            if top:
                values, ids = logprobs.topk(top)
                alternatives = [
                    (tokenizer.decode([t]), float(v)) for t, v in zip(ids.tolist(), values.tolist(), strict=True)
                ]
        return Token(token, text, float(logprobs[token]), alternatives)

    def _advance(self, row: Row) -> None:
        """After a new token: finish the row (EOS, a stop string, max_tokens, the context's end), or send
        the text that can no longer change (held back: a possible stop string's start, a partial character)."""
        sampling = row.job.sampling
        token = row.generated[-1]
        eos = token in self.eos_ids and not sampling.ignore_eos
        if eos:
            row.generated.pop()  # the EOS is no part of the answer (nor of usage's completion tokens)
            if row.pending and row.pending[-1].id == token:
                row.pending.pop()
        text = self._text(row)
        cut = -1
        for stop in sampling.stop:
            at = text.find(stop, max(0, row.sent - len(stop) + 1))
            if at >= 0 and (cut < 0 or at < cut):
                cut = at
        if cut >= 0:
            self._send(row, text[:cut])
            return self._finish(row, "stop")
        if eos:
            self._send(row, text)
            return self._finish(row, "stop")
        full = self.context is not None and row.position >= self.context
        if len(row.generated) >= sampling.max_tokens or full:
            self._send(row, text)
            return self._finish(row, "length")
        hold = held_back(text, sampling.stop)
        self._send(row, text[: len(text) - hold])

    def _text(self, row: Row) -> str:
        tokenizer = row.job.tokenizer
        with self.tokenizer_lock:
            text = tokenizer.decode(row.generated, skip_special_tokens=True)
            if self.think is not None:
                text = keep_marker(tokenizer, row.generated, text, self.think)
        return text

    def _send(self, row: Row, visible: str) -> None:
        if len(visible) > row.sent or row.pending:
            row.job.events.put(Event("delta", row.index, visible[row.sent :], row.pending))
            row.sent, row.pending = max(row.sent, len(visible)), []

    def _finish(self, row: Row, finish: str) -> None:
        row.finish = finish
        if row.pending:
            row.job.events.put(Event("delta", row.index, "", row.pending))
            row.pending = []
        row.job.events.put(Event("end", row.index, finish=finish, count=len(row.generated)))
        self.finished.append((row.job.id, row.index, finish, len(row.generated)))


def cache_argument(model: Any) -> str:
    """The forward argument that takes the KV cache: `cache` in transformers from 5.2x, `past_key_values` before
    (which later versions warn about)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of `text` must wait: the start of a stop string (the next token may
    complete it, and a stop string is never sent), or a partial UTF-8 character (decoded as U+FFFD)."""
    hold = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    if text.endswith("\ufffd"):
        hold = max(hold, 1)
    return hold


def sample(logits: Any, temperature: float, top_p: float, generator: Any) -> int:
    """One token drawn as transformers' temperature and top-p warpers then multinomial sampling draw it."""
    import torch

    scores = logits / temperature
    if top_p < 1.0:
        ordered, order = torch.sort(scores, descending=False)
        cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative <= (1 - top_p)
        remove[-1:] = False  # keep at least one token
        scores = scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))
    probs = scores.softmax(dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))
