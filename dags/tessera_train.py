"""Retrain on a versioned dataset: the ``tessera_train`` DAG, scheduled on the dataset Asset
(new data -> retrain) and triggerable by hand.

Orchestration only: the train, evaluate and release groups are the pipeline's own, built by
``components.orchestration.dag_tasks``; task bodies import ``components.orchestration.tasks``.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, task

from components.orchestration import dag_tasks, kubernetes
from components.orchestration.dag_tasks import DATASET

DOC = """
### Train on the latest dataset
`start` opens the parent MLflow run (experiment `tessera/tessera_train`). `dataset` finds the
versioned dataset to train on: the run named by **source_run**, else the `tessera_pipeline` run
whose `version` task updated the Asset `tessera://dataset` (when the Asset triggered this run),
else the latest finished pipeline run; it returns that run's committed `version` outputs (the
manifest, `dataset_rev`) and its demo corpus. Then the pipeline's own groups run on it:
**train** — `train_captioner`, `caption_plan` / `caption_shard` / `caption`, `train_vae`,
`encode_plan` / `encode_shard` / `encode`, `sweep_plan` / `sweep_point` / `sweep`,
`train_evaluator`; **evaluation** — `generate`, `evaluate`; **release** — `register` (updates the
Asset `tessera://model/tessera-t2v`) and `promote`. `finish` always runs and closes the parent
run. Typed params as in `tessera_pipeline` (**budgets**, **manual_approval**, **gates**,
**require_validated_evaluator**). With `[tessera] task_mode = kubernetes` the training tasks are
GPU pods (`tessera task <step>`; the sweep's points through `sweep_point_args`).

The DAG is paused when first parsed, like every DAG here: unpause it to retrain on every new
dataset version (the pipeline itself also trains on the data it versions).
"""

PARAMS = {
    **dag_tasks.PARAMS,
    "source_run": Param(
        "",
        type="string",
        description="the pipeline run whose dataset to train on; empty = the triggering or latest",
    ),
}


@dag(
    dag_id="tessera_train",
    schedule=DATASET,
    catchup=False,
    params=PARAMS,
    doc_md=DOC,
    tags=["tessera"],
    default_args={"retries": 2},
    user_defined_filters=kubernetes.TEMPLATE_FILTERS,
)
def tessera_train():
    @task(
        task_id="dataset",
        execution_timeout=timedelta(minutes=5),
        doc_md="The versioned dataset of the data run to train on (from the store).",
    )
    def find_dataset(params=None, triggering_asset_events=None) -> dict:
        from components.orchestration import tasks

        run_id = params["source_run"]
        events = (triggering_asset_events or {}).get(DATASET) or []
        if not run_id and events:
            run_id = events[-1].extra.get("run_id", "")
        return tasks.dataset(dict(params), run_id)

    run = dag_tasks.start()
    dataset = find_dataset()
    ends = dag_tasks.model_groups(run, dataset, corpus_task="dataset")
    [dataset, *ends] >> dag_tasks.finish(dataset_task="dataset")(run)


train_dag = tessera_train()
