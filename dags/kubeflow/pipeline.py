"""Tessera's main pipeline as a Kubeflow Pipelines (v2) pipeline: the Airflow DAG's twin.

One container component per Airflow task of ``dags/tessera_pipeline.py``, named like it, each
running the ``tessera`` CLI of the project image::

    tessera task TASK --params PARAMS_JSON --run RUN_JSON --upstream UPSTREAM_JSON --output PATH

which runs the body of Airflow task TASK (``components.orchestration.tasks.dag_task``, the
function the Airflow task calls) and writes its return value as JSON to PATH, the component's
output parameter (a STRUCT, a LIST for a plan). UPSTREAM_JSON is an object keyed by the Airflow
task function's argument names (``{"dataset": <version's output>, ...}``), a mapped task's part
included (``shard``, ``point``). ``start`` gets ``--run {"run_id": <KFP run id>}`` and returns
the run handle every other task gets as RUN_JSON; ``finish`` is the exit handler's task: it
cannot depend on another task, so it gets the same ``{"run_id": ...}`` and, as ``--inputs
{"status": ...}``, KFP's final status of the pipeline.

Airflow constructs and their KFP twins: a mapped task ``expand``-ed over a plan is a
``dsl.ParallelFor`` over the plan's output and its gather step reads ``dsl.Collected`` (the
``max_active_tis_per_dagrun`` of the shard tasks is the loop's ``parallelism``); the teardown
``finish`` is the ``dsl.ExitHandler``'s exit task around every other task; ``register``'s skip
when ``track`` is false (which skips ``promote`` too) is a ``dsl.If(track == True)`` around both;
pools become resource requests (GPU for the training tasks); ``retries`` is ``set_retry`` with
Airflow's default 300 s delay. ``demo_data`` skips in Airflow when ``source`` is set, and KFP
cannot skip a task another depends on: there ``tessera task demo_data`` must exit 0 (a no-op).
KFP caching is off: a cached ``start`` would hand a new run an old run handle, and the steps are
idempotent per run id anyway. PARAMS_JSON holds every param (a nullable one absent = ``null``);
``finish`` derives the run id as ``start`` does (``run_name`` if set). Not mirrored: execution
timeouts (no KFP SDK counterpart), Assets, task groups, and the DAG's kubernetes task mode (its
``sweep_point_args`` task): this is the graph of the default, local mode.

Compile (in the ``make kfp`` environment; this file imports only kfp and the standard library)::

    .venv-kfp/bin/python dags/kubeflow/pipeline.py --output tessera_pipeline.yaml
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Callable
from typing import Any, Optional

from kfp import compiler, dsl

PIPELINE = "tessera_pipeline"
IMAGE = "tessera:0.1.0"  # what infra/docker/Dockerfile builds
# The Airflow DAG's params (dags/tessera_pipeline.py, components/orchestration/dag_tasks.py):
# name -> (type, default); a default of None is a nullable param (null = the profile's value).
PARAMS: dict[str, tuple[type, Any]] = {
    "profile": (str, "demo"),
    "overrides": (list, []),
    "track": (bool, True),
    "run_name": (str, ""),
    "budgets": (list, None),
    "manual_approval": (bool, None),
    "gates": (list, None),
    "require_validated_evaluator": (bool, None),
    "source": (str, ""),
    "captions": (str, ""),
}
RETRIES = 2  # the DAG's default_args; finish has 0 there too
RETRY_DELAY = "300s"  # Airflow's [core] default_task_retry_delay, constant (no exponential backoff)
CPU_TASK = {"cpu": "2", "memory": "8G"}
GPU_TASK = {"cpu": "8", "memory": "64G", "gpus": 1}
PARAM = "param_"  # a component's inputs: the params (prefixed: `captions` is both) + upstreams
JOB_RUN = '{"run_id": "' + dsl.PIPELINE_JOB_ID_PLACEHOLDER + '"}'  # start's and finish's RUN_JSON
TRAINING = {"train_captioner", "train_vae", "sweep_point", "train_evaluator"}  # pool accelerator
ENDS = ("start", "finish")  # the pipeline's two ends: `tessera task start|finish`


def params_json(values: dict[str, Any]) -> dsl.ConcatPlaceholder:
    """PARAMS_JSON from a component's param placeholders: strings quoted, the rest resolve to
    JSON, an absent nullable param is ``null``. A string value is spliced in unescaped, so it
    must not hold ``"`` or ``\\``."""
    items: list[Any] = ["{"]
    for i, (name, (kind, default)) in enumerate(PARAMS.items()):
        value = values[PARAM + name]
        items.append(f'{", " if i else ""}"{name}": ')
        piece = dsl.ConcatPlaceholder(['"', value, '"']) if kind is str else value
        if default is None:
            piece = dsl.IfPresentPlaceholder(input_name=PARAM + name, then=piece, else_="null")
        items.append(piece)
    return dsl.ConcatPlaceholder([*items, "}"])


