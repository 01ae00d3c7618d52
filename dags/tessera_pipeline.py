"""Tessera's main pipeline as an Airflow DAG: raw videos to a trained, sampled, evaluated model.

Orchestration only: every task runs one step through ``components.orchestration.tasks`` (imported
inside the task body, so parsing this file stays cheap); a task id is its step's name, and only
URIs and small dicts travel in XCom. The data group is this DAG's own; the train, evaluate and
release groups are built by ``components.orchestration.dag_tasks`` (stdlib + Airflow only at
parse time), which ``tessera_train`` shares.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, TaskGroup, dag, task

from components.orchestration import dag_tasks, kubernetes
from components.orchestration.dag_tasks import DATASET, DVC_POOL

DOC = """
### Tessera pipeline
`start` opens the run's MLflow parent run. Raw videos come from **source** (a directory, glob or
`s3://` prefix); with no source, `demo_data` renders the captioned demo corpus (and is skipped
otherwise). `ingest` probes every file into a manifest (corrupt files quarantined with a
reason): `ingest_plan` cuts the sorted listing into shards, mapped over `ingest_shard`, and
`ingest` merges them into one manifest, identical to a single pass; `validate` checks it with the Great Expectations suite (Data Docs logged to MLflow) and
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

Task groups: **data** (demo_data … version), **train** (train_captioner … train_evaluator),
**evaluation** (generate, evaluate; a group id may not repeat a task id), **release** (register, promote); task ids carry no group
prefix. `version` updates the Asset `tessera://dataset` (its event names the run, manifest and
dataset revision: `tessera_train` retrains on it) and `register` the Asset
`tessera://model/tessera-t2v`. Typed params set config keys (null = the profile's value; a set
one wins over `overrides`): **budgets** → `sweep.budgets`, **manual_approval** →
`promote.manual_approval`, **gates** → `promote.gates`, **require_validated_evaluator** →
`train_evaluator.require_validated`; a wrong type or value is refused when the run is triggered.
With `[tessera] task_mode = kubernetes` the training tasks run as GPU pods in the Tessera image
(`tessera task <step>`; the sweep's points through `sweep_point_args`).

Each step writes to `{store}/runs/{run_id}/{step}/` atomically, so a retry of a finished step is
a no-op and a retry of a crashed one starts that step again (training resumes from its last
checkpoint). MLflow: experiment `tessera/tessera_pipeline`, one nested run per step.
"""

PARAMS = {
    **dag_tasks.PARAMS,
    "source": Param("", type="string", description="raw videos; empty = render the demo corpus"),
    "captions": Param("", type="string", description="captions.parquet for `source` (optional)"),
}


@dag(
    dag_id="tessera_pipeline",
    schedule=None,
    catchup=False,
    params=PARAMS,
    doc_md=DOC,
    tags=["tessera"],
    default_args={"retries": 2},  # the delay is Airflow's [core] default_task_retry_delay
    user_defined_filters=kubernetes.TEMPLATE_FILTERS,
)
def tessera_pipeline():
    @task(
        execution_timeout=timedelta(hours=1),
        doc_md="Render the captioned demo corpus (skipped when `source` is set).",
    )
    def demo_data(run: dict, params=None) -> dict:
        from components.orchestration import tasks

        if params["source"]:
            tasks.skip("params.source is set: its files are ingested instead of the demo corpus")
        return tasks.dag_task("demo_data", dict(params), run)

    @task(
        trigger_rule="none_failed",
        execution_timeout=timedelta(minutes=30),
        doc_md="Cut the source's sorted listing into shards (`ingest.shard_size` files each).",
    )
    def ingest_plan(run: dict, params=None) -> list:
        from components.orchestration import tasks

        return tasks.dag_task("ingest_plan", dict(params), run)

    @task(
        max_active_tis_per_dagrun=2,
        execution_timeout=timedelta(hours=6),
        doc_md="Probe one shard's files; quarantine the rest with a reason.",
    )
    def ingest_shard(run: dict, shard: dict, params=None) -> dict:
        from components.orchestration import tasks

        return tasks.dag_task("ingest_shard", dict(params), run, shard=shard)

    @task(
        execution_timeout=timedelta(hours=1),
        doc_md="Merge the shards into one manifest + quarantine (duplicates across shards too).",
    )
    def ingest(run: dict, shards: list, params=None) -> dict:
        from components.orchestration import tasks

        return tasks.dag_task("ingest", dict(params), run, shards=shards)

    @task(
        execution_timeout=timedelta(hours=1),
        doc_md="Check the manifest with the Great Expectations suite (Data Docs).",
    )
    def validate(run: dict, ingested: dict, params=None) -> dict:
        from components.orchestration import tasks

        return tasks.dag_task("validate", dict(params), run, ingested=ingested)

    @task(
        pool=DVC_POOL,
        execution_timeout=timedelta(hours=6),
        outlets=[DATASET],
        doc_md="Commit the dataset to DVC; updates the dataset Asset.",
    )
    def version(run: dict, validated: dict, params=None, outlet_events=None) -> dict:
        from components.orchestration import tasks

        versioned = tasks.dag_task("version", dict(params), run, validated=validated)
        outlet_events[DATASET].extra = {
            "run_id": run["run_id"],
            "manifest": versioned["manifest"],
            "dataset_rev": versioned.get("dataset_rev"),
        }
        return versioned

    run = dag_tasks.start()
    with TaskGroup("data", prefix_group_id=False, tooltip="raw videos to a versioned dataset"):
        demo = demo_data(run)
        planned = ingest_plan(run)
        demo >> planned
        ingested = ingest(run, ingest_shard.partial(run=run).expand(shard=planned))
        validated = validate(run, ingested)
        dataset = version(run, validated)
    ends = dag_tasks.model_groups(run, dataset, corpus_task="demo_data")
    [demo, ingested, validated, dataset, *ends] >> dag_tasks.finish()(run)


pipeline_dag = tessera_pipeline()
