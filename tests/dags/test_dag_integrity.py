"""DAG integrity: the DagBag loads without errors, the DAG reads back as written (one name per
step, a timeout on every task, DVC in a one-slot pool, a teardown that always closes the run),
and parsing imports none of the ML stack."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from components.orchestration.airflow_local import DAGS_FOLDER, POOLS, REPO

PROBE = """
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags.get(sys.argv[2])
heavy = sorted(m for m in ("torch", "mlflow", "pandas", "great_expectations", "dvc", "av",
                           "components") if m in sys.modules)
tasks = dag.tasks if dag else []
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "dags": sorted(bag.dags),
    "tasks": sorted(dag.task_dict) if dag else [],
    "edges": sorted([t.task_id, d] for t in tasks for d in t.downstream_task_ids),
    "retries": {t.task_id: t.retries for t in tasks},
    "timeouts": {t.task_id: t.execution_timeout and t.execution_timeout.total_seconds()
                 for t in tasks},
    "pools": {t.task_id: t.pool for t in tasks},
    "trigger_rules": {t.task_id: getattr(t.trigger_rule, "value", t.trigger_rule) for t in tasks},
    "teardowns": sorted(t.task_id for t in tasks if t.is_teardown),
    "mapped": sorted(t.task_id for t in tasks if "Mapped" in type(t).__name__),
    "doc_md": dag.doc_md if dag else "",
    "params": sorted(dag.params) if dag else [],
    "max_active_runs": dag.max_active_runs if dag else None,
    "heavy": heavy,
}))
"""
STEPS = ["demo_data", "ingest", "validate", "version", "train_captioner", "caption"]
STEPS += ["train_vae", "encode", "sweep", "generate", "train_evaluator", "evaluate"]
STEPS += ["register", "promote"]


def _read_back(home, dag_id: str) -> dict:
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PATH": "/usr/bin:/bin",
        "TESSERA_HOME": str(home / "tessera"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(DAGS_FOLDER), dag_id],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    return _read_back(tmp_path_factory.mktemp("airflow"), "tessera_pipeline")


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    return _read_back(tmp_path_factory.mktemp("airflow"), "recaption_ablation")


def test_the_ablation_dag_reads_back_as_written(ablation):
    assert ablation["errors"] == {} and "recaption_ablation" in ablation["dags"]
    steps = ["sweep", "recaption_ablation"]
    parts = ["sweep_plan", "sweep_point", "recaption_ablation_plan", "recaption_ablation_cell"]
    assert ablation["tasks"] == sorted(["start", "source", *steps, *parts, "finish"])
    edges = {tuple(e) for e in ablation["edges"]}
    chain = ["start", "sweep_plan", "sweep_point", "sweep", "recaption_ablation_plan"]
    chain += ["recaption_ablation_cell", "recaption_ablation", "finish"]
    for edge in itertools.pairwise(chain):
        assert edge in edges, edge
    assert ablation["mapped"] == ["recaption_ablation_cell", "sweep_point"]
    assert ablation["teardowns"] == ["finish"] and all(ablation["timeouts"].values())
    assert ablation["pools"]["sweep_point"] == "accelerator"
    for task in ablation["tasks"]:
        assert f"`{task}`" in ablation["doc_md"], task
    assert {"source_run", "budget"} <= set(ablation["params"])
    assert ablation["heavy"] == []


@pytest.fixture(scope="module")
def promote_dag(tmp_path_factory):
    return _read_back(tmp_path_factory.mktemp("airflow"), "tessera_promote")


def test_the_promote_dag_is_manual_with_params(promote_dag):
    assert promote_dag["errors"] == {} and promote_dag["tasks"] == ["promote"]
    assert promote_dag["pools"]["promote"] == "tessera_registry"
    assert {"version", "approve", "rollback"} <= set(promote_dag["params"])
    assert "`promote`" in promote_dag["doc_md"] and promote_dag["heavy"] == []


def test_no_import_errors(dagbag):
    assert dagbag["errors"] == {}
    assert "tessera_pipeline" in dagbag["dags"]


def test_a_task_is_named_after_its_step(dagbag):
    parts = ["caption_plan", "caption_shard", "encode_plan", "encode_shard"]
    parts += ["sweep_plan", "sweep_point"]
    assert dagbag["tasks"] == sorted(["start", *STEPS, *parts, "finish"])
    from components.orchestration.tasks import spec

    for name in STEPS:
        assert spec(name).name == name  # the step module the task runs has that name


def test_pipeline_shape(dagbag):
    edges = {tuple(e) for e in dagbag["edges"]}
    chain = ["start", "demo_data", "ingest", "validate", "version", "train_captioner"]
    chain += ["caption_plan", "caption_shard", "caption", "train_vae", "encode_shard", "encode"]
    chain += ["sweep_plan", "sweep_point", "sweep", "generate", "finish"]
    for edge in itertools.pairwise(chain):
        assert edge in edges, edge
    assert {("version", "encode_plan"), ("encode_plan", "encode_shard")} <= edges
    assert ("train_vae", "sweep_point") in edges  # the points sample with the VAE
    assert ("caption", "encode_shard") in edges  # latents carry the re-captioned captions
    assert {("sweep", "evaluate"), ("train_evaluator", "evaluate")} <= edges
    assert ("version", "train_evaluator") in edges
    assert dagbag["mapped"] == ["caption_shard", "encode_shard", "sweep_point"]
    # every task reports to finish, directly or through its descendants
    assert {t for t, d in edges if d == "finish"} >= {"evaluate", "generate", "demo_data"}
    assert {("evaluate", "register"), ("train_captioner", "register")} <= edges
    assert {("register", "promote"), ("promote", "finish")} <= edges


def test_finish_always_runs_and_closes_the_run(dagbag):
    assert dagbag["teardowns"] == ["finish"]
    assert dagbag["retries"]["finish"] == 0
    assert dagbag["trigger_rules"]["ingest"] == "none_failed"  # runs when demo_data skipped


def test_every_task_has_a_timeout_and_retries_on_purpose(dagbag):
    assert all(dagbag["timeouts"].values()), dagbag["timeouts"]
    assert dagbag["timeouts"]["sweep_point"] >= 24 * 3600 > dagbag["timeouts"]["validate"]
    # a misspelled default_args key would silently leave retries at 0
    assert all(dagbag["retries"][t] == 2 for t in [*STEPS, "caption_shard", "sweep_point"])


def test_dvc_and_training_runs_have_their_pools(dagbag):
    assert dagbag["pools"]["version"] == "tessera_dvc" and POOLS["tessera_dvc"][0] == 1
    training = ("train_captioner", "sweep_point")
    assert {dagbag["pools"][t] for t in training} == {"accelerator"}
    assert POOLS["accelerator"][0] == 1
    registry = ("register", "promote")
    assert {dagbag["pools"][t] for t in registry} == {"tessera_registry"}
    assert POOLS["tessera_registry"][0] == 1
    others = {p for t, p in dagbag["pools"].items() if t not in ("version", *training, *registry)}
    assert others == {"default_pool"}
    assert dagbag["max_active_runs"] > 1  # runs overlap; only DVC is serialised


def test_the_doc_describes_every_task(dagbag):
    for task in dagbag["tasks"]:
        assert f"`{task}`" in dagbag["doc_md"], task
    assert {"profile", "overrides", "source", "captions", "track"} <= set(dagbag["params"])


def test_parsing_imports_no_ml_stack(dagbag):
    assert dagbag["heavy"] == []
