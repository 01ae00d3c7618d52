"""MLflow going down mid-step: the step fails with a message naming the server, nothing is
committed, and the re-run once the server is back completes with one MLflow run for the step,
not two. Requests go through a loopback proxy in front of a real `mlflow server` that starts
answering 503 half-way through the step (the count is measured on a clean run first)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.testing_utils.s3_proxy import FaultyS3Proxy

TESSERA = str(Path(sys.executable).with_name("tessera"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.fault("fault: MLflow down"),
]  # three tracked CLI runs of demo-data: ~40 s


def demo_data(env: dict[str, str], run_id: str) -> subprocess.CompletedProcess:
    cmd = [TESSERA, "demo-data", "-p", "tiny", "--run-id", run_id]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def test_mlflow_down_mid_step_fails_clearly_and_the_rerun_does_not_duplicate(
    mlflow_server, tmp_path
):
    import mlflow

    upstream = mlflow_server.url
    env = {**os.environ, "TESSERA_HOME": str(tmp_path / "home")}
    env |= {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
    with FaultyS3Proxy(upstream).running() as counting:
        clean = demo_data({**env, "MLFLOW_TRACKING_URI": counting.url}, "mlflow-count")
    assert clean.returncode == 0, clean.stderr[-3000:]
    requests = counting.seen
    assert requests >= 6
    with FaultyS3Proxy(upstream, fail_after=requests // 2).running() as down:
        failed = demo_data({**env, "MLFLOW_TRACKING_URI": down.url}, "mlflow-down")
    assert failed.returncode == 2, failed.stderr[-3000:]
    assert f"MLflow at {down.url} failed during step demo_data of run mlflow-down" in failed.stderr
    assert "Traceback" not in failed.stderr
    step_dir = tmp_path / "home" / "store" / "runs" / "mlflow-down" / "demo_data"
    assert not (step_dir / "_SUCCESS").exists()
    client = mlflow.MlflowClient(upstream)
    query = "tags.`tessera.run_id` = 'mlflow-down' and tags.`tessera.step` = 'demo_data'"
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert len(client.search_runs(experiments, query)) == 1  # the half-done run, left open
    again = demo_data({**env, "MLFLOW_TRACKING_URI": upstream}, "mlflow-down")
    assert again.returncode == 0, again.stderr[-3000:]
    assert (step_dir / "_SUCCESS").exists()
    (run,) = client.search_runs(experiments, query)
    assert run.info.status == "FINISHED"