def _with_signature(name: str, parameters: list[inspect.Parameter], body: Callable) -> Callable:
    """``body(*args)`` under ``name`` and a typed signature: what KFP's decorators read."""

    def func(*args):
        return body(*args)

    func.__name__ = func.__qualname__ = name
    func.__signature__ = inspect.Signature(parameters)
    return func


def _param(name: str, annotation: Any, default: Any = inspect.Parameter.empty):
    kind = inspect.Parameter.KEYWORD_ONLY  # so a nullable param may precede a required one
    return inspect.Parameter(name, kind, default=default, annotation=annotation)


def task_component(
    task_id: str,
    image: str,
    inputs: dict[str, type] | None = None,
    part: str = "",
    returns: type = dict,
    run: str = "input",
):
    """The container component of Airflow task ``task_id``: ``tessera task TASK_ID``.

    Args:
        inputs: upstream inputs by the Airflow task's argument names: ``dict`` or ``list``.
        part: the argument that takes a mapped task's part (``shard``, ``point``).
        returns: the type of the task's JSON output (``dict``; ``list`` for a plan).
        run: ``input`` (RUN_JSON is start's handle) or ``job`` (``{"run_id": <KFP run id>}``).
    """
    inputs = dict(inputs or {})
    names = [PARAM + name for name in PARAMS]
    names += [*(["run"] if run == "input" else []), *inputs, *([part] if part else [])]
    signature = [
        _param(PARAM + name, Optional[kind], None)  # noqa: UP045 (kfp reads typing.Optional)
        if default is None
        else _param(PARAM + name, kind)
        for name, (kind, default) in PARAMS.items()
    ]
    signature += [_param("run", dict)] if run == "input" else []
    signature += [_param(name, kind) for name, kind in inputs.items()]
    signature += [_param(part, dict)] if part else []
    signature += [_param("output", dsl.OutputPath(returns))]

    def body(*args) -> dsl.ContainerSpec:
        values = dict(zip([*names, "output"], args, strict=True))
        run_json = values["run"] if run == "input" else JOB_RUN
        given = [*inputs, *([part] if part else [])]
        upstream_json = "{" + ", ".join(f'"{k}": {values[k]}' for k in given) + "}"
        command = ["tessera", "task", task_id, "--params", params_json(values), "--run", run_json]
        if task_id in ENDS:  # start / finish: no upstream task (finish: KFP's status)
            command += ["--inputs", upstream_json]
        else:
            command += ["--upstream", upstream_json]
        command += ["--output", values["output"]]
        return dsl.ContainerSpec(image=image, command=command)

    return dsl.container_component(_with_signature(task_id, signature, body))


def configure(task: dsl.PipelineTask, task_id: str, retries: int = RETRIES) -> dsl.PipelineTask:
    """Retries, resources and caching of one task, as the Airflow task has them."""
    task.set_caching_options(enable_caching=False)
    task.set_retry(num_retries=retries, backoff_duration=RETRY_DELAY, backoff_factor=1.0)
    resources = GPU_TASK if task_id in TRAINING else CPU_TASK
    task.set_cpu_request(resources["cpu"]).set_cpu_limit(resources["cpu"])
    task.set_memory_request(resources["memory"]).set_memory_limit(resources["memory"])
    if resources.get("gpus"):
        task.set_accelerator_type("nvidia.com/gpu").set_accelerator_limit(resources["gpus"])
    return task


