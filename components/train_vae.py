"""Train the causal video VAE on the manifest's clips (``tessera train-vae``; issue 4).

**Data.** The manifest's ``train`` clips, videos and images mixed, minus every clip whose URI
contains a ``train_vae.holdout`` name. Each sample is a random spatio-temporal crop of
``crop_frames`` x ``crop_size`` from the clip at its native size (nothing is resized to a
square). A clip or image smaller than the crop is cropped to what it has, padded by replication
to the batch shape, and its *valid* size is recorded: the reconstruction losses only see the
valid region, so padding is never learned as content (causality makes an image padded in time
exactly an image to frame 0). A crop is a pure function of ``(seed, global sample position)``,
so a resume sees the same crops as an uninterrupted run.

**Objective.** ``l1_weight * L1 + ssim_weight * (1 - SSIM) + kl_weight * KL`` (+ LPIPS when
``lpips_weights`` names a TorchScript file, + a hinge adversarial term after ``disc_start``
steps when ``disc_weight > 0``). SSIM is the usual 11-tap Gaussian-window SSIM per frame,
averaged over frames. The 3D patch discriminator is a plain torch module with its own AdamW,
outside DeepSpeed: every rank computes its gradients on its own micro-batch, they are averaged
with one ``all_reduce`` per parameter and every rank steps the same update, so the replicas stay
identical without a second engine. Its weights and optimizer are saved in the same checkpoint
directory, before DeepSpeed marks the checkpoint complete.

**Training** is :class:`components.trainer.Trainer` (gradient clipping, warm-up/cosine, optional
EMA, checkpoints every ``checkpoint_every`` steps in a directory outside the step's staging area,
resume with optimizer, scheduler, RNG and data position). Rank 0 logs ``loss``, its terms,
``lr``, ``grad_norm``, ``frames_per_s``, ``samples_per_s`` every ``log_every`` steps and
``val_psnr`` / ``val_ssim`` on fixed centre crops of the first ``val_clips`` val clips every
``eval_every`` steps.

**At the end** (rank 0): the latent scale/shift are computed from ``stats_samples`` training
crops and stored in the VAE config, the model (EMA weights when enabled) is saved to
``workdir/vae/``, held-out real footage is reconstructed at the resolution the encode step uses
(``holdout_psnr`` / ``holdout_ssim``), and side-by-side videos (original | reconstruction |
4 x abs error) go to the MLflow run under ``reconstructions/``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from components import frames as fr
from components import storage
from components.config import TesseraConfig, TrainVAEConfig, from_dict, to_dict
from components.frames import Clip, read_clips
from components.runner import StepResult
from model.vae import CausalVAE, build_vae, compute_latent_stats

STEP = "train_vae"
VAE_DIR = "vae"
RESULT_NAME = "result.json"
HISTORY_NAME = "history.json"
LOG_NAME = "train_vae.log"
RECONSTRUCTIONS = "reconstructions"
DISC_WEIGHTS = "discriminator.safetensors"
DISC_OPTIMIZER = "discriminator_optimizer.pt"
STATS_POSITION = 1 << 40  # crops for the latent statistics use positions no training step reaches

# --------------------------------------------------------------------------- clips


def is_holdout(clip: Clip, names: Sequence[str]) -> bool:
    return any(name and name in clip.uri for name in names)


def select_clips(clips: Sequence[Clip], tv: TrainVAEConfig) -> dict[str, Any]:
    """``train`` / ``val`` / ``holdout`` clips; ``val_source`` says where the val clips came from.

    Validation takes the first ``val_clips`` val-split clips; a manifest without any (tiny
    corpora) falls back to the first training videos, reported as ``val_source = "train"``.
    """
    holdout = [c for c in clips if is_holdout(c, tv.holdout)]
    rest = [c for c in clips if not is_holdout(c, tv.holdout)]
    train = [c for c in rest if c.split == "train"]
    if not train:
        raise ValueError(
            f"no training clips: the manifest has {len(clips)} rows, {len(holdout)} held out "
            f"({list(tv.holdout)}), none of the rest in split 'train'"
        )
    val = [c for c in rest if c.split == "val"][: tv.val_clips]
    source = "val"
    if not val and tv.val_clips > 0:  # videos first: they show more than stills
        val, source = sorted(train, key=lambda c: c.kind != "video")[: tv.val_clips], "train"
    return {"train": train, "val": val, "holdout": holdout, "val_source": source}


# --------------------------------------------------------------------------- data


def balance_kinds(clips: Sequence[Clip], video_share: float) -> list[Clip]:
    """``clips`` with every video repeated as often as needed for videos to make up at least
    ``video_share`` of the list (0: as they come). A corpus rich in cheap stills (which the DiT
    wants) then still trains the VAE's temporal layers on videos most of the time."""
    videos = sum(c.kind == "video" for c in clips)
    images = len(clips) - videos
    if video_share <= 0 or not videos or not images:
        return list(clips)
    repeat = max(1, math.ceil(video_share / (1 - video_share) * images / videos))
    return [c for c in clips for _ in range(repeat if c.kind == "video" else 1)]


