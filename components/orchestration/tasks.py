"""The DAG's task bodies: one runner over the step specs, plus the pipeline's two ends.

A DAG task names a step and passes its inputs (URIs and small dicts from upstream tasks);
:func:`run_task` finds the step's spec by that name (``components.steps.<name>.STEP``), builds
the config from the DAG params and the run context from :func:`start`'s handle, and runs it
through :func:`components.core.runner.run_step`. :func:`start` opens the pipeline's MLflow
parent run, :func:`finish` closes it with the pipeline's real status; :func:`skip` marks a task
that has nothing to do skipped. Adding a step adds no code here.

The DAG params become the config in one place, :func:`config`: ``profile``, then the free-form
``overrides``, then the typed Params of :data:`PARAM_KEYS` that are set (a null or empty one
means "the profile's value"). :func:`command` is what ``tessera task`` (a Kubernetes pod, a
Kubeflow component) runs: the same bodies as a local task, by step name.
"""

from __future__ import annotations

import importlib
import json
import re
from typing import Any, NoReturn

from components.core import runner, storage
from components.core.config import TesseraConfig, load_config
from components.core.runner import RunContext, StepSpec

PIPELINE = "tessera_pipeline"


def sanitize_run_id(run_id: str) -> str:
    """Airflow run ids (``manual__2026-01-01T00:00:00+00:00``) made safe for paths and S3 keys."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id).strip("-")


def spec(name: str) -> StepSpec:
    """The spec of step ``name``: ``components.steps.<name>.STEP``."""
    found = importlib.import_module(f"components.steps.{name}").STEP
    if found.name != name:
        raise ValueError(f"components.steps.{name} declares step {found.name!r}; they must match")
    return found


# typed DAG Params -> the config key each sets (their JSON schemas are in the DAG files)
PARAM_KEYS = {
    "budgets": "sweep.budgets",
    "manual_approval": "promote.manual_approval",
    "gates": "promote.gates",
    "require_validated_evaluator": "train_evaluator.require_validated",
}


def param_overrides(params: dict[str, Any]) -> list[str]:
    """The config overrides of a DAG run's params: ``overrides`` as given, then one
    ``key=value`` per typed Param that is set (so a set Param wins over the same key in
    ``overrides``); null, ``""`` and ``[]`` leave the profile's value."""
    found = list(params.get("overrides") or [])
    for name, key in PARAM_KEYS.items():
        value = params.get(name)
        if value is None or value == "" or value == []:
            continue
        found.append(f"{key}={json.dumps(value)}")  # JSON is YAML: the override parser reads it
    return found


def config(params: dict[str, Any]) -> TesseraConfig:
    """The resolved config of a DAG run: its profile plus :func:`param_overrides`."""
    return load_config(params.get("profile", "demo"), param_overrides(params))


def resolve(params: dict[str, Any], run: dict[str, Any]) -> tuple[TesseraConfig, RunContext]:
    cfg = config(params)
    pipeline = run.get("pipeline", PIPELINE)
    ctx = RunContext(run["run_id"], pipeline, run.get("parent_run_id"), run.get("track", True))
    return cfg, ctx


def skip(reason: str) -> NoReturn:
    """Mark the running task skipped (downstream tasks that need it are skipped too)."""
    from airflow.sdk.exceptions import AirflowSkipException

    raise AirflowSkipException(reason)


def run_task(name: str, params: dict[str, Any], run: dict[str, Any], **inputs: Any) -> dict:
    """Run step ``name`` of this pipeline run; returns its outputs (URIs + small values)."""
    cfg, ctx = resolve(params, run)
    return runner.run_step(spec(name), cfg, ctx, **inputs)


def plan_task(name: str, params: dict[str, Any], run: dict[str, Any], **inputs: Any) -> list:
    """The parts of step ``name`` that Airflow maps :func:`part_task` over (XCom-sized)."""
    cfg, ctx = resolve(params, run)
    return runner.plan_parts(spec(name), cfg, ctx, **inputs)


def part_task(
    name: str, params: dict[str, Any], run: dict[str, Any], part: dict[str, Any], **inputs: Any
) -> dict:
    """One part of step ``name`` (its own committed transaction)."""
    cfg, ctx = resolve(params, run)
    return runner.run_part(spec(name), cfg, ctx, part, **inputs)


def gather(parts: Any) -> list[dict[str, Any]]:
    """The outputs of a mapped task as a list. Indexed up to its length: iterating Airflow's
    lazy sequence to its end asks for one XCom too many, which its client logs as an error."""
    return [parts[i] for i in range(len(parts))]


