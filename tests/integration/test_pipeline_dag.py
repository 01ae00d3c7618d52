"""The whole pipeline DAG through a real Airflow `dag.test()` on the tiny profile, tracked by a
real MLflow server: demo corpus → ingest → validate → version → train_vae → encode → train_dit →
samples and prompt_eval."""

from __future__ import annotations

import json

import pytest

from components import airflow_local, storage
from components.config import load_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def pipeline_run(mlflow_server, tmp_path_factory):
    home = tmp_path_factory.mktemp("tessera-home")
    mp = pytest.MonkeyPatch()
    mp.setenv("TESSERA_HOME", str(home))
    mp.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    try:
        summary = airflow_local.dags_test("tiny", [], "")
        full = json.loads((home / "store" / "latest" / "pipeline.json").read_text())
        yield home, summary, full
    finally:
        mp.undo()


def test_dag_run_succeeds_and_accounts_for_every_file(pipeline_run):
    home, summary, full = pipeline_run
    ingest = full["ingest"]
    assert ingest["seen"] == ingest["ingested"] + ingest["quarantined"]
    assert ingest["ingested"] > 0
    # the demo corpus carries a truncated upload and a text file named .mp4
    assert ingest["reasons"].get("corrupt") == 1 and ingest["reasons"].get("not_media") == 1
    assert full["validate"]["success"] is True
    assert full["version"]["dataset_rev"] == summary["dataset rev"]
    assert storage.is_committed(ingest["step_uri"]) and storage.is_committed(
        full["validate"]["step_uri"]
    )


def test_dag_trains_and_samples(pipeline_run):
    """train_vae → encode (mapped over shards) → train_dit → samples, all through the DAG."""
    _, _, full = pipeline_run
    vae, latents, dit, samples = (full[k] for k in ("train_vae", "encode", "train_dit", "samples"))
    assert storage.exists(storage.join(vae["vae"], "model.safetensors"))
    assert latents["shards"] >= 2  # the tiny corpus spans several mapped shard tasks
    assert latents["clips"] == full["validate"]["rows_passed"]
    assert dit["steps"] == load_config("tiny").train_dit.train.steps
    assert storage.exists(storage.join(dit["model"], "vae", "config.json"))
    entries = json.loads(storage.read_text(samples["samples_json"]))
    assert {e["aspect"] for e in entries} == {"16:9", "9:16", "1:1", "image"}
    for entry in entries:
        frames, height, width = entry["size"]
        assert (frames == 1) == (entry["aspect"] == "image")
        assert storage.exists(storage.join(samples["step_uri"], entry["path"]))
    wide = next(e for e in entries if e["aspect"] == "16:9")["size"]
    tall = next(e for e in entries if e["aspect"] == "9:16")["size"]
    assert wide[2] > wide[1] and tall[1] > tall[2]


def test_dag_scores_colour_following(pipeline_run):
    _, _, full = pipeline_run
    evaluated = full["prompt_eval"]
    result = json.loads(storage.read_text(evaluated["result"]))
    assert evaluated["trials"] == len(result["trials"]) > 0
    assert 0 < result["chance"] < 1 and 0 <= result["accuracy"] <= 1
    assert storage.exists(evaluated["grid"])


def test_mlflow_has_parent_and_nested_step_runs(pipeline_run, mlflow_server, monkeypatch):
    import mlflow

    _, _, full = pipeline_run
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server.url)
    mlflow.set_tracking_uri(mlflow_server.url)
    exp = mlflow.MlflowClient().get_experiment_by_name("tessera/tessera_pipeline")
    runs = mlflow.search_runs(
        [exp.experiment_id],
        filter_string=f"tags.`tessera.run_id` = '{full['run_id']}'",
        output_format="list",
    )
    steps = {r.data.tags["tessera.step"]: r for r in runs}
    assert {
        "pipeline",
        "demo_data",
        "ingest",
        "validate",
        "version",
        "train_vae",
        "encode",
        "train_dit",
        "samples",
        "prompt_eval",
    } <= set(steps)
    parent = steps["pipeline"].info.run_id
    assert all(
        steps[s].data.tags.get("mlflow.parentRunId") == parent for s in ("ingest", "validate")
    )
    assert steps["pipeline"].info.status == "FINISHED"
    assert steps["version"].data.tags.get("tessera.dataset_rev") == full["version"]["dataset_rev"]


def test_rerun_same_run_is_a_no_op(pipeline_run, monkeypatch):
    """Re-running finished steps under the same run id returns their recorded outputs."""
    from components import ingest, runner
    from components.runner import RunContext

    home, _, full = pipeline_run
    monkeypatch.setenv("TESSERA_HOME", str(home))
    cfg = load_config("tiny")
    ctx = RunContext(full["run_id"], "tessera_pipeline", None, track=False)
    again = runner.run_step("ingest", ingest.run, cfg, ctx, src="/nonexistent")  # not even read
    assert again == full["ingest"]
