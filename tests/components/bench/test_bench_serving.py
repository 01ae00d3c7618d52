"""The ``serving`` bench case at tiny sizes: it registers a tiny model, serves it, and reports
latency and throughput of the served path next to the same pyfunc in-process."""

from __future__ import annotations

import math

import pytest

from components.bench import load_cases
from components.bench.serving import PEER, ServingBenchSizes, serving_case
from components.core.config import BenchConfig, TesseraConfig

CFG = TesseraConfig(bench=BenchConfig(warmup=0, repeats=1, matmul_size=64))


def test_serving_case_is_registered():
    assert "serving" in load_cases()


@pytest.mark.slow
def test_serving_case_tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("TESSERA_HOME", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    records = serving_case(CFG, ServingBenchSizes(requests=3, concurrency=(1, 2), warmup=1))
    names = [r.name for r in records]
    assert names == [
        "serving.latency_p50.c1",
        "serving.latency_p95.c1",
        "serving.requests_per_s.c1",
        "serving.latency_p50.c2",
        "serving.latency_p95.c2",
        "serving.requests_per_s.c2",
    ]
    for r in records:
        assert r.peer == PEER and r.unit in ("s", "req/s")
        assert r.value > 0 and r.peer_value > 0
        assert math.isfinite(r.ratio) and r.ratio > 0
        assert r.higher_is_better == (r.unit == "req/s")
    extra = records[0].extra
    assert set(extra["timing"]) == {"served", "in_process"}
    assert extra["timing"]["served"]["2"]["statuses"] == ["200"]
    assert extra["max_concurrency"] == 2
    p50, p95 = records[0], records[1]
    assert p50.value <= p95.value
