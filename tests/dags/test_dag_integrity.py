"""DAG integrity: the DagBag loads without errors, the DAG reads back as written (one name per
step, a timeout on every task, DVC in a one-slot pool, a teardown that always closes the run,
task groups, Assets, typed Params refused at trigger time), and parsing each DAG file is cheap:
none of the ML stack imported, well under a second, ``ruff --select AIR`` clean."""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys

import pytest

from components.orchestration.airflow_local import DAGS_FOLDER, POOLS, REPO

PROBE = """
import importlib, json, sys
from airflow.utils.file import iter_airflow_imports
for module in iter_airflow_imports(sys.argv[1]):  # as Airflow's dag processor pre-imports them
    importlib.import_module(module)
if len(sys.argv) > 3:  # warm modules (the provider of kubernetes mode): one-off, not per parse
    for module in sys.argv[3].split(","):
        importlib.import_module(module)
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags.get(sys.argv[2])
# our modules that DAG files may import when parsed: stdlib + Airflow only (tests/test_layout.py)
light = {"components", "components.orchestration", "components.orchestration.dag_tasks",
         "components.orchestration.kubernetes"}
heavy = sorted(m for m in sys.modules if m in ("torch", "mlflow", "pandas", "great_expectations",
                                               "dvc", "av")
               or (m.split(".")[0] == "components" and m not in light))
tasks = dag.tasks if dag else []
def uris(cond):
    if cond is None:
        return []
    return [cond.uri] if hasattr(cond, "uri") else [u for o in cond.objects for u in uris(o)]
refused = []
if dag:
    import copy
    for name, value in [("budgets", [-1.0]), ("budgets", "4e13"), ("manual_approval", "yes"),
                        ("gates", [{"metric": "fvd_domain", "max_regression": -1}]),
                        ("gates", [{"max_regression": 0}])]:
        if name in dag.params:
            try:
                copy.deepcopy(dag.params).update({name: value})
            except Exception:
                refused.append([name, value])
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "dags": sorted(bag.dags),
    "parse_s": sum(s.duration.total_seconds() for s in bag.dagbag_stats),
    "tasks": sorted(dag.task_dict) if dag else [],
    "edges": sorted([t.task_id, d] for t in tasks for d in t.downstream_task_ids),
    "retries": {t.task_id: t.retries for t in tasks},
    "timeouts": {t.task_id: t.execution_timeout and t.execution_timeout.total_seconds()
                 for t in tasks},
    "pools": {t.task_id: t.pool for t in tasks},
    "trigger_rules": {t.task_id: getattr(t.trigger_rule, "value", t.trigger_rule) for t in tasks},
    "teardowns": sorted(t.task_id for t in tasks if t.is_teardown),
    "mapped": sorted(t.task_id for t in tasks if "Mapped" in type(t).__name__),
    "groups": {t.task_id: t.task_group.group_id for t in tasks},
    "task_docs": {t.task_id: t.doc_md or "" for t in tasks},
    "outlets": {t.task_id: [a.uri for a in t.outlets] for t in tasks if t.outlets},
    "schedule_assets": sorted(uris(getattr(dag.timetable, "asset_condition", None))),
    "doc_md": dag.doc_md if dag else "",
    "params": sorted(dag.params) if dag else [],
    "refused": refused,
    "max_active_runs": dag.max_active_runs if dag else None,
    "heavy": heavy,
}))
"""
STEPS = ["demo_data", "ingest", "validate", "version", "train_captioner", "caption"]
STEPS += ["train_vae", "encode", "sweep", "generate", "train_evaluator", "evaluate"]
STEPS += ["register", "promote"]


DAG_FILES = sorted(p.stem for p in DAGS_FOLDER.glob("*.py") if p.stem != "__init__")
MAX_PARSE_S = 1.0  # a measured guard on parse cost: ours is ~0.05 s a file, keep the margin
KUBERNETES_PROVIDER = "airflow.providers.cncf.kubernetes.operators.pod"


def read_back(home, dag_id: str, env: dict[str, str] | None = None, warm: str = "") -> dict:
    """Parse ``dags/<dag_id>.py`` alone in a fresh interpreter and read the DAG back."""
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PATH": "/usr/bin:/bin",
        "TESSERA_HOME": str(home / "tessera"),
        "OMP_NUM_THREADS": "1",
        **(env or {}),
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(DAGS_FOLDER / f"{dag_id}.py"), dag_id]
        + ([warm] if warm else []),
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
    return read_back(tmp_path_factory.mktemp("airflow"), "tessera_pipeline")


