"""The HTTP side of `tunelab serve`: OpenAI's endpoints over the standard library's threading HTTP server.

Why the standard library: one thread per connection makes the hard parts plain. A half-sent request (slow
loris) holds only its own thread, and its socket's timeout ends it; a client that goes away is seen on its own
socket (a failed write, or a poll while its answer is generated) and cancels its generation; draining on SIGTERM
is a counter of requests in flight. Generation itself is one engine thread that batches every connection's
requests (`tunelab.serving.engine`).

Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`, with server-sent
events for `stream: true` (chunked transfer encoding, ending with `data: [DONE]`).
"""

from __future__ import annotations

import contextlib
import hmac
import json
import queue
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from tunelab.core.errors import TunelabError
from tunelab.serving.protocol import ApiError, Choice, Endpoint, Request, chunk, envelope, parse, response, sse, usage

MAX_BODY = 4 * 2**20  # bytes of a request body; larger: 413 (a 128k-token prompt is about 0.5 MB)
DISCARD = 64 * 2**20  # bytes of a refused body read and dropped so that its sender sees the 413
READ_TIMEOUT = 30.0  # seconds a connection may take to send a request (or idle between requests)
POLL = 0.2  # seconds between checks that a waiting client is still there


class ClientGone(Exception):
    """The client closed its connection: its generation is cancelled and nothing more is sent."""


