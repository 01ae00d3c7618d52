"""Run one pipeline step as a transaction: run-partitioned, atomic, idempotent, tracked.

A step is a :class:`StepSpec`: its one name (module = spec = DAG task id = MLflow
``tessera.step`` tag = CLI command with dashes), its entry ``run(cfg, workdir, **inputs) ->
StepResult`` and what it keeps. The entry writes its files into ``workdir`` (a local staging
directory) and returns their names plus small values and metrics. :func:`run_step` then

1. returns the recorded outputs at once if ``{store}/runs/{run_id}/{step}/`` is committed
   (a re-run of a finished step is a no-op);
2. otherwise checks the config (``spec.check``) before any heavy work, opens (or resumes) the
   step's MLflow run, passes the checkpoint directory to steps that keep checkpoints, calls the
   step, logs its metrics and artifacts, commits the directory atomically and records
   ``outputs.json`` in it;
3. points ``{store}/latest/{step}.json`` at the new outputs, for incremental re-runs.

A step whose work splits into independent parts (``spec.plan`` / ``spec.part``, e.g. encode's
shards) runs each part as its own committed transaction (:func:`run_part`, mapped by Airflow),
then ``spec.run`` gathers the parts' outputs into the step; :func:`run_in_process` does all three in
one process. Parts have no MLflow run of their own: the step's run reports them.

The same calls serve the CLI, an Airflow task and a KFP component; only URIs and small values
come back (XCom-sized).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.core import storage
from components.core.config import ConfigError, Environment, TesseraConfig

OUTPUTS = "outputs.json"


@dataclass
class StepResult:
    files: dict[str, str] = field(default_factory=dict)  # output name -> path under workdir
    values: dict[str, Any] = field(default_factory=dict)  # small JSON values (counts, revs)
    metrics: dict[str, float] = field(default_factory=dict)  # logged to MLflow
    artifacts: list[str] = field(default_factory=list)  # paths under workdir logged to MLflow


@dataclass(frozen=True)
class StepSpec:
    """One pipeline step, as the CLI, the DAG and the runner see it.

    Attributes:
        name: the one name of the step (``train_dit``; the CLI command is ``train-dit``).
        run: the entry, ``run(cfg, workdir, **inputs) -> StepResult``.
        checkpoints: the step keeps checkpoints; :func:`run_step` passes ``checkpoint_dir``, a
            directory outside the staging area that a retried task resumes from.
        check: ``check(cfg)`` raises on a config the step cannot run with, before any work.
        plan: for a step in parts, ``plan(cfg, **inputs) -> [part, ...]`` (small dicts; a
            ``key`` names a part's directory, else its index does).
        part: ``part(cfg, workdir, part, **inputs) -> StepResult`` for one of them; ``run``
            then receives ``parts``, the list of their outputs. With ``checkpoints`` a part gets
            its own ``checkpoint_dir``; a plan or part function with a ``ctx`` parameter gets
            the :class:`RunContext` (to log into MLflow runs of its own).
    """

    name: str
    run: Callable[..., StepResult]
    checkpoints: bool = False
    check: Callable[[TesseraConfig], None] | None = None
    plan: Callable[..., list[dict[str, Any]]] | None = None
    part: Callable[..., StepResult] | None = None

    @property
    def command(self) -> str:
        return self.name.replace("_", "-")


# Airflow's own run id pattern (``[scheduler] allowed_run_id_pattern``), less a leading dot:
# a run id names folders under the store, the checkpoints and MLflow runs.
RUN_ID = re.compile(r"[A-Za-z0-9_~:+-][A-Za-z0-9_.~:+-]{0,249}")


def check_run_id(run_id: str) -> str:
    """``run_id`` when it is a safe folder name, else a ConfigError naming it and the rule."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id):
        raise ConfigError(
            f"invalid run id {run_id!r}: use 1-250 of letters, digits and _ . ~ : + - "
            "(not starting with a dot), as Airflow's run ids do"
        )
    return run_id


@dataclass(frozen=True)
class RunContext:
    """Where a step runs: which pipeline run, and its MLflow parent run (if any)."""

    run_id: str
    pipeline: str = "cli"
    parent_run_id: str | None = None
    track: bool = True

    def __post_init__(self) -> None:
        check_run_id(self.run_id)

    @staticmethod
    def new(pipeline: str = "cli", track: bool = True) -> RunContext:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        return RunContext(f"{pipeline}-{stamp}-{secrets.token_hex(3)}", pipeline, None, track)


def step_uri(cfg: TesseraConfig, run_id: str, step: str) -> str:
    return storage.join(cfg.store_uri(), "runs", run_id, step)


def part_key(part: dict[str, Any]) -> str:
    """A part's identity: its ``key`` when the plan names one (stable when the plan changes),
    else its index as ``00000``."""
    return str(part["key"]) if part.get("key") else f"{part['index']:05d}"


def part_uri(cfg: TesseraConfig, run_id: str, step: str, part: dict[str, Any]) -> str:
    """Where one part of a step commits: ``runs/{run_id}/{step}-parts/{key}``."""
    return storage.join(cfg.store_uri(), "runs", run_id, f"{step}-parts", part_key(part))


def checkpoint_dir(ctx: RunContext, step: str) -> Path:
    """Local home of a training step's checkpoints (and its log): outside the staging directory
    and keyed by run id and step, so a retried task finds them and resumes."""
    return Environment.read().home / "checkpoints" / ctx.run_id / step


def latest_outputs(cfg: TesseraConfig, step: str) -> dict[str, Any] | None:
    """Outputs of the most recent committed run of ``step`` in this store, or None."""
    uri = storage.join(cfg.store_uri(), "latest", f"{step}.json")
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else None


def committed_outputs(out: str) -> dict[str, Any] | None:
    """The recorded outputs of a committed step directory, or None."""
    if not storage.is_committed(out):
        return None
    return json.loads(storage.read_text(storage.join(out, OUTPUTS)))


def run_step(spec: StepSpec, cfg: TesseraConfig, ctx: RunContext, **inputs: Any) -> dict[str, Any]:
    """Run ``spec`` as a step of ``ctx``'s pipeline run; returns its outputs (URIs + values)."""
    out = step_uri(cfg, ctx.run_id, spec.name)
    done = committed_outputs(out)
    if done is not None:
        return done
    if spec.check is not None:
        spec.check(cfg)
    if spec.checkpoints and spec.part is None:  # a step in parts: its parts keep them
        inputs["checkpoint_dir"] = checkpoint_dir(ctx, spec.name)
    parts = inputs.get("parts") if spec.part is not None else None
    outputs = _transaction(out, spec.name, cfg, ctx, spec.run, inputs, ctx.track, parts)
    storage.write_text(
        storage.join(cfg.store_uri(), "latest", f"{spec.name}.json"),
        json.dumps(outputs, sort_keys=True),
    )
    return outputs


def plan_parts(
    spec: StepSpec, cfg: TesseraConfig, ctx: RunContext | None = None, **inputs: Any
) -> list[dict[str, Any]]:
    """The parts of a step in parts (``spec.plan``), each numbered by ``index``."""
    if spec.plan is None or spec.part is None:
        raise TypeError(f"step {spec.name} does not run in parts (its spec has no plan/part)")
    if spec.check is not None:
        spec.check(cfg)
    if ctx is not None and _takes_context(spec.plan):
        inputs["ctx"] = ctx
    parts = [{**part, "index": i} for i, part in enumerate(spec.plan(cfg, **inputs))]
    keys = [part_key(p) for p in parts]
    if len(set(keys)) != len(keys):
        raise ValueError(f"step {spec.name} planned parts with repeated keys: {keys}")
    return parts


def run_part(
    spec: StepSpec, cfg: TesseraConfig, ctx: RunContext, part: dict[str, Any], **inputs: Any
) -> dict[str, Any]:
    """Run one planned part of ``spec`` as its own committed transaction (no MLflow run)."""
    out = part_uri(cfg, ctx.run_id, spec.name, part)
    done = committed_outputs(out)
    if done is not None:
        return done
    fn = spec.part
    if spec.checkpoints:  # a training part resumes from its own checkpoints
        inputs["checkpoint_dir"] = checkpoint_dir(ctx, spec.name) / part_key(part)
    if _takes_context(fn):
        inputs["ctx"] = ctx

    def body(cfg: TesseraConfig, workdir: Path, **kw: Any) -> StepResult:
        return fn(cfg, workdir, part, **kw)

    return _transaction(out, spec.name, cfg, ctx, body, inputs, False, keep_metrics=True)


def run_in_process(
    spec: StepSpec, cfg: TesseraConfig, ctx: RunContext, **inputs: Any
) -> dict[str, Any]:
    """Any step in this process, as the CLI runs it: :func:`run_step`, and for a step in parts
    its plan, every part, then the step over their outputs."""
    if spec.plan is None:
        return run_step(spec, cfg, ctx, **inputs)
    done = committed_outputs(step_uri(cfg, ctx.run_id, spec.name))
    if done is not None:
        return done
    planned = plan_parts(spec, cfg, ctx, **inputs)
    parts = [run_part(spec, cfg, ctx, p, **inputs) for p in planned]
    return run_step(spec, cfg, ctx, parts=parts)


def _takes_context(fn: Callable[..., Any]) -> bool:
    import inspect

    return "ctx" in inspect.signature(fn).parameters


def _transaction(
    out: str,
    name: str,
    cfg: TesseraConfig,
    ctx: RunContext,
    fn: Callable[..., StepResult],
    inputs: dict[str, Any],
    track: bool,
    parts: list[dict[str, Any]] | None = None,
    keep_metrics: bool = False,
) -> dict[str, Any]:
    """Stage, run, log and commit; a part (``keep_metrics``) keeps its metrics in its outputs,
    and the step over them logs those as ``part/<metric>`` series (MLflow step = part index).
    ``seconds`` in the outputs is the transaction's wall time; a step over parts also records
    ``parts_seconds``, the sum of its parts' (they may have run in parallel)."""
    started = time.perf_counter()
    with _disk_errors(name, out), storage.staged_output(out) as workdir:
        mlflow_run_id = None
        if track:
            from components.core import tracking

            with tracking.step_run(
                cfg, name, pipeline=ctx.pipeline, run_id=ctx.run_id, parent_run_id=ctx.parent_run_id
            ) as active:
                result = fn(cfg, workdir, **inputs)
                _log_result(result, workdir, parts)
                mlflow_run_id = active.info.run_id
        else:
            result = fn(cfg, workdir, **inputs)
        outputs: dict[str, Any] = {
            key: storage.join(out, rel) if rel else out for key, rel in result.files.items()
        }
        outputs.update(result.values)
        if keep_metrics:
            outputs["metrics"] = {k: float(v) for k, v in result.metrics.items()}
        outputs["step_uri"] = out
        outputs["mlflow_run_id"] = mlflow_run_id
        outputs["seconds"] = round(time.perf_counter() - started, 2)
        if parts is not None:
            outputs["parts_seconds"] = round(sum(p.get("seconds", 0.0) for p in parts), 2)
        (Path(workdir) / OUTPUTS).write_text(json.dumps(outputs, indent=2, sort_keys=True))
    return outputs


DISK_FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


@contextlib.contextmanager
def _disk_errors(name: str, out: str) -> Iterator[None]:
    """No space, a quota or a file-size limit while a step writes: a StorageError naming the
    step and its output (pyarrow reports the errno only in its text); other errors pass."""
    try:
        yield
    except OSError as exc:
        if not (exc.errno in DISK_FULL or any(os.strerror(n) in str(exc) for n in DISK_FULL)):
            raise
        raise storage.StorageError(
            f"step {name}: writing its output {out} failed: {exc}. Nothing was committed (the "
            "staging folder is removed); free space, or move the store (--set store=…, "
            "TESSERA_HOME), then re-run: committed steps are reused"
        ) from exc


def _log_result(
    result: StepResult, workdir: Path, parts: list[dict[str, Any]] | None = None
) -> None:
    import mlflow

    if result.metrics:
        mlflow.log_metrics({k: float(v) for k, v in result.metrics.items()})
    for i, part in enumerate(parts or []):
        series = {f"part/{k}": v for k, v in (part.get("metrics") or {}).items()}
        if series:  # by the part's index where it reports one (the plan's order otherwise)
            mlflow.log_metrics(series, step=int(part.get("index", i)))
    for rel in result.artifacts:
        path = Path(workdir) / rel
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=path.name)
        elif path.exists():
            mlflow.log_artifact(str(path))
