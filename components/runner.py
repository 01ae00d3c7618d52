"""Run one pipeline step as a transaction: run-partitioned, atomic, idempotent, tracked.

A step is a plain function ``fn(cfg, workdir, **inputs) -> StepResult``. It writes its files
into ``workdir`` (a local staging directory) and returns their names plus small values and
metrics. :func:`run_step` then

1. returns the recorded outputs at once if ``{store}/runs/{run_id}/{step}/`` is committed
   (a re-run of a finished step is a no-op);
2. otherwise opens (or resumes) the step's MLflow run, calls the step, logs its metrics and
   artifacts, commits the directory atomically and records ``outputs.json`` in it;
3. points ``{store}/latest/{step}.json`` at the new outputs, for incremental re-runs.

The same call serves the CLI, an Airflow task and a KFP component; only URIs and small values
come back (XCom-sized).
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components import storage
from components.config import TesseraConfig

OUTPUTS = "outputs.json"


@dataclass
class StepResult:
    files: dict[str, str] = field(default_factory=dict)  # output name -> path under workdir
    values: dict[str, Any] = field(default_factory=dict)  # small JSON values (counts, revs)
    metrics: dict[str, float] = field(default_factory=dict)  # logged to MLflow
    artifacts: list[str] = field(default_factory=list)  # paths under workdir logged to MLflow


@dataclass(frozen=True)
class RunContext:
    """Where a step runs: which pipeline run, and its MLflow parent run (if any)."""

    run_id: str
    pipeline: str = "cli"
    parent_run_id: str | None = None
    track: bool = True

    @staticmethod
    def new(pipeline: str = "cli", track: bool = True) -> RunContext:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        return RunContext(f"{pipeline}-{stamp}-{secrets.token_hex(3)}", pipeline, None, track)


def step_uri(cfg: TesseraConfig, run_id: str, step: str) -> str:
    return storage.join(cfg.store_uri(), "runs", run_id, step)


def checkpoint_dir(ctx: RunContext, step: str) -> Path:
    """Local home of a training step's checkpoints: outside the staging directory and keyed by
    run id and step, so a retried task finds them and resumes."""
    from components.config import Environment

    return Environment.read().home / "checkpoints" / ctx.run_id / step


def latest_outputs(cfg: TesseraConfig, step: str) -> dict[str, Any] | None:
    """Outputs of the most recent committed run of ``step`` in this store, or None."""
    uri = storage.join(cfg.store_uri(), "latest", f"{step}.json")
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def run_step(
    step: str,
    fn: Callable[..., StepResult],
    cfg: TesseraConfig,
    ctx: RunContext,
    **inputs: Any,
) -> dict[str, Any]:
    """Run ``fn`` as step ``step`` of ``ctx``'s pipeline run; returns its outputs (URIs + values)."""
    out = step_uri(cfg, ctx.run_id, step)
    if storage.is_committed(out):
        return json.loads(storage.read_text(storage.join(out, OUTPUTS)))

    with storage.staged_output(out) as workdir:
        if ctx.track:
            from components import tracking

            with tracking.step_run(
                cfg, step, pipeline=ctx.pipeline, run_id=ctx.run_id, parent_run_id=ctx.parent_run_id
            ) as active:
                result = fn(cfg, workdir, **inputs)
                _log_result(result, workdir)
                mlflow_run_id = active.info.run_id
        else:
            result = fn(cfg, workdir, **inputs)
            mlflow_run_id = None
        outputs: dict[str, Any] = {
            name: storage.join(out, rel) if rel else out for name, rel in result.files.items()
        }
        outputs.update(result.values)
        outputs["step_uri"] = out
        outputs["mlflow_run_id"] = mlflow_run_id
        (Path(workdir) / OUTPUTS).write_text(json.dumps(outputs, indent=2, sort_keys=True))

    storage.write_text(
        storage.join(cfg.store_uri(), "latest", f"{step}.json"), json.dumps(outputs, sort_keys=True)
    )
    return outputs


def _log_result(result: StepResult, workdir: Path) -> None:
    import mlflow

    if result.metrics:
        mlflow.log_metrics({k: float(v) for k, v in result.metrics.items()})
    for rel in result.artifacts:
        path = Path(workdir) / rel
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=path.name)
        elif path.exists():
            mlflow.log_artifact(str(path))
