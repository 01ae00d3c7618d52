"""The DAG's task bodies without Airflow's scheduler: steps found by name, the corpus a run
ingests, the pipeline's status and summary from its task states, skipped steps."""

from __future__ import annotations

import json

import pytest

from components.core import runner, storage
from components.core.config import load_config
from components.core.runner import RunContext, StepResult, StepSpec
from components.orchestration import tasks

PARAMS = {"profile": "tiny", "overrides": [], "source": "", "captions": "", "track": False}


def test_every_step_is_found_by_its_name():
    for name in ("demo_data", "ingest", "train_captioner", "caption", "encode", "train_dit"):
        assert tasks.spec(name).name == name
    for name in ("sweep", "train_evaluator", "evaluate", "recaption_ablation"):
        assert tasks.spec(name).name == name
    with pytest.raises(ModuleNotFoundError):
        tasks.spec("no_such_step")


def test_the_run_handle_is_safe_for_paths_and_untracked_without_mlflow():
    run = tasks.start(PARAMS, "manual__2026-01-01T00:00:00+00:00")
    assert run == {
        "run_id": "manual__2026-01-01T00-00-00-00-00",
        "parent_run_id": None,
        "track": False,
        "pipeline": "tessera_pipeline",
    }


def test_the_corpus_is_the_source_or_this_runs_demo_data(tessera_home):
    source = {**PARAMS, "source": "s3://bucket/raw", "captions": "s3://bucket/captions.parquet"}
    run = {"run_id": "r1", "track": False}
    assert tasks.corpus(source, run) == {
        "clips": "s3://bucket/raw",
        "captions": "s3://bucket/captions.parquet",
    }
    with pytest.raises(RuntimeError, match="no committed demo_data output"):
        tasks.corpus(PARAMS, run)
    outputs = tasks.run_task(
        "demo_data", {**PARAMS, "overrides": ["demo_data.include_real_clips=false"]}, run
    )
    assert tasks.corpus(PARAMS, run) == outputs


def test_a_task_with_nothing_to_do_is_skipped():
    from airflow.sdk.exceptions import AirflowSkipException

    with pytest.raises(AirflowSkipException, match="params.source is set"):
        tasks.skip("params.source is set: its files are ingested instead of the demo corpus")


def test_finish_reports_the_real_status_and_every_committed_step(tessera_home):
    cfg, run = load_config("tiny"), {"run_id": "r3", "track": False}
    ctx = RunContext("r3", track=False)
    runner.run_step(
        StepSpec("ingest", lambda cfg, workdir: StepResult(values={"seen": 3})), cfg, ctx
    )
    states = {"start": "success", "ingest": "success", "validate": "failed"}
    states |= {"version": "upstream_failed", "encode_shard_0": "success", "demo_data": "skipped"}
    summary = tasks.finish(PARAMS, run, states)
    assert summary["status"] == "FAILED"
    assert summary["failed"] == ["validate"] and summary["not_run"] == ["version"]
    assert summary["ingest"]["seen"] == 3 and "validate" not in summary
    latest = storage.join(cfg.store_uri(), "latest", "pipeline.json")
    assert json.loads(storage.read_text(latest)) == summary
    done = tasks.finish(PARAMS, run, {"start": "success", "demo_data": "skipped"})
    assert done["status"] == "FINISHED" and done["failed"] == done["not_run"] == []


def test_mapped_outputs_are_gathered_up_to_their_length():
    class Lazy:  # Airflow's lazy XCom sequence: indexing past the end is an error it logs
        def __init__(self, items):
            self.items = items

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

        def __iter__(self):
            raise AssertionError("iterating asks for one item too many")

    assert tasks.gather(Lazy([{"index": 0}, {"index": 1}])) == [{"index": 0}, {"index": 1}]


def test_a_missing_source_run_names_the_fix(tessera_home):
    with pytest.raises(FileNotFoundError, match="run the tessera_pipeline DAG first"):
        tasks.source_run(PARAMS)
    with pytest.raises(FileNotFoundError, match="runs/nope/summary.json"):
        tasks.source_run(PARAMS, "nope")


# --------------------------------------------------------------------------- DAG tasks by id


def test_every_airflow_task_body_is_a_dag_task():
    from tests.dags.test_kubeflow import airflow_arguments

    ids = set(airflow_arguments()) - {"start", "finish"}
    assert ids == set(tasks.DAG_TASKS)


def test_a_dag_task_names_what_it_is_missing():
    with pytest.raises(ValueError, match=r"no DAG task 'nope'; the tasks are \["):
        tasks.dag_task("nope", {}, {"run_id": "r"})
    with pytest.raises(
        ValueError, match=r"DAG task validate needs upstream input\(s\) \['ingested'\]"
    ):
        tasks.dag_task("validate", {}, {"run_id": "r"})
    with pytest.raises(ValueError, match=r"needs upstream input\(s\) \['shard'"):
        tasks.dag_task("ingest_shard", {"source": "/x"}, {"run_id": "r"})
    with pytest.raises(ValueError, match="no --plan or --part"):
        tasks.command("validate", {}, {"run_id": "r"}, {}, plan=True, upstream={})


def test_kubeflows_final_status_becomes_finish_states():
    ok = tasks.kubeflow_states('{"state": "SUCCEEDED", "pipelineTaskName": "exit"}')
    assert "kubeflow" not in ok and ok["train_vae"] == "success"
    failed = tasks.kubeflow_states({"state": "FAILED", "error": {"message": "oom"}})
    assert failed["kubeflow"] == "failed"


@pytest.mark.slow
def test_the_data_group_runs_task_by_task_through_tessera_task_upstream(tmp_path):
    """What a Kubeflow run does: each task a `tessera task TASK --upstream` process, its output
    JSON the next one's upstream, from demo_data to the versioned dataset."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tessera = str(Path(sys.executable).with_name("tessera"))
    env = {**os.environ, "TESSERA_HOME": str(tmp_path / "home")}
    params = json.dumps({"profile": "tiny", "track": False})
    run = json.dumps({"run_id": "kfp-run", "track": False, "pipeline": tasks.PIPELINE})

    def task(task_id: str, **upstream) -> object:
        out = tmp_path / f"{task_id}.json"
        cmd = [tessera, "task", task_id, "--params", params, "--run", run]
        cmd += ["--upstream", json.dumps(upstream), "--output", str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, (task_id, proc.stderr[-3000:])
        return json.loads(out.read_text())

    task("demo_data")
    plan = task("ingest_plan")
    shards = [task("ingest_shard", shard=shard) for shard in plan]
    ingested = task("ingest", shards=shards)
    validated = task("validate", ingested=ingested)
    versioned = task("version", validated=validated)
    assert versioned["dataset_rev"] and versioned["num_clips"] == ingested["ingested"]
