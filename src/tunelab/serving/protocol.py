"""OpenAI's API for `tunelab serve`: request checking, prompts, and the response and chunk bodies.

Requests are checked field by field with OpenAI's own wording, status and `code` (`Invalid 'max_tokens':
integer below minimum value...`, `invalid_type`, `model_not_found`, `context_length_exceeded`), so a client
that handles OpenAI's errors handles these. Prompts are rendered by `tunelab.models.chat_templates.render`, the
function `tunelab chat` renders with, and a model without a chat template reads a lone user message as plain
text, as `tunelab chat` does.
"""

from __future__ import annotations

import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.models.chat_templates import render
from tunelab.serving.engine import Event, Job, Sampling, Token

DEFAULT_MAX_TOKENS = 256  # `tunelab chat`'s max_new_tokens (tunelab.models.chat.DEFAULTS); OpenAI's completions use 16
MAX_STOPS = 4  # OpenAI's limit on `stop`
MAX_TOP_LOGPROBS = {"chat": 20, "text": 5}  # OpenAI's limits on top_logprobs and completions' logprobs
# Fields clients send that change nothing here (accounting, storage, routing).
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls", "prediction", "modalities"}
# Fields taken when they ask for what is done anyway, refused otherwise.
NEUTRAL = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": None, "best_of": 1, "echo": False}