def corpus(
    params: dict[str, Any], run: dict[str, Any], dataset: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The raw videos of this run: ``params.source`` (+ ``params.captions``), else the demo
    corpus this run's demo_data step rendered. Read from the store, not XCom: demo_data is
    skipped when a source is given, and a skipped task leaves no XCom to pull.

    A ``dataset`` from :func:`dataset` (a training run on an earlier run's data) carries its
    corpus: the demo corpus of that data run, or ``{}`` when that run ingested a source."""
    if dataset and dataset.get("data_run"):
        return {k: dataset[k] for k in ("clips", "captions", "factors") if dataset.get(k)}
    if params.get("source"):
        return {"clips": params["source"], "captions": params.get("captions") or None}
    cfg, ctx = resolve(params, run)
    outputs = runner.committed_outputs(runner.step_uri(cfg, ctx.run_id, "demo_data"))
    if outputs is None:
        raise RuntimeError(
            f"run {ctx.run_id} has no source and no committed demo_data output; set the "
            "'source' param or let the demo_data task run first"
        )
    return outputs


# --------------------------------------------------------------------------- DAG tasks by id

Upstream = dict[str, Any]


def _source(params: dict, run: dict, up: Upstream) -> dict[str, Any]:
    raw = corpus(params, run)
    return {"src": raw["clips"], "captions": raw.get("captions")}


def _gathered(name: str):
    return lambda params, run, up: {"parts": gather(up[name])}


def _manifest(params: dict, run: dict, up: Upstream) -> dict[str, Any]:
    return {"manifest": up["dataset"]["manifest"]}


def _captioner(params: dict, run: dict, up: Upstream) -> dict[str, Any]:
    raw = corpus(params, run, up["dataset"])
    return {"manifest": up["dataset"]["manifest"], "factors": raw.get("factors") or ""}


def _caption(params: dict, run: dict, up: Upstream) -> dict[str, Any]:
    return {"manifest": up["dataset"]["manifest"], "captioner": up["captioner"]["captioner"]}


def _encode(params: dict, run: dict, up: Upstream) -> dict[str, Any]:
    return {
        "manifest": up["dataset"]["manifest"],
        "vae": up["vae"]["vae"],
        "captions": up["captions"]["captions"],
    }


def _evaluate(params: dict, run: dict, up: Upstream) -> dict[str, Any]:
    raw = corpus(params, run, up["dataset"])
    demo = {k: raw[k] for k in ("clips", "captions", "factors") if raw.get("factors")}
    return {
        "manifest": up["dataset"]["manifest"],
        "model": up["dit"]["model"],
        "evaluator": up["evaluator"]["evaluator"],
        **demo,
    }


def _register(params: dict, run: dict, up: Upstream) -> dict[str, Any]:
    return {
        "model": up["dit"]["model"],
        "evaluation": up["evaluated"]["result"],
        "evaluator": up["evaluator"]["evaluator"],
        "captioner": up["captioner"]["captioner"],
        "pairs": up["captioner"].get("pairs") or "",
    }


# task id -> (step, "run" | "plan" | "part", the upstream argument holding the part, inputs):
# ``inputs(params, run, upstream)`` turns the upstream tasks' outputs, by the task's argument
# names, into the step's keyword inputs. The Airflow task bodies and `tessera task --upstream`
# (a Kubeflow component) both go through :func:`dag_task`, so they cannot drift apart.
DAG_TASKS: dict[str, tuple[str, str, str | None, Any]] = {
    "demo_data": ("demo_data", "run", None, lambda params, run, up: {}),
    "ingest_plan": ("ingest", "plan", None, _source),
    "ingest_shard": ("ingest", "part", "shard", _source),
    "ingest": ("ingest", "run", None, _gathered("shards")),
    "validate": (
        "validate",
        "run",
        None,
        lambda params, run, up: {
            "manifest": up["ingested"]["manifest"],
            "quarantine": up["ingested"]["quarantine"],
        },
    ),
    "version": (
        "version",
        "run",
        None,
        lambda params, run, up: {
            "manifest": up["validated"]["manifest"],
            "captions": corpus(params, run)["captions"],
        },
    ),
    "train_captioner": ("train_captioner", "run", None, _captioner),
    "caption_plan": ("caption", "plan", None, _caption),
    "caption_shard": ("caption", "part", "shard", _caption),
    "caption": ("caption", "run", None, _gathered("shards")),
    "train_vae": ("train_vae", "run", None, _manifest),
    "encode_plan": ("encode", "plan", None, _manifest),
    "encode_shard": ("encode", "part", "shard", _encode),
    "encode": ("encode", "run", None, _gathered("shards")),
    "sweep_plan": (
        "sweep",
        "plan",
        None,
        lambda params, run, up: {"latents": up["latents"]["latents"]},
    ),
    "sweep_point": (
        "sweep",
        "part",
        "point",
        lambda params, run, up: {"latents": up["latents"]["latents"], "vae": up["vae"]["vae"]},
    ),
    "sweep": ("sweep", "run", None, _gathered("points")),
    "train_evaluator": ("train_evaluator", "run", None, _manifest),
    "generate": ("generate", "run", None, lambda params, run, up: {"model": up["dit"]["model"]}),
    "evaluate": ("evaluate", "run", None, _evaluate),
    "register": ("register", "run", None, _register),
    "promote": (
        "promote",
        "run",
        None,
        lambda params, run, up: {"version": str(up["registered"]["model_version"])},
    ),
}


def dag_task(task_id: str, params: dict[str, Any], run: dict[str, Any], **upstream: Any) -> Any:
    """Run DAG task ``task_id`` from its upstream tasks' outputs, keyed by the task's argument
    names (a mapped task's part too: ``shard``, ``point``): the body of the Airflow task, and
    what a Kubeflow component runs through ``tessera task TASK --upstream``."""
    if task_id not in DAG_TASKS:
        raise ValueError(f"no DAG task {task_id!r}; the tasks are {sorted(DAG_TASKS)}")
    step, mode, part_arg, inputs = DAG_TASKS[task_id]
    missing = sorted({part_arg} - set(upstream)) if part_arg else []
    try:
        kwargs = inputs(params, run, upstream)
    except KeyError as exc:
        missing.append(str(exc).strip("'"))
    if missing:
        raise ValueError(f"DAG task {task_id} needs upstream input(s) {missing}")
    if mode == "plan":
        return plan_task(step, params, run, **kwargs)
    if mode == "part":
        return part_task(step, params, run, upstream[part_arg], **kwargs)
    return run_task(step, params, run, **kwargs)


def kubeflow_states(status: Any) -> dict[str, str]:
    """Task states for :func:`finish` from Kubeflow's final status of the pipeline (KFP hands
    the exit task the pipeline's state, not each task's): every step ``success`` (the summary
    keeps the committed ones), plus ``kubeflow: failed`` unless the pipeline SUCCEEDED."""
    if isinstance(status, str):
        status = json.loads(status)
    states = {step: "success" for step, *_ in DAG_TASKS.values()}
    if str((status or {}).get("state", "")).upper() not in ("SUCCEEDED", "SUCCESS"):
        states["kubeflow"] = "failed"
    return states


# --------------------------------------------------------------------------- the ends


def start(params: dict[str, Any], airflow_run_id: str, pipeline: str = PIPELINE) -> dict[str, Any]:
    """Open the pipeline's parent MLflow run (once per run id) and return the run handle. The
    run id is ``params.run_name`` when set (a name used before resumes that run: its committed
    steps are kept), else the Airflow run id."""
    from components.core import tracking

    cfg = config(params)
    run_id = sanitize_run_id(params.get("run_name") or airflow_run_id)
    track = bool(params.get("track", True))
    parent = tracking.pipeline_run(cfg, pipeline, run_id) if track else None
    return {"run_id": run_id, "parent_run_id": parent, "track": track, "pipeline": pipeline}


def source_run(params: dict[str, Any], run_id: str = "") -> dict[str, Any]:
    """The summary of a finished main-pipeline run (``run_id``, or the latest one): every
    committed step's outputs by step name."""
    cfg = config(params)
    name = f"runs/{run_id}/summary.json" if run_id else "latest/pipeline.json"
    uri = storage.join(cfg.store_uri(), *name.split("/"))
    if not storage.exists(uri):
        raise FileNotFoundError(
            f"no {PIPELINE} run summary at {uri}: run the {PIPELINE} DAG first (make demo), or "
            "name a finished run id in the source_run param"
        )
    return json.loads(storage.read_text(uri))


def dataset(params: dict[str, Any], run_id: str = "") -> dict[str, Any]:
    """The versioned dataset of an earlier data run, for a training run (``tessera_train``):
    the committed ``version`` outputs of run ``run_id`` (it need not have finished: the
    dataset Asset's event names the run as soon as ``version`` commits), else of the latest
    finished pipeline run; plus ``data_run`` and that run's demo corpus (``clips``,
    ``captions``, ``factors``; absent when the run ingested a source)."""
    cfg = config(params)
    run_id = run_id or source_run(params)["run_id"]
    versioned = runner.committed_outputs(runner.step_uri(cfg, run_id, "version"))
    if versioned is None:
        raise FileNotFoundError(
            f"run {run_id} has no committed version step under "
            f"{runner.step_uri(cfg, run_id, 'version')}: name a run whose data steps finished"
        )
    demo = runner.committed_outputs(runner.step_uri(cfg, run_id, "demo_data")) or {}
    corpus = {k: demo[k] for k in ("clips", "captions", "factors") if demo.get(k)}
    return {**versioned, **corpus, "data_run": run_id}


def finish(params: dict[str, Any], run: dict[str, Any], states: dict[str, str]) -> dict[str, Any]:
    """Close the parent run with the pipeline's status and write the run's summary.

    ``states`` maps every task id of the DAG run to its state; the pipeline FAILED when any
    task failed (``failed``) or could not run because an upstream one did (``not_run``). The
    summary holds every committed step's outputs and goes to ``runs/{run_id}/summary.json`` and
    ``{store}/latest/pipeline.json``.
    """
    cfg, ctx = resolve(params, run)
    failed = sorted(task for task, state in states.items() if state == "failed")
    not_run = sorted(task for task, state in states.items() if state == "upstream_failed")
    status = "FAILED" if failed or not_run else "FINISHED"
    steps = {}
    for task in sorted(states):
        outputs = runner.committed_outputs(runner.step_uri(cfg, ctx.run_id, task))
        if outputs is not None:
            steps[task] = outputs
    summary = {"run_id": ctx.run_id, "profile": cfg.profile, "status": status, "failed": failed}
    summary["not_run"] = not_run
    summary.update(steps)
    if ctx.track and ctx.parent_run_id:
        from components.core import tracking

        rev = steps.get("version", {}).get("dataset_rev") or run.get("dataset_rev")
        tracking.finish_pipeline_run(ctx.parent_run_id, status, dataset_rev=rev)
        summary["mlflow_parent_run_id"] = ctx.parent_run_id
    text = json.dumps(summary, indent=2, sort_keys=True, default=str)
    storage.write_text(storage.join(cfg.store_uri(), "runs", ctx.run_id, "summary.json"), text)
    latest = "pipeline.json" if ctx.pipeline == PIPELINE else f"pipeline-{ctx.pipeline}.json"
    storage.write_text(storage.join(cfg.store_uri(), "latest", latest), text)
    return summary


# --------------------------------------------------------------------------- tessera task


def command(
    step: str,
    params: dict[str, Any],
    run: dict[str, Any],
    inputs: dict[str, Any],
    *,
    plan: bool = False,
    part: dict[str, Any] | None = None,
    upstream: dict[str, Any] | None = None,
) -> Any:
    """What ``tessera task`` runs (a pod, a Kubeflow component): the body of the DAG task of
    ``step`` with the same arguments. ``start`` takes ``run = {"run_id": <the orchestrator's
    run id>, "pipeline": <name>}`` and returns the run handle; ``finish`` takes ``inputs =
    {"states": {task: state}}`` (Airflow) or ``{"status": <KFP's final status>}`` (Kubeflow's
    exit handler). With ``upstream`` (Kubeflow), ``step`` is a DAG task id and ``upstream`` its
    upstream outputs by argument name (:func:`dag_task`); otherwise (a Kubernetes pod, whose
    arguments Airflow templates field by field) the step runs whole, its plan (``plan``) or one
    ``part``, with ``inputs`` as its keyword inputs."""
    if step == "start":
        return start(params, run["run_id"], pipeline=run.get("pipeline", PIPELINE))
    if step == "finish":
        if "status" in inputs:
            return finish(params, run, kubeflow_states(inputs["status"]))
        return finish(params, run, dict(inputs.get("states") or {}))
    if upstream is not None:
        if plan or part is not None:
            raise ValueError("tessera task --upstream names a DAG task: no --plan or --part")
        return dag_task(step, params, run, **upstream)
    if plan and part is not None:
        raise ValueError("tessera task takes --plan or --part, not both")
    if plan:
        return plan_task(step, params, run, **inputs)
    if part is not None:
        return part_task(step, params, run, part, **inputs)
    return run_task(step, params, run, **inputs)
