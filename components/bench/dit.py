"""DiT cases: Tessera's packed DiT vs diffusers' ``WanTransformer3DModel``, in the same run.

The peer is built to our width, depth, heads, MLP width, patch, latent channels and text length,
both with random weights, and both get the same latents, timesteps and text states. Cases:

* ``dit.train`` — one training step (forward + backward + AdamW) on a fixed-shape batch:
  tokens/s, and utilisation = FLOPs / time / this machine's fp32 matmul peak (measured in the same
  run with :func:`components.core.hardware.peak_gflops`). FLOPs come from
  ``FlopCounterMode`` for *both* models, with formulas added for the CPU flash-attention kernels
  that the stock counter skips (so attention is included).
* ``dit.mixed`` — a realistic mixed workload (images + videos, 16:9 / 9:16 / 1:1 / 21:9,
  1–17 latent frames). Ours packs clips into token-budget batches (patch n' pack); the peer gets
  the better of pad-to-max and per-shape batching. Reports real (non-padding) tokens/s and
  real-token fractions. On CPU per-shape batching loses little (no launch overhead, GEMMs stay
  efficient at a few hundred rows), so expect the big gap only against pad-to-max.
* ``dit.train_bf16``, ``dit.mixed_bf16`` — the same with *both* models under CPU bf16 autocast
  (fp32 weights and optimizer), run where ``train_dit`` trains in bf16 (``precision: auto`` picks
  it on CPUs with native bf16 matmuls). Ours then runs attention as bf16 matmuls
  (``model.dit.matmul_attention``); the peer keeps SDPA. Utilisation is against the bf16 peak.
* ``dit.sample`` — seconds per denoising step at 17x256x256 and 17x288x160 (9:16) pixels, without
  CFG and with CFG run sequentially (two forwards, as diffusers' ``WanPipeline`` does) or batched
  (cond + uncond in one forward). Ours reuses text keys/values from ``DiT.encode_text`` (once per
  sample); the peer re-projects the text every step.

Timing: ours and the peer alternate inside every repeat, so load from other processes hits both;
each reports the median, ``extra`` adds the minimum and the load average. On a shared machine
only the ratio is meaningful. Sizes live in :class:`DiTBenchSizes`; tests pass :data:`TINY`.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from components.bench import BenchRecord, benchmark
from components.core.config import TesseraConfig

PEER = "diffusers WanTransformer3DModel"
Grid = tuple[int, int, int]

# Mixed workload as (count, latent (t, h, w)) of the 4x8x8 VAE: 1 + 4(t-1) frames of 8h x 8w px.
# 20 images and 6 videos of 2-17 latent frames (5-65 px frames) in 16:9, 9:16, 1:1 and 21:9
# (14x32 latent = 112x256 px, 2.29:1). With the 1x2x2 patch: 10,032 tokens, the longest clip
# 2,448; first-fit-decreasing fills four 2,560-token packs to 98%.
MIXED_WORKLOAD: tuple[tuple[int, Grid], ...] = (
    (6, (1, 32, 32)),  # 1:1 images, 256x256 px
    (4, (1, 24, 24)),  # 1:1 images, 192x192 px
    (4, (1, 18, 32)),  # 16:9 images, 144x256 px
    (4, (1, 32, 18)),  # 9:16 images
    (2, (1, 14, 32)),  # 21:9 images
    (1, (17, 18, 32)),  # 16:9, 65 frames
    (1, (9, 32, 18)),  # 9:16, 33 frames
    (1, (5, 24, 24)),  # 1:1, 17 frames
    (1, (3, 14, 32)),  # 21:9, 9 frames
    (1, (2, 18, 32)),  # 16:9, 5 frames
    (1, (13, 14, 32)),  # 21:9, 49 frames
)


@dataclass(frozen=True)
class DiTBenchSizes:
    """Model and input sizes of the DiT cases (defaults: ``make bench``; :data:`TINY`: tests).

    Attributes:
        hidden_size, depth, num_heads, mlp_ratio: the DiT (and the peer's) width, depth, heads
            and MLP width / hidden size.
        latent_channels: VAE latent channels (the DiT's in and out channels).
        text_len, text_dim: text tokens per clip (all real: the peer takes no text mask) and width.
        patch_size: (pt, ph, pw).
        train_clips, train_latent: the fixed-shape training batch, clips x latent (t, h, w).
        mixed_workload, mixed_token_budget: the mixed case's clips and tokens per pack / batch.
        sample_latents: (label, latent (t, h, w)) of the sampling case.
        guidance: CFG scale of the sampling case (its value does not change the cost).
        max_repeats: cap on ``cfg.bench.repeats`` for the heavy cases.
    """

    hidden_size: int = 384
    depth: int = 6
    num_heads: int = 6
    mlp_ratio: float = 4.0
    latent_channels: int = 8
    text_len: int = 64
    text_dim: int = 384
    patch_size: Grid = (1, 2, 2)
    train_clips: int = 2
    train_latent: Grid = (5, 32, 32)  # 17x256x256 px: 1,280 tokens per clip
    mixed_workload: tuple[tuple[int, Grid], ...] = MIXED_WORKLOAD
    mixed_token_budget: int = 2560
    sample_latents: tuple[tuple[str, Grid], ...] = (
        ("17x256x256", (5, 32, 32)),
        ("17x288x160", (5, 36, 20)),  # 9:16
    )
    guidance: float = 5.0
    max_repeats: int = 3


TINY = DiTBenchSizes(
    hidden_size=32,
    depth=1,
    num_heads=2,
    latent_channels=4,
    text_len=8,
    text_dim=32,
    train_latent=(2, 4, 4),
    mixed_workload=((3, (1, 4, 4)), (1, (2, 4, 6)), (1, (3, 6, 4))),
    mixed_token_budget=24,
    sample_latents=(("tiny", (2, 4, 4)), ("tiny_9x16", (2, 6, 4))),
    max_repeats=1,
)


# --------------------------------------------------------------------------- shared helpers (the VAE cases use them too)


def interleaved_times(
    fns: dict[str, Callable[[], Any]], warmup: int, repeats: int
) -> dict[str, list[float]]:
    """Wall seconds of each ``fn`` over ``repeats`` rounds that run every fn once, in turn."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(max(1, repeats)):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def timing_summary(times: list[float]) -> dict[str, float]:
    return {"median_s": statistics.median(times), "min_s": min(times), "runs": len(times)}


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def count_flops(fn: Callable[[], Any]) -> tuple[int, int]:
    """(all FLOPs, attention FLOPs) of ``fn()`` by ``FlopCounterMode``, with CPU flash attention
    (forward and backward) counted.

    The stock counter only knows the CUDA SDPA kernels, so on CPU it silently counts attention
    as zero; the CPU kernels take the same arguments, so the same formulas apply (masked keys
    are counted as computed, which is what the kernel does).
    """
    import torch
    from torch.utils import flop_counter

    aten, registry = torch.ops.aten, flop_counter.flop_registry

    def raw(formula: Callable[..., int]) -> Callable[..., int]:
        def count(*args: Any, **kwargs: Any) -> int:
            return formula(*args, **kwargs)

        count._get_raw = True  # type: ignore[attr-defined]  # already shape-wrapped
        return count

    mapping = {
        aten._scaled_dot_product_flash_attention_for_cpu: raw(
            registry[aten._scaled_dot_product_flash_attention]
        ),
        aten._scaled_dot_product_flash_attention_for_cpu_backward: raw(
            registry[aten._scaled_dot_product_flash_attention_backward]
        ),
    }
    with flop_counter.FlopCounterMode(display=False, custom_mapping=mapping) as counter:
        fn()
    by_op = counter.get_flop_counts()["Global"]
    attention = sum(by_op.get(op, 0) for op in mapping)
    return counter.get_total_flops(), attention


def matmul_peak(cfg: TesseraConfig, precision: str = "fp32") -> float:
    """This machine's matmul GFLOP/s right now (torch) in ``precision``, n = ``bench.matmul_size``."""
    from components.core.hardware import peak_gflops

    return peak_gflops(cfg.bench, precision)


def autocast(precision: str) -> Any:
    """CPU bf16 autocast for ``"bf16"`` (both models run under it), nothing for ``"fp32"``."""
    import contextlib

    import torch

    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def trains_in_bf16(cfg: TesseraConfig) -> bool:
    """Whether ``train_dit`` trains in bf16 on this machine (``precision: auto`` decides)."""
    from components.core.trainer import precision

    return precision(cfg.train_dit.train) == "bf16"


# --------------------------------------------------------------------------- models and inputs


def build_models(s: DiTBenchSizes) -> tuple[Any, Any]:
    """(our DiT, the diffusers Wan transformer) at the same sizes, random weights."""
    import torch
    from diffusers import WanTransformer3DModel

    from model.dit import DiT, DiTConfig

    torch.manual_seed(0)
    ours = DiT(
        DiTConfig(
            hidden_size=s.hidden_size,
            depth=s.depth,
            num_heads=s.num_heads,
            mlp_ratio=s.mlp_ratio,
            patch_size=s.patch_size,
            in_channels=s.latent_channels,
            text_dim=s.text_dim,
        )
    )
    peer = WanTransformer3DModel(
        patch_size=s.patch_size,
        num_attention_heads=s.num_heads,
        attention_head_dim=s.hidden_size // s.num_heads,
        in_channels=s.latent_channels,
        out_channels=s.latent_channels,
        text_dim=s.text_dim,
        ffn_dim=int(s.hidden_size * s.mlp_ratio),
        num_layers=s.depth,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
    )
    return ours, peer


def _tokens(grid: Grid, patch: Grid) -> int:
    return math.prod(g // p for g, p in zip(grid, patch, strict=True))


def _sizes_extra(s: DiTBenchSizes, ours: Any, peer: Any) -> dict[str, Any]:
    return {
        "hidden_size": s.hidden_size,
        "depth": s.depth,
        "num_heads": s.num_heads,
        "mlp_hidden": int(s.hidden_size * s.mlp_ratio),
        "patch_size": list(s.patch_size),
        "latent_channels": s.latent_channels,
        "text_len": s.text_len,
        "params_ours": sum(p.numel() for p in ours.parameters()),
        "params_peer": sum(p.numel() for p in peer.parameters()),
    }


def _repeats(cfg: TesseraConfig, s: DiTBenchSizes) -> tuple[int, int]:
    return cfg.bench.warmup, max(1, min(cfg.bench.repeats, s.max_repeats))


# --------------------------------------------------------------------------- training step, fixed shape


@benchmark("dit.train")
def dit_train(
    cfg: TesseraConfig, s: DiTBenchSizes = DiTBenchSizes(), precision: str = "fp32"
) -> list[BenchRecord]:
    import torch
    import torch.nn.functional as F

    from model.patches import pack_patches

    ours, peer = build_models(s)
    ours.train()
    peer.train()
    gen = torch.Generator().manual_seed(cfg.seed)
    c, (t, h, w) = s.latent_channels, s.train_latent
    latents = torch.randn(s.train_clips, c, t, h, w, generator=gen)
    text = torch.randn(s.train_clips, s.text_len, s.text_dim, generator=gen)
    times = torch.rand(s.train_clips, generator=gen)
    (batch,) = pack_patches(
        list(latents), latents.shape[0] * _tokens((t, h, w), s.patch_size), s.patch_size
    )
    target_ours = torch.randn(batch.tokens.shape, generator=gen)
    target_peer = torch.randn(latents.shape, generator=gen)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    opt_peer = torch.optim.AdamW(peer.parameters(), lr=1e-4, fused=True)

    def step_ours(precision: str = precision) -> None:
        with autocast(precision):
            out = ours(batch.tokens, batch.coords, batch.cu_seqlens, times, text)  # (N, D)
        F.mse_loss(out.float(), target_ours).backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_peer(precision: str = precision) -> None:
        with autocast(precision):
            out = peer(latents, times * 1000, text, return_dict=False)[0]  # (B, C, T, H, W)
        F.mse_loss(out.float(), target_peer).backward()
        opt_peer.step()
        opt_peer.zero_grad(set_to_none=True)

    load_before = load_average()
    peak = matmul_peak(cfg, precision)
    # FLOPs are counted in fp32 (the same model FLOPs in either precision; in fp32 both models'
    # attention runs the flash kernel, which the counter reports separately)
    flops_ours, attn_ours = count_flops(lambda: step_ours("fp32"))  # also warm-up steps
    flops_peer, attn_peer = count_flops(lambda: step_peer("fp32"))
    warmup, repeats = cfg.bench.warmup, max(1, cfg.bench.repeats)
    runs = interleaved_times({"ours": step_ours, "peer": step_peer}, warmup, repeats)
    peak = max(peak, matmul_peak(cfg, precision))  # best of before/after: least disturbed
    sec_ours, sec_peer = statistics.median(runs["ours"]), statistics.median(runs["peer"])
    tokens = batch.num_tokens
    util_ours = flops_ours / sec_ours / 1e9 / peak
    util_peer = flops_peer / sec_peer / 1e9 / peak
    extra = {
        **_sizes_extra(s, ours, peer),
        "clips": s.train_clips,
        "latent_thw": list(s.train_latent),
        "tokens_per_step": tokens,
        "step": f"forward + backward + AdamW, {_precision_words(precision)}",
        "gflop_per_step_ours": flops_ours / 1e9,
        "gflop_per_step_peer": flops_peer / 1e9,
        "attention_gflop_per_step_ours": attn_ours / 1e9,  # the stock counter misses these
        "attention_gflop_per_step_peer": attn_peer / 1e9,
        "gflops_ours": flops_ours / sec_ours / 1e9,
        "gflops_peer": flops_peer / sec_peer / 1e9,
        "matmul_peak_gflops": peak,
        "utilisation_ours": util_ours,
        "utilisation_peer": util_peer,
        "ours": timing_summary(runs["ours"]),
        "peer": timing_summary(runs["peer"]),
        "load_average": [load_before, load_average()],
        "torch_threads": torch.get_num_threads(),
    }
    case = _case_name("dit.train", precision)
    return [
        BenchRecord(
            f"{case}.tokens_per_s",
            tokens / sec_ours,
            "tokens/s",
            PEER,
            tokens / sec_peer,
            extra=extra,
        ),
        BenchRecord(
            f"{case}.utilisation",
            100 * util_ours,
            f"% {precision} peak",
            PEER,
            100 * util_peer,
            extra=extra,
        ),
    ]


@benchmark("dit.train_bf16")
def dit_train_bf16(cfg: TesseraConfig, s: DiTBenchSizes = DiTBenchSizes()) -> list[BenchRecord]:
    """``dit.train`` with both models under bf16 autocast, where training runs in bf16 here."""
    return dit_train(cfg, s, "bf16") if trains_in_bf16(cfg) else []


def _case_name(base: str, precision: str) -> str:
    return base if precision == "fp32" else f"{base}_{precision}"


def _precision_words(precision: str) -> str:
    return "fp32" if precision == "fp32" else "CPU bf16 autocast (fp32 weights and optimizer)"


# --------------------------------------------------------------------------- mixed workload: patch n' pack vs pad-to-max / per-shape batching


def _pad_to_max_batches(grids: list[Grid], s: DiTBenchSizes) -> list[list[int]]:
    """Clips longest first; a batch grows while ``clips x tokens of the padded grid`` fits."""
    order = sorted(range(len(grids)), key=lambda i: (-_tokens(grids[i], s.patch_size), i))
    batches: list[list[int]] = []
    for i in order:
        if batches:
            grown = batches[-1] + [i]
            padded = tuple(max(grids[j][a] for j in grown) for a in range(3))
            if len(grown) * _tokens(padded, s.patch_size) <= s.mixed_token_budget:
                batches[-1] = grown
                continue
        batches.append([i])
    return batches


def _per_shape_batches(grids: list[Grid], s: DiTBenchSizes) -> list[list[int]]:
    """Clips of one shape together, ``budget // tokens`` (at least 1) per batch."""
    by_shape: dict[Grid, list[int]] = {}
    for i, g in enumerate(grids):
        by_shape.setdefault(g, []).append(i)
    batches = []
    for g, idx in by_shape.items():
        size = max(1, s.mixed_token_budget // _tokens(g, s.patch_size))
        batches += [idx[k : k + size] for k in range(0, len(idx), size)]
    return batches


@benchmark("dit.mixed")
def dit_mixed(
    cfg: TesseraConfig, s: DiTBenchSizes = DiTBenchSizes(), precision: str = "fp32"
) -> list[BenchRecord]:
    import torch
    import torch.nn.functional as F

    from model.patches import pack_patches, real_token_fraction

    ours, peer = build_models(s)
    ours.train()
    peer.train()
    gen = torch.Generator().manual_seed(cfg.seed)
    grids = [g for count, g in s.mixed_workload for _ in range(count)]
    latents = [torch.randn(s.latent_channels, *g, generator=gen) for g in grids]
    text = torch.randn(len(grids), s.text_len, s.text_dim, generator=gen)
    times = torch.rand(len(grids), generator=gen)
    real = sum(_tokens(g, s.patch_size) for g in grids)

    packs = pack_patches(latents, s.mixed_token_budget, s.patch_size)
    ours_inputs = [
        (p, times[p.indices], text[p.indices], torch.randn(p.tokens.shape, generator=gen))
        for p in packs
    ]

    def peer_inputs(batches: list[list[int]]) -> list[tuple[Any, ...]]:
        inputs = []
        for idx in batches:
            thw = [max(grids[i][a] for i in idx) for a in range(3)]
            padded = torch.stack(
                [
                    F.pad(
                        latents[i],
                        (0, thw[2] - grids[i][2], 0, thw[1] - grids[i][1], 0, thw[0] - grids[i][0]),
                    )
                    for i in idx
                ]
            )  # (B, C, T, H, W), zero-padded at the end of each axis
            target = torch.randn(padded.shape, generator=gen)
            inputs.append((padded, times[idx] * 1000, text[idx], target))
        return inputs

    pad_batches, shape_batches = _pad_to_max_batches(grids, s), _per_shape_batches(grids, s)
    pad_inputs, shape_inputs = peer_inputs(pad_batches), peer_inputs(shape_batches)
    opt_ours = torch.optim.AdamW(ours.parameters(), lr=1e-4, fused=True)
    opt_peer = torch.optim.AdamW(peer.parameters(), lr=1e-4, fused=True)

    # One pass over the workload = one global batch: forward + backward per batch (gradient
    # accumulation), one AdamW step, so every strategy pays the optimizer once.
    def pass_ours(inputs: list[tuple[Any, ...]] = ours_inputs) -> None:
        for p, t, txt, target in inputs:
            with autocast(precision):
                out = ours(p.tokens, p.coords, p.cu_seqlens, t, txt)  # (N, D)
            F.mse_loss(out.float(), target).backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def pass_peer(inputs: list[tuple[Any, ...]]) -> None:
        for lat, t, txt, target in inputs:
            with autocast(precision):
                out = peer(lat, t, txt, return_dict=False)[0]  # (B, C, T, H, W)
            F.mse_loss(out.float(), target).backward()
        opt_peer.step()
        opt_peer.zero_grad(set_to_none=True)

    load_before = load_average()
    pass_ours(ours_inputs[-1:])  # warm-up on one (the smallest) batch each
    pass_peer(pad_inputs[-1:])
    _, repeats = _repeats(cfg, s)
    runs = interleaved_times(
        {
            "ours": pass_ours,
            "pad": lambda: pass_peer(pad_inputs),
            "shape": lambda: pass_peer(shape_inputs),
        },
        warmup=0,
        repeats=repeats,
    )
    sec = {k: statistics.median(v) for k, v in runs.items()}
    best = min(("pad", "shape"), key=sec.__getitem__)
    padded_tokens = sum(
        math.prod(x[0].shape[:1]) * _tokens(x[0].shape[2:], s.patch_size) for x in pad_inputs
    )
    frac_ours = real_token_fraction(packs, s.mixed_token_budget)
    frac_pad = real / (len(pad_batches) * s.mixed_token_budget)
    frac_shape = real / (len(shape_batches) * s.mixed_token_budget)
    shapes = Counter(grids)
    extra = {
        **_sizes_extra(s, ours, peer),
        "workload_count_latent_thw": [[n, *g] for g, n in shapes.items()],
        "workload_count_pixels_thw": [
            [n, 1 + 4 * (g[0] - 1), 8 * g[1], 8 * g[2]] for g, n in shapes.items()
        ],
        "clips": len(grids),
        "images": sum(1 for g in grids if g[0] == 1),
        "real_tokens": real,
        "token_budget": s.mixed_token_budget,
        "pass": "forward + backward per batch, one AdamW step per pass (gradient accumulation), "
        f"{_precision_words(precision)}",
        "ours_packs": len(packs),
        "ours_real_fraction_of_budget": frac_ours,
        "pad_batches": len(pad_batches),
        "pad_computed_tokens": padded_tokens,
        "pad_real_fraction_of_computed": real / padded_tokens,
        "pad_real_fraction_of_budget": frac_pad,
        "shape_batches": len(shape_batches),
        "shape_real_fraction_of_budget": frac_shape,
        "peer_best": {"pad": "pad-to-max", "shape": "per-shape batching"}[best],
        "real_tokens_per_s": {k: real / v for k, v in sec.items()},
        "timing": {k: timing_summary(v) for k, v in runs.items()},
        "load_average": [load_before, load_average()],
    }
    peer_name, case = f"{PEER} ({extra['peer_best']})", _case_name("dit.mixed", precision)
    return [
        BenchRecord(
            f"{case}.real_tokens_per_s",
            real / sec["ours"],
            "real tokens/s",
            peer_name,
            real / sec[best],
            extra=extra,
        ),
        BenchRecord(
            f"{case}.real_token_fraction",
            frac_ours,
            "of budget slots",
            f"{PEER} (pad-to-max)",
            frac_pad,
            extra=extra,
        ),
    ]


@benchmark("dit.mixed_bf16")
def dit_mixed_bf16(cfg: TesseraConfig, s: DiTBenchSizes = DiTBenchSizes()) -> list[BenchRecord]:
    """``dit.mixed`` with both models under bf16 autocast, where training runs in bf16 here."""
    return dit_mixed(cfg, s, "bf16") if trains_in_bf16(cfg) else []


# --------------------------------------------------------------------------- sampling: seconds per denoising step


@benchmark("dit.sample")
def dit_sample(cfg: TesseraConfig, s: DiTBenchSizes = DiTBenchSizes()) -> list[BenchRecord]:
    import torch

    ours, peer = build_models(s)
    ours.eval()
    peer.eval()
    gen = torch.Generator().manual_seed(cfg.seed)
    records = []
    for label, grid in s.sample_latents:
        records += _sample_one(cfg, s, ours, peer, label, grid, gen)
    return records


def _sample_one(
    cfg: TesseraConfig, s: DiTBenchSizes, ours: Any, peer: Any, label: str, grid: Grid, gen: Any
) -> list[BenchRecord]:
    import torch

    from model.diffusion import FlowMatching, concat_text, null_condition
    from model.patches import patchify

    flow, g = FlowMatching(), s.guidance
    latent = torch.randn(1, s.latent_channels, *grid, generator=gen)
    text = torch.randn(1, s.text_len, s.text_dim, generator=gen)
    mask = torch.ones(text.shape[:2], dtype=torch.bool)
    tokens, coords = patchify(latent[0], s.patch_size)  # (N, in_dim), (N, 3)
    cu = torch.tensor([0, tokens.shape[0]])
    t_now, dt = torch.tensor([0.5]), -1.0 / 30  # one Euler step of a 30-step schedule
    null, null_mask = null_condition(text)
    neg = torch.zeros_like(text)  # stands in for the peer's encoded negative prompt: same cost
    with torch.inference_mode():
        start = time.perf_counter()
        cache = ours.encode_text(text, mask)
        encode_s = time.perf_counter() - start
        cache_null = ours.encode_text(null, null_mask)
        cache_both = ours.encode_text(*concat_text(text, mask, null, null_mask))

    def ours_step(mode: str) -> Any:
        if mode == "cfg_sequential":
            v_cond = flow.guided_velocity(ours, tokens, coords, cu, t_now, cache, None)
            v_null = flow.guided_velocity(ours, tokens, coords, cu, t_now, cache_null, None)
            v = v_null + g * (v_cond - v_null)
        elif mode == "cfg_batched":  # cond + null rows in one packed forward
            v = flow.guided_velocity(ours, tokens, coords, cu, t_now, cache_both, g)
        else:
            v = flow.guided_velocity(ours, tokens, coords, cu, t_now, cache, None)
        return tokens + dt * v  # (N, in_dim)

    def peer_step(mode: str) -> Any:
        ts = t_now * 1000
        if mode == "cfg_sequential":  # what diffusers' WanPipeline does
            v_cond = peer(latent, ts, text, return_dict=False)[0]
            v_null = peer(latent, ts, neg, return_dict=False)[0]
            v = v_null + g * (v_cond - v_null)
        elif mode == "cfg_batched":
            out = peer(
                torch.cat([latent, latent]),
                torch.cat([ts, ts]),
                torch.cat([text, neg]),
                return_dict=False,
            )[0]
            v_cond, v_null = out.chunk(2)
            v = v_null + g * (v_cond - v_null)
        else:
            v = peer(latent, ts, text, return_dict=False)[0]
        return latent + dt * v  # (1, C, T, H, W)

    modes = ("no_cfg", "cfg_batched", "cfg_sequential")
    fns: dict[str, Callable[[], Any]] = {}
    for mode in modes:
        fns[f"ours_{mode}"] = functools.partial(ours_step, mode)
        fns[f"peer_{mode}"] = functools.partial(peer_step, mode)
    warmup, repeats = _repeats(cfg, s)
    load_before = load_average()
    with torch.inference_mode():
        runs = interleaved_times(fns, warmup, repeats)
    sec = {k: statistics.median(v) for k, v in runs.items()}
    d = s.hidden_size
    t, h, w = grid
    extra = {
        **_sizes_extra(s, ours, peer),
        "latent_thw": [t, h, w],
        "pixels_thw": [1 + 4 * (t - 1), 8 * h, 8 * w],
        "tokens": int(tokens.shape[0]),
        "step": "one Euler step: model forward(s) + CFG combine + update, inference_mode",
        "ours_encode_text_s_once_per_sample": encode_s,
        "peer_text_gflop_recomputed_per_forward": 2
        * s.text_len
        * (s.text_dim * d + d * d + s.depth * 2 * d * d)
        / 1e9,
        "timing": {k: timing_summary(v) for k, v in runs.items()},
        "load_average": [load_before, load_average()],
    }
    return [
        BenchRecord(
            f"dit.sample.{label}.{mode}",
            sec[f"ours_{mode}"],
            "s/step",
            PEER,
            sec[f"peer_{mode}"],
            higher_is_better=False,
            extra=extra,
        )
        for mode in modes
    ]