class ApiError(Exception):
    """An error response: HTTP status and OpenAI's error body."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None, kind: str = ""
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind = kind or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Endpoint:
    """A name requests may give as `model`: the base, or one adapter over it, with its own tokenizer (an
    adapter folder may carry a tokenizer whose chat template differs from the base's)."""

    name: str
    adapter: str | None  # the peft adapter name; None: the base model
    tokenizer: Any
    templated: bool  # prompts go through the tokenizer's chat template
    root: str  # the folder or hub id it was loaded from
    parent: str | None = None  # an adapter's base, by its served name

    def card(self, created: int) -> dict[str, Any]:
        return {
            "id": self.name,
            "object": "model",
            "created": created,
            "owned_by": "tunelab",
            "root": self.root,
            "parent": self.parent,
        }


@dataclass
class Request:
    """A checked request: its jobs (one per prompt), how to answer, and what was asked."""

    kind: str  # chat or text (completions)
    model: str
    jobs: list[Job]
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: str = ""
    created: int = 0

    @property
    def choices(self) -> int:
        return self.n * len(self.jobs)

    @property
    def prompt_tokens(self) -> int:
        return sum(len(job.prompt_ids) for job in self.jobs)


# --- checking fields -----------------------------------------------------------------------------------

JSON_TYPES = {str: "a string", bool: "a boolean", int: "an integer", float: "a number", list: "an array"}


def json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "an object"
    for kind, name in JSON_TYPES.items():
        if isinstance(value, kind):
            return name
    return type(value).__name__


def invalid_type(name: str, expected: str, value: Any) -> ApiError:
    return ApiError(
        400,
        f"Invalid type for '{name}': expected {expected}, but got {json_type(value)} instead.",
        name,
        "invalid_type",
    )


def missing(name: str) -> ApiError:
    return ApiError(400, f"Missing required parameter: '{name}'.", name, "missing_required_parameter")


def integer(body: dict, name: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid_type(name, "an integer", value)
    if low is not None and value < low:
        raise ApiError(
            400,
            f"Invalid '{name}': integer below minimum value. Expected a value >= {low}, but got {value} instead.",
            name,
            "integer_below_min_value",
        )
    if high is not None and value > high:
        raise ApiError(
            400,
            f"Invalid '{name}': integer above maximum value. Expected a value <= {high}, but got {value} instead.",
            name,
            "integer_above_max_value",
        )
    return value


def number(body: dict, name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise invalid_type(name, "a number", value)
    for bad, word, bound, sign in (
        (value < low, "below minimum", low, ">="),
        (value > high, "above maximum", high, "<="),
    ):
        if bad:
            raise ApiError(
                400,
                f"Invalid '{name}': decimal {word} value. Expected a value {sign} {bound}, but got {value} instead.",
                name,
                f"decimal_{word.split()[0]}_{'min' if sign == '>=' else 'max'}_value",
            )
    return float(value)


def boolean(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise invalid_type(name, "a boolean", value)
    return value


def stops(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise invalid_type("stop", "a string or an array of strings", value)
    if len(items) > MAX_STOPS:
        raise ApiError(
            400,
            f"Invalid 'stop': array too long. Expected at most {MAX_STOPS} items.",
            "stop",
            "array_above_max_length",
        )
    if any(not s for s in items):
        raise ApiError(400, "Invalid 'stop': empty strings cannot stop anything.", "stop", "invalid_value")
    return tuple(items)


def check_fields(body: dict, known: set[str]) -> None:
    for name in body:
        if name in IGNORED:
            continue
        if name in NEUTRAL:
            if body[name] not in (NEUTRAL[name], None, {}):
                raise ApiError(400, f"'{name}' is not supported by tunelab serve.", name, "unsupported_parameter")
            continue
        if name not in known:
            raise ApiError(400, f"Unrecognized request argument supplied: {name}", name, "unrecognized_argument")


COMMON = {"model", "max_tokens", "temperature", "top_p", "stop", "seed", "n", "stream", "stream_options"}
COMMON |= {"logprobs", "ignore_eos"}
CHAT = COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format"}
TEXT = COMMON | {"prompt"}


def parse(
    kind: str, body: Any, endpoints: dict[str, Endpoint], context: int | None, max_n: int, lock: threading.Lock
) -> Request:
    """A checked chat (`kind` chat) or completions (`kind` text) request, its prompts tokenized."""
    if not isinstance(body, dict):
        raise ApiError(400, f"The request body must be a JSON object, not {json_type(body)}.", None, "invalid_type")
    check_fields(body, CHAT if kind == "chat" else TEXT)
    name = body.get("model")
    if name is None:
        raise missing("model")
    if not isinstance(name, str):
        raise invalid_type("model", "a string", name)
    endpoint = endpoints.get(name)
    if endpoint is None:
        served = ", ".join(endpoints)
        raise ApiError(404, f"The model `{name}` does not exist. Served here: {served}.", "model", "model_not_found")
    stream = boolean(body, "stream") or False
    options = body.get("stream_options")
    if options is not None and (not isinstance(options, dict) or set(options) - {"include_usage"}):
        raise invalid_type("stream_options", "an object with include_usage", options)
    if options is not None and not stream:
        raise ApiError(400, "The 'stream_options' parameter is only allowed when 'stream' is true.", "stream_options")
    include_usage = bool(boolean(options or {}, "include_usage"))
    n = integer(body, "n", 1, max_n) or 1
    if kind == "chat":
        format_ = body.get("response_format")
        if format_ not in (None, {"type": "text"}):
            raise ApiError(400, "Only response_format {'type': 'text'} is supported.", "response_format")
        logprobs = boolean(body, "logprobs") or False
        top = integer(body, "top_logprobs", 0, MAX_TOP_LOGPROBS["chat"])
        if top is not None and not logprobs:
            raise ApiError(400, "top_logprobs is only allowed when logprobs is true.", "top_logprobs")
        limit = integer(body, "max_completion_tokens", 1)
        limit = limit if limit is not None else integer(body, "max_tokens", 1)
        prompts = [chat_prompt(endpoint, body.get("messages"))]
    else:
        top = integer(body, "logprobs", 0, MAX_TOP_LOGPROBS["text"])
        logprobs = top is not None
        limit = integer(body, "max_tokens", 1)
        prompts = text_prompts(body.get("prompt"))
        if limit is None:
            limit = 16  # OpenAI's default for completions
    temperature = number(body, "temperature", 0.0, 2.0)
    sampling = {
        "temperature": temperature or 0.0,  # absent: greedy, as `tunelab chat` answers (see the README)
        "top_p": 1.0 if (top_p := number(body, "top_p", 0.0, 1.0)) is None else top_p,
        "seed": integer(body, "seed"),
        "stop": stops(body),
        "logprobs": logprobs,
        "top_logprobs": top or 0,
        "ignore_eos": boolean(body, "ignore_eos") or False,
    }
    request = Request(kind, name, [], n, stream, include_usage, logprobs)
    request.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
    request.created = int(time.time())
    for i, (text, templated) in enumerate((p, endpoint.templated and kind == "chat") for p in prompts):
        with lock:
            ids = endpoint.tokenizer(text, add_special_tokens=not templated)["input_ids"]
        tokens = fit(ids, limit, context, "messages" if kind == "chat" else "prompt")
        job = Job(ids, Sampling(max_tokens=tokens, **sampling), endpoint.tokenizer, endpoint.adapter, n, offset=i * n)
        job.events, job.cancelled = request.events, request.cancelled
        request.jobs.append(job)
    return request


def fit(ids: list[int], limit: int | None, context: int | None, where: str) -> int:
    """`max_tokens`, or the default, within the model's context (vLLM's and OpenAI's wording past it)."""
    if not ids:
        raise ApiError(400, f"The {where} is empty after tokenization: give some text.", where, "invalid_value")
    if context is None:
        return limit or DEFAULT_MAX_TOKENS
    wanted = limit if limit is not None else min(DEFAULT_MAX_TOKENS, context - len(ids))
    if len(ids) + max(wanted, 1) > context:
        raise ApiError(
            400,
            f"This model's maximum context length is {context} tokens. However, you requested "
            f"{len(ids) + wanted} tokens ({len(ids)} in the {where}, {wanted} in the completion). "
            f"Please reduce the length of the {where} or completion.",
            where,
            "context_length_exceeded",
        )
    return wanted


ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def chat_prompt(endpoint: Endpoint, messages: Any) -> str:
    """What the model reads: the conversation through the chat template (as `tunelab chat` renders it), or
    for a model without one, the lone user message's text (as `tunelab chat` sends it)."""
    if messages is None:
        raise missing("messages")
    if not isinstance(messages, list):
        raise invalid_type("messages", "an array", messages)
    if not messages:
        raise ApiError(400, "Invalid 'messages': empty array. Expected an array with minimum length 1.", "messages")
    turns = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise invalid_type(where, "an object", message)
        role = message.get("role")
        if role not in ROLES:
            raise ApiError(
                400,
                f"Invalid value for '{where}.role': {role!r}; supported values are 'system', 'developer', 'user' "
                "and 'assistant'.",
                f"{where}.role",
                "invalid_value",
            )
        turns.append({"role": ROLES[role], "content": content_text(message.get("content"), f"{where}.content")})
    if not endpoint.templated:
        if len(turns) != 1 or turns[0]["role"] != "user":
            raise ApiError(
                400,
                f"The model `{endpoint.name}` has no chat template: send one user message (its text is the whole "
                "prompt, as `tunelab chat` sends it) or use /v1/completions.",
                "messages",
            )
        return turns[0]["content"]
    try:
        return render(endpoint.tokenizer, turns, "messages")
    except TunelabError as exc:
        raise ApiError(400, str(exc), "messages") from None


def content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ApiError(400, f"Invalid '{where}': only text parts are supported.", where, "invalid_value")
            parts.append(part["text"])
        return "".join(parts)
    if content is None:
        raise missing(where)
    raise invalid_type(where, "a string or an array of text parts", content)


def text_prompts(prompt: Any) -> list[str]:
    if prompt is None:
        raise missing("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise invalid_type("prompt", "a string or a non-empty array of strings", prompt)
    return prompts


# --- answers ---------------------------------------------------------------------------------------------


class Choice:
    """One choice's text and tokens as they arrive, with the reasoning split off at `think`.

    With `think` (an end-of-reasoning marker such as `</think>`), the whole answer follows the eval stage's rule
    (`tunelab.models.prompting.strip_reasoning`): the reasoning is what comes before the last marker, the content what
    follows it, and an answer without the marker is all content. A stream cannot take back what it sent, so it
    holds the text back until the first marker arrives, then sends the reasoning in one piece and the content as
    it comes (a choice that ends without the marker sends all of it as content)."""

    def __init__(self, think: str | None) -> None:
        self.think = think
        self.raw = ""
        self.tokens: list[Token] = []
        self.finish: str | None = None
        self.count = 0
        self.streamed: str | None = None if think else ""  # content sent so far; None: waiting for the marker

    def add(self, event: Event) -> dict[str, str]:
        """The fields of a stream's delta for `event` (a delta or an end)."""
        self.tokens += event.tokens
        self.raw += event.text
        if event.kind == "end":
            self.finish, self.count = event.finish, event.count
        out: dict[str, str] = {}
        if self.streamed is None:
            if self.think in self.raw:
                head, _, tail = self.raw.partition(self.think)
                out["reasoning_content"], piece, self.streamed = head, tail, ""
            elif event.kind == "end":
                piece, self.streamed = self.raw, ""
            else:
                return out
        else:
            piece = event.text
        if self.think is not None and not self.streamed:
            piece = piece.lstrip()  # strip_reasoning's lstrip, across pieces
        if piece:
            out["content"] = piece
            self.streamed += piece
        return out

    def answer(self) -> tuple[str | None, str]:
        """(reasoning, content) of the whole text."""
        if self.think and self.think in self.raw:
            head, _, tail = self.raw.rpartition(self.think)
            return head, tail.lstrip()
        return None, self.raw


def chat_logprobs(tokens: list[Token]) -> dict[str, Any]:
    def entry(text: str, logprob: float) -> dict[str, Any]:
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    return {
        "content": [{**entry(t.text, t.logprob), "top_logprobs": [entry(s, lp) for s, lp in t.top]} for t in tokens],
        "refusal": None,
    }


def text_logprobs(tokens: list[Token], offset: int = 0) -> dict[str, Any]:
    offsets, at = [], offset
    for token in tokens:
        offsets.append(at)
        at += len(token.text)
    return {
        "tokens": [t.text for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [_first(t.top) for t in tokens],
        "text_offset": offsets,
    }


def _first(top: list[tuple[str, float]]) -> dict[str, float]:
    """Completions' {token: logprob}: of two tokens that decode alike (partial UTF-8 bytes), the likelier."""
    out: dict[str, float] = {}
    for text, logprob in top:
        out.setdefault(text, logprob)
    return out


def usage(request: Request, choices: list[Choice]) -> dict[str, int]:
    completion = sum(c.count for c in choices)
    return {
        "prompt_tokens": request.prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": request.prompt_tokens + completion,
    }


def response(request: Request, choices: list[Choice]) -> dict[str, Any]:
    """The whole answer (`stream: false`)."""
    out = []
    for i, choice in enumerate(choices):
        reasoning, text = choice.answer()
        if request.kind == "chat":
            message = {"role": "assistant", "content": text}
            if reasoning is not None:
                message["reasoning_content"] = reasoning
            item = {"index": i, "message": message}
            item["logprobs"] = chat_logprobs(choice.tokens) if request.logprobs else None
        else:
            item = {"index": i, "text": text}
            item["logprobs"] = text_logprobs(choice.tokens) if request.logprobs else None
        out.append({**item, "finish_reason": finish(choice.finish)})
    return {
        "id": request.id,
        "object": "chat.completion" if request.kind == "chat" else "text_completion",
        "created": request.created,
        "model": request.model,
        "choices": out,
        "usage": usage(request, choices),
        "system_fingerprint": None,
    }


def finish(reason: str | None) -> str | None:
    return reason if reason in ("stop", "length") else None


def chunk(request: Request, index: int, fields: dict[str, Any], choice: Choice, end: bool, tokens: list[Token]):
    """One server-sent event's body for choice `index`."""
    if request.kind == "chat":
        item: dict[str, Any] = {"index": index, "delta": fields}
        item["logprobs"] = chat_logprobs(tokens) if request.logprobs and tokens else None
    else:
        item = {"index": index, "text": fields.get("content", "")}
        item["logprobs"] = text_logprobs(tokens) if request.logprobs and tokens else None
    item["finish_reason"] = finish(choice.finish) if end else None
    return envelope(request, [item])


def envelope(request: Request, items: list[dict[str, Any]], usage_: dict[str, int] | None = None) -> dict[str, Any]:
    body = {
        "id": request.id,
        "object": "chat.completion.chunk" if request.kind == "chat" else "text_completion",
        "created": request.created,
        "model": request.model,
        "choices": items,
        "system_fingerprint": None,
    }
    if request.include_usage:
        body["usage"] = usage_
    return body


def sse(body: dict[str, Any] | str) -> bytes:
    data = body if isinstance(body, str) else json.dumps(body, ensure_ascii=False)
    return f"data: {data}\n\n".encode()
