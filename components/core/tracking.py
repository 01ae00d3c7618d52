"""MLflow conventions (DESIGN §6) and a real tracking server on loopback.

- one experiment per pipeline: ``tessera/<pipeline>``, of MLflow's model-training kind (the UI
  opens it on its runs, not on the GenAI trace views);
- one parent run per pipeline run (``tessera.step = pipeline``), nested runs per step; the
  parent ends with the pipeline's real status;
- tags ``tessera.run_id``, ``tessera.step``, ``tessera.git_sha``, ``tessera.profile`` and, on
  every run that reads the versioned dataset, ``tessera.dataset_rev`` with the dataset logged
  as the run's input (:func:`log_lineage`);
- the resolved config is logged as flattened params and as ``config.yaml``.

Runs are found again by their tags, so a retried step resumes its MLflow run instead of
opening a second one.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.core.config import Environment, TesseraConfig, flatten, to_yaml

if TYPE_CHECKING:
    from components.core.manifest import Lineage

PIPELINE_STEP = "pipeline"
# MLflow 3 shows an experiment as GenAI (traces) or model training by this tag and by the UI's
# workflowType; a training platform's experiments are the latter.
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_WORKFLOW = "machine_learning"


class TrackingError(RuntimeError):
    """MLflow could not be reached or used; the message says which server and what to do."""


# --------------------------------------------------------------------------- client side


def tracking_uri(env: Environment | None = None) -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the embedded SQLite store under TESSERA_HOME."""
    env = env or Environment.read()
    return env.mlflow_tracking_uri or f"sqlite:///{env.home / 'mlflow.db'}"


def default_artifact_root(env: Environment | None = None) -> str:
    env = env or Environment.read()
    return (env.home / "mlartifacts").as_uri()


def setup() -> str:
    """Point the mlflow client at :func:`tracking_uri`; returns it."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    return uri


def experiment_name(pipeline: str, cfg: TesseraConfig | None = None) -> str:
    prefix = cfg.tracking.experiment_prefix if cfg else "tessera"
    return f"{prefix}/{pipeline}"


def ensure_experiment(name: str) -> str:
    """Experiment id for ``name``, created if missing (artifacts beside the SQLite store)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = mlflow.MlflowClient()
    try:
        found = client.get_experiment_by_name(name)
    except MlflowException as exc:
        raise TrackingError(
            f"cannot reach MLflow at {mlflow.get_tracking_uri()}: {exc}. Start one with "
            "`tessera mlflow-server` or set MLFLOW_TRACKING_URI"
        ) from exc
    if found is not None:
        if found.tags.get(EXPERIMENT_KIND[0]) != EXPERIMENT_KIND[1]:
            client.set_experiment_tag(found.experiment_id, *EXPERIMENT_KIND)
        return found.experiment_id
    # A server picks its own artifact root; a direct SQLite store needs one spelled out or
    # mlflow would write into ./mlruns of whatever directory it was started from.
    uri = mlflow.get_tracking_uri()
    location = default_artifact_root() if uri.startswith("sqlite:") else None
    try:
        return client.create_experiment(
            name, artifact_location=location, tags=dict([EXPERIMENT_KIND])
        )
    except MlflowException:  # created concurrently by another task
        return client.get_experiment_by_name(name).experiment_id


def experiment_url(server_url: str, experiment_id: str) -> str:
    """The MLflow UI page of an experiment's training runs."""
    return f"{server_url}/#/experiments/{experiment_id}/runs?workflowType={UI_WORKFLOW}"


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
            timeout=10,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def find_run(experiment_id: str, run_id: str, step: str, part: str | None = None):
    """The latest MLflow run tagged with this pipeline run id and step (and ``tessera.part``,
    for one part of a step in parts), or None."""
    import mlflow

    query = f"tags.`tessera.run_id` = '{run_id}' and tags.`tessera.step` = '{step}'"
    if part is not None:
        query += f" and tags.`tessera.part` = '{part}'"
    runs = mlflow.MlflowClient().search_runs(
        [experiment_id], filter_string=query, order_by=["attributes.start_time DESC"], max_results=1
    )
    return runs[0] if runs else None


def ensure_step_run(
    cfg: TesseraConfig,
    step: str,
    *,
    pipeline: str,
    run_id: str,
    parent_run_id: str | None = None,
) -> str:
    """MLflow run id of one step's run, created (RUNNING, not activated) when it has none yet: for
    work that logs into a step's run before the step itself runs (a sweep's plan, its points'
    nested runs). :func:`step_run` later resumes it."""
    import mlflow

    setup()
    experiment_id = ensure_experiment(experiment_name(pipeline, cfg))
    existing = find_run(experiment_id, run_id, step)
    if existing is not None:
        return existing.info.run_id
    client = mlflow.MlflowClient()
    tags = standard_tags(cfg, run_id, step)
    if parent_run_id is not None:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=step, tags=tags)
    _log_config(client, run.info.run_id, cfg)
    return run.info.run_id


