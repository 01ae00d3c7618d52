"""VAE case: Tessera's causal 3D VAE vs diffusers' ``AutoencoderKLWan``, in the same run.

Both compress 4x8x8 (time x height x width) to the same latent channels with about the same
parameter count and random weights: ours is ``vae-xs``; the peer is WAN 2.1's VAE layout scaled
down to the same base width, multipliers, residual blocks and latent channels (~2.0 M
parameters each). Both get the same clips in [-1, 1] and decode the same latents.

Per clip size (17x256x256 and 17x288x160, i.e. 9:16): encode and decode frames/s and peak memory.
Ours runs the whole clip at once (its default); the peer always runs causal chunks with a feature
cache (encode: frame 0 then 4 frames at a time; decode: one latent frame at a time). Ours with
``chunk_latent_frames=1`` does the same chunking and is reported in ``extra`` and in the
``*_chunked`` memory records, so memory is also compared like for like.

Peak memory: a fresh subprocess per model (``python -m components.bench.vae``) runs each
call once and reports its peak resident set above the resident set just before the call
(writing ``5`` to ``/proc/self/clear_refs`` resets the kernel's high-water mark VmHWM before each
call; where that is not possible, every call gets its own process and the ``getrusage`` max-RSS
delta). tracemalloc cannot see torch's CPU tensors; RSS counts everything the call touches
(activations, oneDNN scratch, outputs). The subprocess runs with ``MALLOC_MMAP_THRESHOLD_=1MiB``,
so freed tensors go straight back to the OS: with glibc's default dynamic threshold, reused heap
holes made the same chunked encode read anywhere from 240 to 560 MB depending on what ran before
it; with the fixed threshold repeated calls agree within ~10%, alone or after others. Timings
come from the main process (normal allocator), interleaved: every variant once per round.

``extra`` also names the top ops by self CPU time (torch.profiler, one encode and one decode of
the first clip size per model) — what dominates the time.

``vae.train_step`` is ``train_vae``'s demo step for both models: ``micro_batch`` clips of
9x48x48 frames in [-1, 1], encode -> posterior sample -> decode, L1 + KL, backward, fused AdamW,
under bf16 autocast where ``train_vae`` trains in bf16 here. Each model runs eagerly and compiled
(ours: its ``compile_regions``, as the trainer does; the peer: ``torch.compile`` of its whole
step's forward, static shapes), all four interleaved step by step; frames/s and utilisation (FLOPs
by ``FlopCounterMode`` / step time / the calibrated matmul peak in the training precision).
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from components.bench import BenchRecord, benchmark
from components.bench.dit import interleaved_times, load_average, timing_summary
from components.core.config import TesseraConfig

PEER = "diffusers AutoencoderKLWan"
Clip = tuple[int, int, int]  # pixel (frames, height, width)


@dataclass(frozen=True)
class VAEBenchSizes:
    """Sizes of the VAE case (defaults: ``make bench``; :data:`TINY`: tests).

    Attributes:
        ours: a ``model.vae.VAE_SIZES`` name.
        peer: ``AutoencoderKLWan`` keyword arguments (4x8x8 with these multipliers and
            ``temperal_downsample``).
        clips: (label, pixel (frames, height, width)), frames = 1 + 4k, sides multiples of 8.
        warmup_clip: every variant runs once on this small clip before timing.
        max_repeats: cap on ``cfg.bench.repeats`` (each repeat runs every variant once).
        profile: profile one encode + decode of the first clip per model for ``extra``.
        memory: measure peak memory (one subprocess per clip and variant, ~5 s each).
    """

    ours: str = "vae-xs"
    peer: dict[str, Any] = field(
        default_factory=lambda: {
            "base_dim": 16,
            "z_dim": 4,
            "dim_mult": [1, 2, 2, 4],
            "num_res_blocks": 1,
            "temperal_downsample": [False, True, True],
        }
    )
    clips: tuple[tuple[str, Clip], ...] = (
        ("17x256x256", (17, 256, 256)),
        ("17x288x160", (17, 288, 160)),  # 9:16
    )
    warmup_clip: Clip = (5, 64, 64)
    max_repeats: int = 2
    profile: bool = True
    memory: bool = True


TINY = VAEBenchSizes(
    ours="vae-tiny",
    peer={
        "base_dim": 8,
        "z_dim": 4,
        "dim_mult": [1, 1, 2, 2],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
    },
    clips=(("5x32x32", (5, 32, 32)), ("5x48x24", (5, 48, 24))),
    warmup_clip=(1, 16, 16),
    max_repeats=1,
    profile=False,
    memory=False,  # tests measure one subprocess call on its own
)


# --------------------------------------------------------------------------- peak memory of one call, in a fresh process

_CLEAR_REFS = Path("/proc/self/clear_refs")
_MMAP_THRESHOLD = str(1 << 20)  # bytes; see the module docstring


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(f"{key} not in /proc/self/status")


def peak_rss_mb(fn: Callable[[], Any]) -> float:
    """Peak resident MB above the resident set just before ``fn()``, for one call."""
    import resource

    gc.collect()
    try:
        rss_kb = _status_kb("VmRSS")
        _CLEAR_REFS.write_text("5")  # VmHWM := VmRSS
        reset = True
    except (OSError, KeyError):  # no procfs: the process's max RSS so far is the baseline
        rss_kb, reset = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, False
    fn()
    peak_kb = _status_kb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak_kb - rss_kb) / 1024


def _inputs(s: VAEBenchSizes, clip: Clip, seed: int) -> tuple[Any, Any]:
    """The clip (1, 3, T, H, W) in [-1, 1] and a latent (1, Z, t, h, w) of its size."""
    import torch

    from model.vae import VAE_SIZES

    config = VAE_SIZES[s.ours]
    tf, sf = config.temporal_downsample, config.spatial_downsample
    frames, height, width = clip
    gen = torch.Generator().manual_seed(seed)
    video = torch.rand(1, 3, *clip, generator=gen) * 2 - 1
    latent = torch.randn(
        1, config.latent_channels, 1 + (frames - 1) // tf, height // sf, width // sf, generator=gen
    )
    return video, latent


def _variants(ours: Any, peer: Any, video: Any, latent: Any) -> dict[str, Callable[[], Any]]:
    """Encode and decode calls; ``ours`` or ``peer`` may be None (their variants are left out)."""
    fns: dict[str, Callable[[], Any]] = {}
    if ours is not None:
        fns["encode_ours"] = lambda: ours.encode(video).mode()
        fns["encode_ours_chunked"] = lambda: ours.encode(video, chunk_latent_frames=1).mode()
    if peer is not None:
        fns["encode_peer"] = lambda: peer.encode(video).latent_dist.mode()
    if ours is not None:
        fns["decode_ours"] = lambda: ours.decode(latent)
        fns["decode_ours_chunked"] = lambda: ours.decode(latent, chunk_latent_frames=1)
    if peer is not None:
        fns["decode_peer"] = lambda: peer.decode(latent).sample
    return fns


def _child(spec: dict[str, Any]) -> list[float]:
    """Runs in the subprocess: build one model, then measure each (clip, variant) in turn."""
    import torch

    torch.set_num_threads(spec["threads"])
    s = VAEBenchSizes(ours=spec["ours"], peer=spec["peer"])
    ours = build_ours(s) if spec["model"] == "ours" else None
    peer = build_peer(s) if spec["model"] == "peer" else None
    peaks = []
    for clip, variant in spec["calls"]:
        video, latent = _inputs(s, tuple(clip), spec["seed"])
        with torch.inference_mode():
            peaks.append(peak_rss_mb(_variants(ours, peer, video, latent)[variant]))
        del video, latent
    return peaks


def measure_peak_mb(
    s: VAEBenchSizes, calls: list[tuple[Clip, str]], seed: int
) -> dict[tuple[Clip, str], float]:
    """Peak MB of each (clip, variant) call, one subprocess per model (see the module docstring).

    With the mmap threshold fixed, freed tensors leave the process, so calls measured one after
    another in the same subprocess read the same as alone (checked: within 10%). Without
    ``clear_refs`` the high-water mark cannot be reset and every call gets its own process.
    """
    import torch

    try:
        _CLEAR_REFS.write_text("5")
        groups = [[c for c in calls if model in c[1]] for model in ("ours", "peer")]
    except OSError:
        groups = [[c] for c in calls]
    out: dict[tuple[Clip, str], float] = {}
    for group in (g for g in groups if g):
        model = "peer" if "peer" in group[0][1] else "ours"
        spec = {
            "ours": s.ours,
            "peer": s.peer,
            "model": model,
            "seed": seed,
            "calls": [[list(c), v] for c, v in group],
            "threads": torch.get_num_threads(),
        }
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": _MMAP_THRESHOLD}
        done = subprocess.run(
            [sys.executable, "-m", "components.bench.vae", json.dumps(spec)],
            env=env,
            cwd=Path(__file__).resolve().parents[2],
            capture_output=True,
            text=True,
            timeout=1800,
        )
        if done.returncode != 0:
            raise RuntimeError(f"VAE memory subprocess {spec} failed:\n{done.stderr[-2000:]}")
        peaks = json.loads(done.stdout.strip().splitlines()[-1])
        out.update(zip(group, peaks, strict=True))
    return out


# --------------------------------------------------------------------------- the case


def build_ours(s: VAEBenchSizes, latent_channels: int | None = None) -> Any:
    """Our CausalVAE of size ``s.ours`` (``latent_channels`` overriding the size's), random
    weights, eval mode."""
    import torch

    from model.vae import build_vae

    torch.manual_seed(0)
    overrides = {} if latent_channels is None else {"latent_channels": latent_channels}
    return build_vae(s.ours, **overrides).eval()


def build_peer(s: VAEBenchSizes) -> Any:
    """diffusers AutoencoderKLWan with ``s.peer``, random weights, eval mode."""
    import torch
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    z = s.peer["z_dim"]
    return AutoencoderKLWan(**s.peer, latents_mean=[0.0] * z, latents_std=[1.0] * z).eval()


def top_ops(fn: Callable[[], Any], limit: int = 6) -> list[list[Any]]:
    """[op, % of self CPU time] of the ``limit`` most expensive ops of one ``fn()`` call."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    return [[e.key, round(100 * e.self_cpu_time_total / total, 1)] for e in events[:limit]]


@benchmark("vae.codec")
def vae_codec(cfg: TesseraConfig, s: VAEBenchSizes = VAEBenchSizes()) -> list[BenchRecord]:
    import torch

    ours, peer = build_ours(s), build_peer(s)
    if ours.config.latent_channels != s.peer["z_dim"]:
        raise ValueError(
            f"latent channels differ: ours {ours.config.latent_channels}, peer {s.peer['z_dim']}"
        )
    repeats = max(1, min(cfg.bench.repeats, s.max_repeats))
    params = {
        "params_ours": sum(p.numel() for p in ours.parameters()),
        "params_peer": sum(p.numel() for p in peer.parameters()),
        "ours": s.ours,
        "peer_config": s.peer,
        "compression_thw": [ours.temporal_factor, ours.spatial_factor, ours.spatial_factor],
        "memory_method": "peak RSS above pre-call RSS, one fresh subprocess per call, "
        "MALLOC_MMAP_THRESHOLD_=1MiB, VmHWM reset via /proc/self/clear_refs"
        if s.memory
        else "not measured",
    }
    with torch.inference_mode():  # warm-up on a small clip: one-off library initialisation
        for fn in _variants(ours, peer, *_inputs(s, s.warmup_clip, cfg.seed)).values():
            fn()
    calls = [(clip, v) for _, clip in s.clips for v in _variants(ours, peer, None, None)]
    peaks = measure_peak_mb(s, calls, cfg.seed) if s.memory else {}  # 2 subprocesses in all
    records: list[BenchRecord] = []
    for i, (label, clip) in enumerate(s.clips):
        frames = clip[0]
        video, latent = _inputs(s, clip, cfg.seed)
        variants = _variants(ours, peer, video, latent)
        load_before = load_average()
        with torch.inference_mode():  # interleaved: every variant once per round
            seconds = interleaved_times(variants, warmup=0, repeats=repeats)
            profiles = {}
            if s.profile and i == 0:
                for name in ("encode_ours", "encode_peer", "decode_ours", "decode_peer"):
                    profiles[name] = top_ops(variants[name])
        mb = {variant: peak for (c, variant), peak in peaks.items() if c == clip}
        sec = {k: statistics.median(v) for k, v in seconds.items()}
        extra = {
            **params,
            "clip_thw": list(clip),
            "latent_thw": list(latent.shape[2:]),
            "frames_per_s": {k: frames / v for k, v in sec.items()},
            "peak_mb": mb,
            "timing": {k: timing_summary(v) for k, v in seconds.items()},
            "top_ops_self_cpu_pct": profiles,
            "load_average": [load_before, load_average()],
            "torch_threads": torch.get_num_threads(),
        }
        for op in ("encode", "decode"):
            records.append(
                BenchRecord(
                    f"vae.{op}.{label}.frames_per_s",
                    frames / sec[f"{op}_ours"],
                    "frames/s",
                    PEER,
                    frames / sec[f"{op}_peer"],
                    extra=extra,
                )
            )
        for op in ("encode", "decode") if s.memory else ():
            for suffix, key in (("", f"{op}_ours"), ("_chunked", f"{op}_ours_chunked")):
                records.append(
                    BenchRecord(
                        f"vae.{op}.{label}.peak_mb{suffix}",
                        mb[key],
                        "MB",
                        PEER,
                        mb[f"{op}_peer"],
                        higher_is_better=False,
                        extra=extra,
                    )
                )
    return records


# --------------------------------------------------------------------------- training step


@dataclass(frozen=True)
class VAETrainBenchSizes:
    """Sizes of ``vae.train_step`` (defaults: the demo's ``train_vae``; :data:`TINY_TRAIN`: tests).

    Attributes:
        models: ours and the peer (``models.peer["z_dim"]`` latent channels for both).
        micro_batch: clips per step.
        clip: pixel (frames, height, width) of every clip, frames = 1 + 4k, sides multiples of 8.
        repeats: timed steps per variant at least (``cfg.bench.repeats`` if more).
        profile: top ops of one step per model and mode for ``extra``.
    """

    models: VAEBenchSizes = field(
        default_factory=lambda: VAEBenchSizes(peer={**VAEBenchSizes().peer, "z_dim": 8})
    )
    micro_batch: int = 4
    clip: Clip = (9, 48, 48)
    repeats: int = 8
    profile: bool = True


TINY_TRAIN = VAETrainBenchSizes(
    models=TINY, micro_batch=1, clip=(5, 16, 16), repeats=1, profile=False
)


def train_precision(cfg: TesseraConfig) -> str:
    """``bf16`` or ``fp32``: what ``train_vae`` trains in on this machine (``precision: auto``)."""
    from components.core.trainer import precision

    return precision(cfg.train_vae.train)


def _kl(mean: Any, logvar: Any) -> Any:
    """Mean over clips of KL(N(mean, exp(logvar)) || N(0, I)) summed over latents, in fp32."""
    import torch

    mean, logvar = mean.float(), logvar.float().clamp(-30.0, 20.0)  # (B, Z, t, h, w) each
    return 0.5 * (mean.pow(2) + torch.expm1(logvar) - logvar).sum(dim=(1, 2, 3, 4)).mean()


def _ours_forward(model: Any, video: Any) -> tuple[Any, Any, Any]:
    recon, posterior = model(video)  # (B, C, T, H, W), over (B, Z, t, h, w)
    return recon, posterior.mean, posterior.logvar


def _peer_forward(model: Any, video: Any) -> tuple[Any, Any, Any]:
    posterior = model.encode(video).latent_dist  # chunked: frame 0, then 4 frames at a time
    recon = model.decode(posterior.sample()).sample  # (B, C, T, H, W), one latent frame a time
    return recon, posterior.mean, posterior.logvar


def _train_step(
    model: Any, forward: Callable[[Any, Any], Any], video: Any, precision: str
) -> Callable[[], float]:
    """One training step of ``model`` on ``video`` per call: L1 + KL, backward, fused AdamW."""
    import torch

    from components.bench.dit import autocast

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def run() -> float:
        with autocast(precision):
            recon, mean, logvar = forward(model, video)
        loss = (recon.float() - video).abs().mean() + 1e-6 * _kl(mean, logvar)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return run


@benchmark("vae.train_step")
def vae_train_step(
    cfg: TesseraConfig, s: VAETrainBenchSizes = VAETrainBenchSizes()
) -> list[BenchRecord]:
    import copy
    import time

    import torch

    from components.bench.dit import count_flops, matmul_peak
    from components.core.compile import compile_regions, region_report

    precision = train_precision(cfg)
    z = s.models.peer["z_dim"]
    ours, peer = build_ours(s.models, latent_channels=z).train(), build_peer(s.models).train()
    gen = torch.Generator().manual_seed(cfg.seed)
    video = torch.rand(s.micro_batch, 3, *s.clip, generator=gen) * 2 - 1  # (B, C, T, H, W)
    load_before = load_average()
    peak = matmul_peak(cfg, precision)
    # FLOPs in fp32 eager (the same model FLOPs in either precision); also warm-up steps
    flops = {
        "ours": count_flops(_train_step(ours, _ours_forward, video, "fp32"))[0],
        "peer": count_flops(_train_step(peer, _peer_forward, video, "fp32"))[0],
    }
    ours_compiled, peer_compiled = copy.deepcopy(ours), copy.deepcopy(peer)  # same weights
    info = compile_regions(ours_compiled, "on", video.device)  # what the trainer compiles
    steps = {
        "ours_eager": _train_step(ours, _ours_forward, video, precision),
        "peer_eager": _train_step(peer, _peer_forward, video, precision),
        "ours_compiled": _train_step(ours_compiled, _ours_forward, video, precision),
        "peer_compiled": _train_step(
            peer_compiled, torch.compile(_peer_forward, dynamic=False), video, precision
        ),
    }
    first_step_s = {}
    for name, fn in steps.items():  # the compiled variants compile here
        start = time.perf_counter()
        fn()
        first_step_s[name] = time.perf_counter() - start
    repeats = max(s.repeats, cfg.bench.repeats)
    runs = interleaved_times(steps, warmup=cfg.bench.warmup, repeats=repeats)
    peak = max(peak, matmul_peak(cfg, precision))  # best of before/after: least disturbed
    sec = {k: statistics.median(v) for k, v in runs.items()}
    profiles = {name: top_ops(fn) for name, fn in steps.items()} if s.profile else {}
    frames = s.micro_batch * s.clip[0]
    fps = {k: frames / v for k, v in sec.items()}
    util = {k: flops[k.split("_")[0]] / v / 1e9 / peak for k, v in sec.items()}
    extra = {
        "ours": s.models.ours,
        "peer_config": s.models.peer,
        "params_ours": sum(p.numel() for p in ours.parameters()),
        "params_peer": sum(p.numel() for p in peer.parameters()),
        "micro_batch": s.micro_batch,
        "clip_thw": list(s.clip),
        "step": "encode -> posterior sample -> decode, L1 + 1e-6 KL, backward, fused AdamW, "
        + ("CPU bf16 autocast (fp32 weights)" if precision == "bf16" else "fp32"),
        "precision": precision,
        "gflop_per_step": {k: v / 1e9 for k, v in flops.items()},
        "matmul_peak_gflops": peak,
        "frames_per_s": fps,
        "utilisation": util,
        "compile_s": {  # the first step minus a timed step: compiling (warm inductor cache: less)
            k: first_step_s[k] - sec[k] for k in ("ours_compiled", "peer_compiled")
        },
        "first_step_s": first_step_s,
        "compiled_speedup": {m: sec[f"{m}_eager"] / sec[f"{m}_compiled"] for m in ("ours", "peer")},
        "ours_compile": region_report(info),
        "timing": {k: timing_summary(v) for k, v in runs.items()},
        "top_ops_self_cpu_pct": profiles,
        "load_average": [load_before, load_average()],
        "torch_threads": torch.get_num_threads(),
    }
    records = []
    for mode in ("eager", "compiled"):
        ours_key, peer_key = f"ours_{mode}", f"peer_{mode}"
        records += [
            BenchRecord(
                f"vae.train_step.{mode}.frames_per_s",
                fps[ours_key],
                "frames/s",
                PEER,
                fps[peer_key],
                extra=extra,
            ),
            BenchRecord(
                f"vae.train_step.{mode}.utilisation",
                100 * util[ours_key],
                f"% {precision} peak",
                PEER,
                100 * util[peer_key],
                extra=extra,
            ),
        ]
    return records


if __name__ == "__main__":  # the memory subprocess: prints the peak MB of each call, as JSON
    print(json.dumps(_child(json.loads(sys.argv[1]))))