class App:
    """What every connection shares: the endpoints, the engine, the key, and the count of requests in flight."""

    def __init__(
        self,
        engine: Any,
        endpoints: dict[str, Endpoint],
        context: int | None,
        think: str | None,
        api_key: str | None,
        max_body: int,
        lock: threading.Lock,
        log: bool,
    ) -> None:
        self.engine, self.endpoints, self.context, self.think = engine, endpoints, context, think
        self.api_key, self.max_body, self.lock, self.log = api_key, max_body, lock, log
        self.created = int(time.time())
        self.draining = False
        self.inflight = 0
        self.guard = threading.Condition()
        self.connections: set[socket.socket] = set()

    def enter(self) -> None:
        with self.guard:
            if self.draining:
                raise ApiError(503, "The server is shutting down: retry on another server.", None, "shutting_down")
            self.inflight += 1

    def leave(self) -> None:
        with self.guard:
            self.inflight -= 1
            self.guard.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.guard:
            while self.inflight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.guard.wait(left)
        return True

    def authorize(self, header: str | None) -> None:
        if self.api_key is None:
            return
        if not header:
            raise ApiError(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
                None,
                None,
            )
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key provided.", None, "invalid_api_key")

    def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [e.card(self.created) for e in self.endpoints.values()]}

    def health(self) -> dict[str, Any]:
        return {"status": "draining" if self.draining else "ok", "models": list(self.endpoints), **self.engine.load()}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and chunked transfer encoding for streams
    server_version = "tunelab-serve"
    sys_version = ""
    timeout = READ_TIMEOUT  # StreamRequestHandler sets it on the socket: a half-sent request ends here
    disable_nagle_algorithm = True  # TCP_NODELAY: each streamed token leaves at once, not after a delayed ACK
    app: App

    def setup(self) -> None:
        super().setup()
        with self.app.guard:
            self.app.connections.add(self.connection)

    def finish(self) -> None:
        with self.app.guard:
            self.app.connections.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        if self.app.log:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self.route("GET")

    def do_POST(self) -> None:  # noqa: N802
        self.route("POST")

    def route(self, method: str) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if path == "/health":
                return self.send_json(200, self.app.health())
            kinds = {"/v1/chat/completions": "chat", "/v1/completions": "text", "/v1/models": "models"}
            if path not in kinds:
                raise ApiError(404, f"Unknown request URL: {method} {path}.", None, "unknown_url")
            self.app.authorize(self.headers.get("Authorization"))
            wanted = "GET" if kinds[path] == "models" else "POST"
            if method != wanted:
                raise ApiError(405, f"{path} takes {wanted} requests, not {method}.", None, "method_not_allowed")
            if kinds[path] == "models":
                return self.send_json(200, self.app.models())
            self.app.enter()
            try:
                self.generate(kinds[path])
            finally:
                self.app.leave()
        except ApiError as exc:
            if method == "POST" and not self.consumed:
                self.close_connection = True  # its body is still in the socket: no next request can follow it
            self.send_json(exc.status, exc.body())
            self.discard()
        except ClientGone:
            self.close_connection = True
        except (TimeoutError, ConnectionError, OSError):
            self.close_connection = True
        except Exception as exc:  # noqa: BLE001 - one 500 body, and the server goes on
            error = ApiError(500, f"Internal error: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}")
            with contextlib.suppress(OSError):
                self.send_json(500, error.body())

    unread = 0
    consumed = False  # the request's body has been read

    def handle_one_request(self) -> None:
        self.consumed = False
        super().handle_one_request()

    def discard(self) -> None:
        """Drop a refused body (up to DISCARD bytes, within the socket's timeout) before the connection closes."""
        left, self.unread = min(self.unread, DISCARD), 0
        with contextlib.suppress(OSError):
            while left > 0 and (data := self.rfile.read(min(left, 2**16))):
                left -= len(data)

    # --- reading ---------------------------------------------------------------------------------------------

    def body(self) -> Any:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "Send the request body with a Content-Length header.", None, "length_required")
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            self.close_connection = True
            raise ApiError(411, "A Content-Length header (a number of bytes) is required.", None, "length_required")
        size = int(length)
        if size > self.app.max_body:
            self.close_connection = True
            self.unread = size  # read and dropped after the answer: a client still sending sees the 413, not a reset
            raise ApiError(
                413,
                f"The request body is {size} bytes, more than this server takes ({self.app.max_body}).",
                None,
                "request_too_large",
            )
        raw = self.rfile.read(size)  # the socket's timeout bounds a client that stops sending
        if len(raw) < size:
            raise ClientGone
        self.consumed = True
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            raise ApiError(
                400,
                "We could not parse the JSON body of your request. The API expects a JSON payload, but what was "
                "sent was not valid JSON.",
                None,
                "invalid_json",
            ) from None

    # --- answering -----------------------------------------------------------------------------------------

    def generate(self, kind: str) -> None:
        app = self.app
        request = parse(kind, self.body(), app.endpoints, app.context, app.engine.max_batch, app.lock)
        for job in request.jobs:
            app.engine.submit(job)
        try:
            if request.stream:
                self.stream(request)
            else:
                self.answer(request)
        except ClientGone:
            request.cancelled.set()
            raise
        finally:
            request.cancelled.set()  # whatever happened, nothing is generated for this request any more

    def next_event(self, request: Request) -> Any:
        while True:
            try:
                return request.events.get(timeout=POLL)
            except queue.Empty:
                if self.client_gone():
                    raise ClientGone from None

    def client_gone(self) -> bool:
        """Whether the peer closed its side (readable with nothing to read) while its answer is generated."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def answer(self, request: Request) -> None:
        choices = [Choice(self.app.think) for _ in range(request.choices)]
        ended = 0
        while ended < request.choices:
            event = self.next_event(request)
            if event.kind == "error":
                raise ApiError(500, event.text)
            choices[event.index].add(event)
            ended += event.kind == "end"
        if any(c.finish == "cancelled" for c in choices):
            raise ApiError(503, "The server shut down before the answer was finished.", None, "shutting_down")
        self.send_json(200, response(request, choices))

    def stream(self, request: Request) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        choices = [Choice(self.app.think) for _ in range(request.choices)]
        if request.kind == "chat":
            for i in range(request.choices):
                item = {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None}
                self.write(sse(envelope(request, [{**item, "finish_reason": None}])))
        ended = 0
        while ended < request.choices:
            event = self.next_event(request)
            if event.kind == "error":
                self.write(sse(ApiError(500, event.text).body()))
                break
            choice = choices[event.index]
            fields = choice.add(event)
            end = event.kind == "end"
            ended += end
            if fields or event.tokens or end:
                self.write(sse(chunk(request, event.index, fields, choice, end, event.tokens)))
        if request.include_usage:
            self.write(sse(envelope(request, [], usage(request, choices))))
        self.write(sse("[DONE]"))
        self.write(b"", last=True)

    def write(self, data: bytes, last: bool = False) -> None:
        """One chunk of a chunked response (`last`: the terminating empty chunk)."""
        try:
            if data:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            if last:
                self.wfile.write(b"0\r\n\r\n")
        except (OSError, ValueError):
            raise ClientGone from None

    def send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        if self.app.draining:
            self.close_connection = True
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)


class HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # 100 clients connecting at once must not overflow the listen backlog
    allow_reuse_address = True


def bind(host: str, port: int) -> HTTPServer:
    """The listening socket, taken before the model loads: a port in use is one line, at once."""
    try:
        return HTTPServer((host, port), Handler, bind_and_activate=True)
    except OSError as exc:
        if exc.errno in (98, 48, 10048):  # EADDRINUSE (Linux, macOS, Windows)
            raise TunelabError(
                f"port {port} on {host} is in use (another server?): choose another with --port"
            ) from None
        raise TunelabError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; check --host and --port") from None