@pytest.fixture(scope="module")
def ablation(tmp_path_factory):
    return read_back(tmp_path_factory.mktemp("airflow"), "recaption_ablation")


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
    return read_back(tmp_path_factory.mktemp("airflow"), "tessera_promote")


def test_the_promote_dag_is_manual_with_params(promote_dag):
    assert promote_dag["errors"] == {} and promote_dag["tasks"] == ["promote"]
    assert promote_dag["pools"]["promote"] == "tessera_registry"
    assert {"version", "approve", "rollback"} <= set(promote_dag["params"])
    assert "`promote`" in promote_dag["doc_md"] and promote_dag["heavy"] == []


def test_no_import_errors(dagbag):
    assert dagbag["errors"] == {}
    assert "tessera_pipeline" in dagbag["dags"]


def test_a_task_is_named_after_its_step(dagbag):
    parts = ["ingest_plan", "ingest_shard", "caption_plan", "caption_shard", "encode_plan"]
    parts += ["encode_shard", "sweep_plan", "sweep_point"]
    assert dagbag["tasks"] == sorted(["start", *STEPS, *parts, "finish"])
    from components.orchestration.tasks import spec

    for name in STEPS:
        assert spec(name).name == name  # the step module the task runs has that name


def test_pipeline_shape(dagbag):
    edges = {tuple(e) for e in dagbag["edges"]}
    chain = ["start", "demo_data", "ingest_plan", "ingest_shard", "ingest", "validate"]
    chain += ["version", "train_captioner"]
    chain += ["caption_plan", "caption_shard", "caption", "train_vae", "encode_shard", "encode"]
    chain += ["sweep_plan", "sweep_point", "sweep", "generate", "finish"]
    for edge in itertools.pairwise(chain):
        assert edge in edges, edge
    assert {("version", "encode_plan"), ("encode_plan", "encode_shard")} <= edges
    assert ("train_vae", "sweep_point") in edges  # the points sample with the VAE
    assert ("caption", "encode_shard") in edges  # latents carry the re-captioned captions
    assert {("sweep", "evaluate"), ("train_evaluator", "evaluate")} <= edges
    assert ("version", "train_evaluator") in edges
    assert dagbag["mapped"] == ["caption_shard", "encode_shard", "ingest_shard", "sweep_point"]
    # every task reports to finish, directly or through its descendants
    assert {t for t, d in edges if d == "finish"} >= {"evaluate", "generate", "demo_data"}
    assert {("evaluate", "register"), ("train_captioner", "register")} <= edges
    assert {("register", "promote"), ("promote", "finish")} <= edges


def test_finish_always_runs_and_closes_the_run(dagbag):
    assert dagbag["teardowns"] == ["finish"]
    assert dagbag["retries"]["finish"] == 0
    assert dagbag["trigger_rules"]["ingest_plan"] == "none_failed"  # runs when demo_data skipped


def test_every_task_has_a_timeout_and_retries_on_purpose(dagbag):
    assert all(dagbag["timeouts"].values()), dagbag["timeouts"]
    assert dagbag["timeouts"]["sweep_point"] >= 24 * 3600 > dagbag["timeouts"]["validate"]
    # a misspelled default_args key would silently leave retries at 0
    mapped = ["ingest_shard", "caption_shard", "sweep_point"]
    assert all(dagbag["retries"][t] == 2 for t in [*STEPS, *mapped])


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


# --------------------------------------------------------------------------- groups, Assets, Params

GROUPS = {
    "data": ["demo_data", "ingest_plan", "ingest_shard", "ingest", "validate", "version"],
    "train": ["train_captioner", "caption_plan", "caption_shard", "caption", "train_vae"],
    "evaluation": ["generate", "evaluate"],
    "release": ["register", "promote"],
}
GROUPS["train"] += ["encode_plan", "encode_shard", "encode", "sweep_plan", "sweep_point"]
GROUPS["train"] += ["sweep", "train_evaluator"]


def test_tasks_are_grouped_without_renaming_them(dagbag):
    for group, members in GROUPS.items():
        assert {dagbag["groups"][t] for t in members} == {group}, group
    assert dagbag["groups"]["start"] is None and dagbag["groups"]["finish"] is None


