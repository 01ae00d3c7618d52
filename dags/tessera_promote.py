"""Promote (or roll back) a registered ``tessera-t2v`` version by hand: the manual
``tessera_promote`` DAG, with Params for the version, approval and rollback.

Orchestration only: the task runs the ``promote`` step through
``components.orchestration.tasks`` (imported inside the task body).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, task

DOC = """
### Promote a model
`promote` gates a registered `tessera-t2v` version (**version**, empty = the one with the
`challenger` alias) against the current `champion` with `promote.gates` (same extractors and
sample counts, or the comparison is refused and says which differ) and moves the `champion`
alias when it passes. With `promote.manual_approval` a passing version waits for a run with
**approve** checked (the human in the loop). **rollback** gives `champion` back to the previous
champion instead. Every decision (who, when, why, the checks) is recorded as tags on the version;
the task runs in the one-slot pool `tessera_registry`, so promotions never interleave.
"""

PARAMS = {
    "profile": Param("demo", type="string", description="tiny | demo | small, or a YAML path"),
    "overrides": Param([], type="array", description="e.g. promote.manual_approval=true"),
    "version": Param("", type="string", description="model version; empty = the challenger"),
    "approve": Param(False, type="boolean", description="approve (manual-approval mode)"),
    "rollback": Param(False, type="boolean", description="restore the previous champion"),
}
REGISTRY_POOL = "tessera_registry"


@dag(
    dag_id="tessera_promote",
    schedule=None,
    catchup=False,
    params=PARAMS,
    doc_md=DOC,
    tags=["tessera", "registry"],
    default_args={"retries": 1},
)
def tessera_promote():
    @task(pool=REGISTRY_POOL, execution_timeout=timedelta(minutes=30))
    def promote(params=None, run_id=None) -> dict:
        from components.orchestration import tasks

        # one top-level MLflow run (experiment tessera/tessera_promote): no parent to close
        run = {"run_id": tasks.sanitize_run_id(run_id), "pipeline": "tessera_promote"}
        return tasks.run_task(
            "promote",
            dict(params),
            run,
            version=str(params["version"] or ""),
            approve=bool(params["approve"]),
            rollback=bool(params["rollback"]),
        )

    promote()


promote_dag = tessera_promote()
