"""Tessera's main pipeline as an Airflow DAG: raw videos to a trained, sampled, evaluated model.

Orchestration only: every task runs one step through ``components.orchestration.tasks`` (imported
inside the task body, so parsing this file stays cheap); a task id is its step's name, and only
URIs and small dicts travel in XCom.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, task, teardown

DOC = """
### Tessera pipeline
`start` opens the run's MLflow parent run. Raw videos come from **source** (a directory, glob or
`s3://` prefix); with no source, `demo_data` renders the captioned demo corpus (and is skipped
otherwise). `ingest` probes every file into a manifest (corrupt files quarantined with a
reason), `validate` checks it with the Great Expectations suite (Data Docs logged to MLflow) and
`version` commits it to DVC (one run at a time: pool `tessera_dvc`); the training steps read
that versioned dataset and are tagged with its revision. `train_captioner` trains the video
captioner (short and descriptive styles, and prompt expansion) on the captioned clips and reports
held-out BLEU-4, ROUGE-L and attribute accuracy; `caption` re-captions every clip with it
(planned by `caption_plan`, mapped over `caption_shard`) into `captions.parquet`, which encode
and training use. `train_vae` trains the video VAE
(DeepSpeed), `encode` encodes every clip at native size into latent shards (planned by
`encode_plan`, mapped over `encode_shard`). The compute sweep trains the diffusion transformer
on packed spacetime patches once per planned budget: `sweep_plan` plans the runs from the
analytic FLOP count, `sweep_point` trains one with DeepSpeed (pool `accelerator`, a nested
MLflow run each; a failed point is retried alone and resumes), `sweep` fits the scaling law and
selects the best run. `generate` renders sample videos at 16:9, 9:16, 1:1 and a still image. `train_evaluator` trains the in-domain video–text model (the extractor of
`fvd_domain` / `clip_score_domain`, validated on held-out clips), and `evaluate` samples the
held-out captions and a fixed prompt set with fixed seeds and computes FVD, CLIP score, VAE
reconstruction and, on the demo corpus, colour following and framing, writing `report.html`.
`register` logs the generator as the MLflow pyfunc `tessera-t2v` (from code, with its lineage;
`tessera-vae` and `tessera-evaluator` beside it) and gives it the `challenger` alias; `promote`
moves `champion` to it when the gate (`promote.gates`) passes against the current champion
(pool `tessera_registry`; a refused promotion is recorded, not a failure). Serve the champion
with `tessera serve`; promote or roll back by hand with the `tessera_promote` DAG.
`finish` always runs: it ends the parent run FINISHED or FAILED and writes the run's summary.