def standard_tags(cfg: TesseraConfig, run_id: str, step: str, **extra: str) -> dict[str, str]:
    tags = {
        "tessera.run_id": run_id,
        "tessera.step": step,
        "tessera.git_sha": git_sha(),
        "tessera.profile": cfg.profile,
    }
    tags.update({k: str(v) for k, v in extra.items() if v is not None})
    return tags


def pipeline_run(cfg: TesseraConfig, pipeline: str, run_id: str) -> str:
    """MLflow run id of the parent run for one pipeline run, created once (idempotent)."""
    import mlflow

    setup()
    experiment_id = ensure_experiment(experiment_name(pipeline, cfg))
    existing = find_run(experiment_id, run_id, PIPELINE_STEP)
    if existing is not None:
        if existing.info.status != "RUNNING":  # a re-run of a finished pipeline: reopen it
            mlflow.MlflowClient().update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    client = mlflow.MlflowClient()
    run = client.create_run(
        experiment_id,
        run_name=f"{pipeline}-{run_id}",
        tags=standard_tags(cfg, run_id, PIPELINE_STEP),
    )
    _log_config(client, run.info.run_id, cfg)
    return run.info.run_id


def finish_pipeline_run(
    parent_run_id: str, status: str = "FINISHED", dataset_rev: str | None = None
) -> None:
    """End the parent run with the pipeline's ``status`` (``FINISHED`` | ``FAILED``), tagged
    with the dataset revision it versioned; a step run still ``RUNNING`` under a failed
    pipeline (its task was killed) is ended ``KILLED``."""
    import mlflow

    setup()
    client = mlflow.MlflowClient()
    if dataset_rev:
        client.set_tag(parent_run_id, "tessera.dataset_rev", dataset_rev)
    if status != "FINISHED":
        parent = client.get_run(parent_run_id)
        children = client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' "
            "and attributes.status = 'RUNNING'",
        )
        for child in children:
            client.set_terminated(child.info.run_id, status="KILLED")
    client.set_terminated(parent_run_id, status=status)


def log_lineage(lineage: Lineage, context: str = "training") -> None:
    """Tag the active run with the dataset revision it reads and log the versioned manifest as
    its dataset input (MLflow's Dataset column; digest = DVC's md5; ``context`` its role).
    Nothing happens without an active run (an untracked ``--no-track`` step)."""
    import warnings

    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    if mlflow.active_run() is None:
        return

    with warnings.catch_warnings():  # "can be interpreted in multiple ways": same class twice
        warnings.simplefilter("ignore", UserWarning)
        source = resolve_dataset_source(lineage.manifest)
    digest = lineage.dataset_md5.removesuffix(".dir")
    dataset = MetaDataset(source=source, name="tessera-dataset", digest=digest)
    mlflow.log_input(dataset, context=context, tags={"dataset_rev": lineage.dataset_rev})
    mlflow.set_tags(
        {"tessera.dataset_rev": lineage.dataset_rev, "tessera.dataset_md5": lineage.dataset_md5}
    )


