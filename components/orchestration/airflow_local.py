"""Run the pipeline DAG through a real, local Airflow (SQLite metadata DB under TESSERA_HOME).

:func:`dags_test` migrates the metadata DB (idempotent), creates the pools the DAG uses, and
runs ``dag.test()`` in a child process with ``AIRFLOW_HOME`` set, exactly as ``airflow dags
test`` does. The DAG's ``finish`` task writes the run's summary whatever happened; a failed run
raises :class:`DagRunFailed` naming the failed tasks and where their logs are.

:class:`AirflowServices` starts Airflow's own services instead (api-server, scheduler,
dag-processor, triggerer; LocalExecutor) on loopback, with a login of the simple auth manager,
and :class:`AirflowClient` drives them through the REST API: ``make airflow-ui`` and the
scheduler tests use them. Unlike ``airflow standalone`` nothing relies on ``airflow`` being on
PATH: every service is started from this interpreter's own ``bin``.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
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
    # slots to the runs its nodes hold (infra/kubernetes/values-airflow.yaml)
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


def prepare(env: dict[str, str] | None = None) -> None:
    """Migrate the metadata DB and create the DAG's pools (both idempotent), in one child
    process: each ``airflow`` CLI call would pay Airflow's import again."""
    env = env or airflow_env()
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "components.orchestration.airflow_local", "--prepare"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if proc.returncode != 0:
        raise DagRunFailed(
            f"preparing Airflow's metadata DB under {env['AIRFLOW_HOME']} (db migrate, pools) "
            f"failed:\n{proc.stderr[-3000:]}"
        )