class CropDataset(torch.utils.data.Dataset):
    """Random ``crop_frames`` x ``crop_size`` crops of native-size clips, keyed by position.

    Indexing takes ``(position, clip index)`` (see :class:`PositionedSampler`) and returns
    ``video`` (3, crop_frames, crop_h, crop_w) in [-1, 1], replication-padded where the clip is
    smaller than the crop, and ``valid`` (3,) = the real (frames, height, width) at the front.
    Decoded clips are cached per process up to ``cache_mb``.
    """

    def __init__(
        self,
        clips: Sequence[Clip],
        crop_frames: int,
        crop_size: tuple[int, int],
        seed: int,
        cache_mb: int = 0,
    ):
        if not clips:
            raise ValueError("CropDataset needs at least one clip")
        self.clips = list(clips)
        self.crop_frames = crop_frames
        self.crop_h, self.crop_w = crop_size
        self.seed = seed
        self.cache_budget = cache_mb * 2**20
        self._cache: dict[str, np.ndarray] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.clips)

    def _frames(self, index: int, start: int, count: int) -> np.ndarray:
        """(n <= count, H, W, 3) uint8 frames from ``start`` (the whole clip cached if it fits)."""
        clip = self.clips[index]
        if clip.uri in self._cache:  # by URI: balance_kinds repeats clips
            return self._cache[clip.uri][start : start + count]
        size = clip.num_frames * clip.width * clip.height * 3
        if self._cached_bytes + size <= self.cache_budget:
            whole = fr.read_frames(clip.uri, rotation=clip.rotation)
            self._cache[clip.uri] = whole
            self._cached_bytes += whole.nbytes
            return whole[start : start + count] if start < len(whole) else whole[-count:]
        try:
            return fr.read_frames(clip.uri, start=start, count=count, rotation=clip.rotation)
        except ValueError:  # the header over-counted frames: take the clip's first ones
            return fr.read_frames(clip.uri, count=count, rotation=clip.rotation)

    def crop(self, position: int, index: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + position)

        def randint(high: int) -> int:  # uniform in [0, high]
            return int(torch.randint(0, high + 1, (1,), generator=gen))

        clip = self.clips[index]
        n = min(self.crop_frames, clip.num_frames)
        frames = self._frames(index, randint(clip.num_frames - n), n)  # (t, H, W, 3)
        t, height, width = frames.shape[:3]
        h, w = min(self.crop_h, height), min(self.crop_w, width)
        top, left = randint(height - h), randint(width - w)
        video = fr.to_video(frames[:, top : top + h, left : left + w])  # (3, t, h, w)
        pad = (0, self.crop_w - w, 0, self.crop_h - h, 0, self.crop_frames - t)
        video = F.pad(video[None], pad, mode="replicate")[0]  # (3, crop_frames, crop_h, crop_w)
        return {
            "video": video,
            "valid": torch.tensor([t, h, w]),
            "position": torch.tensor(position),
        }

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        position, index = key
        return self.crop(position, index)


