"""Servers bind to loopback; another address needs --allow-remote. Database URIs (they may hold
a password) travel in the environment, not on a command line that `ps` shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from components.core.tracking import MlflowServer

pytestmark = pytest.mark.fault("security: loopback binds")

TESSERA = str(Path(sys.executable).with_name("tessera"))


def test_mlflow_server_refuses_a_public_bind_without_allow_remote(tmp_path):
    env = {**os.environ, "TESSERA_HOME": str(tmp_path)}
    proc = subprocess.run(
        [TESSERA, "mlflow-server", "--host", "0.0.0.0", "--port", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "refusing to bind the MLflow server to 0.0.0.0" in proc.stderr
    assert "--allow-remote" in proc.stderr


def test_tessera_serve_refuses_a_public_bind_without_allow_remote():
    from components.core.serving import ServingError, check_host

    check_host("127.0.0.1", False)
    check_host("0.0.0.0", True)
    with pytest.raises(ServingError, match="refusing to serve on 0.0.0.0"):
        check_host("0.0.0.0", False)


def test_the_backend_uri_is_in_the_environment_not_argv(tmp_path):
    secret_uri = "postgresql+psycopg2://u:planted-password@127.0.0.1:5432/mlflow"
    server = MlflowServer(tmp_path, backend_store_uri=secret_uri)
    assert not any("planted-password" in arg for arg in server.command())
    assert server.environment()["MLFLOW_BACKEND_STORE_URI"] == secret_uri
