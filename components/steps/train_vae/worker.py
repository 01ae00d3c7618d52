"""One DeepSpeed process of VAE training (``run_workers`` launches it), then rank 0's finish:
latent statistics, the saved model, held-out scores and reconstruction videos."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from components.core import media, tracking
from components.core import trainer as tr
from components.core.compile import compile_regions, region_report
from components.core.config import TesseraConfig, TrainVAEConfig, from_dict
from components.core.manifest import read_clips
from components.steps.train_vae.data import (
    CropDataset,
    center_clip,
    select_clips,
)
from components.steps.train_vae.losses import (
    PatchDiscriminator3D,
    load_lpips,
    reconstruct,
    reconstruction_losses,
)
from evaluation.reconstruction import mean_psnr_ssim
from model.vae import CausalVAE, build_vae, compute_latent_stats

VAE_DIR = "vae"
RESULT_NAME = "result.json"
HISTORY_NAME = "history.json"
LOG_NAME = "train_vae.log"
RECONSTRUCTIONS = "reconstructions"
DISC_WEIGHTS = "discriminator.safetensors"
DISC_OPTIMIZER = "discriminator_optimizer.pt"
STATS_POSITION = 1 << 40  # crops for the latent statistics use positions no training step reaches

log = logging.getLogger(__name__)

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
    cfg = from_dict(TesseraConfig, payload["cfg"])
    tv, train = cfg.train_vae, cfg.train_vae.train
    out_dir = Path(payload["out_dir"])
    torch.manual_seed(cfg.seed)
    vae = build_model(tv)
    disc = PatchDiscriminator3D(channels=tv.disc_channels) if tv.disc_weight > 0 else None
    perceptual = load_lpips(tv.lpips_weights) if tv.lpips_weights else None
    trainer = tr.Trainer(vae, train, Path(payload["checkpoint_dir"]), payload.get("mlflow_run_id"))
    device, rank0 = trainer.device, trainer.rank == 0
    compiled = compile_regions(trainer.model, train.compile, device)  # encoder, decoder
    log.info("compile: %s", compiled["reason"])
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
        tr.balance_kinds(clips["train"], tv.video_share, lambda c: c.kind),
        tv.crop_frames,
        tv.crop_size,
        cfg.seed,
        tv.cache_mb,
    )
    sampler = tr.PositionedSampler(
        tr.ResumableSampler(
            len(dataset),
            seed=cfg.seed,
            rank=trainer.rank,
            world_size=trainer.world_size,
            start=trainer.state.samples,
        )
    )
    loader = tr.data_loader(dataset, sampler, train.micro_batch, train.num_workers, cfg.seed)
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
            val_psnr, val_ssim = mean_psnr_ssim(val_views, recons)
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
        "compile": region_report(compiled),
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
    val_psnr, val_ssim = mean_psnr_ssim(val_views, val_recons)
    for clip, video, recon in zip(clips["val"], val_views, val_recons, strict=True):
        videos.append(
            media.write_comparison(recon_dir / f"val_{clip.name}.mp4", video, recon, clip.fps)
        )
    held: dict[str, dict[str, float]] = {}
    tf, s = vae.temporal_factor, vae.spatial_factor
    for clip in clips["holdout"]:
        video = media.encode_pixels(clip, cfg.encode, s, tf)
        recon = reconstruct(vae, video, chunk)
        p, q = mean_psnr_ssim([video], [recon])
        held[clip.name] = {
            "psnr": p,
            "ssim": q,
            "frames": video.shape[1],
            "height": video.shape[2],
            "width": video.shape[3],
        }
        videos.append(
            media.write_comparison(recon_dir / f"holdout_{clip.name}.mp4", video, recon, clip.fps)
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
    Path(payload["result"]).write_text(json.dumps(result, indent=2, default=_json_number))


def _json_number(value: Any) -> Any:
    return float(value) if isinstance(value, (np.floating, torch.Tensor)) else str(value)
