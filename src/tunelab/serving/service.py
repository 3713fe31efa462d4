"""A running `tunelab serve`: bind the port, load the model, start the engine and the HTTP server; drain on close.

`start` is `tunelab.serve(...)` (tests, notebooks) and what the CLI runs; `run_until_signalled` is the CLI's
life cycle: SIGTERM (or Ctrl-C) stops accepting connections, lets the requests in flight finish (for at most
`drain` seconds, then cancels them), and returns so that the process exits 0.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sys
import threading
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.serving.server import MAX_BODY, READ_TIMEOUT, App, Handler, bind
from tunelab.serving.sources import Plan, plan

BACKENDS = ("transformers", "vllm")


class Server:
    """A server running on background threads. `url` is the OpenAI base URL (`http://HOST:PORT/v1`), `models`
    the names requests may give as `model`. Use it as a context manager, or call `close()`."""

    def __init__(self, httpd: Any, app: App, engine: Any, plan: Plan) -> None:
        self.httpd, self.app, self.engine, self.plan = httpd, app, engine, plan
        host, port = httpd.server_address[:2]
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}/v1"
        self.models = list(app.endpoints)
        self.thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
        self.thread.start()
        self.closed = False

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<tunelab Server {self.url} models={self.models}>"

    def close(self, drain: float = 30.0) -> bool:
        """Stop accepting, let requests in flight finish (at most `drain` seconds, then cancel them), stop.

        True when every request in flight finished within `drain`."""
        if self.closed:
            return True
        self.closed = True
        self.app.draining = True
        self.httpd.shutdown()  # serve_forever returns: no new connection is accepted
        self.httpd.server_close()  # and the port is free: new connections are refused
        finished = self.app.wait_idle(drain)
        self.engine.stop()  # cancels what is left; their connections answer and close
        self.app.wait_idle(5.0)
        with self.app.guard:  # idle keep-alive connections: their threads would wait for READ_TIMEOUT
            for conn in list(self.app.connections):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
        return finished


def start(
    model: str,
    adapters: list[str] | dict[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    quantization: dict[str, Any] | None = None,
    backend: str = "transformers",
    max_batch: int = 32,
    think_end_token: str | None = None,
    max_body: int = MAX_BODY,
    read_timeout: float = READ_TIMEOUT,
    log_requests: bool = False,
) -> Server:
    """Serve `model` (and `adapters`) on host:port (0: a free port); the checks come before anything loads."""
    from tunelab.core.hub import configure_offline
    from tunelab.core.progress import quiet

    if backend not in BACKENDS:
        raise TunelabError(f"--backend is '{backend}': use transformers (any machine) or vllm (CUDA and vLLM)")
    if not isinstance(max_batch, int) or isinstance(max_batch, bool) or max_batch < 1:
        raise TunelabError(f"--max-batch is {max_batch!r}: use a whole number of at least 1 (rows decoded together)")
    if api_key is not None and not api_key.strip():
        raise TunelabError("--api-key is empty: give the key clients must send, or leave the option out")
    if backend == "vllm":
        from tunelab.serving.vllm_backend import check_vllm

        check_vllm(quantization)
    configure_offline()
    with quiet():  # the libraries' loading noise, around the loading only: the caller's settings come back
        served = plan(model, adapters)
        httpd = bind(host, port)
        try:
            lock = threading.Lock()
            if backend == "vllm":
                from tunelab.serving.vllm_backend import load_vllm

                engine, endpoints, context = load_vllm(served, max_batch, think_end_token, lock)
            else:
                engine, endpoints, context = load_transformers(served, quantization, max_batch, think_end_token, lock)
        except BaseException:
            httpd.server_close()
            raise
    try:
        app = App(engine, endpoints, context, think_end_token, api_key, max_body, lock, log_requests)
        httpd.RequestHandlerClass = type("BoundHandler", (Handler,), {"app": app, "timeout": read_timeout})
    except BaseException:
        httpd.server_close()
        raise
    return Server(httpd, app, engine, served)


def load_transformers(served: Plan, quantization: dict[str, Any] | None, max_batch: int, think: str | None, lock):
    """The engine over the base (and its adapters) and the endpoints, one per served name."""
    from tunelab.models.chat import context_length
    from tunelab.models.chat_templates import use_template
    from tunelab.serving.engine import Engine
    from tunelab.serving.protocol import Endpoint
    from tunelab.serving.sources import load

    model, tokenizers = load(served, quantization)
    endpoints = {}
    for name, tokenizer in tokenizers.items():
        adapter = None if name == served.base_name else name
        root = served.base["path"] if adapter is None else served.adapters[name]
        parent = served.base_name if adapter else None
        endpoints[name] = Endpoint(name, adapter, tokenizer, use_template(tokenizer, True), str(root), parent)
    base_tokenizer = tokenizers[served.base_name]
    eos = set()
    for value in (base_tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)):
        eos |= set(value) if isinstance(value, (list, tuple)) else {value} if isinstance(value, int) else set()
    context = context_length(model.config)
    engine = Engine(model, eos, base_tokenizer.pad_token_id, context, max_batch, think, lock)
    return engine, endpoints, context


def run_until_signalled(server: Server, drain: float) -> None:
    """Serve until SIGTERM or Ctrl-C, then drain (a second signal cancels what is left at once)."""
    stop = threading.Event()
    hurry = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        (hurry if stop.is_set() else stop).set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stop.wait(0.5):
            pass
        print(f"draining: finishing the requests in flight (at most {drain:g} s)", file=sys.stderr, flush=True)
        done = threading.Event()
        closer = threading.Thread(target=lambda: (server.close(drain), done.set()), daemon=True)
        closer.start()
        while not done.wait(0.2):
            if hurry.is_set():
                server.app.wait_idle(0)
                server.engine.stop()
                hurry.clear()
        print("stopped", file=sys.stderr, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