class PositionedSampler(torch.utils.data.Sampler):
    """Yields ``(global position, clip index)`` from a :class:`ResumableSampler` stream."""

    def __init__(self, base: Any):
        self.base = base

    def __iter__(self) -> Iterator[tuple[int, int]]:
        first, stride = self.base.start + self.base.rank, self.base.world_size
        for k, index in enumerate(self.base):
            yield first + k * stride, index

    def __len__(self) -> int:
        return len(self.base)


def center_clip(
    clip: Clip, frames: int, crop_size: tuple[int, int], temporal_factor: int
) -> torch.Tensor:
    """The fixed validation view of a clip: its first ``1 + tf*k <= frames`` frames, centre crop
    of ``crop_size`` (or less where the clip is smaller) -> (3, T, h, w)."""
    count = fr.usable_frames(clip.num_frames, frames, temporal_factor)
    pixels = fr.read_frames(clip.uri, count=count, rotation=clip.rotation)
    h, w = min(crop_size[0], pixels.shape[1]), min(crop_size[1], pixels.shape[2])
    return fr.to_video(fr.center_crop(pixels, h, w))


# --------------------------------------------------------------------------- losses and metrics


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    g = torch.exp(-x.pow(2) / (2 * sigma**2))
    return g / g.sum()  # (size,)


