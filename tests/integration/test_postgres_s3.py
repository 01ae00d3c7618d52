"""The scale-out twins of the embedded defaults, run for real: the tiny pipeline end to end with
the store, the DVC remote and MLflow's artifacts on S3 (moto's server, its own process) and
MLflow's tracking store and registry in PostgreSQL (an ephemeral Debian ``postgresql`` cluster
on loopback, schema from ``mlflow db upgrade``); the registered model then loads back from S3.

Nothing is written under the local store: a run that silently fell back to local disk fails.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from components.core.tracking import MlflowServer
from tests.testing_utils.services import MotoS3Server, PostgresCluster, free_port

# one xdist worker for the whole module: its module-scoped run is made once, not once per worker
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.xdist_group("postgres-s3")]
TESSERA = str(Path(sys.executable).with_name("tessera"))
BUCKET = "tessera-team"
PLANTED = {
    name: f"planted-{name.lower()}-{secrets.token_hex(8)}"
    for name in ("TESSERA_EXPAND_API_KEY", "TESSERA_CHECKPOINT_KEY", "MLFLOW_TRACKING_TOKEN")
}


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    postgres = PostgresCluster().start()
    s3 = MotoS3Server().start()
    server = None
    try:
        s3.create_bucket(BUCKET)
        backend = postgres.create_database("mlflow")
        server = MlflowServer(
            tmp_path_factory.mktemp("mlflow-pg"),
            port=free_port(),
            backend_store_uri=backend,
            artifact_root=f"s3://{BUCKET}/mlflow",
            env=s3.env(),
        )
        server.start(timeout_s=240)
        yield {"postgres": postgres, "s3": s3, "mlflow": server, "backend": backend}
    finally:
        if server is not None:
            server.stop()
        s3.stop()
        postgres.stop()


@pytest.fixture(scope="module")
def s3_run(services, tmp_path_factory):
    home = tmp_path_factory.mktemp("tessera-home-s3")
    env = {**os.environ, **services["s3"].env(), "TESSERA_HOME": str(home)}
    env["MLFLOW_TRACKING_URI"] = services["mlflow"].url
    env.pop("AIRFLOW_HOME", None)
    env |= PLANTED  # every other credential variable holds a secret too
    store = f"s3://{BUCKET}/store"
    settings = [f"store={store}", f"version.remote=s3://{BUCKET}/dvc"]
    cmd = [TESSERA, "run", "-p", "tiny"] + [a for s in settings for a in ("--set", s)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"home": home, "env": env, "store": store, "output": proc.stdout + proc.stderr}


def s3_client(services):
    import boto3

    env = services["s3"].env()
    return boto3.client(
        "s3",
        endpoint_url=env["AWS_ENDPOINT_URL"],
        aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
        region_name=env["AWS_DEFAULT_REGION"],
    )


def keys(services, prefix: str) -> list[str]:
    pages = (
        s3_client(services).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    )
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def test_pipeline_runs_on_s3_and_postgres(services, s3_run):
    summary = json.loads(
        s3_client(services)
        .get_object(Bucket=BUCKET, Key="store/latest/pipeline.json")["Body"]
        .read()
    )
    assert summary["status"] == "FINISHED", summary
    for step in ("ingest", "version", "train_vae", "encode", "sweep", "evaluate", "register"):
        assert summary[step]["step_uri"].startswith(f"s3://{BUCKET}/store/runs/"), step
    # the versioned dataset's objects live in the S3 DVC remote
    assert any(k.startswith("dvc/files/md5/") for k in keys(services, "dvc/"))
    assert summary["version"]["remote"] == f"s3://{BUCKET}/dvc"
    # nothing fell back to the local store
    assert not (s3_run["home"] / "store").exists()


def test_mlflow_records_live_in_postgres(services, s3_run):
    import sqlalchemy

    engine = sqlalchemy.create_engine(services["backend"])
    with engine.connect() as conn:
        runs = conn.execute(sqlalchemy.text("SELECT count(*) FROM runs")).scalar()
        versions = conn.execute(
            sqlalchemy.text("SELECT count(*) FROM model_versions WHERE name = 'tessera-t2v'")
        ).scalar()
        roots = conn.execute(sqlalchemy.text("SELECT DISTINCT artifact_uri FROM runs")).scalars()
        roots = list(roots)
    engine.dispose()
    assert runs >= 10 and versions == 1
    assert roots and all(r.startswith(f"s3://{BUCKET}/mlflow/") for r in roots), roots
    assert keys(services, "mlflow/"), "no MLflow artifact reached the bucket"


def test_registered_model_loads_back_from_s3(services, s3_run, tmp_path):
    probe = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model("models:/tessera-t2v@champion")
prompts = pd.DataFrame({"prompt": ["a red ball"]})
out = model.predict(prompts, params={"frames": 1, "steps": 2, "format": "png"})
where = mlflow.MlflowClient().get_logged_model(model.metadata.model_id).artifact_location
print(json.dumps({"rows": len(out), "artifacts": where}))
"""
    env = {**s3_run["env"], "MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}
    proc = subprocess.run(
        [sys.executable, "-c", probe],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["rows"] == 1
    assert loaded["artifacts"].startswith(f"s3://{BUCKET}/mlflow/"), loaded


@pytest.mark.fault("security: planted secrets")
def test_planted_secrets_appear_nowhere(services, s3_run):
    """The database password, the S3 secret key and every Tessera / MLflow credential variable
    hold planted values; none of them is in the run's output, any file under TESSERA_HOME or
    the services' logs, any object in the bucket (store, DVC remote, MLflow artifacts) or any
    row of MLflow's database (params, tags, metrics, model versions)."""
    import sqlalchemy

    planted = [services["postgres"].password, services["s3"].secret_key, *PLANTED.values()]
    places: dict[str, bytes] = {"run output": s3_run["output"].encode()}
    for root in (s3_run["home"], services["mlflow"].home, services["s3"].root):
        for path in Path(root).rglob("*"):
            if path.is_file():
                places[str(path)] = path.read_bytes()
    places["postgres log"] = services["postgres"].log.read_bytes()
    client = s3_client(services)
    for key in keys(services, ""):
        places[f"s3://{BUCKET}/{key}"] = client.get_object(Bucket=BUCKET, Key=key)["Body"].read()
    engine = sqlalchemy.create_engine(services["backend"])
    with engine.connect() as conn:
        for table in sqlalchemy.inspect(conn).get_table_names():
            rows = conn.execute(sqlalchemy.text(f'SELECT * FROM "{table}"')).fetchall()
            places[f"postgres table {table}"] = repr(rows).encode()
    engine.dispose()
    assert len(places) > 100 and any(k.startswith("postgres table") for k in places)
    found = [
        (where, secret[:12] + "...")
        for where, data in places.items()
        for secret in planted
        if secret.encode() in data
    ]
    print(f"planted secrets: {len(planted)}, places searched: {len(places)}, found: {len(found)}")
    assert found == []
