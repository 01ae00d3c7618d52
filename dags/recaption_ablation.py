"""The re-captioning ablation as an Airflow DAG: does training on descriptive captions, and
expanding short prompts, improve prompt following? (optional; runs on a finished pipeline run)

Orchestration only: every task runs one step through ``components.orchestration.tasks``
(imported inside the task body); only URIs and small dicts travel in XCom.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, task, teardown

from components.orchestration import dag_tasks, kubernetes
from components.orchestration.dag_tasks import ACCELERATOR_POOL

DOC = """
### Re-captioning ablation
Reuses a finished `tessera_pipeline` run (**source_run**, default the latest): its latents (encoded
with both the corpus's short captions and the captioner's descriptive ones), VAE, in-domain
evaluator and demo corpus. `start` opens the parent MLflow run (experiment
`tessera/recaption_ablation`) and `source` reads the source run's outputs. At equal compute
(**budget**, training FLOPs), the sweep trains two DiTs with `train_dit.captions` = `short` and
`recaptioned`: `sweep_plan` plans them, `sweep_point` trains each (pool `accelerator`), `sweep`
collects them (with `[tessera] task_mode = kubernetes` each point is a GPU pod running
`tessera task sweep --part`, its arguments made by `sweep_point_args`, as in `tessera_pipeline`).
`recaption_ablation_plan` plans the four cells (each model prompted with the same
short prompts, as typed and expanded by the configured `expand` backend),
`recaption_ablation_cell` samples one cell and scores colour following and `clip_score_domain`,
and `recaption_ablation` writes the 2x2 table with paired bootstrap intervals (`ablation.md`,
`ablation.json`). `finish` always runs and closes the parent run.
"""

PIPELINE = "recaption_ablation"
PARAMS = {
    "profile": Param("demo", type="string", description="tiny | demo | small, or a YAML path"),
    "overrides": Param([], type="array", description="config overrides, e.g. expand.backend=chat"),
    "source_run": Param("", type="string", description="tessera_pipeline run id; empty = latest"),
    "budget": Param(4.0e13, type="number", description="training FLOPs of each of the two DiTs"),
    "track": Param(True, type="boolean", description="log to MLflow"),
}


def _params(params: dict) -> dict:
    """The DAG params with the ablation's sweep: both caption variants, one budget."""
    fixed = [
        "sweep.captions=[short, recaptioned]",
        "sweep.sizes=[]",
        f"sweep.budgets=[{float(params['budget'])}]",
    ]
    return {**params, "overrides": [*(params.get("overrides") or []), *fixed]}


@dag(
    dag_id=PIPELINE,
    schedule=None,
    catchup=False,
    params=PARAMS,
    doc_md=DOC,
    tags=["tessera", "ablation"],
    default_args={"retries": 2},
)
def recaption_ablation():
    @task(execution_timeout=timedelta(minutes=5))
    def start(params=None, run_id=None) -> dict:
        from components.orchestration import tasks

        return tasks.start(_params(dict(params)), run_id, pipeline=PIPELINE)

    @task(execution_timeout=timedelta(minutes=5))
    def source(params=None) -> dict:
        from components.orchestration import tasks

        summary = tasks.source_run(_params(dict(params)), params["source_run"])
        corpus = summary.get("demo_data") or {}
        if not corpus.get("factors"):
            raise ValueError(
                f"source run {summary.get('run_id')} has no demo corpus (demo_data): the "
                "ablation scores colour following, which needs the demo corpus's factors"
            )
        return {
            "latents": summary["encode"]["latents"],
            "vae": summary["train_vae"]["vae"],
            "evaluator": summary["train_evaluator"]["evaluator"],
            "clips": corpus["clips"],
            "captions": corpus["captions"],
            "factors": corpus["factors"],
        }

    @task(execution_timeout=timedelta(minutes=30))
    def sweep_plan(run: dict, src: dict, params=None) -> list:
        from components.orchestration import tasks

        return tasks.plan_task("sweep", _params(dict(params)), run, latents=src["latents"])

    @task(pool=ACCELERATOR_POOL, execution_timeout=timedelta(hours=72))
    def sweep_point(run: dict, src: dict, point: dict, params=None) -> dict:
        from components.orchestration import tasks

        return tasks.part_task(
            "sweep", _params(dict(params)), run, point, latents=src["latents"], vae=src["vae"]
        )

    @task(execution_timeout=timedelta(minutes=10), doc_md="The sweep points' pod arguments.")
    def sweep_point_args(run: dict, src: dict, points: list, params=None) -> list:
        return kubernetes.sweep_point_arguments(
            run, src["latents"], src["vae"], points, _params(dict(params))
        )

    @task(execution_timeout=timedelta(hours=1))
    def sweep(run: dict, points: list, params=None) -> dict:
        from components.orchestration import tasks

        return tasks.run_task("sweep", _params(dict(params)), run, parts=tasks.gather(points))

    @task(execution_timeout=timedelta(minutes=10))
    def recaption_ablation_plan(run: dict, swept: dict, params=None) -> list:
        from components.orchestration import tasks

        return tasks.plan_task(
            "recaption_ablation", _params(dict(params)), run, sweep=swept["result"]
        )

    @task(max_active_tis_per_dagrun=1, execution_timeout=timedelta(hours=6))
    def recaption_ablation_cell(run: dict, src: dict, swept: dict, cell: dict, params=None) -> dict:
        from components.orchestration import tasks

        return tasks.part_task(
            "recaption_ablation",
            _params(dict(params)),
            run,
            cell,
            sweep=swept["result"],
            clips=src["clips"],
            captions=src["captions"],
            factors=src["factors"],
            evaluator=src["evaluator"],
        )

    @task(execution_timeout=timedelta(minutes=30))
    def recaption_ablation_table(run: dict, cells: list, params=None) -> dict:
        from components.orchestration import tasks

        return tasks.run_task(
            "recaption_ablation", _params(dict(params)), run, parts=tasks.gather(cells)
        )

    @teardown
    @task(retries=0, execution_timeout=timedelta(minutes=10))
    def finish(run: dict, params=None, ti=None) -> dict:
        from components.orchestration import tasks

        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id])[ti.run_id]
        return tasks.finish(
            _params(dict(params)), run, {k: v for k, v in states.items() if k != ti.task_id}
        )

    run = start()
    src = source()
    planned = sweep_plan(run, src)
    if kubernetes.task_mode() == "kubernetes":  # the same pods as tessera_pipeline's points
        points = dag_tasks.sweep_point_pods(sweep_point_args(run, src, planned))
    else:
        points = sweep_point.partial(run=run, src=src).expand(point=planned)
    swept = sweep(run, points)
    cells = recaption_ablation_cell.partial(run=run, src=src, swept=swept).expand(
        cell=recaption_ablation_plan(run, swept)
    )
    table = recaption_ablation_table.override(task_id="recaption_ablation")(run, cells)
    [src, swept, table] >> finish(run)


ablation_dag = recaption_ablation()
