"""Run the pipeline DAG through a real, local Airflow (SQLite metadata DB under TESSERA_HOME).

:func:`dags_test` migrates the metadata DB (idempotent), creates the pools the DAG uses, and
runs ``dag.test()`` in a child process with ``AIRFLOW_HOME`` set, exactly as ``airflow dags
test`` does. The DAG's ``finish`` task writes the run's summary whatever happened; a failed run
raises :class:`DagRunFailed` naming the failed tasks and where their logs are.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from components.core import storage
from components.core.config import Environment, load_config
from components.orchestration.tasks import sanitize_run_id

REPO = Path(__file__).resolve().parents[2]
DAGS_FOLDER = REPO / "dags"
DAG_ID = "tessera_pipeline"
POOLS = {
    "tessera_dvc": (1, "DVC and git: one version task at a time per workspace"),
    # one training run at a time on this machine (each uses every core); a GPU cluster sets the
    # slots to the runs its nodes hold (infra/values-airflow.yaml)
    "accelerator": (1, "training runs (sweep points): one per free accelerator"),
    "tessera_registry": (1, "MLflow registrations and promotions: one at a time per registry"),
}


class DagRunFailed(RuntimeError):
    """The DAG run ended in a state other than success."""


def airflow_home() -> Path:
    return Environment.read().home / "airflow"


def airflow_env() -> dict[str, str]:
    """The environment for Airflow child processes (Airflow's own settings, nothing secret added)."""
    env = dict(os.environ)
    env.setdefault("AIRFLOW_HOME", str(airflow_home()))
    env.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS_FOLDER))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    env.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
    env.setdefault("TESSERA_HOME", str(Environment.read().home))
    # MLflow prints two links per finished run, to its GenAI view: ~100 lines of a demo's output
    env.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    # retries wait this long unless a task sets its own delay (Airflow's default is 300 s)
    env.setdefault("AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY", "30")
    return env


def _airflow(*args: str) -> None:
    airflow = Path(sys.executable).with_name("airflow")
    proc = subprocess.run([str(airflow), *args], env=airflow_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise DagRunFailed(f"`airflow {' '.join(args)}` failed:\n{proc.stderr[-3000:]}")


def prepare() -> None:
    """Migrate the metadata DB and create the DAG's pools (both idempotent)."""
    Path(airflow_env()["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    _airflow("db", "migrate")
    for name, (slots, description) in POOLS.items():
        _airflow("pools", "set", name, str(slots), description)


def dags_test(
    profile: str,
    overrides: list[str],
    source: str = "",
    captions: str = "",
    *,
    dag_id: str = DAG_ID,
    params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run a DAG (the pipeline, or ``dag_id`` with its ``params``) once with ``dag.test()``;
    returns the run's summary (every committed step's outputs, as its ``finish`` task wrote
    it)."""
    prepare()
    conf = {"profile": profile, "overrides": list(overrides), **(params or {})}
    if dag_id == DAG_ID:
        conf |= {"source": source, "captions": captions}
    with tempfile.TemporaryDirectory(prefix="tessera-dagrun-") as tmp:
        report = Path(tmp) / "dagrun.json"
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "components.orchestration.airflow_local",
                dag_id,
                json.dumps(conf),
                str(report),
            ],
            env=airflow_env(),
            cwd=REPO,
        )
        dag_run = json.loads(report.read_text()) if report.is_file() else {}
    logs = f"{airflow_env()['AIRFLOW_HOME']}/logs"
    if not dag_run:
        raise DagRunFailed(
            f"DAG {dag_id} did not run (exit {proc.returncode}); see the output above"
        )
    cfg = load_config(profile, overrides)
    run_id = sanitize_run_id(dag_run["run_id"])
    summary_uri = storage.join(cfg.store_uri(), "runs", run_id, "summary.json")
    summary = json.loads(storage.read_text(summary_uri)) if storage.exists(summary_uri) else {}
    if not dag_run["state"].endswith("success"):
        raise DagRunFailed(
            f"DAG {dag_id} run {dag_run['run_id']} ended {dag_run['state']}: failed tasks "
            f"{summary.get('failed', '(no summary written)')}. Task logs are above and under "
            f"{logs}; training steps also keep theirs beside their checkpoints in "
            f"{Environment.read().home / 'checkpoints' / run_id}"
        )
    return summary


def _child(dag_id: str, conf_json: str, report: str) -> int:
    """In the child process: load the DAG file, run it with ``dag.test()``, report its state."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(dag_id, DAGS_FOLDER / f"{dag_id}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from airflow.sdk import DAG

    dag = next(v for v in vars(module).values() if isinstance(v, DAG) and v.dag_id == dag_id)
    dag_run = dag.test(run_conf=json.loads(conf_json))
    state = str(getattr(dag_run, "state", "unknown"))
    Path(report).write_text(
        json.dumps({"dag_id": dag_id, "run_id": dag_run.run_id, "state": state})
    )
    return 0 if state.endswith("success") else 1


if __name__ == "__main__":
    raise SystemExit(_child(*sys.argv[1:4]))