def ssim(x: torch.Tensor, y: torch.Tensor, window: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """SSIM of each video, per frame with a Gaussian window, averaged over frames -> (B,).

    x, y: (B, C, T, H, W) in [-1, 1] (data range 2). Frames smaller than the window use the
    largest odd window that fits.
    """
    b, c = x.shape[:2]
    size = min(window, x.shape[-2], x.shape[-1])
    size -= 1 - size % 2
    g = _gaussian(size, sigma).to(x)
    kernel_h = g.view(1, 1, size, 1).expand(c, 1, size, 1)
    kernel_w = g.view(1, 1, 1, size).expand(c, 1, 1, size)

    def blur(z: torch.Tensor) -> torch.Tensor:  # (N, C, H, W) -> (N, C, H - size + 1, W - size + 1)
        return F.conv2d(F.conv2d(z, kernel_h, groups=c), kernel_w, groups=c)

    x = rearrange(x.float(), "b c t h w -> (b t) c h w")
    y = rearrange(y.float(), "b c t h w -> (b t) c h w")
    c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
    # fp32 even under autocast: the variances are differences of near-equal blurs, which bf16
    # convolutions round to <= -c2 (SSIM inf, then NaN gradients)
    with torch.autocast(x.device.type, enabled=False):
        mx, my = blur(x), blur(y)
        vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    ssim_map = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    per_frame = ssim_map.mean(dim=(1, 2, 3))  # (B * T,)
    return rearrange(per_frame, "(b t) -> b t", b=b).mean(dim=1)  # (B,)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of each video (B, C, T, H, W) in [-1, 1], on the [0, 1] scale -> (B,)."""
    mse = (x.float() - y.float()).pow(2).mean(dim=(1, 2, 3, 4)) / 4  # (B,)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-10))


class PatchDiscriminator3D(nn.Module):
    """3D PatchGAN: video (B, 3, T, H, W) -> real/fake logits (B, 1, T, H/8, W/8).

    Strided in space only, so a single frame (an image) is a valid input.
    """

    def __init__(self, in_channels: int = 3, channels: int = 32, levels: int = 3):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv3d(in_channels, channels, (3, 4, 4), stride=(1, 2, 2), padding=1),
            nn.LeakyReLU(0.2),
        ]
        c = channels
        for _ in range(levels - 1):
            layers += [
                nn.Conv3d(c, 2 * c, (3, 4, 4), stride=(1, 2, 2), padding=1),
                nn.GroupNorm(math.gcd(8, 2 * c), 2 * c),
                nn.LeakyReLU(0.2),
            ]
            c *= 2
        layers.append(nn.Conv3d(c, 1, 3, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        return self.net(video)  # (B, 1, T, H / 2^levels, W / 2^levels)


def load_lpips(path: str) -> torch.jit.ScriptModule:
    """A TorchScript perceptual distance ``f(x, y)``: (N, 3, H, W) pairs in [-1, 1] -> distances.

    Export one from the ``lpips`` package with ``torch.jit.trace`` (nothing is downloaded here).
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"train_vae.lpips_weights={path!r} does not exist. Point it at a TorchScript LPIPS "
            "module (torch.jit.trace of lpips.LPIPS(net='vgg') on two (N, 3, H, W) inputs in "
            "[-1, 1]), or set train_vae.lpips_weights='' to train without the LPIPS term"
        )
    module = torch.jit.load(str(file), map_location="cpu").eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def reconstruction_losses(
    x: torch.Tensor, recon: torch.Tensor, valid: torch.Tensor, perceptual: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """Mean L1, SSIM and (optionally) LPIPS over the valid region of each sample.

    x, recon: (B, C, T, H, W); valid: (B, 3) real (frames, height, width) at the front.
    """
    l1, sim, lp = [], [], []
    for b, (t, h, w) in enumerate(valid.tolist()):
        xb, rb = x[b : b + 1, :, :t, :h, :w], recon[b : b + 1, :, :t, :h, :w]  # (1, C, t, h, w)
        l1.append((xb - rb).abs().mean())
        sim.append(ssim(xb, rb)[0])
        if perceptual is not None:
            flat = "b c t h w -> (b t) c h w"
            lp.append(perceptual(rearrange(xb, flat), rearrange(rb, flat)).mean())
    out = {"l1": torch.stack(l1).mean(), "ssim": torch.stack(sim).mean()}
    if perceptual is not None:
        out["lpips"] = torch.stack(lp).mean()
    return out


@torch.no_grad()
def reconstruct(
    vae: CausalVAE, video: torch.Tensor, chunk_latent_frames: int | None = None
) -> torch.Tensor:
    """Posterior-mode reconstruction of one video (3, T, H, W), any size -> same shape."""
    param = next(vae.parameters())  # a bf16 DeepSpeed engine holds bf16 weights
    posterior, meta = vae.encode_video(
        video[None].to(param.device, param.dtype), chunk_latent_frames=chunk_latent_frames
    )
    recon = vae.decode_video(posterior.mode(), meta, chunk_latent_frames=chunk_latent_frames)
    return recon[0].float().cpu()


def score(videos: Sequence[torch.Tensor], recons: Sequence[torch.Tensor]) -> tuple[float, float]:
    """Mean (PSNR, SSIM) over clips; NaN when there are none."""
    if not videos:
        return math.nan, math.nan
    p = [psnr(v[None], r[None]).item() for v, r in zip(videos, recons, strict=True)]
    s = [ssim(v[None], r[None]).item() for v, r in zip(videos, recons, strict=True)]
    return float(np.mean(p)), float(np.mean(s))


# --------------------------------------------------------------------------- the worker


def build_model(tv: TrainVAEConfig) -> CausalVAE:
    return build_vae(
        tv.size,
        latent_channels=tv.latent_channels,
        temporal_downsample=tv.temporal_downsample,
        spatial_downsample=tv.spatial_downsample,
    )


class _Meter:
    """Sums of loss terms over steps since the last flush, averaged over every rank."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.steps = 0

    def add(self, terms: dict[str, float]) -> None:
        for k, v in terms.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.steps += 1

    def flush(self) -> dict[str, float]:
        import torch.distributed as dist

        keys = sorted(self.sums)
        totals = torch.tensor(
            [self.sums[k] for k in keys] + [float(self.steps)], dtype=torch.float64
        )
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(totals)
        count = max(totals[-1].item(), 1.0)
        self.sums, self.steps = {}, 0
        return {k: totals[i].item() / count for i, k in enumerate(keys)}


def _sync_grads(module: nn.Module) -> None:
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    world = dist.get_world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad.div_(world)


def worker(payload: dict[str, Any]) -> None:
    """One DeepSpeed process of VAE training; payload from :func:`build_payload`."""
    from components import trainer as tr

    cfg = from_dict(TesseraConfig, payload["cfg"])
    tv, train = cfg.train_vae, cfg.train_vae.train
    out_dir = Path(payload["out_dir"])
    torch.manual_seed(cfg.seed)
    vae = build_model(tv)
    disc = PatchDiscriminator3D(channels=tv.disc_channels) if tv.disc_weight > 0 else None
    perceptual = load_lpips(tv.lpips_weights) if tv.lpips_weights else None
    trainer = tr.Trainer(vae, train, Path(payload["checkpoint_dir"]), payload.get("mlflow_run_id"))
    device, rank0 = trainer.device, trainer.rank == 0
    disc_opt = None
    if disc is not None:
        disc.to(device)
        disc_opt = torch.optim.AdamW(
            disc.parameters(), lr=train.lr, betas=(0.5, 0.9), weight_decay=0.0
        )
    if perceptual is not None:
        perceptual.to(device)
    client_state = trainer.resume() or {}
    if client_state and disc is not None:
        _load_disc(trainer.checkpoints()[-1], disc, disc_opt, device)

    clips = select_clips(read_clips(payload["manifest"]), tv)
    dataset = CropDataset(
        balance_kinds(clips["train"], tv.video_share),
        tv.crop_frames,
        tv.crop_size,
        cfg.seed,
        tv.cache_mb,
    )
    sampler = PositionedSampler(
        tr.ResumableSampler(
            len(dataset),
            seed=cfg.seed,
            rank=trainer.rank,
            world_size=trainer.world_size,
            start=trainer.state.samples,
        )
    )
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=train.micro_batch, sampler=sampler, num_workers=train.num_workers
    )
    tf = vae.temporal_factor
    val_views = (
        [center_clip(c, tv.crop_frames, tv.crop_size, tf) for c in clips["val"]] if rank0 else []
    )

    stop_at = min(int(payload.get("stop_at") or train.steps), train.steps)
    log_every, eval_every = max(1, train.log_every), max(1, tv.eval_every)
    meter, history = _Meter(), []
    initial_loss = client_state.get("initial_loss")
    last: dict[str, float] = client_state.get("last") or {}
    window_start, window_steps, train_time = time.perf_counter(), 0, 0.0
    batches = iter(loader)
    saved_at = trainer.state.step if client_state else -1
    while trainer.state.step < stop_at:
        batch = next(batches)
        x, valid = batch["video"].to(device), batch["valid"]
        with tr.maybe_autocast(train):  # the networks; losses in fp32 (bf16 SSIM went inf)
            recon, posterior = trainer.engine(x)
        terms = reconstruction_losses(x, recon.float(), valid, perceptual)
        kl = posterior.kl().mean()
        loss = tv.l1_weight * terms["l1"] + tv.ssim_weight * (1 - terms["ssim"]) + tv.kl_weight * kl
        if perceptual is not None:
            loss = loss + tv.lpips_weight * terms["lpips"]
        adversarial = disc is not None and trainer.state.step >= tv.disc_start
        if adversarial:
            disc.requires_grad_(False)
            with tr.maybe_autocast(train):
                g_adv = -disc(recon).float().mean()  # hinge generator loss
            disc.requires_grad_(True)
            loss = loss + tv.disc_weight * g_adv
        stepped = trainer.backward_step(loss)
        record = {"loss": loss.item(), "kl": kl.item(), **{k: v.item() for k, v in terms.items()}}
        if adversarial:
            with tr.maybe_autocast(train):
                real, fake = disc(x).float(), disc(recon.detach()).float()
            d_loss = F.relu(1 - real).mean() + F.relu(1 + fake).mean()
            disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            _sync_grads(disc)
            disc_opt.step()
            record.update(g_adv=g_adv.item(), d_loss=d_loss.item())
        if not stepped:
            continue
        step = trainer.state.step
        meter.add(record)
        window_steps += 1
        history.append({"step": step, **record, "positions": batch["position"].tolist()})
        if step % log_every == 0 or step == stop_at:
            elapsed = time.perf_counter() - window_start
            train_time += elapsed
            last = meter.flush()
            if initial_loss is None:
                initial_loss = last["loss"]
            samples = window_steps * trainer.global_batch
            last.update(
                lr=trainer.lr(),
                grad_norm=trainer.grad_norm(),
                samples_per_s=samples / elapsed,
                frames_per_s=samples * tv.crop_frames / elapsed,
                step_time_s=elapsed / window_steps,
            )
            trainer.log({f"train/{k}" if k in record else k: v for k, v in last.items()})
            if rank0:
                print(
                    f"train_vae: step {step}/{train.steps} loss {last['loss']:.4f} "
                    f"(l1 {last['l1']:.4f}, ssim {last['ssim']:.3f}) "
                    f"{last['frames_per_s']:.1f} frames/s",
                    flush=True,
                )
            window_start, window_steps = time.perf_counter(), 0
        paused = time.perf_counter()  # evaluation and checkpoints are not training throughput
        if rank0 and val_views and (step % eval_every == 0 or step == train.steps):
            trainer.model.eval()
            recons = [reconstruct(trainer.model, v) for v in val_views]
            trainer.model.train()
            val_psnr, val_ssim = score(val_views, recons)
            trainer.log({"val_psnr": val_psnr, "val_ssim": val_ssim})
        if step % train.checkpoint_every == 0 or step == stop_at:
            _save(trainer, disc, disc_opt, {"initial_loss": initial_loss, "last": last})
            saved_at = step
        window_start += time.perf_counter() - paused
    if saved_at != trainer.state.step:  # nothing ran since the last checkpoint
        _save(trainer, disc, disc_opt, {"initial_loss": initial_loss, "last": last})
    if rank0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / HISTORY_NAME).write_text(json.dumps(history))
    if trainer.state.step < train.steps or not rank0:
        return  # stopped early on purpose (stop_at), or not the rank that writes outputs
    final = {
        "initial_loss": initial_loss,
        "final_loss": last.get("loss"),
        "frames_per_s": last.get("frames_per_s"),
        "samples_per_s": last.get("samples_per_s"),
        "step_time_s": last.get("step_time_s"),
        "loop_seconds": train_time,
        "precision": tr.precision(train),
    }
    _finish(cfg, payload, trainer, clips, val_views, dataset, final)