Each step writes to `{store}/runs/{run_id}/{step}/` atomically, so a retry of a finished step is
a no-op and a retry of a crashed one starts that step again (training resumes from its last
checkpoint). MLflow: experiment `tessera/tessera_pipeline`, one nested run per step.
"""

PARAMS = {
    "profile": Param("demo", type="string", description="tiny | demo | small, or a YAML path"),
    "overrides": Param([], type="array", description="config overrides, e.g. ingest.workers=4"),
    "source": Param("", type="string", description="raw videos; empty = render the demo corpus"),
    "captions": Param("", type="string", description="captions.parquet for `source` (optional)"),
    "track": Param(True, type="boolean", description="log to MLflow"),
}
DVC_POOL = "tessera_dvc"  # one slot: DVC and git cannot run concurrently in one workspace
ACCELERATOR_POOL = "accelerator"  # training runs: as many slots as runs the machines hold
REGISTRY_POOL = "tessera_registry"  # one slot: registrations and promotions of one registry


@dag(
    dag_id="tessera_pipeline",
    schedule=None,
    catchup=False,
    params=PARAMS,
    doc_md=DOC,
    tags=["tessera"],
    default_args={"retries": 2},  # the delay is Airflow's [core] default_task_retry_delay
)
def tessera_pipeline():
    @task(execution_timeout=timedelta(minutes=5))
    def start(params=None, run_id=None) -> dict:
        from components.orchestration import tasks

        return tasks.start(dict(params), run_id)

    @task(execution_timeout=timedelta(hours=1))
    def demo_data(run: dict, params=None) -> dict:
        from components.orchestration import tasks

        if params["source"]:
            tasks.skip("params.source is set: its files are ingested instead of the demo corpus")
        return tasks.run_task("demo_data", dict(params), run)

    @task(trigger_rule="none_failed", execution_timeout=timedelta(hours=6))
    def ingest(run: dict, params=None) -> dict:
        from components.orchestration import tasks

        raw = tasks.corpus(dict(params), run)
        return tasks.run_task(
            "ingest", dict(params), run, src=raw["clips"], captions=raw.get("captions")
        )

    @task(execution_timeout=timedelta(hours=1))
    def validate(run: dict, ingested: dict, params=None) -> dict:
        from components.orchestration import tasks

        return tasks.run_task(
            "validate",
            dict(params),
            run,
            manifest=ingested["manifest"],
            quarantine=ingested["quarantine"],
        )

    @task(pool=DVC_POOL, execution_timeout=timedelta(hours=6))
    def version(run: dict, validated: dict, params=None) -> dict:
        from components.orchestration import tasks

        raw = tasks.corpus(dict(params), run)
        return tasks.run_task(
            "version", dict(params), run, manifest=validated["manifest"], captions=raw["captions"]
        )

    @task(pool=ACCELERATOR_POOL, execution_timeout=timedelta(hours=24))
    def train_captioner(run: dict, dataset: dict, params=None) -> dict:
        from components.orchestration import tasks

        raw = tasks.corpus(dict(params), run)
        return tasks.run_task(
            "train_captioner",
            dict(params),
            run,
            manifest=dataset["manifest"],
            factors=raw.get("factors") or "",
        )

    @task(execution_timeout=timedelta(minutes=10))
    def caption_plan(run: dict, dataset: dict, captioner: dict, params=None) -> list:
        from components.orchestration import tasks

        return tasks.plan_task(
            "caption",
            dict(params),
            run,
            manifest=dataset["manifest"],
            captioner=captioner["captioner"],
        )

    @task(max_active_tis_per_dagrun=2, execution_timeout=timedelta(hours=6))
    def caption_shard(run: dict, dataset: dict, captioner: dict, shard: dict, params=None) -> dict:
        from components.orchestration import tasks

        return tasks.part_task(
            "caption",
            dict(params),
            run,
            shard,
            manifest=dataset["manifest"],
            captioner=captioner["captioner"],
        )

    @task(execution_timeout=timedelta(hours=1))
    def caption(run: dict, shards: list, params=None) -> dict:
        from components.orchestration import tasks

        return tasks.run_task("caption", dict(params), run, parts=tasks.gather(shards))

    @task(execution_timeout=timedelta(hours=48))
    def train_vae(run: dict, dataset: dict, params=None) -> dict:
        from components.orchestration import tasks

        return tasks.run_task("train_vae", dict(params), run, manifest=dataset["manifest"])

    @task(execution_timeout=timedelta(minutes=10))
    def encode_plan(run: dict, dataset: dict, params=None) -> list:
        from components.orchestration import tasks

        return tasks.plan_task("encode", dict(params), run, manifest=dataset["manifest"])

    @task(max_active_tis_per_dagrun=2, execution_timeout=timedelta(hours=6))
    def encode_shard(
        run: dict, dataset: dict, vae: dict, captions: dict, shard: dict, params=None
    ) -> dict:
        from components.orchestration import tasks

        return tasks.part_task(
            "encode",
            dict(params),
            run,
            shard,
            manifest=dataset["manifest"],
            vae=vae["vae"],
            captions=captions["captions"],
        )

    @task(execution_timeout=timedelta(hours=1))
    def encode(run: dict, shards: list, params=None) -> dict:
        from components.orchestration import tasks

        return tasks.run_task("encode", dict(params), run, parts=tasks.gather(shards))

    @task(execution_timeout=timedelta(minutes=30))
    def sweep_plan(run: dict, latents: dict, params=None) -> list:
        from components.orchestration import tasks

        return tasks.plan_task("sweep", dict(params), run, latents=latents["latents"])

    @task(pool=ACCELERATOR_POOL, execution_timeout=timedelta(hours=72))
    def sweep_point(run: dict, latents: dict, vae: dict, point: dict, params=None) -> dict:
        from components.orchestration import tasks

        return tasks.part_task(
            "sweep", dict(params), run, point, latents=latents["latents"], vae=vae["vae"]
        )

    @task(execution_timeout=timedelta(hours=1))
    def sweep(run: dict, points: list, params=None) -> dict:
        from components.orchestration import tasks

        return tasks.run_task("sweep", dict(params), run, parts=tasks.gather(points))

    @task(execution_timeout=timedelta(hours=2))
    def generate(run: dict, dit: dict, params=None) -> dict:
        from components.orchestration import tasks

        return tasks.run_task("generate", dict(params), run, model=dit["model"])

    @task(execution_timeout=timedelta(hours=12))
    def train_evaluator(run: dict, dataset: dict, params=None) -> dict:
        from components.orchestration import tasks

        return tasks.run_task("train_evaluator", dict(params), run, manifest=dataset["manifest"])

    @task(execution_timeout=timedelta(hours=6))
    def evaluate(run: dict, dataset: dict, dit: dict, evaluator: dict, params=None) -> dict:
        from components.orchestration import tasks

        raw = tasks.corpus(dict(params), run)
        demo = {k: raw[k] for k in ("clips", "captions", "factors") if raw.get("factors")}
        return tasks.run_task(
            "evaluate",
            dict(params),
            run,
            manifest=dataset["manifest"],
            model=dit["model"],
            evaluator=evaluator["evaluator"],
            **demo,
        )

    @task(pool=REGISTRY_POOL, execution_timeout=timedelta(hours=1))
    def register(
        run: dict, dit: dict, evaluator: dict, evaluated: dict, captioner: dict, params=None
    ) -> dict:
        from components.orchestration import tasks

        if not params["track"]:
            tasks.skip("params.track is false: the registry lives in MLflow, nothing to register")
        return tasks.run_task(
            "register",
            dict(params),
            run,
            model=dit["model"],
            evaluation=evaluated["result"],
            evaluator=evaluator["evaluator"],
            captioner=captioner["captioner"],
            pairs=captioner.get("pairs") or "",
        )

    @task(pool=REGISTRY_POOL, execution_timeout=timedelta(minutes=30))
    def promote(run: dict, registered: dict, params=None) -> dict:
        from components.orchestration import tasks

        return tasks.run_task(
            "promote", dict(params), run, version=str(registered["model_version"])
        )

    @teardown
    @task(retries=0, execution_timeout=timedelta(minutes=10))
    def finish(run: dict, params=None, ti=None) -> dict:
        from components.orchestration import tasks

        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id])[ti.run_id]
        return tasks.finish(dict(params), run, {k: v for k, v in states.items() if k != ti.task_id})

    run = start()
    demo = demo_data(run)
    ingested = ingest(run)
    demo >> ingested
    validated = validate(run, ingested)
    dataset = version(run, validated)
    captioner = train_captioner(run, dataset)
    caption_shards = caption_shard.partial(run=run, dataset=dataset, captioner=captioner).expand(
        shard=caption_plan(run, dataset, captioner)
    )
    captions = caption(run, caption_shards)
    vae = train_vae(run, dataset)
    captions >> vae  # the corpus is re-captioned before the compression network trains
    shards = encode_shard.partial(run=run, dataset=dataset, vae=vae, captions=captions).expand(
        shard=encode_plan(run, dataset)
    )
    latents = encode(run, shards)
    points = sweep_point.partial(run=run, latents=latents, vae=vae).expand(
        point=sweep_plan(run, latents)
    )
    dit = sweep(run, points)
    evaluator = train_evaluator(run, dataset)
    evaluated = evaluate(run, dataset, dit, evaluator)
    steps = [demo, ingested, validated, dataset, captioner, captions, vae, latents, dit]
    steps.append(generate(run, dit))
    registered = register(run, dit, evaluator, evaluated, captioner)
    steps += [evaluator, evaluated, registered, promote(run, registered)]
    steps >> finish(run)


pipeline_dag = tessera_pipeline()
