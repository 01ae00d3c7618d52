"""Run the pipeline DAG through a real, local Airflow (SQLite metadata DB under TESSERA_HOME).

``dags_test`` migrates the metadata DB (idempotent) and runs ``dag.test()`` in a child process
with ``AIRFLOW_HOME`` set, exactly as ``airflow dags test`` does; the child reports the DagRun's
state and the pipeline summary comes from ``{store}/latest/pipeline.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from components.config import Environment, load_config

REPO = Path(__file__).resolve().parents[1]
DAGS_FOLDER = REPO / "dags"
DAG_ID = "tessera_pipeline"


class DagRunFailed(RuntimeError):
    """The DAG run ended in a state other than success."""


def airflow_home() -> Path:
    return Environment.read().home / "airflow"


def airflow_env() -> dict[str, str]:
    """The environment for Airflow child processes (Airflow's own settings, nothing secret added)."""
    env = dict(os.environ)
    env.setdefault("AIRFLOW_HOME", str(airflow_home()))
    env.setdefault("AIRFLOW__CORE__DAGS_FOLDER", str(DAGS_FOLDER))
    env.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")
    env.setdefault("AIRFLOW__LOGGING__LOGGING_LEVEL", "WARNING")
    env.setdefault("TESSERA_HOME", str(Environment.read().home))
    return env


def _airflow(*args: str) -> None:
    airflow = Path(sys.executable).with_name("airflow")
    proc = subprocess.run([str(airflow), *args], env=airflow_env(), capture_output=True, text=True)
    if proc.returncode != 0:
        raise DagRunFailed(f"`airflow {' '.join(args)}` failed:\n{proc.stderr[-3000:]}")


def dags_test(
    profile: str, overrides: list[str], source: str, captions: str = ""
) -> dict[str, Any]:
    """Run the pipeline DAG once with ``dag.test()``; returns the pipeline summary."""
    Path(airflow_env()["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    _airflow("db", "migrate")
    conf = {
        "profile": profile,
        "overrides": list(overrides),
        "source": source,
        "captions": captions,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "components.airflow_local", DAG_ID, json.dumps(conf)],
        env=airflow_env(),
        cwd=REPO,
    )
    if proc.returncode != 0:
        raise DagRunFailed(
            f"DAG {DAG_ID} run failed (exit {proc.returncode}); task logs are above and under "
            f"{airflow_env()['AIRFLOW_HOME']}/logs"
        )
    cfg = load_config(profile, overrides)
    from components import storage

    summary = json.loads(
        storage.read_text(storage.join(cfg.store_uri(), "latest", "pipeline.json"))
    )
    holdout = summary["train_vae"].get("holdout_psnr")
    return {
        "run_id": summary["run_id"],
        "manifest": summary["validate"]["manifest"],
        "data docs": storage.join(summary["validate"]["data_docs"], "index.html"),
        "quarantine": summary["validate"]["quarantine"],
        "dataset rev": summary["version"]["dataset_rev"],
        "vae": f"{summary['train_vae']['vae']} (held-out real footage PSNR "
        f"{'n/a' if holdout is None else f'{holdout:.2f}'} dB)",
        "model": summary["train_dit"].get("model", summary["train_dit"]["dit"]),
        "samples": summary["samples"]["samples"],
        "colour following": _colour_line(summary.get("prompt_eval")),
        "ingested": f"{summary['ingest']['ingested']} of {summary['ingest']['seen']} files "
        f"({summary['ingest']['quarantined']} quarantined: {summary['ingest'].get('reasons', {})})",
    }


def _colour_line(evaluated: dict | None) -> str:
    """One line on the prompt_eval step's outputs for the end-of-run summary."""
    if not evaluated:
        return "not run"
    if "skipped" in evaluated:
        return f"skipped: {evaluated['skipped']}"
    return (
        f"accuracy {evaluated['colour_accuracy']:.2f} vs chance "
        f"{evaluated['colour_chance']:.2f} (p = {evaluated['colour_p_value']:.2g}, "
        f"{evaluated['trials']} clips): {evaluated['result']}"
    )


def _child(dag_id: str, conf_json: str) -> int:
    """In the child process: load the DAG file and run it with ``dag.test()``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(dag_id, DAGS_FOLDER / f"{dag_id}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from airflow.sdk import DAG

    dag = next(v for v in vars(module).values() if isinstance(v, DAG) and v.dag_id == dag_id)
    dag_run = dag.test(run_conf=json.loads(conf_json))
    state = str(getattr(dag_run, "state", "unknown"))
    print(json.dumps({"dag_id": dag_id, "run_id": dag_run.run_id, "state": state}))
    return 0 if state.endswith("success") else 1


if __name__ == "__main__":
    raise SystemExit(_child(sys.argv[1], sys.argv[2]))
