"""The serving guard alone, in front of a tiny echo app (no model, no server): 413, 400, 503 and
pass-through with the body re-fed unchanged; plus the launcher's pure helpers."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from fastapi.testclient import TestClient

from components.core import serving
from components.core.config import TesseraConfig
from components.core.t2v_model import PARAMS

LIMIT = 1000


def echo_app() -> FastAPI:
    app = FastAPI()

    @app.post("/invocations")
    async def invocations(request: Request):
        body = await request.body()
        return JSONResponse({"echo": body.decode(), "type": request.headers.get("content-type")})

    @app.get("/ping")
    async def ping():
        return JSONResponse({})

    return app


@pytest.fixture
def client():
    guard = serving.Guard(echo_app(), max_request_bytes=LIMIT, params=list(PARAMS))
    with TestClient(guard) as c:
        yield c


def post(client, body, content_type="application/json"):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post("/invocations", content=data, headers={"Content-Type": content_type})


def test_passes_a_good_request_through_unchanged(client):
    body = json.dumps(
        {"dataframe_records": [{"prompt": "a red ball"}], "params": {"frames": 5, "seed": 1}}
    )
    r = post(client, body)
    assert r.status_code == 200
    assert r.json()["echo"] == body  # re-fed byte for byte
    for key in serving.INPUT_KEYS:
        assert post(client, {key: [{"prompt": "x"}]}).status_code == 200
    # the unwrapped form with params at the top level, CSV, and other routes pass too
    assert post(client, {"prompt": "a ball", "frames": 5}).status_code == 200
    assert post(client, "prompt\na ball\n", "text/csv").json()["echo"] == "prompt\na ball\n"
    assert client.get("/ping").status_code == 200


def test_too_large_by_content_length(client):
    big = json.dumps({"dataframe_records": [{"prompt": "x" * 5000}]})
    r = post(client, big)
    assert r.status_code == 413
    err = r.json()
    assert err["error_code"] == "REQUEST_TOO_LARGE"
    assert (
        "serve.max_request_bytes=1000" in err["message"] and f"{len(big)} bytes" in err["message"]
    )
    # exactly the limit passes
    ok = json.dumps({"dataframe_records": [{"prompt": "x"}]})
    ok = ok.replace('"x"', '"' + "x" * (LIMIT - len(ok) + 1) + '"')
    assert len(ok) == LIMIT and post(client, ok).status_code == 200


def run_guard(guard, chunks, headers):
    """Drive the guard by hand with a streamed body (no Content-Length); returns (status, body,
    bytes of the body the guard pulled, what the app saw)."""
    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1}
        for i, c in enumerate(chunks)
    ]
    pulled = []
    sent = []

    async def receive():
        if messages:
            m = messages.pop(0)
            pulled.append(len(m["body"]))
            return m
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/invocations",
        "headers": [(k.encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(guard(scope, receive, send))
    status = sent[0]["status"]
    body = b"".join(m.get("body", b"") for m in sent[1:])
    return status, json.loads(body), sum(pulled)


def test_too_large_while_streaming_reads_no_more_than_the_limit():
    seen = []

    async def app(scope, receive, send):  # never reached
        seen.append(scope)

    guard = serving.Guard(app, max_request_bytes=LIMIT)
    chunks = [b"x" * 400] * 10
    status, body, pulled = run_guard(guard, chunks, {"content-type": "application/json"})
    assert status == 413 and body["error_code"] == "REQUEST_TOO_LARGE"
    assert pulled <= LIMIT + 400 and not seen  # stopped at the first chunk past the limit


def test_streamed_body_is_reassembled_for_the_app():
    got = []

    async def app(scope, receive, send):
        message = await receive()
        got.append(message)
        await serving.respond(send, 200, "OK", "fine")

    guard = serving.Guard(app, max_request_bytes=LIMIT, params=["frames"])
    doc = json.dumps({"inputs": ["a ball"], "params": {"frames": 3}}).encode()
    status, _, _ = run_guard(
        guard, [doc[:7], doc[7:20], doc[20:]], {"content-type": "application/json"}
    )
    assert status == 200
    assert got == [{"type": "http.request", "body": doc, "more_body": False}]


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({"dataframe_records": [{"prompt": "x"}], "params": {"frame": 5}}, ["'frame'", "frames"]),
        ({"dataframe_records": [{"prompt": "x"}], "parms": {}}, ["'parms'", "dataframe_records"]),
        ({"messages": [{"role": "user", "content": "x"}]}, ["'messages'", "params"]),
        ({"prompt": "x", "params": {"frames": 5}}, ["'params'", "top level"]),
        ({"prompt": "x", "framez": 5}, ["'framez'", "frames"]),
        ({"inputs": ["x"], "params": [5]}, ["'params' must be a JSON object"]),
    ],
)
def test_unknown_keys_are_400_naming_them(client, body, words):
    r = post(client, body)
    assert r.status_code == 400, r.text
    err = r.json()
    assert err["error_code"] == "INVALID_PARAMETER_VALUE"
    for word in words:
        assert word in err["message"], err["message"]


def test_malformed_json_and_missing_content_type(client):
    r = post(client, b'{"inputs": ["a ball"')
    assert r.status_code == 400 and "not valid JSON" in r.json()["message"]
    r = client.post("/invocations", content=b'{"inputs": ["x"]}')
    assert r.status_code == 415 and "Content-Type" in r.json()["message"]
    # a JSON list is MLflow's to refuse (its own message)
    assert post(client, [1, 2]).status_code == 200


def test_bad_content_length_is_400():
    async def app(scope, receive, send):
        raise AssertionError("not reached")

    status, body, _ = run_guard(
        serving.Guard(app, max_request_bytes=LIMIT),
        [b"{}"],
        {"content-type": "application/json", "content-length": "lots"},
    )
    assert status == 400 and "Content-Length" in body["message"]


def test_refuses_beyond_max_concurrency_with_503():
    release = asyncio.Event()
    entered = []

    async def app(scope, receive, send):
        await receive()
        entered.append(1)
        await release.wait()
        await serving.respond(send, 200, "OK", "done")

    guard = serving.Guard(app, max_request_bytes=LIMIT, max_concurrency=2)

    async def one(sent):
        messages = [{"type": "http.request", "body": b'{"inputs": ["x"]}', "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/invocations",
            "headers": [(b"content-type", b"application/json")],
        }
        await guard(scope, receive, send)

    async def main():
        outs = [[] for _ in range(4)]
        tasks = [asyncio.create_task(one(o)) for o in outs[:2]]
        while len(entered) < 2:
            await asyncio.sleep(0)
        await one(outs[2])  # refused at once, while two are in flight
        release.set()
        await asyncio.gather(*tasks)
        await one(outs[3])  # a slot is free again
        return [o[0]["status"] for o in outs], outs[2]

    statuses, refused = asyncio.run(main())
    assert statuses == [200, 200, 503, 200]
    assert (b"retry-after", b"1") in refused[0]["headers"]
    assert "max_concurrency=2" in json.loads(refused[1]["body"])["message"]
    assert guard.in_flight == 0


# --------------------------------------------------------------------------- launcher helpers


def test_check_host_refuses_remote_binds_unless_allowed():
    serving.check_host("127.0.0.1", False)
    serving.check_host("localhost", False)
    with pytest.raises(serving.ServingError, match="infra/serving.md"):
        serving.check_host("0.0.0.0", False)
    serving.check_host("0.0.0.0", True)


def test_decode_prediction_and_curl_example():
    assert serving.decode_prediction({"video": base64.b64encode(b"\x00mp4").decode()}) == b"\x00mp4"
    with pytest.raises(ValueError, match="no 'video' key"):
        serving.decode_prediction({"frames": 1})
    line = serving.curl_example("http://127.0.0.1:5001")
    assert line.startswith("curl -s http://127.0.0.1:5001/invocations ")
    assert '"params":{"frames":9,"steps":20,"seed":1}' in line and "video.mp4" in line
    assert "\n" not in line


def test_settings_and_command_from_the_config():
    from components.core.config import ServeConfig

    cfg = TesseraConfig(
        serve=ServeConfig(max_concurrency=3, workers=2, max_frames=9, default_frames=5)
    )
    settings = serving.serving_settings(cfg, "tessera-t2v", "4", "models:/tessera-t2v/4")
    assert settings["model_config"]["model_version"] == "4"
    assert settings["model_config"]["max_frames"] == 9
    assert settings["max_concurrency"] == 3
    command = serving.uvicorn_command(cfg, "127.0.0.1", 5055)
    joined = " ".join(command[1:])
    assert "-m uvicorn --factory components.core.serving:create_app" in joined
    assert "--workers 2" in joined and "--limit-concurrency 7" in joined
    assert "--port 5055" in joined


def test_slot_is_free_once_the_answer_is_sent():
    """A keep-alive client's next request may arrive while the app still cleans up after its
    answer (MLflow's http middlewares): the slot is released by the last body message."""
    cleanup = asyncio.Event()

    async def app(scope, receive, send):
        await receive()
        await serving.respond(send, 200, "OK", "done")
        await cleanup.wait()  # still "inside" the app after answering

    guard = serving.Guard(app, max_request_bytes=LIMIT, max_concurrency=1)

    async def call(sent):
        messages = [{"type": "http.request", "body": b"x", "more_body": False}]

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/invocations",
            "headers": [(b"content-type", b"text/csv")],
        }
        await guard(scope, receive, send)

    async def main():
        first, second = [], []
        task = asyncio.create_task(call(first))
        while not first:
            await asyncio.sleep(0)
        cleanup.set()  # lets the second call (and the first's clean-up) finish
        await call(second)
        await task
        return first[0]["status"], second[0]["status"]

    assert asyncio.run(main()) == (200, 200)
    assert guard.in_flight == 0
