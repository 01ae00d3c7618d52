"""Real servers as separate processes for the integration tests: an ephemeral PostgreSQL cluster
(Debian's ``postgresql``, which ``make system`` installs) and moto's S3 server.

Each listens on loopback only, lives in a temporary directory and is stopped (and removed) on
exit. A missing server binary is an error naming the make target that installs it: a test never
skips because its service is absent.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")


class ServiceMissing(RuntimeError):
    """A server binary the test needs is not installed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(ready, proc: subprocess.Popen, what: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{what} exited with code {proc.returncode}; log {log}:\n"
                f"{log.read_text(errors='replace')[-2000:]}"
            )
        if ready():
            return
        time.sleep(0.3)
    raise RuntimeError(f"{what} was not ready within {timeout_s:.0f}s; log {log}")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class PostgresCluster:
    """``initdb`` + ``postgres`` on a free loopback port in a fresh directory.

    PostgreSQL refuses to run as root, so as root the cluster runs as the ``postgres`` user the
    Debian package creates. ``url(db)`` is a SQLAlchemy URL with the psycopg2 driver.
    """

    user = "tessera"

    def __init__(self) -> None:
        self.password = f"planted-pg-{secrets.token_hex(8)}"  # tests grep for it: never logged
        for tool in ("initdb", "postgres", "pg_isready"):
            if not (PG_BIN / tool).is_file():
                raise ServiceMissing(
                    f"{PG_BIN / tool} is missing: `make system` installs Debian's postgresql"
                )
        self.port = free_port()
        self.root = Path(tempfile.mkdtemp(prefix="tessera-pg-"))
        self.data = self.root / "data"
        self.log = self.root / "postgres.log"
        self._proc: subprocess.Popen | None = None
        self._as: list[str] = []
        if os.geteuid() == 0:
            owner = pwd.getpwnam("postgres")
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    def _run(self, *cmd: str, **kw) -> subprocess.CompletedProcess:
        return subprocess.run([*self._as, *cmd], capture_output=True, text=True, check=True, **kw)

    def start(self, timeout_s: float = 60) -> PostgresCluster:
        pwfile = self.root / "pw"
        pwfile.write_text(self.password)
        if self._as:
            shutil.chown(pwfile, "postgres")
        self._run(
            str(PG_BIN / "initdb"),
            "-D",
            str(self.data),
            "-U",
            self.user,
            f"--pwfile={pwfile}",
            "--auth=scram-sha-256",
            "-E",
            "UTF8",
        )
        pwfile.unlink()
        cmd = [str(PG_BIN / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        cmd += ["-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={self.root}"]
        cmd += ["-c", "fsync=off", "-c", "max_connections=200"]
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [*self._as, *cmd], stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        ready = [str(PG_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(self.port), "-q"]
        _wait(
            lambda: subprocess.run(ready).returncode == 0,
            self._proc,
            "postgres",
            self.log,
            timeout_s,
        )
        return self

    def create_database(self, name: str) -> str:
        import psycopg2

        conn = psycopg2.connect(
            host="127.0.0.1",
            port=self.port,
            user=self.user,
            password=self.password,
            dbname="postgres",
        )
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        conn.close()
        return self.url(name)

    def url(self, db: str) -> str:
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{db}"

    def stop(self) -> None:
        _stop(self._proc)
        shutil.rmtree(self.root, ignore_errors=True)


class MotoS3Server:
    """moto's S3 server as its own process (``moto_server``) on a free loopback port."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.root = Path(tempfile.mkdtemp(prefix="tessera-moto-"))
        self.log = self.root / "moto.log"
        self._proc: subprocess.Popen | None = None
        self.secret_key = f"planted-aws-{secrets.token_hex(8)}"  # tests grep for it

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/moto-api/", timeout=2):
                return True
        except OSError:
            return False

    def start(self, timeout_s: float = 60) -> MotoS3Server:
        moto = Path(sys.executable).with_name("moto_server")
        if not moto.is_file():
            raise ServiceMissing(f"{moto} is missing: `make setup` installs moto[server]")
        with self.log.open("ab") as log:
            self._proc = subprocess.Popen(
                [str(moto), "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait(self._healthy, self._proc, "moto_server", self.log, timeout_s)
        return self

    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": self.url,
            "MLFLOW_S3_ENDPOINT_URL": self.url,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": self.secret_key,  # moto checks no signatures
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def create_bucket(self, name: str) -> None:
        import boto3

        env = self.env()
        boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
            region_name=env["AWS_DEFAULT_REGION"],
        ).create_bucket(Bucket=name)

    def stop(self) -> None:
        _stop(self._proc)
        shutil.rmtree(self.root, ignore_errors=True)