def _save(trainer: Any, disc: nn.Module | None, disc_opt: Any, extra: dict[str, Any]) -> None:
    if disc is not None and trainer.rank == 0:
        from safetensors.torch import save_file

        path = trainer.checkpoint_dir / f"step-{trainer.state.step:07d}"
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in disc.state_dict().items()}
        save_file(state, str(path / DISC_WEIGHTS))
        torch.save(disc_opt.state_dict(), path / DISC_OPTIMIZER)
    trainer.save_checkpoint(extra)


def _load_disc(path: Path, disc: nn.Module, disc_opt: Any, device: torch.device) -> None:
    from safetensors.torch import load_file

    if not (path / DISC_WEIGHTS).exists():  # the discriminator was off when this was saved
        return
    disc.load_state_dict(load_file(str(path / DISC_WEIGHTS), device=str(device)))
    disc_opt.load_state_dict(
        torch.load(path / DISC_OPTIMIZER, map_location=device, weights_only=True)
    )


def _finish(
    cfg: TesseraConfig,
    payload: dict[str, Any],
    trainer: Any,
    clips: dict[str, Any],
    val_views: list[torch.Tensor],
    dataset: CropDataset,
    final: dict[str, Any],
) -> None:
    """Rank 0 after the last step: latent stats, save, held-out metrics, reconstruction videos."""
    from components import trainer as tr

    tv, out_dir = cfg.train_vae, Path(payload["out_dir"])
    vae = CausalVAE(trainer.model.config)
    vae.load_state_dict(trainer.export_state_dict(use_ema=True))
    vae.to(trainer.device).eval()
    chunk = cfg.encode.chunk_latent_frames or None

    # Latent statistics over training crops (their valid regions), then save.
    stream = tr.ResumableSampler(len(dataset), seed=cfg.seed + 1)
    crops = [
        dataset.crop(STATS_POSITION + k, i)
        for k, i in zip(range(max(1, tv.stats_samples)), stream, strict=False)
    ]
    valid = (c["video"][:, :t, :h, :w] for c in crops for t, h, w in [c["valid"].tolist()])
    with tr.maybe_autocast(tv.train):
        shift, scale = compute_latent_stats(vae, (v[None].to(trainer.device) for v in valid))
    vae.set_latent_stats(shift, scale)
    vae.save_pretrained(out_dir / VAE_DIR)

    # Validation and held-out reconstructions, with side-by-side videos.
    recon_dir = out_dir / RECONSTRUCTIONS
    videos: list[Path] = []
    val_recons = [reconstruct(vae, v, chunk) for v in val_views]
    val_psnr, val_ssim = score(val_views, val_recons)
    for clip, video, recon in zip(clips["val"], val_views, val_recons, strict=True):
        videos.append(
            fr.write_comparison(recon_dir / f"val_{clip.name}.mp4", video, recon, clip.fps)
        )
    held: dict[str, dict[str, float]] = {}
    tf, s = vae.temporal_factor, vae.spatial_factor
    for clip in clips["holdout"]:
        video = fr.encode_pixels(clip, cfg.encode, s, tf)
        recon = reconstruct(vae, video, chunk)
        p, q = score([video], [recon])
        held[clip.name] = {
            "psnr": p,
            "ssim": q,
            "frames": video.shape[1],
            "height": video.shape[2],
            "width": video.shape[3],
        }
        videos.append(
            fr.write_comparison(recon_dir / f"holdout_{clip.name}.mp4", video, recon, clip.fps)
        )
    if not clips["holdout"]:
        print(
            f"train_vae: no held-out clips matching {list(tv.holdout)} in the manifest; "
            "holdout_psnr / holdout_ssim are not reported"
        )

    metrics = {
        "val_psnr": val_psnr,
        "val_ssim": val_ssim,
        "latent_shift": shift,
        "latent_scale": scale,
    }
    if held:
        metrics["holdout_psnr"] = float(np.mean([v["psnr"] for v in held.values()]))
        metrics["holdout_ssim"] = float(np.mean([v["ssim"] for v in held.values()]))
    trainer.log(metrics)
    run_id = payload.get("mlflow_run_id")
    if run_id:
        import mlflow

        from components import tracking

        tracking.setup()
        client = mlflow.MlflowClient()
        for path in videos:
            client.log_artifact(run_id, str(path), RECONSTRUCTIONS)
    result = {
        **final,
        **metrics,
        "steps": trainer.state.step,
        "holdout": held,
        "val_source": clips["val_source"],
        "val_clips": [c.name for c in clips["val"]],
        "train_clips": len(clips["train"]),
        "parameters": vae.num_parameters(),
        "reconstructions": [p.relative_to(out_dir).as_posix() for p in videos],
    }
    (out_dir / RESULT_NAME).write_text(json.dumps(result, indent=2, default=_json_number))


