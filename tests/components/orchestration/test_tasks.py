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