def _prepare_db() -> None:
    """In a child process with Airflow's environment: what ``airflow db migrate`` and
    ``airflow pools set`` do."""
    from airflow.models.pool import Pool
    from airflow.utils import db

    db.upgradedb()
    for name, (slots, description) in POOLS.items():
        Pool.create_or_update_pool(name, slots, description, include_deferred=False)


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
    Path(airflow_env()["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
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
    run_id = sanitize_run_id(conf.get("run_name") or dag_run["run_id"])
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
    """In the child process: prepare the metadata DB, load the DAG file, run it with
    ``dag.test()``, report its state."""
    import importlib.util

    _prepare_db()

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


# --------------------------------------------------------------------------- real services

SERVICES = ("api-server", "scheduler", "dag-processor", "triggerer")
USER = "tessera"  # the simple auth manager's one user (role admin) on a local box


class AirflowServices:
    """Airflow's services as separate processes on loopback, like a deployment runs them.

    The metadata DB is SQLite under ``AIRFLOW_HOME`` (migrated, pools created); the executor is
    LocalExecutor. The api-server and the scheduler share one JWT secret (kept, mode 0600, in
    ``AIRFLOW_HOME/tessera-jwt-secret``) and the execution API URL points at this api-server.
    The simple auth manager writes the generated password of user ``tessera`` to
    ``AIRFLOW_HOME/simple_auth_manager_passwords.json.generated``: :meth:`login` reads it.
    Logs: ``AIRFLOW_HOME/logs/services/<name>.log``.
    """

    def __init__(self, port: int = 8080, env: dict[str, str] | None = None) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.env = {**airflow_env(), **(env or {})}
        self.home = Path(self.env["AIRFLOW_HOME"])
        self.procs: dict[str, subprocess.Popen] = {}

    def _service_env(self) -> dict[str, str]:
        env = dict(self.env)
        secret_file = self.home / "tessera-jwt-secret"
        if not secret_file.is_file():
            self.home.mkdir(parents=True, exist_ok=True)
            secret_file.touch(mode=0o600)
            secret_file.write_text(secrets.token_urlsafe(64))
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
        env.setdefault("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
        env.setdefault("AIRFLOW__API_AUTH__JWT_SECRET", secret_file.read_text().strip())
        env.setdefault("AIRFLOW__API__PORT", str(self.port))
        env.setdefault("AIRFLOW__API__HOST", "127.0.0.1")
        env.setdefault("AIRFLOW__CORE__EXECUTION_API_SERVER_URL", f"{self.url}/execution/")
        env.setdefault("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS", f"{USER}:admin")
        env.setdefault("AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL", "30")
        env.setdefault("AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK", "False")
        env["AIRFLOW__LOGGING__LOGGING_LEVEL"] = self.env.get(
            "AIRFLOW__LOGGING__LOGGING_LEVEL", "INFO"
        )
        return env

    def start(self, timeout_s: float = 180) -> AirflowServices:
        prepare_env = self._service_env()
        prepare(prepare_env)
        logs = self.home / "logs" / "services"
        logs.mkdir(parents=True, exist_ok=True)
        airflow = str(Path(sys.executable).with_name("airflow"))
        for name in SERVICES:
            args = [airflow, name]
            if name == "api-server":
                args += ["--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"]
            with (logs / f"{name}.log").open("ab") as log:
                self.procs[name] = subprocess.Popen(
                    args,
                    env=prepare_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                    cwd=REPO,
                )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            if self.healthy():
                return self
            time.sleep(1)
        self.stop()
        raise DagRunFailed(
            f"Airflow's api-server on {self.url} did not report healthy within {timeout_s:.0f}s; "
            f"see the logs in {logs}"
        )

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log = self.home / "logs" / "services" / f"{name}.log"
                tail = log.read_text(errors="replace")[-3000:]
                raise DagRunFailed(f"airflow {name} exited with code {proc.returncode}:\n{tail}")

    def healthy(self) -> bool:
        """The api-server answers and reports the metadatabase and scheduler healthy."""
        try:
            with urllib.request.urlopen(f"{self.url}/api/v2/monitor/health", timeout=5) as resp:
                health = json.loads(resp.read())
        except (OSError, ValueError):
            return False
        return all(
            health.get(part, {}).get("status") == "healthy"
            for part in ("metadatabase", "scheduler", "dag_processor")
        )

    def password(self) -> str:
        path = self.home / "simple_auth_manager_passwords.json.generated"
        deadline = time.monotonic() + 30
        while not path.is_file() and time.monotonic() < deadline:
            time.sleep(0.5)
        return json.loads(path.read_text())[USER]

    def client(self) -> AirflowClient:
        return AirflowClient(self.url, USER, self.password())

    def stop(self) -> None:
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs = {}

    def __enter__(self) -> AirflowServices:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve_ui(port: int = 8080) -> None:
    """Airflow's services with the DAGs loaded, in the foreground until Ctrl-C (``make
    airflow-ui``): prints the URL and the login."""
    services = AirflowServices(port=port)
    print(f"starting Airflow (api-server, scheduler, dag-processor, triggerer) in {services.home}")
    with services:
        dags, errors = services.client().wait_for_dag_files()
        print(f"DAGs loaded   {', '.join(dags)}")
        for name, trace in errors.items():
            print(f"import error  {name}:\n{trace}")
        print(f"Airflow UI    {services.url}")
        print(f"login         user {USER}, password {services.password()}")
        print(f"              (the simple auth manager's, in {services.home})")
        print(f"service logs  {services.home / 'logs' / 'services'}; Ctrl-C stops them")
        try:
            while True:
                services.check_alive()
                time.sleep(2)
        except KeyboardInterrupt:
            print("stopping Airflow")


class AirflowClient:
    """Airflow's REST API (``/api/v2``) with a bearer token from ``/auth/token``."""

    def __init__(self, url: str, username: str, password: str) -> None:
        self.url = url.rstrip("/")
        body = json.dumps({"username": username, "password": password}).encode()
        request = urllib.request.Request(
            f"{self.url}/auth/token",
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as resp:
            self.token = json.loads(resp.read())["access_token"]

    def call(self, method: str, path: str, body: Any = None) -> Any:
        request = urllib.request.Request(
            f"{self.url}/api/v2/{path.lstrip('/')}",
            data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.token}"},
            method=method,
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")[:2000]
            raise DagRunFailed(f"Airflow API {method} {path} answered {e.code}: {detail}") from e

    def wait_for_dag(self, dag_id: str, timeout_s: float = 180) -> dict[str, Any]:
        """The DAG once the dag-processor has parsed it (the API answers 404 until then)."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return self.call("GET", f"dags/{dag_id}")
            except DagRunFailed:
                if time.monotonic() > deadline:
                    raise
                time.sleep(2)

    def wait_for_dag_files(
        self, folder: Path = DAGS_FOLDER, timeout_s: float = 300
    ) -> tuple[list[str], dict[str, str]]:
        """Wait until the dag-processor has parsed every ``*.py`` in ``folder`` (each file has a
        DAG or an import error); returns the DAG ids and ``{file: stack trace}``."""
        expected = {p.name for p in folder.glob("*.py")}
        deadline = time.monotonic() + timeout_s
        while True:
            dags = self.call("GET", "dags?limit=1000")["dags"]
            errors = {
                Path(e["filename"]).name: e["stack_trace"]
                for e in self.call("GET", "importErrors?limit=1000")["import_errors"]
            }
            seen = {Path(d["fileloc"]).name for d in dags} | set(errors)
            if expected <= seen:
                return sorted(d["dag_id"] for d in dags), errors
            if time.monotonic() > deadline:
                raise DagRunFailed(
                    f"the dag-processor has not parsed {sorted(expected - seen)} in {folder} "
                    f"after {timeout_s:.0f}s; see its log, logs/services/dag-processor.log"
                )
            time.sleep(2)

    def trigger(self, dag_id: str, conf: dict[str, Any], run_id: str | None = None) -> str:
        """Unpause ``dag_id`` and trigger a run with ``conf``; returns the run id."""
        self.wait_for_dag(dag_id)
        self.call("PATCH", f"dags/{dag_id}", {"is_paused": False})
        body: dict[str, Any] = {"logical_date": None, "conf": conf}
        if run_id:
            body["dag_run_id"] = run_id
        return self.call("POST", f"dags/{dag_id}/dagRuns", body)["dag_run_id"]

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.call("GET", f"dags/{dag_id}/dagRuns/{run_id}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        found = self.call("GET", f"dags/{dag_id}/dagRuns/{run_id}/taskInstances?limit=1000")
        return found["task_instances"]

    def wait(self, dag_id: str, run_id: str, timeout_s: float, on_poll=None) -> dict[str, Any]:
        """Poll the run until it leaves queued/running; ``on_poll(client)`` runs each poll."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            run = self.dag_run(dag_id, run_id)
            if run["state"] not in ("queued", "running"):
                return run
            if on_poll is not None:
                on_poll(self)
            time.sleep(3)
        raise DagRunFailed(f"DAG run {dag_id}/{run_id} still running after {timeout_s:.0f}s")


if __name__ == "__main__":
    if sys.argv[1:] == ["--prepare"]:
        _prepare_db()
    else:
        raise SystemExit(_child(*sys.argv[1:4]))
