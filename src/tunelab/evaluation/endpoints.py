"""Served models as eval models: `{openai_base_url: http://host:8000/v1, model: NAME}` in `model:`/`models:`.

What an application will talk to is scored the way the application talks to it: through OpenAI's API (the
`openai` package is the client), against `tunelab serve`, vLLM, llama.cpp's server or any compatible one.
Chat-templated prompts go as `messages` (the server renders them with its own template, as it does for
the application); with `chat_template: false` the plain prompt goes to `/v1/completions`. The settings
are the eval's own: greedy unless `generation:` samples, `max_new_tokens` as `max_tokens`, the recipe's
seed. A generation setting the API has no field for is refused, not dropped.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from tunelab.core.errors import TunelabError, unknown_key

KEYS = ("openai_base_url", "model", "api_key")
# GenerationConfig fields a served model is asked for through OpenAI's request fields.
SENT = {"max_new_tokens", "do_sample", "temperature", "top_p", "stop_strings"}
TIMEOUT_S = 600.0


def is_endpoint(value: Any) -> bool:
    return isinstance(value, dict) and "openai_base_url" in value


@dataclass(frozen=True)
class Endpoint:
    """A model served over OpenAI's API: where, under which name, with which key."""

    base_url: str
    model: str
    api_key: str | None = None

    def client(self) -> Any:
        try:
            import openai
        except ImportError:
            raise TunelabError(
                "scoring a served endpoint needs the openai client: pip install 'tunelab[serve]'"
            ) from None
        key = self.api_key or os.environ.get("OPENAI_API_KEY") or "none"
        return openai.OpenAI(base_url=self.base_url, api_key=key, timeout=TIMEOUT_S, max_retries=0)


def endpoint_spec(value: dict[str, Any], where: str) -> Endpoint:
    for key in value:
        if key not in KEYS:
            raise unknown_key(where, key, KEYS, "keys of a served endpoint")
    url = value["openai_base_url"]
    parsed = urlparse(url) if isinstance(url, str) else None
    if parsed is None or parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise TunelabError(
            f"'{where}.openai_base_url' must be the server's OpenAI base URL, e.g. http://127.0.0.1:8000/v1, "
            f"not {url!r}"
        )
    name = value.get("model")
    if not isinstance(name, str) or not name:
        raise TunelabError(
            f"'{where}' needs `model:`, the name the server serves it under (GET {url.rstrip('/')}/models lists them)"
        )
    key = value.get("api_key")
    if key is not None and not isinstance(key, str):
        raise TunelabError(f"'{where}.api_key' must be text (or leave it out and set OPENAI_API_KEY)")
    return Endpoint(url.rstrip("/"), name, key)


def check_endpoint(endpoint: Endpoint, where: str) -> None:
    """The server answers, accepts the key, and serves the model by that name: a run would find out late."""
    import openai

    try:
        names = [m.id for m in endpoint.client().models.list()]
    except openai.AuthenticationError:
        raise TunelabError(
            f"'{where}': {endpoint.base_url} refuses the API key: set `api_key:` (or OPENAI_API_KEY) to the server's"
        ) from None
    except openai.APIConnectionError:
        raise TunelabError(
            f"'{where}': nothing answers at {endpoint.base_url}: start the server (tunelab serve MODEL) or fix "
            "`openai_base_url`"
        ) from None
    except openai.APIError as exc:
        raise TunelabError(f"'{where}': {endpoint.base_url}/models failed: {exc}"[:300]) from None
    if endpoint.model not in names:
        raise TunelabError(
            f"'{where}.model' is '{endpoint.model}', which {endpoint.base_url} does not serve; it serves: "
            + ", ".join(names[:20])
        )


def request_fields(config: Any, given: dict[str, Any], seed: int, where: str) -> dict[str, Any]:
    """OpenAI request fields for the eval's GenerationConfig; a setting with no such field is one line."""
    for key in given:
        if key not in SENT:
            raise TunelabError(
                f"'{where}.{key}' has no field in OpenAI's API, so a served model cannot be asked for it: "
                f"remove it, or score the model in-process (settings sent: {', '.join(sorted(SENT))})"
            )
    fields: dict[str, Any] = {"max_tokens": config.max_new_tokens, "seed": seed}
    if config.do_sample:
        fields.update(temperature=config.temperature, top_p=config.top_p)
    else:
        fields["temperature"] = 0.0
    stops = config.stop_strings
    if stops:
        fields["stop"] = [stops] if isinstance(stops, str) else list(stops)
    return fields


def answers(endpoint: Endpoint, prompts: list[Any], chat: bool, fields: dict[str, Any], concurrency: int) -> list[str]:
    """Each prompt's answer: `messages` to /chat/completions, or text to /completions; sent together (the
    server batches them), returned in order."""
    import openai

    client = endpoint.client()

    def one(prompt: Any) -> str:
        if chat:
            reply = client.chat.completions.create(model=endpoint.model, messages=prompt, **fields)
            return reply.choices[0].message.content or ""
        reply = client.completions.create(model=endpoint.model, prompt=prompt, **fields)
        return reply.choices[0].text

    try:
        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
            return list(pool.map(one, prompts))
    except openai.APIConnectionError:
        raise TunelabError(f"{endpoint.base_url} stopped answering during the eval: is the server still up?") from None
    except openai.APIStatusError as exc:
        raise TunelabError(f"{endpoint.base_url} refused a request ({exc.status_code}): {exc.message}"[:300]) from None
