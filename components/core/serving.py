"""Serving a registered ``tessera-t2v`` version over HTTP: MLflow's scoring server, guarded.

``tessera serve`` (:func:`serve`) resolves ``models:/name@alias`` (or ``models:/name/N``) in the
registry, downloads that version once to ``$TESSERA_HOME/serving/<name>/<version>`` and starts
uvicorn on it::

    python -m uvicorn --factory components.core.serving:create_app --host 127.0.0.1 --port 5001
        --workers W --limit-concurrency C+4 --timeout-keep-alive 5 --timeout-graceful-shutdown 30

with ``MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT`` (504 after ``serve.request_timeout_s``),
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false`` (the model is logged from code: nothing to unpickle),
``TESSERA_SERVING_MODEL`` (the local model directory) and ``TESSERA_SERVING_CONFIG`` (JSON:
``model_config`` overrides - the request limits and defaults of ``cfg.serve`` and the registry
identity -, ``max_request_bytes``, ``max_concurrency``, ``model_uri``).

Every worker process runs :func:`create_app`: it loads the pyfunc, builds MLflow's FastAPI app
(``/ping``, ``/health``, ``/version``, ``/invocations``) and wraps it in :class:`Guard`, which on
``POST /invocations``:

- answers **503** ``TEMPORARILY_UNAVAILABLE`` (``Retry-After: 1``) at once when the worker already
  has ``serve.max_concurrency`` requests in flight (one generates, the rest wait for the model);
- answers **413** ``REQUEST_TOO_LARGE`` for a body over ``serve.max_request_bytes`` (from
  ``Content-Length``, or while streaming: it never reads more than the limit + 1 bytes);
- answers **400** ``INVALID_PARAMETER_VALUE`` for JSON that does not parse, unknown top-level keys
  and unknown ``params`` (MLflow would drop those with a log warning), naming the allowed ones;
- passes everything else, body re-fed unchanged, to MLflow (its 400s for wrong types, the model's
  400s for the limits of :func:`components.core.t2v_model.check_request`).

uvicorn's own ``--limit-concurrency`` (``max_concurrency + CONNECTION_HEADROOM`` connections per
worker) is the backstop behind it: it counts every open connection, idle keep-alive ones and
health checks included, and answers a plain-text 503 beyond. The headroom keeps ``/ping`` answering
while every generation slot is busy. See ``infra/serving.md``.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.core.config import Environment, TesseraConfig

log = logging.getLogger(__name__)

DEFAULT_MODEL_URI = "models:/tessera-t2v@champion"
LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
INVOCATIONS = "/invocations"
# MLflow's scoring protocol: exactly one of these carries the rows, ``params`` rides along
INPUT_KEYS = ("dataframe_records", "dataframe_split", "inputs", "instances")
PARAMS_KEY = "params"
COMPLETIONS_KEY = "prompt"  # MLflow's unwrapped ("unified LLM") form: {"prompt": ..., **params}
# connections per worker uvicorn admits beyond the generation slots: health checks, idle keep-alive
CONNECTION_HEADROOM = 4
COMPLETE_MARKER = ".tessera-download-complete"
DOCS = "infra/serving.md"

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class ServingError(RuntimeError):
    """The server cannot be started as asked; the message says why and what to do."""


# --------------------------------------------------------------------------- the guard


def error_body(code: str, message: str) -> bytes:
    """A JSON error in the shape of MLflow's (``error_code``, ``message``)."""
    return json.dumps({"error_code": code, "message": message}).encode()


