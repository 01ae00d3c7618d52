"""A scripted OpenAI-compatible chat-completions server on a real loopback socket.

``ChatServer`` answers ``POST /v1/chat/completions`` on ``127.0.0.1`` (a free port) from a
script: each request takes the next action (:func:`reply`, :func:`status`, :func:`sleep`,
:func:`raw`); once the script is spent it answers with :func:`echo` (one deterministic choice
per requested ``n``, built from the last user turn and the seed). Every request is recorded
(path, headers, JSON body) in ``server.requests``.

    with ChatServer([status(500), reply("a long caption")]) as server:
        ChatBackend(server.base_url, "tiny").candidates("red ball", seed=0, n=1)
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Answer:
    status: int = 200
    body: bytes = b""
    headers: tuple[tuple[str, str], ...] = ()
    delay_s: float = 0.0  # wait this long before answering (a timeout on the client's side)


Action = Callable[[dict], Answer]  # the request's JSON body -> the answer


def completion(texts: list[str], model: str = "tiny") -> bytes:
    """A chat-completions response body with one choice per text."""
    choices = [
        {"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": "stop"}
        for i, t in enumerate(texts)
    ]
    body = {"id": "chatcmpl-test", "object": "chat.completion", "model": model, "choices": choices}
    return json.dumps(body).encode()


def reply(*texts: str) -> Action:
    """Answer with these choices (whatever ``n`` asked for)."""
    return lambda body: Answer(body=completion(list(texts), body.get("model", "")))


def echo(body: dict) -> Answer:
    """``n`` choices derived from the last user turn and the seed: the same request, the same
    answer."""
    prompt = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
    seed, n = body.get("seed", 0), body.get("n", 1)
    texts = [
        f"A wide shot of {prompt}, seen in soft daylight on a plain grey background. "
        f"Variation {seed}-{i}: the camera is static."
        for i in range(n)
    ]
    return Answer(body=completion(texts, body.get("model", "")))


def status(code: int, body: str = "", headers: dict[str, str] | None = None) -> Action:
    """Answer with an HTTP error status (``Retry-After`` etc. in ``headers``)."""
    answer = Answer(code, body.encode(), tuple((headers or {}).items()))
    return lambda _body: answer


def sleep(seconds: float, then: Action = echo) -> Action:
    """Wait ``seconds`` before answering with ``then`` (the client has usually given up)."""
    return lambda body: dataclasses.replace(then(body), delay_s=seconds)


def raw(body: str, code: int = 200) -> Action:
    """Answer with this body verbatim (malformed JSON, a wrong shape, ...)."""
    return lambda _body: Answer(code, body.encode(), (("Content-Type", "application/json"),))


class ChatServer:
    """A ``ThreadingHTTPServer`` in a thread; use as a context manager."""

    def __init__(self, script: list[Action] | None = None, default: Action = echo) -> None:
        self.script = list(script or [])
        self.default = default
        self.requests: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def base_url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/v1"

    def __enter__(self) -> ChatServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopping.set()  # sleeping handlers wake up and answer a closed socket
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def _next(self, body: dict) -> Answer:
        with self._lock:
            action = self.script.pop(0) if self.script else self.default
        return action(body)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                data = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    body = json.loads(data)
                except ValueError:
                    body = {}
                with server._lock:
                    server.requests.append(
                        {"path": self.path, "headers": dict(self.headers), "body": body}
                    )
                if self.path.rstrip("/") != "/v1/chat/completions":
                    answer = Answer(404, b'{"error": "not found"}')
                else:
                    answer = server._next(body)
                if answer.delay_s and server._stopping.wait(answer.delay_s):
                    return
                # a client that timed out has left: writing to it breaks the pipe
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    self.send_response(answer.status)
                    names = {k.lower() for k, _ in answer.headers}
                    for key, value in answer.headers:
                        self.send_header(key, value)
                    if "content-type" not in names:
                        self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(answer.body)))
                    self.end_headers()
                    self.wfile.write(answer.body)

            def log_message(self, *args: object) -> None:
                """Quiet: http.server would print every request to stderr."""

        return Handler