def _json_number(value: Any) -> Any:
    return float(value) if isinstance(value, (np.floating, torch.Tensor)) else str(value)


# --------------------------------------------------------------------------- the pipeline step


def build_payload(
    cfg: TesseraConfig,
    manifest: str,
    out_dir: Path,
    checkpoint_dir: Path,
    *,
    mlflow_run_id: str | None = None,
    stop_at: int | None = None,
) -> dict[str, Any]:
    """What :func:`worker` reads (JSON). ``stop_at``: stop after that step with a checkpoint,
    as a pre-empted run would, without writing the model. The precision is resolved
    (:func:`components.trainer.resolve_precision`)."""
    from components.trainer import resolve_precision

    return {
        "cfg": to_dict(resolve_precision(cfg)),
        "manifest": str(manifest),
        "out_dir": str(out_dir),
        "checkpoint_dir": str(checkpoint_dir),
        "mlflow_run_id": mlflow_run_id,
        "stop_at": stop_at,
    }


def check_config(tv: TrainVAEConfig) -> None:
    """Fail before launching processes on settings the worker would trip over."""
    tf = tv.temporal_downsample
    if tv.crop_frames < 1 or (tv.crop_frames - 1) % tf:
        raise ValueError(
            f"train_vae.crop_frames={tv.crop_frames} must be 1 + {tf}k "
            f"(temporal_downsample={tf}), e.g. {1 + tf * max(1, tv.crop_frames // tf)}"
        )
    if min(tv.crop_size) < 1:
        raise ValueError(f"train_vae.crop_size={list(tv.crop_size)} must be positive")
    if tv.train.zero_stage == 3:
        raise ValueError(
            "train_vae.train.zero_stage=3 is not supported: evaluation and export "
            "read the whole VAE on rank 0; use stage 0-2 (the VAE is small)"
        )
    if tv.lpips_weights:
        load_lpips(tv.lpips_weights)  # raises a clear error when the file is missing


