"""DAG integrity: the DagBag loads without errors, the DAG reads back as written, parsing is cheap."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys

import pytest

from components.airflow_local import DAGS_FOLDER, REPO

PROBE = """
import json, sys, time
t0 = time.perf_counter()
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
dag = bag.dags.get("tessera_pipeline")
heavy = sorted(m for m in ("torch", "mlflow", "pandas", "great_expectations", "dvc", "av")
               if m in sys.modules)
print(json.dumps({
    "errors": {k: str(v) for k, v in bag.import_errors.items()},
    "dags": sorted(bag.dags),
    "tasks": sorted(dag.task_dict) if dag else [],
    "edges": sorted([t.task_id, d] for t in dag.tasks for d in t.downstream_task_ids) if dag else [],
    "retries": {t.task_id: t.retries for t in dag.tasks} if dag else {},
    "mapped": sorted(t.task_id for t in dag.tasks if "Mapped" in type(t).__name__),
    "doc_md": bool(dag and dag.doc_md),
    "params": sorted(dag.params) if dag else [],
    "heavy": heavy,
}))
"""


@pytest.fixture(scope="module")
def dagbag(tmp_path_factory):
    home = tmp_path_factory.mktemp("airflow")
    env = {
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PATH": "/usr/bin:/bin",
        "TESSERA_HOME": str(home / "tessera"),
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(DAGS_FOLDER)],
        env=env,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_no_import_errors(dagbag):
    assert dagbag["errors"] == {}
    assert "tessera_pipeline" in dagbag["dags"]


def test_pipeline_shape(dagbag):
    assert dagbag["tasks"] == sorted(
        [
            "start",
            "corpus",
            "ingest",
            "validate",
            "version",
            "train_vae",
            "plan_encode",
            "encode_shard",
            "merge_latents",
            "train_dit",
            "samples",
            "prompt_eval",
            "finish",
        ]
    )
    edges = {tuple(e) for e in dagbag["edges"]}
    chain = [
        "start",
        "corpus",
        "ingest",
        "validate",
        "version",
        "train_vae",
        "encode_shard",
        "merge_latents",
        "train_dit",
        "samples",
        "finish",
    ]
    for edge in itertools.pairwise(chain):
        assert edge in edges, edge
    assert ("plan_encode", "encode_shard") in edges
    assert {
        ("train_dit", "prompt_eval"),
        ("corpus", "prompt_eval"),
        ("prompt_eval", "finish"),
    } <= edges
    assert dagbag["mapped"] == ["encode_shard"]


def test_default_args_are_applied(dagbag):
    # A misspelled default_args key would silently leave retries at 0.
    assert dagbag["retries"]["ingest"] == 2
    assert dagbag["retries"]["finish"] == 0
    assert dagbag["doc_md"]
    assert {"profile", "overrides", "source", "captions", "track"} <= set(dagbag["params"])


def test_parsing_imports_no_ml_stack(dagbag):
    assert dagbag["heavy"] == []
