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
        "dit.train_compiled",
        "dit.mixed_compiled",
        "dit.stage1",
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
    check(dit.dit_mixed(CFG, dit.TINY, "bf16"), "dit.mixed_bf16.", 3)


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
    check(records, "dit.mixed.", 3)
    extra = records[0].extra
    assert extra["real_tokens"] == sum(
        n * math.prod(g // p for g, p in zip(grid, (1, 2, 2), strict=True))
        for n, grid in dit.TINY.mixed_workload
    )
    assert 0 < extra["ours_real_fraction_of_budget"] <= 1


def test_stage1_workload_is_the_demo_corpus():
    """The shapes ``make demo`` trains its DiT on, from the demo profile's plan: 96x96 stills
    of 27-36 tokens, clips of 3-9 latent frames, MiniLM caption lengths (0 = uncaptioned)."""
    from components.core.config import load_config

    demo = load_config("demo").demo_data
    work = dit.stage1_workload("demo")
    assert len(work) == demo.num_clips + demo.num_images
    stills = [g for g, _ in work if g[0] == 1]
    tokens = {g[1] * g[2] // 4 for g in stills}
    assert len(stills) == demo.num_images and min(tokens) >= 27 and max(tokens) <= 36
    assert {g[0] for g, _ in work if g[0] > 1} <= set(range(3, 10))
    lens = [n for _, n in work]
    assert 0 in lens and 20 < max(lens) <= load_config("demo").text.max_length


def test_dit_stage1_tiny():
    records = dit.dit_stage1(CFG, dit.TINY_STAGE1)
    check(records, "dit.stage1.", 2)
    extra = records[0].extra
    assert extra["clips_without_text"] >= 1 and extra["ours_packs"] == 2
    assert extra["peer_best_eager"] in ("pad-to-max", "per-shape batching")
    assert set(extra["utilisation"]) == {"ours_eager", "pad_eager", "shape_eager"}


@pytest.mark.slow
def test_compiled_cases_tiny(monkeypatch):
    """Both models compiled: ours through train.compile (inductor), the peer by torch.compile
    (dynamo only here: inductor on diffusers' model takes minutes cold, and it is not ours)."""
    real = dit.compile_pair
    monkeypatch.setattr(
        dit, "compile_pair", lambda o, p, dynamic: real(o, p, dynamic, peer_backend="eager")
    )
    train = dit.dit_train(CFG, dit.TINY, "fp32", compiled=True)
    check(train, "dit.train_compiled.", 2)
    assert set(train[0].extra["first_step_s_compiling"]) == {"ours", "peer"}
    stage1 = dit.dit_stage1(CFG, dataclasses.replace(dit.TINY_STAGE1, modes=("eager", "compiled")))
    check(stage1, "dit.stage1", 4)
    assert [r.name for r in stage1[2:]] == [
        "dit.stage1_compiled.real_tokens_per_s",
        "dit.stage1_compiled.utilisation",
    ]
    assert set(stage1[0].extra["first_pass_s_compiling"]) == {
        "ours_compiled",
        "pad_compiled",
        "shape_compiled",
    }


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
