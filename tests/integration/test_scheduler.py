"""The tiny pipeline under Airflow's real services, not ``dag.test()``: api-server, scheduler,
dag-processor and triggerer as separate processes on loopback (LocalExecutor, SQLite), the run
triggered through the REST API with a login of the simple auth manager, tracked by a real MLflow
server. While ``train_vae`` trains, its training processes are SIGKILLed right after their first
checkpoint: the scheduler's retry must resume from that checkpoint, not start over.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest

from components.core.tracking import MlflowServer
from components.orchestration.airflow_local import AirflowServices
from tests.testing_utils.services import free_port

# one xdist worker for the whole module: its module-scoped run is made once, not once per worker
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("scheduler")]
DAG = "tessera_pipeline"
# 40 VAE steps, a checkpoint every 10: the kill lands after step 10 with 30 steps still to go
OVERRIDES = ["train_vae.train.steps=40", "train_vae.train.checkpoint_every=10"]


class Killer(threading.Thread):
    """Watches ``checkpoint_dir``; once its first checkpoint is complete, SIGKILLs every process
    that trains into it (the launcher and its ranks), once."""

    def __init__(self, home: Path) -> None:
        super().__init__(daemon=True)
        self.home = home
        self.killed: list[int] = []
        self.at_step = None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            found = sorted(self.home.glob("checkpoints/*/train_vae/step-*/COMPLETE"))
            if found:
                ckpt_dir = str(found[0].parents[1])
                for proc in psutil.process_iter(["pid", "cmdline"]):
                    cmdline = " ".join(proc.info["cmdline"] or [])
                    if ckpt_dir in cmdline and proc.pid != os.getpid():
                        with contextlib.suppress(ProcessLookupError):  # it ended by itself
                            os.kill(proc.pid, signal.SIGKILL)
                            self.killed.append(proc.pid)
                self.at_step = int(found[0].parent.name.split("-")[1])
                return
            time.sleep(0.1)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """This module's own server: its registry sees only this run's model."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow-scheduler"), port=free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def scheduled_run(mlflow_server, tmp_path_factory):
    home = tmp_path_factory.mktemp("tessera-home-scheduler")
    env = {
        "TESSERA_HOME": str(home),
        "AIRFLOW_HOME": str(home / "airflow"),
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "1",
    }
    killer = Killer(home)
    killer.start()
    with AirflowServices(port=free_port(), env=env) as services:
        client = services.client()
        conf = {"profile": "tiny", "overrides": OVERRIDES, "source": "", "captions": ""}
        run_id = client.trigger(DAG, conf)
        run = client.wait(DAG, run_id, timeout_s=2400, on_poll=lambda _: services.check_alive())
        instances = client.task_instances(DAG, run_id)
    killer.done.set()
    return {"home": home, "run": run, "instances": instances, "killer": killer}


def test_scheduler_runs_every_task_to_success(scheduled_run, mlflow_server):
    import mlflow

    run, instances = scheduled_run["run"], scheduled_run["instances"]
    states = {(ti["task_id"], ti.get("map_index", -1)): ti["state"] for ti in instances}
    assert run["state"] == "success", states
    assert {"start", "train_vae", "sweep_point", "register", "promote", "finish"} <= {
        task for task, _ in states
    }
    assert {k: v for k, v in states.items() if v != "success"} == {}  # no source: none skips
    champion = mlflow.MlflowClient(mlflow_server.url).get_model_version_by_alias(
        "tessera-t2v", "champion"
    )
    assert champion.tags["tessera.run_id"].startswith("manual")


@pytest.mark.fault("fault: training killed")
def test_killed_training_resumes_from_its_checkpoint(scheduled_run):
    killer, instances = scheduled_run["killer"], scheduled_run["instances"]
    assert killer.killed, "the training processes of train_vae were never found to kill"
    (train_vae,) = [ti for ti in instances if ti["task_id"] == "train_vae"]
    assert train_vae["state"] == "success" and train_vae["try_number"] == 2, train_vae
    (log,) = scheduled_run["home"].glob("checkpoints/*/train_vae/*.log")
    resumed = [line for line in log.read_text().splitlines() if "resumed from checkpoint" in line]
    assert len(resumed) == 1, log.read_text()[-3000:]
    assert f"at step {killer.at_step}" in resumed[0]
