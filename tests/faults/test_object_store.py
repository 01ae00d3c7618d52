"""Object-store faults on the real S3 path: a fault-injecting proxy on loopback in front of the
S3 server throttles (503 SlowDown) and drops connections. A step retries with backoff and
writes exactly what a clean run writes; a store that stays down fails the step with a message
naming the URI and leaves nothing committed, and the re-run then commits."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from components.core import storage
from components.core.config import IngestConfig, TesseraConfig
from components.core.runner import RunContext, run_step, step_uri
from components.steps import ingest
from tests.components.steps.test_ingest import encode_video
from tests.testing_utils.s3_proxy import FaultyS3Proxy

pytestmark = [
    pytest.mark.slow,
    pytest.mark.fault("fault: object store"),
]  # retries back off for real: ~20-40 s


@pytest.fixture
def source(s3_env, tmp_path):
    bucket = s3_env
    for i in range(4):
        path = encode_video(tmp_path / f"clip_{i}.mp4", 32, 24, seed=i)
        storage.upload_file(path, f"s3://{bucket}/raw/clip_{i}.mp4")
    return f"s3://{bucket}/raw"


def cfg_for(store: str) -> TesseraConfig:
    return TesseraConfig(
        profile="test", store=store, ingest=IngestConfig(workers=1, file_timeout_s=0)
    )


def ingest_through(proxy_url: str | None, monkeypatch, store: str, run: str, src: str) -> dict:
    if proxy_url:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy_url)
    storage._client.cache_clear()
    try:
        return run_step(ingest.STEP, cfg_for(store), RunContext(run, track=False), src=src)
    finally:
        storage._client.cache_clear()


def rows(uri: str) -> list[dict]:
    with storage.local_copy(uri) as path:
        return pq.read_table(path).to_pylist()


def test_throttling_and_dropped_connections_are_retried_to_the_same_output(
    s3_env, s3_server, source, monkeypatch, tmp_path
):
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "home"))
    bucket = s3_env
    clean = ingest_through(None, monkeypatch, f"s3://{bucket}/clean", "r", source)
    with FaultyS3Proxy(s3_server, fail_every=3, drop_every=5).running() as proxy:
        flaky = ingest_through(proxy.url, monkeypatch, f"s3://{bucket}/flaky", "r", source)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    assert proxy.failed >= 5 and proxy.dropped >= 3, (proxy.seen, proxy.failed, proxy.dropped)
    for table in ("manifest", "quarantine"):
        assert rows(flaky[table]) == rows(clean[table]), table
    assert flaky["ingested"] == clean["ingested"] == 4
    print(f"requests {proxy.seen}, 503s {proxy.failed}, dropped {proxy.dropped}: survived")


def test_a_store_that_stays_down_fails_clearly_and_commits_nothing(
    s3_env, s3_server, source, monkeypatch, tmp_path
):
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    bucket = s3_env
    store = f"s3://{bucket}/down"
    proxy = FaultyS3Proxy(s3_server, fail_after=12)  # the source is read, then the store is down
    with (
        proxy.running(),
        pytest.raises(storage.StorageError, match=rf"S3 request for s3://{bucket}/.*SlowDown"),
    ):
        ingest_through(proxy.url, monkeypatch, store, "r", source)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    storage._client.cache_clear()
    out = step_uri(cfg_for(store), "r", "ingest")
    assert not storage.is_committed(out)  # whatever was uploaded is not an output
    again = ingest_through(None, monkeypatch, store, "r", source)
    assert storage.is_committed(out) and again["ingested"] == 4
