"""Train the causal video VAE on the manifest's clips: the ``train_vae`` step.

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

**Training** is :class:`components.core.trainer.Trainer` (gradient clipping, warm-up/cosine, optional
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

import math
import time
from pathlib import Path

from components.core import manifest as mf
from components.core import tracking, trainer
from components.core.config import TesseraConfig
from components.core.runner import StepResult, StepSpec
from components.steps.train_vae.losses import load_lpips
from components.steps.train_vae.worker import LOG_NAME, RESULT_NAME, VAE_DIR

# --------------------------------------------------------------------------- the pipeline step


def check(cfg: TesseraConfig) -> None:
    """Fail before launching processes on what the config alone cannot check."""
    from model.vae import VAE_SIZES

    VAE_SIZES[cfg.train_vae.size]  # raises UnknownSizeError listing the sizes
    if cfg.train_vae.lpips_weights:
        load_lpips(cfg.train_vae.lpips_weights)  # raises a clear error when the file is missing


def run(cfg: TesseraConfig, workdir: Path, manifest: str, checkpoint_dir: str | Path) -> StepResult:
    """Train the VAE on ``manifest`` with DeepSpeed; see the module docstring.

    Args:
        manifest: URI of the versioned manifest Parquet (the version step's ``manifest``).
        checkpoint_dir: where DeepSpeed checkpoints and the log go, outside ``workdir`` so that
            a retried task resumes from them (the runner passes it).

    Returns:
        ``files={"vae": "vae"}`` (``CausalVAE.save_pretrained`` with the latent scale/shift)
        and the run's numbers (``holdout_psnr`` / ``holdout_ssim`` when held-out clips exist).
    """
    lineage = mf.read_lineage(manifest)
    if lineage is not None:
        tracking.log_lineage(lineage)
    started = time.perf_counter()
    result = trainer.run_workers(
        "components.steps.train_vae.worker:worker",
        cfg,
        cfg.train_vae.train,
        Path(workdir),
        Path(checkpoint_dir),
        log_name=LOG_NAME,
        result_name=RESULT_NAME,
        manifest=manifest,
    )
    seconds = time.perf_counter() - started
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
        "checkpoint_dir": str(checkpoint_dir),
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


STEP = StepSpec("train_vae", run, checkpoints=True, check=check)
