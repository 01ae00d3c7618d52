"""``vae.train_step`` at tiny sizes: both models, eager and compiled, finite records and ratios."""

from __future__ import annotations

import math

import pytest

from components.bench import load_cases, vae
from components.core.config import BenchConfig, TesseraConfig

CFG = TesseraConfig(bench=BenchConfig(warmup=0, repeats=1, matmul_size=64))


def test_vae_train_step_is_registered():
    assert "vae.train_step" in load_cases()


@pytest.mark.slow
def test_vae_train_step_tiny():
    records = vae.vae_train_step(CFG, vae.TINY_TRAIN)
    names = [r.name for r in records]
    assert names == [
        f"vae.train_step.{mode}.{metric}"
        for mode in ("eager", "compiled")
        for metric in ("frames_per_s", "utilisation")
    ]
    for r in records:
        assert r.peer == vae.PEER and r.unit
        assert math.isfinite(r.value) and r.value > 0, r
        assert math.isfinite(r.peer_value) and r.peer_value > 0, r
        assert math.isfinite(r.ratio) and r.ratio > 0
    extra = records[0].extra
    precision = vae.train_precision(CFG)
    assert records[1].unit == f"% {precision} peak" and extra["precision"] == precision
    assert set(extra["timing"]) == {"ours_eager", "peer_eager", "ours_compiled", "peer_compiled"}
    assert all(v > 0 for v in extra["gflop_per_step"].values())
    assert all(math.isfinite(v) and v > 0 for v in extra["compiled_speedup"].values())
    assert extra["ours_compile"]["fallbacks"] == {}, extra["ours_compile"]
