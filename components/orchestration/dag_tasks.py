"""The Airflow tasks the DAG files share: the run's two ends, the typed Params, the Assets, and
the train / evaluate / release task groups that ``tessera_pipeline`` (after its data group) and
``tessera_train`` (on an earlier run's versioned dataset) both build with the same functions.

Imported when a DAG file is parsed: stdlib and Airflow only (and :mod:`.kubernetes`, the same);
every task body imports :mod:`components.orchestration.tasks` when it runs. A task id is its
step's name; only URIs and small dicts travel in XCom. The training tasks
(:data:`.kubernetes.POD_STEPS`) are Python tasks that launch DeepSpeed on the worker, or with
``[tessera] task_mode = kubernetes`` pods running ``tessera task`` with the same arguments.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from airflow.sdk import Asset, Param, TaskGroup, task, teardown

from components.orchestration import kubernetes
from components.orchestration.kubernetes import Pull

DVC_POOL = "tessera_dvc"  # one slot: DVC and git cannot run concurrently in one workspace
ACCELERATOR_POOL = "accelerator"  # training runs: as many slots as runs the machines hold
REGISTRY_POOL = "tessera_registry"  # one slot: registrations and promotions of one registry

# Logical identities, not locations: the store is a directory or an s3:// prefix depending on
# the profile, so each event's extra says where the data is (run_id, manifest, dataset_rev; the
# model's name, version and URI).
DATASET = Asset(name="tessera_dataset", uri="tessera://dataset", group="tessera")
MODEL = Asset(name="tessera_model", uri="tessera://model/tessera-t2v", group="tessera")

_GATE = {
    "type": "object",
    "required": ["metric"],
    "additionalProperties": False,
    "properties": {
        "metric": {"type": "string", "minLength": 1},
        "higher_is_better": {"type": "boolean"},
        "absolute": {"type": ["number", "null"]},
        "max_regression": {"type": ["number", "null"], "minimum": 0},
        "min_improvement": {"type": ["number", "null"], "minimum": 0},
        "paired": {"type": "boolean"},
    },
}
# The params every Tessera run takes. The typed ones map onto config keys in one place
# (components.orchestration.tasks.PARAM_KEYS); null means the profile's value.
PARAMS = {
    "profile": Param("demo", type="string", description="tiny | demo | small, or a YAML path"),
    "overrides": Param([], type="array", description="config overrides, e.g. ingest.workers=4"),
    "track": Param(True, type="boolean", description="log to MLflow"),
    "run_name": Param(
        "",
        type="string",
        pattern="^[A-Za-z0-9_.-]{0,200}$",
        description="the run's id in the store and MLflow; empty = the Airflow run id. A "
        "finished run's name reuses its committed steps (make demo does)",
    ),
    "budgets": Param(
        None,
        type=["null", "array"],
        items={"type": "number", "exclusiveMinimum": 0},
        uniqueItems=True,
        description="sweep.budgets: training FLOPs per sweep run; null = the profile's",
    ),
    "manual_approval": Param(
        None,
        type=["null", "boolean"],
        description="promote.manual_approval: a passing model waits for tessera_promote",
    ),
    "gates": Param(
        None,
        type=["null", "array"],
        items=_GATE,
        description="promote.gates, e.g. [{metric: fvd_domain, max_regression: 0}]",
    ),
    "require_validated_evaluator": Param(
        None,
        type=["null", "boolean"],
        description="train_evaluator.require_validated: fail when its checks fail",
    ),
}


def mode() -> str:
    return kubernetes.task_mode()


# --------------------------------------------------------------------------- the ends


@task(execution_timeout=timedelta(minutes=5), doc_md="Open the run's MLflow parent run.")
def start(params=None, run_id=None, ti=None) -> dict:
    from components.orchestration import tasks

    return tasks.start(dict(params), run_id, pipeline=ti.dag_id)


def finish(dataset_task: str | None = None) -> Any:
    """The teardown that closes the parent run FINISHED or FAILED and writes the summary; with
    ``dataset_task`` the run's dataset revision is that task's (a training-only run)."""

    @teardown
    @task(
        task_id="finish",
        retries=0,
        execution_timeout=timedelta(minutes=10),
        doc_md="Close the parent run with the run's real status; write its summary.",
    )
    def finish(run: dict, params=None, ti=None) -> dict:
        from components.orchestration import tasks

        if dataset_task:
            run = {
                **run,
                "dataset_rev": (ti.xcom_pull(task_ids=dataset_task) or {}).get("dataset_rev"),
            }
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id])[ti.run_id]
        return tasks.finish(dict(params), run, {k: v for k, v in states.items() if k != ti.task_id})

    return finish


# --------------------------------------------------------------------------- train


@task(pool=ACCELERATOR_POOL, execution_timeout=timedelta(hours=24), doc_md="Train the captioner.")
def train_captioner(run: dict, dataset: dict, params=None) -> dict:
    from components.orchestration import tasks

    return tasks.dag_task("train_captioner", dict(params), run, dataset=dataset)


@task(execution_timeout=timedelta(minutes=10), doc_md="Plan the caption shards.")
def caption_plan(run: dict, dataset: dict, captioner: dict, params=None) -> list:
    from components.orchestration import tasks

    return tasks.dag_task("caption_plan", dict(params), run, dataset=dataset, captioner=captioner)


@task(
    max_active_tis_per_dagrun=2,
    execution_timeout=timedelta(hours=6),
    doc_md="Re-caption one shard of clips.",
)
def caption_shard(run: dict, dataset: dict, captioner: dict, shard: dict, params=None) -> dict:
    from components.orchestration import tasks

    return tasks.dag_task(
        "caption_shard", dict(params), run, dataset=dataset, captioner=captioner, shard=shard
    )


@task(execution_timeout=timedelta(hours=1), doc_md="Gather the shards into captions.parquet.")
def caption(run: dict, shards: list, params=None) -> dict:
    from components.orchestration import tasks

    return tasks.dag_task("caption", dict(params), run, shards=shards)


@task(execution_timeout=timedelta(hours=48), doc_md="Train the video VAE (DeepSpeed).")
def train_vae(run: dict, dataset: dict, params=None) -> dict:
    from components.orchestration import tasks

    return tasks.dag_task("train_vae", dict(params), run, dataset=dataset)


@task(execution_timeout=timedelta(minutes=10), doc_md="Plan the encode shards.")
def encode_plan(run: dict, dataset: dict, params=None) -> list:
    from components.orchestration import tasks

    return tasks.dag_task("encode_plan", dict(params), run, dataset=dataset)


@task(
    max_active_tis_per_dagrun=2,
    execution_timeout=timedelta(hours=6),
    doc_md="Encode one shard of clips into latents.",
)
def encode_shard(
    run: dict, dataset: dict, vae: dict, captions: dict, shard: dict, params=None
) -> dict:
    from components.orchestration import tasks

    return tasks.dag_task(
        "encode_shard", dict(params), run, dataset=dataset, vae=vae, captions=captions, shard=shard
    )


@task(execution_timeout=timedelta(hours=1), doc_md="Gather the latent shards.")
def encode(run: dict, shards: list, params=None) -> dict:
    from components.orchestration import tasks

    return tasks.dag_task("encode", dict(params), run, shards=shards)


@task(execution_timeout=timedelta(minutes=30), doc_md="Plan the sweep's runs from FLOP counts.")
def sweep_plan(run: dict, latents: dict, params=None) -> list:
    from components.orchestration import tasks

    return tasks.dag_task("sweep_plan", dict(params), run, latents=latents)


@task(
    pool=ACCELERATOR_POOL,
    execution_timeout=timedelta(hours=72),
    doc_md="Train one DiT of the sweep (DeepSpeed).",
)
def sweep_point(run: dict, latents: dict, vae: dict, point: dict, params=None) -> dict:
    from components.orchestration import tasks

    return tasks.dag_task("sweep_point", dict(params), run, latents=latents, vae=vae, point=point)


@task(execution_timeout=timedelta(minutes=10), doc_md="The sweep points' pod arguments.")
def sweep_point_args(run: dict, latents: dict, vae: dict, points: list, params=None) -> list:
    """One ``tessera task sweep --part`` argument list per planned point (kubernetes mode)."""
    return kubernetes.sweep_point_arguments(run, latents["latents"], vae["vae"], points, params)


@task(execution_timeout=timedelta(hours=1), doc_md="Fit the scaling law; select the best run.")
def sweep(run: dict, points: list, params=None) -> dict:
    from components.orchestration import tasks

    return tasks.dag_task("sweep", dict(params), run, points=points)


@task(execution_timeout=timedelta(hours=12), doc_md="Train the in-domain video-text evaluator.")
def train_evaluator(run: dict, dataset: dict, params=None) -> dict:
    from components.orchestration import tasks

    return tasks.dag_task("train_evaluator", dict(params), run, dataset=dataset)


_POD_TASKS = {  # training task -> its Airflow arguments (the same in both modes)
    "train_captioner": {"pool": ACCELERATOR_POOL, "execution_timeout": timedelta(hours=24)},
    "train_vae": {"execution_timeout": timedelta(hours=48)},
    "sweep_point": {"pool": ACCELERATOR_POOL, "execution_timeout": timedelta(hours=72)},
    "train_evaluator": {"execution_timeout": timedelta(hours=12)},
}


def sweep_point_pods(arguments: Any) -> Any:
    """The sweep points as mapped pods over ``arguments`` (a task's list of argument lists);
    their XComs, as the ``sweep`` task gathers them (tessera_pipeline, recaption_ablation)."""
    pods = kubernetes.pod_operator(
        "sweep_point",
        mapped=True,
        doc_md="Train one DiT of the sweep (a pod: `tessera task sweep --part`)",
        **_POD_TASKS["sweep_point"],
    )
    return pods.expand(arguments=arguments).output


def _pod(task_id: str, run: Any, upstream: list[Any], doc: str, **inputs: Pull) -> Any:
    """A training task as a pod; its XCom inputs are pulled when its arguments render."""
    op = kubernetes.pod_operator(
        task_id,
        kubernetes.templated_arguments(task_id, inputs),
        doc_md=f"{doc} (a pod: `tessera task {task_id}`)",
        **_POD_TASKS[task_id],
    )
    op.set_upstream([run.operator, *(u.operator for u in upstream)])
    return op.output


def train_group(run: Any, dataset: Any, corpus_task: str) -> dict[str, Any]:
    """The ``train`` group: captioner and re-captioning, VAE, encoding, the compute sweep and
    the evaluator. ``dataset`` is a task's XCom with the versioned ``manifest``;
    ``corpus_task`` the task whose XCom holds the demo corpus's ``factors`` (kubernetes mode;
    a local task reads them from the store)."""
    pods = mode() == "kubernetes"
    data = dataset.operator.task_id
    with TaskGroup("train", prefix_group_id=False, tooltip="captions, VAE, latents, sweep"):
        if pods:
            captioner = _pod(
                "train_captioner",
                run,
                [dataset],
                "Train the captioner",
                manifest=Pull(data, "manifest"),
                factors=Pull(corpus_task, "factors", ""),
            )
        else:
            captioner = train_captioner(run, dataset)
        shards = caption_shard.partial(run=run, dataset=dataset, captioner=captioner).expand(
            shard=caption_plan(run, dataset, captioner)
        )
        captions = caption(run, shards)
        if pods:
            vae = _pod(
                "train_vae", run, [dataset], "Train the VAE", manifest=Pull(data, "manifest")
            )
        else:
            vae = train_vae(run, dataset)
        captions >> vae.operator  # the corpus is re-captioned before the VAE trains
        latent_shards = encode_shard.partial(
            run=run, dataset=dataset, vae=vae, captions=captions
        ).expand(shard=encode_plan(run, dataset))
        latents = encode(run, latent_shards)
        planned = sweep_plan(run, latents)
        if pods:
            points = sweep_point_pods(sweep_point_args(run, latents, vae, planned))
        else:
            points = sweep_point.partial(run=run, latents=latents, vae=vae).expand(point=planned)
        dit = sweep(run, points)
        if pods:
            evaluator = _pod(
                "train_evaluator",
                run,
                [dataset],
                "Train the evaluator",
                manifest=Pull(data, "manifest"),
            )
        else:
            evaluator = train_evaluator(run, dataset)
    return {
        "captioner": captioner,
        "captions": captions,
        "vae": vae,
        "latents": latents,
        "dit": dit,
        "evaluator": evaluator,
    }


# --------------------------------------------------------------------------- evaluate


@task(execution_timeout=timedelta(hours=2), doc_md="Sample videos at every aspect ratio.")
def generate(run: dict, dit: dict, params=None) -> dict:
    from components.orchestration import tasks

    return tasks.dag_task("generate", dict(params), run, dit=dit)


@task(execution_timeout=timedelta(hours=6), doc_md="FVD, CLIP score, recon; report.html.")
def evaluate(run: dict, dataset: dict, dit: dict, evaluator: dict, params=None) -> dict:
    from components.orchestration import tasks

    return tasks.dag_task(
        "evaluate", dict(params), run, dataset=dataset, dit=dit, evaluator=evaluator
    )


def evaluate_group(run: Any, dataset: Any, trained: dict[str, Any]) -> dict[str, Any]:
    """The ``evaluation`` group (``evaluate`` is its task's id): sample videos, and score the model against held-out data."""
    with TaskGroup("evaluation", prefix_group_id=False, tooltip="samples, metrics, report"):
        samples = generate(run, trained["dit"])
        evaluated = evaluate(run, dataset, trained["dit"], trained["evaluator"])
    return {"samples": samples, "evaluated": evaluated}


# --------------------------------------------------------------------------- release


@task(
    pool=REGISTRY_POOL,
    execution_timeout=timedelta(hours=1),
    outlets=[MODEL],
    doc_md="Register tessera-t2v (alias challenger); updates the model Asset.",
)
def register(
    run: dict,
    dit: dict,
    evaluator: dict,
    evaluated: dict,
    captioner: dict,
    params=None,
    outlet_events=None,
) -> dict:
    from components.orchestration import tasks

    if not params["track"]:
        tasks.skip("params.track is false: the registry lives in MLflow, nothing to register")
    registered = tasks.dag_task(
        "register",
        dict(params),
        run,
        dit=dit,
        evaluator=evaluator,
        evaluated=evaluated,
        captioner=captioner,
    )
    outlet_events[MODEL].extra = {
        "run_id": run["run_id"],
        "model_version": str(registered.get("model_version")),
        "model_uri": registered.get("model_uri"),
    }
    return registered


@task(
    pool=REGISTRY_POOL,
    execution_timeout=timedelta(minutes=30),
    doc_md="Gate the challenger against the champion; move champion if it passes.",
)
def promote(run: dict, registered: dict, params=None) -> dict:
    from components.orchestration import tasks

    return tasks.dag_task("promote", dict(params), run, registered=registered)


def release_group(run: Any, trained: dict[str, Any], evaluated: Any) -> dict[str, Any]:
    """The ``release`` group: register the model, then gate its promotion."""
    with TaskGroup("release", prefix_group_id=False, tooltip="registry, champion gate"):
        registered = register(
            run, trained["dit"], trained["evaluator"], evaluated, trained["captioner"]
        )
        promoted = promote(run, registered)
    return {"registered": registered, "promoted": promoted}


def model_groups(run: Any, dataset: Any, corpus_task: str) -> list[Any]:
    """train, evaluation and release on ``dataset``; returns every task that reports to finish."""
    trained = train_group(run, dataset, corpus_task)
    checked = evaluate_group(run, dataset, trained)
    released = release_group(run, trained, checked["evaluated"])
    ends = [trained[k] for k in ("captioner", "captions", "vae", "latents", "dit", "evaluator")]
    ends += [checked["samples"], checked["evaluated"], *released.values()]
    return ends
