"""Shared fixtures: an isolated TESSERA_HOME, free ports, a loopback S3 server, MLflow server."""

from __future__ import annotations

import os
import socket

import pytest

# Two cores are shared by two xdist workers: one thread each keeps them from fighting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


# --------------------------------------------------------------------------- the fault suite's report


@pytest.fixture(autouse=True)
def _fault_kind(request, record_property):
    """A test marked ``fault("kind")`` carries its kind in its report (across xdist workers)."""
    if (mark := request.node.get_closest_marker("fault")) is not None:
        record_property("fault", mark.args[0])


def pytest_terminal_summary(terminalreporter):
    """Per kind of fault or bad input: cases injected or tried, and how many the product
    survived (the test passed: the fault was handled, the input refused, nothing lost)."""
    counts: dict[str, list[int]] = {}
    for outcome in ("passed", "failed", "error"):
        for report in terminalreporter.stats.get(outcome, []):
            kind = dict(getattr(report, "user_properties", ())).get("fault")
            if kind is None or report.when not in ("call", "setup"):
                continue
            if report.when == "setup" and outcome != "error":
                continue
            tried = counts.setdefault(kind, [0, 0])
            tried[0] += 1
            tried[1] += outcome == "passed"
    if counts:
        terminalreporter.section("fault suite")
        for kind, (tried, survived) in sorted(counts.items()):
            terminalreporter.write_line(f"{kind:<45} {tried:>3} tried, {survived:>3} survived")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def tessera_home(tmp_path, monkeypatch):
    """TESSERA_HOME in a temporary directory; MLflow falls back to its SQLite store there."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("TESSERA_HOME", str(home))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return home


@pytest.fixture(scope="session")
def s3_server():
    """moto's standalone S3 server on a free loopback port (a real HTTP endpoint)."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point boto3 at the loopback S3 server with throwaway credentials; yields a fresh bucket."""
    import uuid

    from components.core import storage

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    storage._client.cache_clear()
    bucket = f"tessera-{uuid.uuid4().hex[:10]}"
    storage.s3_client().create_bucket(Bucket=bucket)
    yield bucket
    storage._client.cache_clear()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (SQLite + local artifacts) on a free loopback port."""
    from components.core.tracking import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-home"), port=free_port())
    server.start(timeout_s=180)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> str:
    """A model directory of the tiny generator's models (vae/ + dit/ + flow.json)."""
    from tests.testing_utils.models import save_tiny_model

    root = tmp_path_factory.mktemp("model")
    save_tiny_model(root)
    return str(root)


@pytest.fixture
def tiny_model(tiny_model_dir, monkeypatch) -> str:
    """:func:`tiny_model_dir` with the text encoder its DiT was "trained" with (TinyText)
    standing in for the configured one."""
    from components.core import artifacts
    from tests.testing_utils.models import TinyText

    monkeypatch.setattr(artifacts, "load_text_encoder", lambda cfg: TinyText())
    return tiny_model_dir


@pytest.fixture(scope="class")
def tiny_model_class(tiny_model_dir) -> str:
    """:func:`tiny_model` for a whole test class (a step tester's class-scoped step run)."""
    from components.core import artifacts
    from tests.testing_utils.models import TinyText

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(artifacts, "load_text_encoder", lambda cfg: TinyText())
        yield tiny_model_dir
