"""A fault-injecting HTTP proxy on loopback in front of an S3 server: answers chosen requests
with 503 SlowDown or drops the connection without an answer, and forwards the rest."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import socket
import threading

SLOW_DOWN = (
    b"<?xml version='1.0' encoding='UTF-8'?><Error><Code>SlowDown</Code>"
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultyS3Proxy(http.server.ThreadingHTTPServer):
    """Request ``n`` (1-based) fails when ``n <= fail_first``, or, while ``n <= until`` (None:
    always), when ``fail_every`` divides it (503 SlowDown) or ``drop_every`` does (the
    connection is closed unanswered); past ``fail_after`` every request fails (the store went
    down mid-step), and so is every request after the first one whose path holds ``down_after``
    (the server went down right after answering it)."""

    daemon_threads = True

    def __init__(
        self,
        upstream: str,
        *,
        fail_first: int = 0,
        fail_every: int = 0,
        drop_every: int = 0,
        until: int | None = None,
        fail_after: int | None = None,
        down_after: str | None = None,
    ) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.rules = (fail_first, fail_every, drop_every, until, fail_after)
        self.down_after, self.down = down_after, False
        self.seen = self.failed = self.dropped = 0
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def decide(self, path: str = "") -> str:
        fail_first, fail_every, drop_every, until, fail_after = self.rules
        with self.lock:
            self.seen += 1
            n = self.seen
            action = "forward"
            if self.down or n <= fail_first or (fail_after is not None and n > fail_after):
                action = "fail"
            elif until is None or n <= until:
                if fail_every and n % fail_every == 0:
                    action = "fail"
                elif drop_every and n % drop_every == 0:
                    action = "drop"
            self.down |= bool(self.down_after) and self.down_after in path
            self.failed += action == "fail"
            self.dropped += action == "drop"
            return action

    @contextlib.contextmanager
    def running(self):
        thread = threading.Thread(target=self.serve_forever, daemon=True)
        thread.start()
        try:
            yield self
        finally:
            self.shutdown()
            self.server_close()


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep test output quiet
        return

    def _relay(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        action = self.server.decide(self.path)
        if action == "drop":
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
            return
        if action == "fail":
            self.send_response(503)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOW_DOWN)))
            self.end_headers()
            self.wfile.write(SLOW_DOWN)
            return
        conn = http.client.HTTPConnection(self.server.upstream, timeout=60)
        try:
            conn.request(self.command, self.path, body=body, headers=dict(self.headers))
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        self.send_response(resp.status)
        for key, value in resp.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_PATCH = do_HEAD = do_DELETE = _relay
