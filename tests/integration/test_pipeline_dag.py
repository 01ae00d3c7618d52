"""The whole pipeline DAG through a real Airflow ``dag.test()`` on the tiny profile, tracked by a
real MLflow server, run as a user runs it (``tessera run``): demo corpus → ingest → validate →
version → train_captioner → caption (mapped over shards) → train_vae → encode (mapped over
shards) → a 2-budget compute sweep (mapped over its
points, one of them forced to fail once) → generate and evaluate; and the same DAG with a config
the sweep's plan refuses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.core import storage
from components.core.config import load_config

# one xdist worker for the whole module: its module-scoped run is made once, not once per worker
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("pipeline-dag")]
TESSERA = str(Path(sys.executable).with_name("tessera"))
STEPS = {"demo_data", "ingest", "validate", "version", "train_captioner", "caption"}
STEPS |= {"train_vae", "encode", "sweep"}
STEPS |= {"generate", "train_evaluator", "evaluate", "register", "promote"}


def tessera_run(home: Path, mlflow_url: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "TESSERA_HOME": str(home), "MLFLOW_TRACKING_URI": mlflow_url}
    environment.pop("AIRFLOW_HOME", None)  # the run's own, under TESSERA_HOME
    return subprocess.run(
        [TESSERA, "run", "-p", "tiny", *args],
        env={**environment, **env},
        capture_output=True,
        text=True,
        timeout=1800,
    )


def mlflow_runs(mlflow_url: str, run_id: str) -> dict:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_url)
    experiment = client.get_experiment_by_name("tessera/tessera_pipeline")
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=f"tags.`tessera.run_id` = '{run_id}'"
    )
    return {"experiment": experiment, "steps": {r.data.tags["tessera.step"]: r for r in runs}}


FAILING_POINT = "native-recaptioned-tessera-tiny-4e08"  # the tiny profile's smaller budget


@pytest.fixture(scope="module")
def pipeline_run(mlflow_server, tmp_path_factory):
    home = tmp_path_factory.mktemp("tessera-home")
    proc = tessera_run(
        home,
        mlflow_server.url,
        TESSERA_FAULTS=f"sweep.point.{FAILING_POINT}",  # after its training, on the 1st try
        AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY="1",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    summary = json.loads((home / "store" / "latest" / "pipeline.json").read_text())
    return home, summary, proc.stdout + proc.stderr


def test_dag_run_succeeds_and_accounts_for_every_file(pipeline_run):
    home, summary, _ = pipeline_run
    assert summary["status"] == "FINISHED" and summary["failed"] == summary["not_run"] == []
    ingest = summary["ingest"]
    assert ingest["seen"] == ingest["ingested"] + ingest["quarantined"]
    assert ingest["ingested"] > 0
    # the demo corpus carries a truncated upload and a text file named .mp4
    assert ingest["reasons"].get("corrupt") == 1 and ingest["reasons"].get("not_media") == 1
    assert summary["validate"]["success"] is True
    assert STEPS <= set(summary)
    for step in STEPS:
        assert storage.is_committed(summary[step]["step_uri"]), step


def test_the_terminal_shows_no_error_and_each_summary_line_once(pipeline_run):
    _, summary, output = pipeline_run
    errors = [line for line in output.splitlines() if "[error" in line]
    # the one error is Airflow reporting the sweep point's injected failure (then retried)
    assert len(errors) == 1 and "Task failed with exception" in errors[0], errors
    assert output.count("InjectedFault: injected fault at sweep.point.") == 1
    assert "View run" not in output  # MLflow's per-run links (to its GenAI view) are off
    for key in ("dataset rev", "colour following", "samples"):
        lines = [line for line in output.splitlines() if line.strip().startswith(key)]
        assert len(lines) == 1, lines
    assert summary["version"]["dataset_rev"] in output


def test_training_reads_the_versioned_dataset(pipeline_run):
    home, summary, _ = pipeline_run
    from components.core.latents import index_lineage, read_index
    from components.core.manifest import read_lineage

    versioned = summary["version"]["manifest"]
    lineage = read_lineage(versioned)
    assert lineage.dataset_rev == summary["version"]["dataset_rev"]
    payload = home / "checkpoints" / summary["run_id"] / "train_vae" / "train_vae.payload.json"
    assert json.loads(payload.read_text())["manifest"] == versioned
    assert index_lineage(summary["encode"]["latents"]) == lineage
    index = read_index(summary["encode"]["latents"])
    assert all("/dvc-remote/files/md5/" in uri for uri in index["uri"])
    assert all("/demo_data/clips/" in uri for uri in index["source_uri"])


def test_dag_trains_and_samples(pipeline_run):
    """train_vae → encode (mapped over shards) → sweep (mapped over points) → generate."""
    _, summary, _ = pipeline_run
    vae, latents, dit, samples = (summary[k] for k in ("train_vae", "encode", "sweep", "generate"))
    assert storage.exists(storage.join(vae["vae"], "model.safetensors"))
    assert latents["shards"] >= 2  # the tiny corpus spans several mapped shard tasks
    assert latents["clips"] == summary["validate"]["rows_passed"]
    assert dit["points"] == len(load_config("tiny").sweep.budgets) == 2
    assert dit["best_budget"] == max(load_config("tiny").sweep.budgets)
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


def test_dag_evaluates_the_model(pipeline_run):
    _, summary, _ = pipeline_run
    evaluated = summary["evaluate"]
    result = json.loads(storage.read_text(evaluated["result"]))
    colour = result["colour_following"]
    assert evaluated["colour_trials"] == len(colour["trials"]) > 0
    assert 0 < colour["chance"] < 1 and 0 <= colour["accuracy"] <= 1
    assert "fvd_domain" in result["metrics"] and "clip_score_domain" in result["metrics"]
    assert result["extractors"]["domain"] and storage.exists(evaluated["report"])
    assert summary["train_evaluator"]["evaluator"]


def test_the_run_ends_with_a_registered_champion_a_user_can_generate_from(
    pipeline_run, mlflow_server, tmp_path
):
    import mlflow

    home, summary, output = pipeline_run
    registered, promoted = summary["register"], summary["promote"]
    assert registered["created"] is True and registered["model_name"] == "tessera-t2v"
    assert promoted["decision"] == "promoted"  # the first model: no champion to beat
    assert promoted["champion"] == str(registered["model_version"])
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    champion = client.get_model_version_by_alias("tessera-t2v", "champion")
    assert champion.tags["tessera.run_id"] == summary["run_id"]
    assert champion.tags["tessera.dataset_rev"] == summary["version"]["dataset_rev"]
    assert champion.tags["tessera.captioner_version"] == summary["caption"]["captioner_version"]
    point = client.get_run(champion.tags["tessera.dit_run"])
    assert point.data.tags["tessera.part"] == summary["sweep"]["best"]
    assert f"models:/tessera-t2v@champion (version {champion.version})" in output
    assert "curl -s http://127.0.0.1:5001/invocations" in output
    environment = {
        **os.environ,
        "TESSERA_HOME": str(home),
        "MLFLOW_TRACKING_URI": mlflow_server.url,
    }
    environment["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
    proc = subprocess.run(
        [TESSERA, "generate", "--model", "models:/tessera-t2v@champion", "--prompt", "red ball"]
        + ["--aspect", "16:9", "--aspect", "image", "--frames", "5", "-p", "tiny"]
        + ["--set", "generate.steps=2", "--no-track"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout[proc.stdout.index("{") :])
    entries = json.loads(storage.read_text(out["samples_json"]))
    assert [e["aspect"] for e in entries] == ["16:9", "image"]
    assert entries[0]["size"][0] == 5 and entries[1]["size"][0] == 1
    assert entries[0]["path"].endswith(".mp4") and entries[1]["path"].endswith(".png")


def test_the_corpus_is_recaptioned_and_training_reads_those_captions(pipeline_run):
    """caption writes every clip once; encode records which caption (and which captioner)
    each clip trains with; the latest captioner expands prompts offline."""
    import pyarrow.parquet as pq

    from components.core.latents import read_index

    home, summary, _ = pipeline_run
    captions = pq.read_table(summary["caption"]["captions"]).to_pylist()
    manifest = pq.read_table(summary["version"]["manifest"]).to_pylist()
    assert sorted(r["clip_id"] for r in captions) == sorted(r["clip_id"] for r in manifest)
    assert {r["caption_source"] for r in captions} == {"recaptioned"}
    index = read_index(summary["encode"]["latents"])
    recaptioned = index[index["caption_source"] == "recaptioned"]
    assert len(recaptioned) and recaptioned["captioner_version"].notna().all()
    uncaptioned = {r["clip_id"] for r in manifest if not r["caption"]}
    assert uncaptioned <= set(recaptioned["clip_id"])  # clips without captions gained one
    env = {**os.environ, "TESSERA_HOME": str(home)}
    proc = subprocess.run(
        [TESSERA, "expand", "red ball", "--seed", "3", "--json", "-p", "tiny"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expanded = json.loads(proc.stdout)
    assert expanded["backend"] == "builtin" and expanded["kept"]
    assert "red" in expanded["text"].lower() and "ball" in expanded["text"].lower()


def test_the_recaption_ablation_dag_runs_on_the_finished_run(pipeline_run, mlflow_server):
    """Two DiTs at one budget (short vs recaptioned captions), four cells, the 2x2 table."""
    home, summary, _ = pipeline_run
    environment = {
        **os.environ,
        "TESSERA_HOME": str(home),
        "MLFLOW_TRACKING_URI": mlflow_server.url,
    }
    environment.pop("AIRFLOW_HOME", None)
    proc = subprocess.run(
        [TESSERA, "recaption-ablation", "-p", "tiny", "--source-run", summary["run_id"]]
        + ["--budget", "4e8"],
        env=environment,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "| recaptioned captions |" in proc.stdout and "| short captions |" in proc.stdout
    ablation = json.loads(
        (home / "store" / "latest" / "pipeline-recaption_ablation.json").read_text()
    )
    result = json.loads(storage.read_text(ablation["recaption_ablation"]["result"]))
    assert sorted(result["cells"]) == [
        "recaptioned-expanded",
        "recaptioned-short",
        "short-expanded",
        "short-short",
    ]
    expanded = result["cells"]["recaptioned-expanded"]["colour"]["trials"]
    assert all(t["expansion"]["kept"] for t in expanded)  # the asked colour survives expansion
    claim = result["differences"]["recaptioned_expanded_vs_short_short"]
    assert claim["low"] <= claim["difference"] <= claim["high"]


def test_mlflow_has_one_parent_and_one_run_per_step(pipeline_run, mlflow_server):
    _, summary, _ = pipeline_run
    found = mlflow_runs(mlflow_server.url, summary["run_id"])
    steps = found["steps"]
    # the encode shards report inside encode's run; the sweep's points in runs nested in its own
    assert set(steps) == {"pipeline", *STEPS, "sweep_point"}
    assert found["experiment"].tags["mlflow.experimentKind"] == "custom_model_development"
    parent = steps["pipeline"]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["tessera.dataset_rev"] == summary["version"]["dataset_rev"]
    for step in STEPS:
        assert steps[step].data.tags.get("mlflow.parentRunId") == parent.info.run_id, step
        assert steps[step].info.status == "FINISHED", step
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    points = client.search_runs(
        [found["experiment"].experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{steps['sweep'].info.run_id}'",
    )
    assert len(points) == 2 and all(p.info.status == "FINISHED" for p in points)
    for run in [steps["version"], steps["train_vae"], steps["encode"], *points]:
        step = run.data.tags["tessera.step"]
        assert run.data.tags["tessera.dataset_rev"] == summary["version"]["dataset_rev"], step
        assert [d.dataset.name for d in run.inputs.dataset_inputs] == ["tessera-dataset"], step
    shards = client.get_metric_history(steps["encode"].info.run_id, "part/clips")
    assert len(shards) == summary["encode"]["shards"]


@pytest.mark.fault("fault: re-runs")
def test_the_failed_sweep_point_was_retried_alone_and_resumed(pipeline_run):
    import sqlite3

    home, summary, _ = pipeline_run
    db = sqlite3.connect(home / "airflow" / "airflow.db")
    tries = dict(
        db.execute(
            "select map_index, try_number from task_instance where task_id = 'sweep_point' "
            "and dag_id = 'tessera_pipeline' and run_id = (select run_id from dag_run "
            "where dag_id = 'tessera_pipeline' order by id desc limit 1)"
        ).fetchall()
    )
    db.close()
    sweep = json.loads(storage.read_text(summary["sweep"]["result"]))
    keys = [p["key"] for p in sweep["points"]]
    assert tries == {keys.index(FAILING_POINT): 2, 1 - keys.index(FAILING_POINT): 1}
    log = home / "checkpoints" / summary["run_id"] / "sweep" / FAILING_POINT / "train_dit.log"
    assert "resumed from step" in log.read_text()  # the retry did not train again


@pytest.mark.fault("fault: re-runs")
def test_rerun_same_run_is_a_no_op(pipeline_run, monkeypatch):
    """Re-running finished steps under the same run id returns their recorded outputs."""
    from components.core import runner
    from components.core.runner import RunContext
    from components.steps import ingest

    home, summary, _ = pipeline_run
    monkeypatch.setenv("TESSERA_HOME", str(home))
    cfg = load_config("tiny")
    ctx = RunContext(summary["run_id"], "tessera_pipeline", None, track=False)
    again = runner.run_step(ingest.STEP, cfg, ctx, src="/nonexistent")  # not even read
    assert again == summary["ingest"]


@pytest.mark.fault("fault: re-runs")
def test_the_whole_dag_rerun_under_the_run_name_reuses_every_step(pipeline_run, mlflow_server):
    """``tessera run --run-name ID`` (what ``make demo`` does on a second call): a new DAG run
    that keeps the committed steps of run ID, opens no new MLflow runs and registers nothing
    new."""
    import time

    home, summary, _ = pipeline_run
    before = mlflow_runs(mlflow_server.url, summary["run_id"])["steps"]
    started = time.monotonic()
    proc = tessera_run(home, mlflow_server.url, "--run-name", summary["run_id"])
    print(f"re-run of the whole tiny DAG under its run name: {time.monotonic() - started:.1f} s")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    again = json.loads((home / "store" / "latest" / "pipeline.json").read_text())
    assert again["run_id"] == summary["run_id"] and again["status"] == "FINISHED"
    for step in STEPS:
        assert again[step] == summary[step], step  # the same committed outputs, not new ones
    after = mlflow_runs(mlflow_server.url, summary["run_id"])["steps"]
    assert {k: r.info.run_id for k, r in after.items()} == {
        k: r.info.run_id for k, r in before.items()
    }


def test_a_failed_task_fails_the_run_and_says_why(mlflow_server, tmp_path):
    """The sweep's plan refuses a token budget below the largest clip before anything trains:
    the DAG run and the pipeline's parent run end FAILED, the tasks after it never run, and the
    error names the key and the fix."""
    home = tmp_path / "home"
    proc = tessera_run(
        home,
        mlflow_server.url,
        "--set",
        "train_dit.token_budget=8",
        AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY="1",
    )
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "failed tasks ['sweep_plan']" in proc.stderr
    assert "raise train_dit.token_budget" in proc.stdout  # the plan's error, with the fix
    summary = json.loads((home / "store" / "latest" / "pipeline.json").read_text())
    assert summary["status"] == "FAILED" and summary["failed"] == ["sweep_plan"]
    assert summary["not_run"] == [
        "evaluate",
        "generate",
        "promote",
        "register",
        "sweep",
        "sweep_point",
    ]
    assert "sweep" not in summary and "encode" in summary
    assert not (home / "checkpoints" / summary["run_id"] / "sweep").exists()  # nothing trained
    steps = mlflow_runs(mlflow_server.url, summary["run_id"])["steps"]
    assert steps["pipeline"].info.status == "FAILED"
    assert "sweep" not in steps and steps["encode"].info.status == "FINISHED"