def load_vae(uri: str, device: str | torch.device = "cpu") -> CausalVAE:
    """A :class:`CausalVAE` from a VAE directory URI (or a train_vae output holding ``vae/``)."""
    names = ("config.json", "model.safetensors")
    for candidate in (uri, storage.join(uri, VAE_DIR)):
        if not storage.exists(storage.join(candidate, names[0])):
            continue
        if not storage.is_s3(candidate):
            return CausalVAE.from_pretrained(storage.local_path(candidate), device=device)
        with tempfile.TemporaryDirectory(prefix="tessera-vae-") as tmp:
            for name in names:
                storage.download_file(storage.join(candidate, name), Path(tmp) / name)
            return CausalVAE.from_pretrained(tmp, device=device)
    raise FileNotFoundError(
        f"no VAE (config.json + model.safetensors) in {uri} or {uri}/vae; "
        "pass the train_vae step's 'vae' output"
    )


def run(cfg: TesseraConfig, workdir: Path, manifest: str, checkpoint_dir: str | Path) -> StepResult:
    """Train the VAE on ``manifest`` with DeepSpeed; see the module docstring.

    Args:
        manifest: URI of the (validated) manifest Parquet.
        checkpoint_dir: where DeepSpeed checkpoints go, outside ``workdir`` so that a retried
            task resumes from them (:func:`components.runner.checkpoint_dir`).

    Returns:
        ``files={"vae": "vae"}`` (``CausalVAE.save_pretrained`` with the latent scale/shift)
        and the run's numbers (``holdout_psnr`` / ``holdout_ssim`` when held-out clips exist).
    """
    import mlflow

    workdir = Path(workdir)
    tv = cfg.train_vae
    check_config(tv)
    active = mlflow.active_run()
    ckpt = Path(checkpoint_dir)
    payload = build_payload(
        cfg, manifest, workdir, ckpt, mlflow_run_id=active.info.run_id if active else None
    )
    from components.trainer import launch

    started = time.perf_counter()
    log_path = ckpt / LOG_NAME  # beside the checkpoints: survives a failed attempt
    launch("components.train_vae:worker", payload, tv.train.num_processes, log_path)
    seconds = time.perf_counter() - started
    shutil.copyfile(log_path, workdir / LOG_NAME)
    result = json.loads((workdir / RESULT_NAME).read_text())
    keys = (
        "final_loss",
        "initial_loss",
        "val_psnr",
        "val_ssim",
        "holdout_psnr",
        "holdout_ssim",
        "latent_shift",
        "latent_scale",
        "frames_per_s",
        "samples_per_s",
        "step_time_s",
    )
    numbers = {
        k: float(result[k])
        for k in keys
        if result.get(k) is not None and math.isfinite(float(result[k]))
    }
    numbers["train_seconds"] = seconds
    # The worker logged the rest at their training step; these are new to the MLflow run.
    metrics = {
        k: numbers[k] for k in ("initial_loss", "final_loss", "train_seconds") if k in numbers
    }
    values = {
        **numbers,
        "steps": result["steps"],
        "holdout": result["holdout"],
        "val_source": result["val_source"],
        "parameters": result["parameters"],
        "precision": result["precision"],
        "checkpoint_dir": str(ckpt),
        "reconstructions": result["reconstructions"],
    }
    print(
        f"train_vae: {result['steps']} steps in {seconds:.0f}s ({result['precision']}), loss "
        f"{result.get('initial_loss') or math.nan:.4f} -> {result.get('final_loss') or math.nan:.4f}, "
        f"val PSNR {result['val_psnr']:.2f} dB, holdout PSNR "
        f"{result.get('holdout_psnr', math.nan):.2f} dB; scale {result['latent_scale']:.4f}, "
        f"shift {result['latent_shift']:.4f}"
    )
    return StepResult(
        files={"vae": VAE_DIR}, values=values, metrics=metrics, artifacts=[LOG_NAME, RESULT_NAME]
    )