class Guard:
    """Pure ASGI middleware in front of MLflow's scoring app (see the module docstring).

    ``params``: the names the model's signature accepts (None: not checked).
    ``max_concurrency``: ``POST /invocations`` in flight in this worker (None: unbounded).
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_request_bytes: int,
        params: Iterable[str] | None = None,
        max_concurrency: int | None = None,
    ) -> None:
        if max_request_bytes < 1:
            raise ValueError(f"max_request_bytes must be >= 1, got {max_request_bytes}")
        self.app = app
        self.max_request_bytes = max_request_bytes
        self.params = None if params is None else tuple(params)
        self.max_concurrency = max_concurrency
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not (
            scope["type"] == "http"
            and scope.get("method") == "POST"
            and scope.get("path", "").rstrip("/") == INVOCATIONS
        ):
            await self.app(scope, receive, send)
            return
        if self.max_concurrency is not None and self.in_flight >= self.max_concurrency:
            await respond(
                send,
                503,
                "TEMPORARILY_UNAVAILABLE",
                f"the server is busy: {self.in_flight} requests in flight, "
                f"serve.max_concurrency={self.max_concurrency} per worker; retry shortly",
                headers=[(b"retry-after", b"1")],
            )
            return
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1

        async def send_and_release(message: Message) -> None:
            await send(message)
            # the slot is free once the answer is out: a client's next request on the same
            # connection can come before the app's own clean-up has returned
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                release()

        try:
            await self._invocation(scope, receive, send_and_release)
        finally:
            release()

    async def _invocation(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        limit = self.max_request_bytes
        declared = headers.get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await respond(
                    send, 400, "BAD_REQUEST", f"Content-Length {declared!r} is not a number"
                )
                return
            if int(declared) > limit:
                await self._too_large(send, f"{int(declared)} bytes")
                return
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client went away: nothing to answer
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._too_large(send, f"more than {limit} bytes")
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        mime = headers.get("content-type", "").split(";")[0].strip().lower()
        if not mime:
            await respond(
                send,
                415,
                "BAD_REQUEST",
                "the request has no Content-Type: send JSON with 'Content-Type: application/json'",
            )
            return
        if mime == "application/json":
            problem = self.check_json(body)
            if problem is not None:
                await respond(send, 400, "INVALID_PARAMETER_VALUE", problem)
                return

        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, send: Send, size: str) -> None:
        await respond(
            send,
            413,
            "REQUEST_TOO_LARGE",
            f"the request body has {size}; serve.max_request_bytes={self.max_request_bytes}: "
            "send a shorter prompt or fewer rows (the video settings go in 'params')",
            headers=[(b"connection", b"close")],
        )

    def check_json(self, body: bytes) -> str | None:
        """What is wrong with a JSON body (None: pass it on), by the scoring protocol's keys."""
        try:
            doc = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return f"the request body is not valid JSON: {e}"
        if not isinstance(doc, dict):
            return None  # MLflow's own message: it wants an object with one of INPUT_KEYS
        allowed_params = sorted(self.params) if self.params is not None else None
        if COMPLETIONS_KEY in doc and not set(doc) & set(INPUT_KEYS):
            # {"prompt": ..., "frames": 9, ...}: MLflow passes the signature's params through and
            # every other key to the model, which would ignore it
            if allowed_params is None:
                return None
            unknown = sorted(set(doc) - {COMPLETIONS_KEY, *allowed_params})
            if unknown:
                return (
                    f"unknown key(s) {unknown} in a {{'prompt': ..., <param>: ...}} request; the "
                    f"params are {allowed_params} (at the top level in this form), or send "
                    f"{{'dataframe_records': [{{'prompt': ...}}], 'params': {{...}}}}"
                )
            return None
        unknown = sorted(set(doc) - {*INPUT_KEYS, PARAMS_KEY})
        if unknown:
            return (
                f"unknown top-level key(s) {unknown}: a request has exactly one of "
                f"{list(INPUT_KEYS)} (the prompts) and optionally 'params' "
                f"{allowed_params if allowed_params is not None else ''}".rstrip()
            )
        params = doc.get(PARAMS_KEY)
        if params is None or allowed_params is None:
            return None
        if not isinstance(params, dict):
            return (
                f"'params' must be a JSON object of {allowed_params}, got {type(params).__name__}"
            )
        unknown = sorted(set(params) - set(allowed_params))
        if unknown:
            return f"unknown params {unknown}: this model accepts {allowed_params}"
        return None


