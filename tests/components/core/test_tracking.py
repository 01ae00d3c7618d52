"""Tracking against a real `mlflow server` on loopback, and the step runner's transactions."""

from __future__ import annotations

import pytest

from components.core import tracking
from components.core.config import load_config

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


def test_experiments_open_on_their_training_runs(mlflow_env):
    import mlflow

    tracking.setup()
    experiment_id = tracking.ensure_experiment("tessera/kind_check")
    tags = mlflow.MlflowClient().get_experiment(experiment_id).tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    url = tracking.experiment_url(mlflow_env.url, experiment_id)
    assert (
        url == f"{mlflow_env.url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    )


def test_a_failed_pipeline_ends_failed_and_ends_its_running_steps(mlflow_env):
    import mlflow

    cfg = load_config("tiny")
    parent = tracking.pipeline_run(cfg, "test_pipeline", "run-failed")
    with tracking.step_run(
        cfg, "ingest", pipeline="test_pipeline", run_id="run-failed", parent_run_id=parent
    ):
        pass
    client = mlflow.MlflowClient()
    killed = client.create_run(  # a step whose task was killed: its run never ended
        client.get_run(parent).info.experiment_id,
        tags={"mlflow.parentRunId": parent, "tessera.step": "train_dit"},
    )
    tracking.finish_pipeline_run(parent, "FAILED", dataset_rev="abc123")
    assert client.get_run(parent).info.status == "FAILED"
    assert client.get_run(parent).data.tags["tessera.dataset_rev"] == "abc123"
    assert client.get_run(killed.info.run_id).info.status == "KILLED"
    steps = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string="tags.`tessera.step` = 'ingest' and tags.`tessera.run_id` = 'run-failed'",
    )
    assert [r.info.status for r in steps] == ["FINISHED"]  # finished steps keep their status


def test_log_lineage_tags_the_run_and_logs_the_dataset_input(mlflow_env, tmp_path):
    import mlflow

    from components.core.manifest import Lineage

    cfg = load_config("tiny")
    manifest = tmp_path / "manifest.parquet"
    manifest.write_bytes(b"PAR1")
    lineage = Lineage(str(manifest), "abc123", "0123456789abcdef.dir")
    tracking.log_lineage(lineage)  # no active run: nothing to do, no error
    with tracking.step_run(cfg, "train_vae", pipeline="test_pipeline", run_id="run-lin") as active:
        tracking.log_lineage(lineage)
    run = mlflow.get_run(active.info.run_id)
    assert run.data.tags["tessera.dataset_rev"] == "abc123"
    (dataset,) = run.inputs.dataset_inputs
    assert dataset.dataset.name == "tessera-dataset"
    assert dataset.dataset.digest == "0123456789abcdef"
    assert "manifest.parquet" in dataset.dataset.source
    assert {t.key: t.value for t in dataset.tags}["mlflow.data.context"] == "training"
