"""Train the text-to-video DiT on latent shards: the ``train_dit`` step.

**Input** is the encode step's output ``latents`` (the format of :mod:`components.core.latents`):
normalised latents per clip, the caption's text states for captioned clips and the short
caption's where a clip has one: a ``train_dit.short_caption_rate`` share of training clips is
conditioned on it instead (validation always uses the long caption). A clip without text trains with the null
condition (all-False mask), exactly what classifier-free guidance samples with.

**Data** is held in memory by every training process: at the demo and small profiles a clip is
at most ~17 x 32 x 32 x 8 floats (~0.5 MB) and the corpus a few hundred MB at most. A corpus that
does not fit would stream shards per epoch in the clip order below (not needed yet).

**Batches** are *patch n' pack* token sequences (NaViT): images and videos of every size are
patchified at their native size and packed greedily, in the clip order of a
:class:`~components.core.trainer.ResumableSampler`, until the next clip would exceed
``train_dit.token_budget`` (optionally after NaViT token dropping, ``drop_rate``). That gives one
deterministic *global pack sequence*; the data position is the number of clips consumed.

**Distribution.** A step consumes ``G = micro_batch * grad_accum * num_processes`` consecutive
packs; rank ``r`` of ``w`` takes packs ``r, r + w, ...`` of them, ``micro_batch`` per forward, and
every pack draws its timesteps, noise, text dropout and token drop from a generator seeded by its
global index. The step's gradient is therefore the mean over the same ``G`` packs whatever the
split: 2 gloo processes x 1 pack equal 1 process x ``grad_accum = 2`` up to float rounding.

**Objective**: :meth:`model.diffusion.FlowMatching.training_loss` — logit-normal timesteps with
the resolution-aware shift, per-token loss averaged per clip, text dropout for CFG.

**Logging** (rank 0 → the step's MLflow run): ``loss`` and ``loss_t*`` by timestep bucket,
``tokens_per_s`` (real tokens), ``mfu`` (model FLOPs of the step from
:func:`model.flops.train_flops` / step time / measured matmul peak of this machine —
in the training precision, not a datasheet number), ``lr``, ``grad_norm``, and ``val_loss``: a
deterministic loss on fixed held-out clips with fixed timesteps and noise.

**Outputs**: DeepSpeed checkpoints (with data position and loss history) in a directory outside
the step's staging area, so a retried task resumes; ``dit/`` (``DiT.save_pretrained``, EMA weights
when enabled, + ``flow.json``) for the registry and the generator; samples at several aspect
ratios when the VAE is given.
"""

from __future__ import annotations

import contextlib
import math
import shutil
from pathlib import Path
from typing import Any

from components.core import artifacts, tracking, trainer
from components.core.config import TesseraConfig
from components.core.latents import index_lineage
from components.core.runner import StepResult, StepSpec
from components.steps.train_dit.worker import SUMMARY_NAME

LOG_NAME = "train_dit.log"

# --------------------------------------------------------------------------- the pipeline step


def run(
    cfg: TesseraConfig,
    workdir: Path,
    latents: str,
    checkpoint_dir: str | Path,
    vae: str | None = None,
) -> StepResult:
    """Train the DiT on ``latents`` (the encode output) with DeepSpeed; see the module docstring.

    Args:
        latents: directory / URI with ``index.parquet`` and the safetensors shards.
        checkpoint_dir: where DeepSpeed checkpoints and the log go, outside ``workdir`` so that
            a retried task resumes from them (the runner passes it).
        vae: the train_vae output (a VAE directory); enables samples every
            ``train_dit.sample_every`` steps and at the end. Without it no samples are made.

    Returns:
        ``files={"dit": "dit"}`` (DiT.save_pretrained + flow.json) and the run's numbers; with a
        VAE also ``vae`` (its copy) and ``model`` (the step directory: what ``tessera generate
        --model`` takes).
    """
    workdir, ckpt = Path(workdir), Path(checkpoint_dir)
    lineage = index_lineage(latents)
    if lineage is not None:
        tracking.log_lineage(lineage)
    with contextlib.ExitStack() as stack:
        vae_dir = stack.enter_context(artifacts.fetch(vae, artifacts.VAE_DIR)) if vae else None
        summary = trainer.run_workers(
            "components.steps.train_dit.worker:worker",
            cfg,
            cfg.train_dit.train,
            workdir,
            ckpt,
            log_name=LOG_NAME,
            result_name=SUMMARY_NAME,
            latents=latents,
            vae_dir=vae_dir,
        )
        if vae_dir is not None:  # the DiT lives in this VAE's latent space: ship them together
            shutil.copytree(vae_dir, workdir / artifacts.VAE_DIR)
    numbers = {
        "final_loss": summary["final_loss"],
        "val_loss": summary["val_loss"],
        "initial_val_loss": summary["initial_val_loss"],
        "tokens_per_s": summary["tokens_per_s"],
        "mfu": summary["mfu"],
        "step_time_s": summary["step_time_s"],
        "train_seconds": summary["train_seconds"],
    }
    values: dict[str, Any] = {k: v if math.isfinite(v) else None for k, v in numbers.items()}
    values.update(steps=summary["steps"], checkpoint_dir=str(ckpt))
    values["train_flops"] = summary["train_flops"]  # model.flops over the packs that ran
    values["samples"] = len(summary["samples"])
    if not vae:
        values["samples_skipped"] = "no VAE given (the train_vae output enables samples)"
    if summary["sample_errors"]:
        values["samples_skipped"] = f"sampling failed: see {LOG_NAME}"
    finite = {f"train_dit.{k}": v for k, v in numbers.items() if math.isfinite(v)}
    files = {"dit": "dit"}
    if (workdir / "vae").is_dir():
        files.update(vae="vae", model="")  # the step dir is a complete model: vae/ + dit/
    return StepResult(
        files=files,
        values=values,
        metrics=finite,
        artifacts=[SUMMARY_NAME, LOG_NAME],
    )


def check(cfg: TesseraConfig) -> None:
    """Fail before launching processes on a DiT size that does not exist."""
    from model.dit import DIT_SIZES

    DIT_SIZES[cfg.train_dit.size]  # raises UnknownSizeError listing the sizes


STEP = StepSpec("train_dit", run, checkpoints=True, check=check)