async def respond(
    send: Send,
    status: int,
    code: str,
    message: str,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    body = error_body(code, message)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                *(headers or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


# --------------------------------------------------------------------------- the app


def param_names(model: Any) -> list[str] | None:
    """The params of a pyfunc's signature (None: it has no params schema)."""
    schema = model.metadata.get_params_schema()
    return None if schema is None else [p.name for p in schema.params]


def load_served_model(path: str | Path, model_config: dict[str, Any] | None = None) -> Any:
    """The pyfunc at ``path`` with ``model_config`` (the server's limits and defaults, the
    version it serves) over its logged one."""
    import mlflow

    return mlflow.pyfunc.load_model(str(path), model_config=model_config or None)


def create_app() -> Guard:
    """The ASGI app of one server process (``uvicorn --factory``): reads ``TESSERA_SERVING_MODEL``
    and ``TESSERA_SERVING_CONFIG`` (set by :func:`serve`)."""
    from mlflow.pyfunc import scoring_server

    env = Environment.read()
    if not env.serving_model:
        raise ServingError(
            "TESSERA_SERVING_MODEL is not set: start the server with `tessera serve` "
            "(components.core.serving.serve), which downloads the model and sets it"
        )
    try:
        settings = json.loads(env.serving_config or "{}")
    except json.JSONDecodeError as e:
        raise ServingError(f"TESSERA_SERVING_CONFIG is not valid JSON: {e}") from e
    model = load_served_model(env.serving_model, settings.get("model_config"))
    app = scoring_server.init(model)
    log.info("serving %s from %s", settings.get("model_uri", "?"), env.serving_model)
    return Guard(
        app,
        max_request_bytes=int(settings.get("max_request_bytes", 64 * 1024)),
        params=param_names(model),
        max_concurrency=settings.get("max_concurrency"),
    )


# --------------------------------------------------------------------------- launcher


def decode_prediction(prediction: dict[str, Any]) -> bytes:
    """The file bytes (MP4, GIF or PNG, see ``prediction['format']``) of one prediction."""
    try:
        return base64.b64decode(prediction["video"], validate=True)
    except KeyError:
        raise ValueError(
            f"not a tessera-t2v prediction: no 'video' key (keys: {sorted(prediction)})"
        ) from None


def curl_example(url: str) -> str:
    """A one-line shell command that asks ``url`` for a clip and writes ``video.mp4``."""
    body = json.dumps(
        {
            "dataframe_records": [{"prompt": "a red ball bouncing"}],
            "params": {"frames": 9, "steps": 20, "seed": 1},
        },
        separators=(",", ":"),
    )
    save = (
        "import sys,json,base64; "
        'open("video.mp4","wb").write(base64.b64decode(json.load(sys.stdin)["predictions"][0]["video"]))'
    )
    return (
        f"curl -s {url.rstrip('/')}{INVOCATIONS} -H 'Content-Type: application/json' "
        f"-d '{body}' | python3 -c '{save}'"
    )


def check_host(host: str, allow_remote: bool) -> None:
    """Refuse a bind other than loopback unless ``allow_remote``."""
    if host in LOOPBACK or host.startswith("127.") or allow_remote:
        return
    raise ServingError(
        f"refusing to serve on {host}: the scoring server has no TLS and no authentication, so "
        "it listens on loopback (127.0.0.1) by default. To expose it, put it behind a reverse "
        f"proxy with TLS and auth and pass --allow-remote; see {DOCS}"
    )


def serving_settings(cfg: TesseraConfig, name: str, version: str, uri: str) -> dict[str, Any]:
    """What ``TESSERA_SERVING_CONFIG`` carries to the server processes."""
    from components.core import t2v_model

    s = cfg.serve
    return {
        "model_uri": uri,
        "model_config": {
            **t2v_model.limits_of(s),
            "model_name": name,
            "model_version": str(version),
        },
        "max_request_bytes": s.max_request_bytes,
        "max_concurrency": s.max_concurrency,
    }


def uvicorn_command(cfg: TesseraConfig, host: str, port: int) -> list[str]:
    s = cfg.serve
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "components.core.serving:create_app",
        "--host",
        host,
        "--port",
        str(port),
        "--workers",
        str(s.workers),
        "--limit-concurrency",
        str(s.max_concurrency + CONNECTION_HEADROOM),
        "--timeout-keep-alive",
        "5",
        "--timeout-graceful-shutdown",
        "30",
    ]


def download_version(name: str, version: str, home: Path | None = None) -> Path:
    """A local copy of ``models:/name/version`` under ``$TESSERA_HOME/serving`` (kept: versions
    are immutable, so a second ``serve`` of the same version starts without downloading)."""
    import shutil

    from components.core import registry

    home = home or Environment.read().home
    dst = home / "serving" / name / str(version)
    if (dst / COMPLETE_MARKER).is_file():
        return dst
    if dst.exists():
        shutil.rmtree(dst)  # a download that did not finish
    dst.mkdir(parents=True)
    local = registry.download(f"models:/{name}/{version}", dst)
    if not (local / "MLmodel").is_file():
        raise ServingError(f"models:/{name}/{version} downloaded to {local} has no MLmodel file")
    (dst / COMPLETE_MARKER).write_text(f"models:/{name}/{version}\n")
    return local


@dataclass
class ServerHandle:
    """A scoring server started by :func:`serve` in the background."""

    url: str
    pid: int
    log_path: Path
    model_uri: str  # models:/name/N, the version being served
    command: list[str] = field(repr=False)
    _proc: subprocess.Popen | None = field(default=None, repr=False)

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def wait_ready(self, timeout: float = 180.0) -> ServerHandle:
        """Wait until ``/ping`` answers 200 (the model is loaded); raise if the server exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc is not None and self._proc.poll() is not None:
                raise ServingError(
                    f"the scoring server exited with code {self._proc.returncode} before it was "
                    f"ready; log {self.log_path}:\n{self.log_tail()}"
                )
            if self.healthy():
                return self
            time.sleep(0.5)
        raise ServingError(
            f"the scoring server on {self.url} did not answer /ping within {timeout:.0f}s; "
            f"log {self.log_path}:\n{self.log_tail()}"
        )

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 40.0) -> int | None:
        """SIGTERM the server's process group (SIGKILL after ``timeout``); its exit code."""
        if self._proc is None:
            return None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGTERM)
        try:
            self._proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self._proc.wait()
        code, self._proc = self._proc.returncode, None
        return code

    def __enter__(self) -> ServerHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(
    cfg: TesseraConfig,
    model_uri: str = DEFAULT_MODEL_URI,
    host: str | None = None,
    port: int | None = None,
    *,
    allow_remote: bool = False,
    foreground: bool = True,
) -> ServerHandle | int:
    """Serve a registered ``tessera-t2v`` version (see the module docstring).

    ``foreground``: run until Ctrl-C and return the server's exit code. Otherwise start it in the
    background (its own process group, output to ``$TESSERA_HOME/logs/serve-<port>.log``) and
    return a :class:`ServerHandle`; call ``wait_ready()`` before sending requests.
    """
    from components.core import registry, tracking

    host = host or cfg.serve.host
    port = port or cfg.serve.port
    check_host(host, allow_remote)
    tracking.setup()
    version = registry.resolve(model_uri)
    pinned = f"models:/{version.name}/{version.version}"
    local = download_version(version.name, version.version)
    settings = serving_settings(cfg, version.name, version.version, pinned)
    env = {
        **os.environ,
        "MLFLOW_SCORING_SERVER_REQUEST_TIMEOUT": str(cfg.serve.request_timeout_s),
        "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false",
        "TESSERA_SERVING_MODEL": str(local),
        "TESSERA_SERVING_CONFIG": json.dumps(settings),
    }
    command = uvicorn_command(cfg, host, port)
    shown = f"[{host}]" if ":" in host else host
    url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else shown}:{port}"
    about = f"{model_uri} (= {pinned})" if model_uri != pinned else pinned
    if foreground:
        print(f"serving {about} on {url} (Ctrl-C stops it); the model loads first", flush=True)
        print(f"try: {curl_example(url)}", flush=True)
        proc = subprocess.Popen(command, env=env)
        try:
            return proc.wait()
        except KeyboardInterrupt:  # the terminal sent SIGINT to uvicorn too: let it finish
            try:
                return proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait()
    log_path = Environment.read().home / "logs" / f"serve-{port}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    log.info("serving %s on %s (pid %d, log %s)", about, url, proc.pid, log_path)
    return ServerHandle(url, proc.pid, log_path, pinned, command, proc)
