"""The start scripts of infra/ run for real against an ephemeral PostgreSQL cluster on loopback
(Debian's ``postgresql``, ``make system``), the way the team box's containers run them:
``postgres/init-mlflow.sh`` as the postgres image's first-start hook, ``mlflow-server.sh`` with
the compose service's settings, ``airflow-init.sh`` with Airflow's Postgres metadata DB.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.testing_utils.services import PG_BIN, PostgresCluster, _stop, free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def postgres():
    cluster = PostgresCluster().start()
    yield cluster
    cluster.stop()


def compose_env(service: str) -> dict[str, str]:
    return yaml.safe_load((INFRA / "compose.yaml").read_text())["services"][service]["environment"]


def script_env(postgres: PostgresCluster, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "MLFLOW"))}
    env["PATH"] = f"{VENV_BIN}:{PG_BIN}:{env.get('PATH', '/usr/bin:/bin')}"
    env |= {"PGHOST": "127.0.0.1", "PGPORT": str(postgres.port), "PGPASSWORD": postgres.password}
    return env | extra


@pytest.fixture(scope="module")
def mlflow_db(postgres):
    """The mlflow database and user, made by the compose file's Postgres init script."""
    env = script_env(
        postgres,
        POSTGRES_USER=postgres.user,
        POSTGRES_DB="postgres",
        MLFLOW_DB_PASSWORD="mlflow-pw",
    )
    proc = subprocess.run(
        [str(INFRA / "postgres" / "init-mlflow.sh")], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    return f"postgresql+psycopg2://mlflow:mlflow-pw@127.0.0.1:{postgres.port}/mlflow"


SEARCH = "/api/2.0/mlflow/experiments/search?max_results=1"  # /health skips the Host check


def get(url: str, host: str) -> int:
    request = urllib.request.Request(url, headers={"Host": host})
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_mlflow_server_script_upgrades_and_serves_the_compose_hosts(postgres, mlflow_db, tmp_path):
    port = free_port()
    env = script_env(
        postgres,
        MLFLOW_BACKEND=mlflow_db,
        MLFLOW_ARTIFACTS="s3://tessera/mlflow",
        MLFLOW_ALLOWED_HOSTS=compose_env("mlflow")["MLFLOW_ALLOWED_HOSTS"],
        MLFLOW_PORT=str(port),
        MLFLOW_WORKERS="1",
    )
    log = tmp_path / "mlflow.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(INFRA / "mlflow-server.sh")],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while get_or_none(f"{base}/health") is None:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.5)
        assert get(f"{base}/health", "localhost:5000") == 200  # the compose healthcheck
        # the other services' MLFLOW_TRACKING_URI: refused by MLflow's default allow-list
        assert get(f"{base}{SEARCH}", "mlflow:5000") == 200
        assert get(f"{base}{SEARCH}", "localhost:5000") == 200  # the published port
        assert get(f"{base}{SEARCH}", "attacker.example:5000") == 403
    finally:
        _stop(proc)
    # `mlflow db upgrade` ran as user mlflow: MLflow's tables are in its own database
    import psycopg2

    conn = psycopg2.connect(mlflow_db.replace("postgresql+psycopg2", "postgresql"))
    with conn.cursor() as cur:
        cur.execute("SELECT tableowner FROM pg_tables WHERE tablename = 'experiments'")
        assert cur.fetchone() == ("mlflow",)
    conn.close()


def get_or_none(url: str) -> int | None:
    try:
        return get(url, "localhost:5000")
    except OSError:
        return None


def test_airflow_init_migrates_and_creates_the_pools(postgres, tmp_path):
    from components.orchestration.airflow_local import POOLS

    conn = postgres.create_database("airflow")
    passwords = tmp_path / "auth" / "passwords.json"
    env = script_env(
        postgres,
        AIRFLOW_HOME=str(tmp_path / "airflow"),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=conn,
        AIRFLOW__CORE__LOAD_EXAMPLES="False",
        # Airflow derives postgresql+asyncpg:// for its async engine and asyncpg is not in the
        # lock (test_airflow_has_an_async_postgres_driver); migrate and pools use the sync one
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC=f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}",
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE=str(passwords),
        AIRFLOW_ADMIN_PASSWORD="admin-pw",
        TESSERA_ACCELERATOR_SLOTS="3",
    )
    for _ in range(2):  # idempotent: compose re-runs it on every `up`
        proc = subprocess.run(
            [str(INFRA / "airflow-init.sh")], env=env, capture_output=True, text=True
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    listed = subprocess.run(
        [str(VENV_BIN / "airflow"), "pools", "list", "-o", "json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    slots = {p["pool"]: int(p["slots"]) for p in json.loads(listed.stdout)}
    expected = {name: n for name, (n, _) in POOLS.items()} | {"accelerator": 3}
    assert {name: slots[name] for name in POOLS} == expected
    assert json.loads(passwords.read_text()) == {"admin": "admin-pw"}
    assert stat.S_IMODE(passwords.stat().st_mode) == 0o600


def test_airflow_has_an_async_postgres_driver(postgres, tmp_path):
    conn = postgres.url("postgres")
    env = script_env(
        postgres, AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=conn
    )
    proc = subprocess.run(
        [str(VENV_BIN / "airflow"), "db", "check"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