def build(image: str = IMAGE) -> Callable:
    """The pipeline over the components of ``image``; its parameters are :data:`PARAMS`."""
    D, L = dict, list  # a task's output: a dict, or a plan's list of parts

    def step(task_id: str, *, retries: int = RETRIES, **kwargs):
        """A function that adds task ``task_id`` to the pipeline with the given inputs."""
        component = task_component(task_id, image, **kwargs)

        def add(params: dict, **values) -> dsl.PipelineTask:
            params = {PARAM + name: value for name, value in params.items()}
            return configure(component(**params, **values), task_id, retries)

        return add

    start = step("start", run="job")
    demo_data = step("demo_data")
    ingest_plan = step("ingest_plan", returns=L)
    ingest_shard = step("ingest_shard", part="shard")
    ingest = step("ingest", inputs={"shards": L})
    validate = step("validate", inputs={"ingested": D})
    version = step("version", inputs={"validated": D})
    train_captioner = step("train_captioner", inputs={"dataset": D})
    caption_plan = step("caption_plan", inputs={"dataset": D, "captioner": D}, returns=L)
    caption_shard = step("caption_shard", inputs={"dataset": D, "captioner": D}, part="shard")
    caption = step("caption", inputs={"shards": L})
    train_vae = step("train_vae", inputs={"dataset": D})
    encode_plan = step("encode_plan", inputs={"dataset": D}, returns=L)
    encode_shard = step(
        "encode_shard", inputs={"dataset": D, "vae": D, "captions": D}, part="shard"
    )
    encode = step("encode", inputs={"shards": L})
    sweep_plan = step("sweep_plan", inputs={"latents": D}, returns=L)
    sweep_point = step("sweep_point", inputs={"latents": D, "vae": D}, part="point")
    sweep = step("sweep", inputs={"points": L})
    generate = step("generate", inputs={"dit": D})
    train_evaluator = step("train_evaluator", inputs={"dataset": D})
    evaluate = step("evaluate", inputs={"dataset": D, "dit": D, "evaluator": D})
    register = step("register", inputs={"dit": D, "evaluator": D, "evaluated": D, "captioner": D})
    promote = step("promote", inputs={"registered": D})
    finish = step("finish", run="job", inputs={"status": dsl.PipelineTaskFinalStatus}, retries=0)

    def tessera_pipeline(*args) -> None:
        p = dict(zip(PARAMS, args, strict=True))
        closing = finish(p)  # the exit task: it may depend on no task
        with dsl.ExitHandler(closing, name="run"):
            run = start(p).output
            demo = demo_data(p, run=run)
            plan = ingest_plan(p, run=run).after(demo).output
            with dsl.ParallelFor(plan, parallelism=2) as shard:
                shards = ingest_shard(p, run=run, shard=shard)
            ingested = ingest(p, run=run, shards=dsl.Collected(shards.output))
            validated = validate(p, run=run, ingested=ingested.output)
            dataset = version(p, run=run, validated=validated.output).output
            captioner = train_captioner(p, run=run, dataset=dataset).output
            plan = caption_plan(p, run=run, dataset=dataset, captioner=captioner).output
            with dsl.ParallelFor(plan, parallelism=2) as shard:
                shards = caption_shard(
                    p, run=run, dataset=dataset, captioner=captioner, shard=shard
                )
            captions = caption(p, run=run, shards=dsl.Collected(shards.output))
            # the corpus is re-captioned before the compression network trains
            vae = train_vae(p, run=run, dataset=dataset).after(captions).output
            plan = encode_plan(p, run=run, dataset=dataset).output
            with dsl.ParallelFor(plan, parallelism=2) as shard:
                shards = encode_shard(
                    p, run=run, dataset=dataset, vae=vae, captions=captions.output, shard=shard
                )
            latents = encode(p, run=run, shards=dsl.Collected(shards.output)).output
            plan = sweep_plan(p, run=run, latents=latents).output
            with dsl.ParallelFor(plan) as point:  # as many at once as the cluster has GPUs
                points = sweep_point(p, run=run, latents=latents, vae=vae, point=point)
            dit = sweep(p, run=run, points=dsl.Collected(points.output)).output
            generate(p, run=run, dit=dit)
            evaluator = train_evaluator(p, run=run, dataset=dataset).output
            evaluated = evaluate(p, run=run, dataset=dataset, dit=dit, evaluator=evaluator).output
            with dsl.If(p["track"] == True, name="track"):  # noqa: E712 (a KFP condition)
                registered = register(
                    p, run=run, dit=dit, evaluator=evaluator, evaluated=evaluated,
                    captioner=captioner,
                )  # fmt: skip
                promote(p, run=run, registered=registered.output)

    parameters = [
        _param(name, kind if default is not None else Optional[kind], default)  # noqa: UP045
        for name, (kind, default) in PARAMS.items()
    ]
    pipeline = _with_signature(PIPELINE, parameters, tessera_pipeline)
    pipeline.__doc__ = __doc__.split("\n\n")[0]
    return dsl.pipeline(name=PIPELINE.replace("_", "-"))(pipeline)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compile Tessera's pipeline to KFP v2 YAML.")
    parser.add_argument("--output", required=True, help="the pipeline YAML to write")
    parser.add_argument("--image", default=IMAGE, help=f"the project image (default {IMAGE})")
    args = parser.parse_args(argv)
    compiler.Compiler().compile(build(args.image), package_path=args.output)
    print(f"wrote {args.output} (image {args.image})")


if __name__ == "__main__":
    main()
