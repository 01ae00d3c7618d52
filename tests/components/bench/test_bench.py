"""Smoke tests of the benchmark cases at tiny sizes: they run, and every record names a peer and
carries positive values for both sides (so the harness can compute a ratio)."""

from __future__ import annotations

import dataclasses
import math

import pytest

from components.bench import BenchRecord, dit, evaluate, load_cases, vae
from components.core.config import BenchConfig, TesseraConfig

CFG = TesseraConfig(bench=BenchConfig(warmup=0, repeats=1, matmul_size=64))


def check(records: list[BenchRecord], prefix: str, count: int) -> None:
    assert len(records) == count
    for r in records:
        assert r.name.startswith(prefix)
        assert r.peer and r.unit
        assert r.value > 0 and r.peer_value > 0, r
        assert math.isfinite(r.ratio) and r.ratio > 0
        assert r.extra


def test_cases_are_registered():
    assert {
        "dit.train",
        "dit.train_bf16",
        "dit.mixed",
        "dit.mixed_bf16",
        "dit.sample",
        "vae.codec",
        "calibration.matmul_bf16",
        "evaluate.step",
        "fvd_features",
    } <= set(load_cases())


@pytest.mark.slow
def test_evaluate_step_tiny():
    """The whole evaluate step on the tiny profile's corpus with random models; the peer (its
    sampling seconds) is part of the same run, so it is at most the whole."""
    records = evaluate.evaluate_step(
        CFG, "tiny", ["ingest.val_fraction=0.5", "evaluate.resamples=10"]
    )
    check(records, "evaluate.step.tiny", 1)
    assert records[0].peer_value <= records[0].value
    assert "fvd_domain" in records[0].extra["metrics"]


def test_dit_train_tiny():
    records = dit.dit_train(CFG, dit.TINY)
    check(records, "dit.train.", 2)
    extra = records[0].extra
    assert extra["gflop_per_step_ours"] > extra["attention_gflop_per_step_ours"] > 0
    assert extra["gflop_per_step_peer"] > extra["attention_gflop_per_step_peer"] > 0
    assert 0 < extra["utilisation_ours"] and 0 < extra["utilisation_peer"]


def test_dit_bf16_cases_tiny():
    """Both models under CPU bf16 autocast (run on any CPU here: tiny sizes, correctness only)."""
    train = dit.dit_train(CFG, dit.TINY, "bf16")
    check(train, "dit.train_bf16.", 2)
    assert train[1].unit == "% bf16 peak"
    assert "bf16" in train[0].extra["step"]
    check(dit.dit_mixed(CFG, dit.TINY, "bf16"), "dit.mixed_bf16.", 2)


def test_count_flops_includes_cpu_attention():
    import torch
    import torch.nn.functional as F

    q = torch.randn(1, 2, 16, 8, requires_grad=True)
    total, attention = dit.count_flops(
        lambda: F.scaled_dot_product_attention(q, q, q).sum().backward()
    )
    forward = 2 * (2 * 2 * 16 * 16 * 8)  # QK^T and AV
    assert total == attention == forward + 5 * forward // 2  # backward: 5 matmuls of that size


def test_dit_mixed_tiny():
    records = dit.dit_mixed(CFG, dit.TINY)
    check(records, "dit.mixed.", 2)
    extra = records[0].extra
    assert extra["real_tokens"] == sum(
        n * math.prod(g // p for g, p in zip(grid, (1, 2, 2), strict=True))
        for n, grid in dit.TINY.mixed_workload
    )
    assert 0 < extra["ours_real_fraction_of_budget"] <= 1


def test_default_mixed_workload_is_fair_and_full():
    """The documented workload: images and videos, four aspect ratios, 1-17 latent frames, and
    first-fit-decreasing fills the packs to >= 97% of the budget."""
    from model.patches import plan_packs, real_token_fraction

    s = dit.DiTBenchSizes()
    grids = [g for n, g in s.mixed_workload for _ in range(n)]
    lengths = [math.prod(x // p for x, p in zip(g, s.patch_size, strict=True)) for g in grids]
    packs = plan_packs(lengths, s.mixed_token_budget)
    planned = [[lengths[i] for i in p] for p in packs]
    assert real_token_fraction(planned, s.mixed_token_budget) >= 0.97
    assert {g[0] for g in grids} >= {1, 17} and min(g[0] for g in grids) == 1
    ratios = {round(g[2] / g[1], 2) for g in grids}
    assert {1.0, 1.78, 0.56, 2.29} <= ratios


def test_dit_sample_tiny():
    records = dit.dit_sample(CFG, dit.TINY)
    check(records, "dit.sample.", 3 * len(dit.TINY.sample_latents))
    assert all(not r.higher_is_better for r in records)


def test_both_sides_are_built_to_the_same_sizes():
    for sizes in (dit.TINY, dataclasses.replace(dit.TINY, depth=2, num_heads=4)):
        ours, peer = dit.build_models(sizes)
        cfg = ours.config
        assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.mlp_hidden) == (
            sizes.hidden_size,
            sizes.depth,
            sizes.num_heads,
            int(sizes.hidden_size * sizes.mlp_ratio),
        )
        assert len(peer.blocks) == sizes.depth
        assert peer.config.num_attention_heads * peer.config.attention_head_dim == cfg.hidden_size
        assert peer.config.ffn_dim == cfg.mlp_hidden and peer.config.text_dim == cfg.text_dim


def test_vae_codec_tiny():
    records = vae.vae_codec(CFG, vae.TINY)
    check(records, "vae.", 2 * len(vae.TINY.clips))  # encode and decode frames/s per clip
    assert records[0].extra["params_ours"] > 0 and records[0].extra["params_peer"] > 0


def test_vae_peak_memory_subprocess():
    clip = vae.TINY.clips[0][1]
    mb = vae.measure_peak_mb(vae.TINY, [(clip, "encode_ours"), (clip, "decode_ours")], seed=0)
    assert set(mb) == {(clip, "encode_ours"), (clip, "decode_ours")}
    assert all(0 < v < 500 for v in mb.values())


def test_peak_rss_sees_torch_allocations():
    import torch

    peak = vae.peak_rss_mb(lambda: torch.ones(64, 1024, 1024).sum())  # 256 MB, one tensor
    assert 200 < peak < 400
