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
* ``dit.train_compiled``, ``dit.mixed_compiled`` — the same in the training precision with both
  models compiled: ours by ``train.compile`` (inductor on the blocks' code between the attention
  calls, dynamic shapes), the peer whole by ``torch.compile`` (``dynamic=True`` for the mixed
  shapes). The first (compiling) step or pass and the recompiles it triggers are in ``extra``.
* ``dit.stage1`` — stage-one training at the shapes ``make demo`` trains on: the demo corpus's
  planned clips (:func:`stage1_workload`: 96x96-pixel stills of 27-36 tokens and clips of 3-9
  latent frames, captions of 0-110 MiniLM tokens), the profile's DiT (``tessera-xs``) and token
  budget (2,048), the first packs of the trainer's own stream. The peer gets per-shape batches
  (every same-size still in one batch) and pad-to-max, its text padded per batch to the longest
  caption (it takes no mask). Both eager and both compiled, in the training precision; real
  tokens/s and utilisation of the calibrated peak.
* ``dit.sample`` — seconds per denoising step at 17x256x256 and 17x288x160 (9:16) pixels, without
  CFG and with CFG run sequentially (two forwards, as diffusers' ``WanPipeline`` does) or batched
  (cond + uncond in one forward). Ours reuses text keys/values from ``DiT.encode_text`` (once per
  sample); the peer re-projects the text every step.

Timing: ours and the peer alternate inside every repeat, so load from other processes hits both;
each reports the median, ``extra`` adds the minimum and the load average. On a shared machine
only the ratio is meaningful. Sizes live in :class:`DiTBenchSizes`; tests pass :data:`TINY`.
"""

from __future__ import annotations

import dataclasses
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


# --------------------------------------------------------------------------- the demo's stage-one workload


def stage1_workload(profile: str = "demo") -> list[tuple[Grid, int]]:
    """(latent (t, h, w), caption tokens) of every synthetic clip a profile's DiT trains on.

    The shapes are what ``encode`` makes of ``demo_data``'s planned files (native aspect,
    ``encode.max_pixels`` / ``max_frames``, sides cropped to the VAE stride x patch) and the
    caption lengths are the text encoder's token counts of the planned captions (0 for the
    uncaptioned files), so nothing needs decoding or training to reproduce them.
    """
    from components.core.config import load_config
    from components.core.demo_corpus import describe
    from components.core.media import fit_size, usable_frames
    from components.steps.demo_data import plan_corpus
    from model.text import load_text_encoder
    from model.vae import VAE_SIZES

    cfg = load_config(profile)
    vae = VAE_SIZES.config(cfg.train_vae.size)
    tf, sf = vae.temporal_downsample, vae.spatial_downsample
    factor = sf * max(cfg.train_dit.patch_size[1:])
    specs = plan_corpus(cfg.demo_data)
    tokenizer = load_text_encoder(cfg.text.encoder, cfg.text.max_length).tokenizer
    captions = [describe(spec)[0] for spec in specs]
    ids = tokenizer(captions, truncation=True, max_length=cfg.text.max_length)["input_ids"]
    workload = []
    for spec, tokens in zip(specs, ids, strict=True):
        _, (width, height) = fit_size(spec.width, spec.height, cfg.encode.max_pixels, factor)
        frames = usable_frames(spec.num_frames, cfg.encode.max_frames, tf)
        grid = (1 + (frames - 1) // tf, height // sf, width // sf)
        workload.append((grid, len(tokens) if spec.captioned else 0))
    return workload


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


# --------------------------------------------------------------------------- compiled variants


def compile_pair(
    ours: Any, peer: Any, dynamic: bool, peer_backend: str = "inductor"
) -> tuple[Any, Any] | None:
    """(ours, peer) compiled in place / wrapped, each as its trainer would: ours through
    ``train.compile`` (:func:`components.core.compile.compile_regions`: the blocks' code between
    the attention calls), the peer whole with ``torch.compile`` (``dynamic`` for varying batch
    shapes). None when inductor has no toolchain here (the compiled cases then record nothing)."""
    import torch

    from components.core.compile import compile_regions, toolchain_missing

    missing = toolchain_missing(torch.device("cpu"))
    if missing:
        print(f"bench: compiled DiT cases skipped: {missing}")
        return None
    compile_regions(ours, "on", torch.device("cpu"))
    return ours, torch.compile(peer, dynamic=dynamic, backend=peer_backend)


def training_precision(cfg: TesseraConfig) -> str:
    return "bf16" if trains_in_bf16(cfg) else "fp32"


# --------------------------------------------------------------------------- training step, fixed shape


@benchmark("dit.train")
def dit_train(
    cfg: TesseraConfig,
    s: DiTBenchSizes = DiTBenchSizes(),
    precision: str = "fp32",
    compiled: bool = False,
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
    models = {"ours": ours, "peer": peer}

    def step_ours(precision: str = precision) -> None:
        with autocast(precision):
            out = models["ours"](batch.tokens, batch.coords, batch.cu_seqlens, times, text)
        F.mse_loss(out.float(), target_ours).backward()  # out (N, D)
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_peer(precision: str = precision) -> None:
        with autocast(precision):
            out = models["peer"](latents, times * 1000, text, return_dict=False)[0]
        F.mse_loss(out.float(), target_peer).backward()  # out (B, C, T, H, W)
        opt_peer.step()
        opt_peer.zero_grad(set_to_none=True)

    load_before = load_average()
    peak = matmul_peak(cfg, precision)
    # FLOPs are counted eagerly in fp32 (the same model FLOPs in either precision; in fp32 both
    # models' attention runs the flash kernel, which the counter reports separately)
    flops_ours, attn_ours = count_flops(lambda: step_ours("fp32"))  # also warm-up steps
    flops_peer, attn_peer = count_flops(lambda: step_peer("fp32"))
    compile_s: dict[str, float] = {}
    if compiled:
        pair = compile_pair(ours, peer, dynamic=False)
        if pair is None:
            return []
        models["ours"], models["peer"] = pair
        for name, fn in (("ours", step_ours), ("peer", step_peer)):
            start = time.perf_counter()
            fn()
            compile_s[name] = time.perf_counter() - start
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
        "step": f"forward + backward + AdamW, {_precision_words(precision)}"
        + (", both compiled" if compiled else ", both eager"),
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
    if compiled:
        extra["first_step_s_compiling"] = compile_s
    case = _case_name("dit.train", precision, compiled)
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


@benchmark("dit.train_compiled")
def dit_train_compiled(cfg: TesseraConfig, s: DiTBenchSizes = DiTBenchSizes()) -> list[BenchRecord]:
    """``dit.train`` in the training precision with both models compiled (ours by
    ``train.compile``, the peer whole by ``torch.compile``)."""
    return dit_train(cfg, s, training_precision(cfg), compiled=True)


def _case_name(base: str, precision: str, compiled: bool = False) -> str:
    name = base if precision == "fp32" else f"{base}_{precision}"
    return f"{name}_compiled" if compiled else name


def _precision_words(precision: str) -> str:
    return "fp32" if precision == "fp32" else "CPU bf16 autocast (fp32 weights and optimizer)"


# --------------------------------------------------------------------------- mixed workloads: patch n' pack vs pad-to-max / per-shape batching


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


@dataclass(frozen=True)
class Workload:
    """Clips of a workload case: latent grids, text tokens per clip and ours' packs.

    ``text_lens`` None: every clip has ``text_len`` real text tokens (no mask). Otherwise clip
    ``i`` has ``text_lens[i]`` (0 = no caption: ours gets the null condition, the peer, which
    takes no mask, zeros); each batch pads its text to its longest caption.
    ``packs`` None: ours packs all clips first-fit decreasing; else these clip indices per pack
    (the trainer's stream order).
    """

    grids: tuple[Grid, ...]
    text_lens: tuple[int, ...] | None = None
    packs: tuple[tuple[int, ...], ...] | None = None


def _workload_case(
    cfg: TesseraConfig,
    s: DiTBenchSizes,
    work: Workload,
    precision: str,
    modes: tuple[str, ...],
    case: str,
) -> list[BenchRecord]:
    """Ours (patch n' pack) vs the peer's pad-to-max and per-shape batching over one workload,
    each in ``modes`` (``"eager"``, ``"compiled"``), interleaved in one run."""
    import copy

    import torch
    import torch.nn.functional as F

    from model.patches import pack_patches, pad_text, real_token_fraction

    base_ours, base_peer = build_models(s)
    gen = torch.Generator().manual_seed(cfg.seed)
    grids = list(work.grids)
    latents = [torch.randn(s.latent_channels, *g, generator=gen) for g in grids]
    lens = list(work.text_lens) if work.text_lens is not None else [s.text_len] * len(grids)
    texts = [torch.randn(max(n, 1), s.text_dim, generator=gen) for n in lens]
    text_masks = [torch.arange(max(n, 1)) < n for n in lens]  # all False: no caption
    times = torch.rand(len(grids), generator=gen)
    real = sum(_tokens(g, s.patch_size) for g in grids)

    if work.packs is None:
        packs = pack_patches(latents, s.mixed_token_budget, s.patch_size)
    else:
        packs = []
        for clip_ids in work.packs:
            (batch,) = pack_patches(
                [latents[i] for i in clip_ids], s.mixed_token_budget, s.patch_size
            )
            batch.indices = [clip_ids[j] for j in batch.indices]
            packs.append(batch)
    ours_inputs = []
    for p in packs:
        text, mask = pad_text([texts[i] for i in p.indices], [text_masks[i] for i in p.indices])
        target = torch.randn(p.tokens.shape, generator=gen)
        ours_inputs.append((p, times[p.indices], text, mask, target))

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
            text, mask = pad_text([texts[i] for i in idx], [text_masks[i] for i in idx])
            target = torch.randn(padded.shape, generator=gen)
            inputs.append((padded, times[idx] * 1000, text * mask[..., None], target))
        return inputs

    pad_batches, shape_batches = _pad_to_max_batches(grids, s), _per_shape_batches(grids, s)
    peer_batches = {"pad": peer_inputs(pad_batches), "shape": peer_inputs(shape_batches)}
    use_mask = work.text_lens is not None

    def pass_ours(model: Any, opt: Any, precision: str = precision) -> None:
        # One pass over the workload = one global batch: forward + backward per batch (gradient
        # accumulation), one AdamW step, so every strategy pays the optimizer once.
        for p, t, text, mask, target in ours_inputs:
            with autocast(precision):
                out = model(p.tokens, p.coords, p.cu_seqlens, t, text, mask if use_mask else None)
            F.mse_loss(out.float(), target).backward()  # out (N, D)
        opt.step()
        opt.zero_grad(set_to_none=True)

    def pass_peer(model: Any, opt: Any, inputs: list[Any], precision: str = precision) -> None:
        for lat, t, text, target in inputs:
            with autocast(precision):
                out = model(lat, t, text, return_dict=False)[0]  # (B, C, T, H, W)
            F.mse_loss(out.float(), target).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def optimiser(model: Any) -> Any:
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    load_before = load_average()
    peak = matmul_peak(cfg, precision)
    # FLOPs of one pass, counted eagerly in fp32 (see dit_train), for ours and the peer's two
    # strategies (the peer's include its padding: they are what it computes)
    flops = {
        "ours": count_flops(lambda: pass_ours(base_ours, optimiser(base_ours), "fp32"))[0],
        **{
            k: count_flops(lambda b=b: pass_peer(base_peer, optimiser(base_peer), b, "fp32"))[0]
            for k, b in peer_batches.items()
        },
    }
    fns: dict[str, Callable[[], Any]] = {}
    compile_s: dict[str, float] = {}
    recompiles: dict[str, int] = {}
    for mode in modes:
        ours, peer = copy.deepcopy(base_ours).train(), copy.deepcopy(base_peer).train()
        if mode == "compiled":
            pair = compile_pair(ours, peer, dynamic=True)
            if pair is None:
                continue
            ours, peer = pair
        opt_ours, opt_peer = optimiser(ours), optimiser(peer)
        fns[f"ours_{mode}"] = functools.partial(pass_ours, ours, opt_ours)
        for k, b in peer_batches.items():
            fns[f"{k}_{mode}"] = functools.partial(pass_peer, peer, opt_peer, b)
        if mode == "compiled":  # a full pass compiles every shape the timed passes meet
            from components.core.compile import compile_stats

            for name in (f"ours_{mode}", f"pad_{mode}", f"shape_{mode}"):
                before, start = compile_stats()["recompiles"], time.perf_counter()
                fns[name]()
                compile_s[name] = time.perf_counter() - start
                recompiles[name] = compile_stats()["recompiles"] - before
    if not fns:
        return []
    for name in [n for n in fns if n.endswith("_eager")]:  # warm-up: one pass each
        fns[name]()
    _, repeats = _repeats(cfg, s)
    runs = interleaved_times(fns, warmup=0, repeats=repeats)
    peak = max(peak, matmul_peak(cfg, precision))
    sec = {k: statistics.median(v) for k, v in runs.items()}
    padded_tokens = sum(
        math.prod(x[0].shape[:1]) * _tokens(x[0].shape[2:], s.patch_size)
        for x in peer_batches["pad"]
    )
    frac_ours = real_token_fraction(packs, s.mixed_token_budget)
    frac_pad = real / (len(pad_batches) * s.mixed_token_budget)
    frac_shape = real / (len(shape_batches) * s.mixed_token_budget)
    shapes = Counter(grids)
    names = {"pad": "pad-to-max", "shape": "per-shape batching"}
    extra: dict[str, Any] = {
        **_sizes_extra(s, base_ours, base_peer),
        "workload_count_latent_thw": [[n, *g] for g, n in shapes.items()],
        "clips": len(grids),
        "images": sum(1 for g in grids if g[0] == 1),
        "real_tokens": real,
        "text_tokens_per_clip": {"mean": statistics.mean(lens), "max": max(lens)},
        "clips_without_text": sum(1 for n in lens if n == 0),
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
        "gflop_per_pass": {k: v / 1e9 for k, v in flops.items()},
        "matmul_peak_gflops": peak,
        "real_tokens_per_s": {k: real / v for k, v in sec.items()},
        "utilisation": {k: flops[k.split("_")[0]] / v / 1e9 / peak for k, v in sec.items()},
        "timing": {k: timing_summary(v) for k, v in runs.items()},
        "load_average": [load_before, load_average()],
        "torch_threads": torch.get_num_threads(),
    }
    if compile_s:
        extra["first_pass_s_compiling"] = compile_s
        extra["recompiles_in_first_pass"] = recompiles
    records = []
    for mode in modes:
        if f"ours_{mode}" not in sec:
            continue
        best = min(("pad", "shape"), key=lambda k: sec[f"{k}_{mode}"])
        extra[f"peer_best_{mode}"] = names[best]
        name = f"{case}_compiled" if mode == "compiled" else case
        ours_s, best_s = sec[f"ours_{mode}"], sec[f"{best}_{mode}"]
        records += [
            BenchRecord(
                f"{name}.real_tokens_per_s",
                real / ours_s,
                "real tokens/s",
                f"{PEER} ({names[best]}, {mode})",
                real / best_s,
                extra=extra,
            ),
            BenchRecord(
                f"{name}.utilisation",
                100 * flops["ours"] / ours_s / 1e9 / peak,
                f"% {precision} peak",
                f"{PEER} ({names[best]}, {mode})",
                100 * flops[best] / best_s / 1e9 / peak,
                extra=extra,
            ),
        ]
    if case.startswith("dit.mixed") and "eager" in modes:
        records.append(
            BenchRecord(
                f"{case}.real_token_fraction",
                frac_ours,
                "of budget slots",
                f"{PEER} (pad-to-max)",
                frac_pad,
                extra=extra,
            )
        )
    return records


def _mixed_workload(s: DiTBenchSizes) -> Workload:
    return Workload(tuple(g for count, g in s.mixed_workload for _ in range(count)))


@benchmark("dit.mixed")
def dit_mixed(
    cfg: TesseraConfig, s: DiTBenchSizes = DiTBenchSizes(), precision: str = "fp32"
) -> list[BenchRecord]:
    """The mixed workload (module docstring), eager, ``precision``."""
    return _workload_case(
        cfg, s, _mixed_workload(s), precision, ("eager",), _case_name("dit.mixed", precision)
    )


@benchmark("dit.mixed_bf16")
def dit_mixed_bf16(cfg: TesseraConfig, s: DiTBenchSizes = DiTBenchSizes()) -> list[BenchRecord]:
    """``dit.mixed`` with both models under bf16 autocast, where training runs in bf16 here."""
    return dit_mixed(cfg, s, "bf16") if trains_in_bf16(cfg) else []


@benchmark("dit.mixed_compiled")
def dit_mixed_compiled(cfg: TesseraConfig, s: DiTBenchSizes = DiTBenchSizes()) -> list[BenchRecord]:
    """``dit.mixed`` in the training precision with both models compiled (dynamic shapes)."""
    precision = training_precision(cfg)
    return _workload_case(
        cfg, s, _mixed_workload(s), precision, ("compiled",), _case_name("dit.mixed", precision)
    )


# --------------------------------------------------------------------------- stage one: the demo corpus's stills and short clips


@dataclass(frozen=True)
class Stage1Sizes:
    """``dit.stage1``: the profile's DiT, token budget and corpus; the first ``packs`` packs of
    the trainer's stream (:class:`~components.steps.train_dit.data.PackStream`) per pass.

    ``model`` / ``workload`` (``(grid, caption tokens)`` per clip) replace the profile's for
    tests.
    """

    profile: str = "demo"
    packs: int = 4
    max_repeats: int = 3
    modes: tuple[str, ...] = ("eager", "compiled")
    model: DiTBenchSizes | None = None
    workload: tuple[tuple[Grid, int], ...] | None = None


TINY_STAGE1 = Stage1Sizes(
    packs=2,
    max_repeats=1,
    modes=("eager",),
    model=dataclasses.replace(TINY, mixed_token_budget=40),
    workload=(
        ((1, 2, 4), 3),
        ((1, 4, 2), 0),
        ((1, 2, 4), 5),
        ((1, 4, 4), 2),
        ((2, 2, 4), 6),
        ((1, 4, 2), 1),
        ((3, 2, 2), 4),
    ),
)


def stage1_model_sizes(cfg: TesseraConfig) -> DiTBenchSizes:
    """Bench sizes of a profile's DiT: its size, patch, latent channels and token budget."""
    from model.dit import dit_config

    tcfg = cfg.train_dit
    dit = dit_config(tcfg.size)
    return DiTBenchSizes(
        hidden_size=dit.hidden_size,
        depth=dit.depth,
        num_heads=dit.num_heads,
        mlp_ratio=dit.mlp_ratio,
        latent_channels=cfg.train_vae.latent_channels,
        text_dim=384,  # MiniLM's width, the embedded text encoder
        patch_size=tuple(tcfg.patch_size),
        mixed_token_budget=tcfg.token_budget,
    )


@benchmark("dit.stage1")
def dit_stage1(cfg: TesseraConfig, st: Stage1Sizes = Stage1Sizes()) -> list[BenchRecord]:
    """Stage-one training at the shapes ``make demo`` trains on (stills of 27-36 tokens, clips
    of 3-9 latent frames, captions of 0-110 tokens), ours vs the peer's best batching, both
    eager and both compiled, in the training precision."""
    from components.core.config import load_config
    from components.steps.train_dit.data import PackStream
    from model.patches import clip_tokens

    profile = load_config(st.profile)
    s = st.model or stage1_model_sizes(profile)
    s = dataclasses.replace(s, max_repeats=st.max_repeats)
    workload = list(st.workload or stage1_workload(st.profile))
    lengths = [clip_tokens((s.latent_channels, *g), s.patch_size) for g, _ in workload]
    stream = PackStream(lengths, s.mixed_token_budget, cfg.seed)
    chosen = [stream.next_pack() for _ in range(st.packs)]
    order: list[int] = []  # clip of each position; a clip the stream repeats is a new clip
    packs = []
    for pack in chosen:
        packs.append(tuple(range(len(order), len(order) + len(pack))))
        order += pack
    work = Workload(
        grids=tuple(workload[i][0] for i in order),
        text_lens=tuple(workload[i][1] for i in order),
        packs=tuple(packs),
    )
    return _workload_case(cfg, s, work, training_precision(cfg), st.modes, "dit.stage1")


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