def test_the_dataset_and_the_model_are_assets(dagbag):
    assert dagbag["outlets"] == {
        "version": ["tessera://dataset/"],  # Airflow normalises an empty path to /
        "register": ["tessera://model/tessera-t2v"],
    }


def test_every_task_has_a_short_doc(dagbag):
    for task, doc in dagbag["task_docs"].items():
        assert 0 < len(doc) <= 120, (task, doc)


def test_typed_params_refuse_wrong_values_at_trigger_time(dagbag):
    assert {"budgets", "manual_approval", "gates", "require_validated_evaluator"} <= set(
        dagbag["params"]
    )
    assert len(dagbag["refused"]) == 5, dagbag["refused"]  # every wrong value in the probe


@pytest.fixture(scope="module")
def train(tmp_path_factory):
    return read_back(tmp_path_factory.mktemp("airflow"), "tessera_train")


def test_the_train_dag_retrains_on_the_dataset_asset(train, dagbag):
    assert train["errors"] == {} and train["schedule_assets"] == ["tessera://dataset/"]
    model_tasks = [t for g in ("train", "evaluation", "release") for t in GROUPS[g]]
    assert train["tasks"] == sorted(["start", "dataset", *model_tasks, "finish"])
    edges = {tuple(e) for e in train["edges"]}
    chain = ["dataset", "train_captioner", "caption_plan", "caption_shard", "caption"]
    chain += ["train_vae", "encode_shard", "encode", "sweep_plan", "sweep_point", "sweep"]
    chain += ["evaluate", "register", "promote", "finish"]
    for edge in itertools.pairwise(chain):
        assert edge in edges, edge
    assert ("dataset", "train_evaluator") in edges and ("start", "train_vae") in edges
    # the same task definitions as the pipeline's: same groups, pools, timeouts, retries, docs
    for key in ("groups", "pools", "timeouts", "retries", "task_docs", "trigger_rules"):
        assert {t: train[key][t] for t in model_tasks} == {t: dagbag[key][t] for t in model_tasks}
    assert train["mapped"] == ["caption_shard", "encode_shard", "sweep_point"]
    assert train["teardowns"] == ["finish"] and train["outlets"]["register"]
    for task in train["tasks"]:
        assert f"`{task}`" in train["doc_md"], task
    assert {"source_run", "budgets", "gates"} <= set(train["params"])
    assert len(train["refused"]) == 5


# --------------------------------------------------------------------------- parse hygiene


@pytest.fixture(scope="module")
def parsed(tmp_path_factory):
    return {d: read_back(tmp_path_factory.mktemp("airflow"), d) for d in DAG_FILES}


def test_there_is_a_dag_per_file(parsed):
    assert set(DAG_FILES) >= {"tessera_pipeline", "tessera_train", "tessera_promote"}
    for dag_id, found in parsed.items():
        assert found["errors"] == {} and found["dags"] == [dag_id], dag_id


def test_parsing_each_dag_file_imports_no_ml_stack(parsed):
    assert {d: p["heavy"] for d, p in parsed.items()} == {d: [] for d in parsed}


def test_parsing_each_dag_file_is_cheap(parsed):
    slow = {d: p["parse_s"] for d, p in parsed.items() if p["parse_s"] >= MAX_PARSE_S}
    assert not slow, f"DAG files that parse in over {MAX_PARSE_S} s: {slow}"


def test_ruff_airflow_rules_pass_on_the_dags():
    ruff = REPO / ".venv" / "bin" / "ruff"
    ruff = ruff if ruff.is_file() else shutil.which("ruff")
    if not ruff:
        pytest.skip("ruff is not installed")
    proc = subprocess.run(
        [str(ruff), "check", "--select", "AIR", "--no-cache", "dags/"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dag_id", ["tessera_pipeline", "tessera_train"])
def test_kubernetes_mode_parses_cheaply_once_the_provider_is_loaded(tmp_path, dag_id):
    # the provider's Kubernetes client costs ~3 s to import, once per parsing process; the DAG's
    # own parse cost is what this guards
    found = read_back(
        tmp_path,
        dag_id,
        env={"AIRFLOW__TESSERA__TASK_MODE": "kubernetes"},
        warm=KUBERNETES_PROVIDER,
    )
    assert found["errors"] == {} and found["heavy"] == []
    assert found["parse_s"] < MAX_PARSE_S, found["parse_s"]
    assert "sweep_point_args" in found["tasks"]