@contextlib.contextmanager
def step_run(
    cfg: TesseraConfig,
    step: str,
    *,
    pipeline: str,
    run_id: str,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    part: str | None = None,
) -> Iterator[Any]:
    """Open (or resume) the MLflow run of one step, nested under the pipeline's parent run (or
    of one ``part`` of it, tagged ``tessera.part``, nested under the step's run).

    Yields the active ``mlflow.ActiveRun``; params, tags and ``config.yaml`` are logged.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    setup()
    experiment_id = ensure_experiment(experiment_name(pipeline, cfg))
    try:
        with _step_run(experiment_id, cfg, step, run_id, parent_run_id, tags, part) as active:
            yield active
    except MlflowException as exc:
        with contextlib.suppress(Exception):  # leave no active run behind in this process
            mlflow.end_run(status="FAILED")
        raise TrackingError(
            f"MLflow at {mlflow.get_tracking_uri()} failed during step {step} of run {run_id}: "
            f"{str(exc)[:500]}. Nothing of the step was committed; re-run it once the server "
            "is back (its MLflow run is resumed, not duplicated)"
        ) from exc


@contextlib.contextmanager
def _step_run(
    experiment_id: str,
    cfg: TesseraConfig,
    step: str,
    run_id: str,
    parent_run_id: str | None,
    tags: dict[str, str] | None,
    part: str | None,
) -> Iterator[Any]:
    import mlflow

    existing = find_run(experiment_id, run_id, step, part)
    resume_id = existing.info.run_id if existing and existing.info.status != "FINISHED" else None
    all_tags = standard_tags(cfg, run_id, step, **(tags or {}))
    if part is not None:
        all_tags["tessera.part"] = part
    with mlflow.start_run(
        run_id=resume_id,
        experiment_id=experiment_id,
        run_name=None if resume_id else (part or step),
        parent_run_id=parent_run_id,
        nested=parent_run_id is not None,
        tags=all_tags,
    ) as active:
        if resume_id:
            mlflow.set_tags(all_tags)
        else:
            _log_config(mlflow.MlflowClient(), active.info.run_id, cfg)
        yield active


def _log_config(client, mlflow_run_id: str, cfg: TesseraConfig) -> None:
    from mlflow.entities import Param

    params = [Param(k, str(v)[:6000]) for k, v in flatten(cfg).items()]
    for i in range(0, len(params), 100):  # the REST API's batch limit
        client.log_batch(mlflow_run_id, params=params[i : i + 100])
    client.log_text(mlflow_run_id, to_yaml(cfg), "config.yaml")


# --------------------------------------------------------------------------- server


class MlflowServer:
    """A real ``mlflow server`` on loopback: by default a SQLite backend and a local artifact
    root under ``home``; a team's database (``backend_store_uri``, e.g. PostgreSQL) and bucket
    (``artifact_root``, e.g. ``s3://…``) otherwise. A SQL backend other than SQLite is brought to
    the installed MLflow's schema with ``mlflow db upgrade`` before the server starts.

    Artifacts are written by clients straight to the artifact root (no proxying), so the same
    store also works when a command talks to ``sqlite:///…/mlflow.db`` directly.
    """

    def __init__(
        self,
        home: Path,
        host: str = "127.0.0.1",
        port: int = 5000,
        *,
        backend_store_uri: str = "",
        artifact_root: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        self.home = Path(home).absolute()
        self.host = host
        self.port = port
        self.backend_store_uri = backend_store_uri or f"sqlite:///{self.home / 'mlflow.db'}"
        self.artifact_root = artifact_root or (self.home / "mlartifacts").as_uri()
        self.env = env
        self.log_path = self.home / "logs" / f"mlflow-server-{port}.log"
        self.pid_path = self.home / f"mlflow-server-{port}.pid"
        self._proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--default-artifact-root",
            self.artifact_root,
            "--no-serve-artifacts",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]

    def environment(self) -> dict[str, str]:
        """The server's environment: ours, ``env``, and the backend URI (it may hold the
        database password: in the environment, not in argv where ``ps`` shows it)."""
        return {
            **os.environ,
            **(self.env or {}),
            "MLFLOW_BACKEND_STORE_URI": self.backend_store_uri,
        }

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return resp.status == 200
        except OSError:
            return False

    def start(self, timeout_s: float = 120.0) -> MlflowServer:
        """Start the server in the background and wait until ``/health`` answers."""
        if self.healthy():
            return self
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = self.environment()
        if not self.backend_store_uri.startswith("sqlite:"):
            upgrade = [sys.executable, "-m", "mlflow", "db", "upgrade", self.backend_store_uri]
            proc = subprocess.run(upgrade, env=env, capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise TrackingError(
                    f"`mlflow db upgrade` of the backend store failed (exit {proc.returncode}):\n"
                    f"{proc.stderr[-2000:]}"
                )
        log = self.log_path.open("ab")
        self._proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        self.pid_path.write_text(str(self._proc.pid))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise TrackingError(
                    f"mlflow server on port {self.port} exited with code {self._proc.returncode}; "
                    f"log {self.log_path}:\n{tail}"
                )
            if self.healthy():
                return self
            time.sleep(0.5)
        self.stop()
        raise TrackingError(
            f"mlflow server on {self.url} did not answer /health within {timeout_s:.0f}s; "
            f"see {self.log_path}"
        )

    def stop(self) -> None:
        """Stop the server this object started, or the one recorded in the pid file."""
        pid = self._proc.pid if self._proc else _read_pid(self.pid_path)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGTERM)
        if self._proc is not None:
            try:
                self._proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
                self._proc.wait()
            self._proc = None
        self.pid_path.unlink(missing_ok=True)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None
