"""Tracking against a real `mlflow server` on loopback, and the step runner's transactions."""

from __future__ import annotations

import pytest

from components import runner, storage, tracking
from components.config import load_config
from components.runner import RunContext, StepResult

pytestmark = pytest.mark.integration


@pytest.fixture
def mlflow_env(mlflow_server, tessera_home, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    return mlflow_server


def test_server_is_real_and_healthy(mlflow_server):
    assert mlflow_server.healthy()
    assert (mlflow_server.home / "mlflow.db").exists()


def test_nested_runs_with_standard_tags(mlflow_env):
    import mlflow

    cfg = load_config("tiny")
    parent = tracking.pipeline_run(cfg, "test_pipeline", "run-1")
    assert tracking.pipeline_run(cfg, "test_pipeline", "run-1") == parent  # idempotent
    for step in ("ingest", "validate"):
        with tracking.step_run(
            cfg, step, pipeline="test_pipeline", run_id="run-1", parent_run_id=parent
        ):
            mlflow.log_metric("rows", 3.0)
    tracking.finish_pipeline_run(parent)

    exp = mlflow.MlflowClient().get_experiment_by_name("tessera/test_pipeline")
    runs = mlflow.search_runs(
        [exp.experiment_id], filter_string="tags.`tessera.run_id` = 'run-1'", output_format="list"
    )
    by_step = {r.data.tags["tessera.step"]: r for r in runs}
    assert set(by_step) == {"pipeline", "ingest", "validate"}
    for step in ("ingest", "validate"):
        run = by_step[step]
        assert run.data.tags["mlflow.parentRunId"] == parent
        assert run.data.metrics["rows"] == 3.0
        assert run.data.params["ingest.workers"] == "1"
        assert run.data.tags["tessera.profile"] == "tiny"
        assert run.data.tags["tessera.git_sha"]
    assert by_step["pipeline"].info.status == "FINISHED"
    artifacts = [a.path for a in mlflow.MlflowClient().list_artifacts(parent)]
    assert "config.yaml" in artifacts


def test_retried_step_resumes_its_run(mlflow_env):
    import mlflow

    cfg = load_config("tiny")
    with (
        pytest.raises(RuntimeError),
        tracking.step_run(cfg, "train", pipeline="resume", run_id="r") as first,
    ):
        raise RuntimeError("worker died")
    with tracking.step_run(cfg, "train", pipeline="resume", run_id="r") as second:
        mlflow.log_metric("x", 1.0)
    assert second.info.run_id == first.info.run_id


def _step(cfg, workdir, n: int):
    (workdir / "out.txt").write_text("x" * n)
    _step.calls += 1
    return StepResult(
        files={"out": "out.txt"}, values={"n": n}, metrics={"n": n}, artifacts=["out.txt"]
    )


_step.calls = 0


def test_run_step_is_idempotent_and_tracked(mlflow_env):
    import mlflow

    cfg = load_config("tiny")
    ctx = RunContext("idem-1", "test_runner")
    before = _step.calls
    out = runner.run_step("make", _step, cfg, ctx, n=4)
    assert storage.read_text(out["out"]) == "xxxx"
    assert out["n"] == 4 and storage.is_committed(out["step_uri"])
    again = runner.run_step("make", _step, cfg, ctx, n=4)
    assert again == out and _step.calls == before + 1  # second call is a no-op
    assert runner.latest_outputs(cfg, "make") == out
    run = mlflow.get_run(out["mlflow_run_id"])
    assert run.data.metrics["n"] == 4.0


def test_unreachable_server_is_a_clear_error(tessera_home, monkeypatch):
    from tests.conftest import free_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    tracking.setup()
    with pytest.raises(tracking.TrackingError, match="tessera mlflow-server"):
        tracking.ensure_experiment("tessera/x")


def test_sqlite_fallback_keeps_artifacts_under_home(tessera_home):
    import mlflow

    cfg = load_config("tiny")
    assert tracking.setup().startswith("sqlite:///")
    with tracking.step_run(cfg, "s", pipeline="local", run_id="l1") as run:
        mlflow.log_text("hi", "note.txt")
    assert run.info.artifact_uri.startswith((tessera_home / "mlartifacts").as_uri())
