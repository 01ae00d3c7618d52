"""Train the in-domain evaluator, a video-text contrastive model, and check that it measures
something: the ``train_evaluator`` step.

No CLIP or I3D weights can exist on this machine, so ``fvd_domain`` and ``clip_score_domain``
come from a model the pipeline trains itself (:mod:`model.evaluator`): its video tower works on
pixels (any generator's output can be scored), its text tower on the frozen token states of the
configured text encoder (``text``).

**Data.** The manifest's ``train`` clips that have a caption, videos and stills mixed (videos
repeated to at least ``video_share`` of the samples). A sample is a window of ``frames``
consecutive frames (a still stays one frame) and a random crop keeping ``crop_scale``..1 of each
side at the clip's native aspect ratio; the model resizes every clip so its short side is
``short_side``. No flips or colour jitter (captions name colours, sides and directions). With
probability ``short_caption_rate`` the sample is paired with its short caption. A sample is a
pure function of (seed, sample position), so a resume sees what an uninterrupted run would.
Captions are encoded once, here, by the frozen text encoder; their mean-pooled states (all the
text tower reads) are kept beside the checkpoints, so a resume does not encode them again.

**Training** is :class:`components.core.trainer.Trainer` (DeepSpeed; AdamW, warm-up/cosine,
gradient clipping, checkpoints every ``checkpoint_every`` steps outside the staging area, resume
with optimizer, scheduler, RNG and data position) on the symmetric InfoNCE loss of each
process's micro-batch (with several processes each rank contrasts its own micro-batch, and the
gradients are averaged). Rank 0 logs ``train/loss``, ``temperature``, ``lr``, ``grad_norm``,
``samples_per_s`` and, every ``eval_every`` steps, the held-out ``val_loss`` / ``val_r1`` /
``val_r5``.

**Validation** (:mod:`.validation`), after training, on the saved model loaded exactly as the
evaluate step loads it (:func:`components.core.artifacts.load_evaluator`), on the ``val``
split's clips (their first ``max_frames`` frames, native size): text->video retrieval against
chance, ``fvd_domain`` of the clips against themselves (exact and two halves) and against
noisy, blurred and frame-shuffled copies at ``strengths``, and ``clip_score_domain`` of matching
against shuffled captions. ``validated`` says whether every required check passed (frame
shuffling is reported but not required: FVD's known blind spot); with ``require_validated`` the
step fails instead of committing an evaluator that does not measure anything.

**Outputs**: ``evaluator/`` (``VideoTextModel.save_pretrained``: ``config.json`` +
``model.safetensors``), ``validation.json`` (every number of the checks), the training log and
result.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

from components.core import artifacts, tracking, trainer
from components.core import manifest as mf
from components.core.config import TesseraConfig
from components.core.runner import StepResult, StepSpec
from components.steps.train_evaluator import data, validation
from components.steps.train_evaluator.worker import EVALUATOR_DIR, LOG_NAME, RESULT_NAME

VALIDATION_NAME = "validation.json"


class EvaluatorNotValidated(RuntimeError):
    """A required check failed and ``train_evaluator.require_validated`` is set."""


def check(cfg: TesseraConfig) -> None:
    """Fail before any work on a size that does not exist or a config it cannot build."""
    from model.evaluator import EVALUATOR_SIZES

    EVALUATOR_SIZES[cfg.train_evaluator.size]  # raises UnknownSizeError listing the sizes
    te = cfg.train_evaluator
    EVALUATOR_SIZES.config(  # the model config validates its own fields
        te.size, short_side=te.short_side, feature_dim=te.feature_dim, embed_dim=te.embed_dim
    )


def _resolved(cfg: TesseraConfig) -> TesseraConfig:
    """``cfg`` with the evaluator's ``precision: auto`` resolved once for every rank (CPU)."""
    te = cfg.train_evaluator
    if te.train.precision != "auto":
        return cfg
    import torch

    if torch.cuda.is_available():
        return cfg
    train = dataclasses.replace(te.train, precision=trainer.precision(te.train))
    return dataclasses.replace(cfg, train_evaluator=dataclasses.replace(te, train=train))


def run(cfg: TesseraConfig, workdir: Path, manifest: str, checkpoint_dir: str | Path) -> StepResult:
    """Train the evaluator on ``manifest`` and validate it; see the module docstring.

    Args:
        manifest: URI of the versioned manifest Parquet (the version step's ``manifest``).
        checkpoint_dir: where checkpoints, the caption states and the log go, outside
            ``workdir`` so that a retried task resumes from them (the runner passes it).

    Returns:
        ``files={"evaluator": "evaluator", "validation": "validation.json"}``, the checks'
        numbers and ``validated``.
    """
    workdir, ckpt = Path(workdir), Path(checkpoint_dir)
    cfg = _resolved(cfg)
    te = cfg.train_evaluator
    lineage = mf.read_lineage(manifest)
    if lineage is not None:
        tracking.log_lineage(lineage)
    picked = data.select(data.read_items(manifest), te)
    started = time.perf_counter()
    encoder = artifacts.load_text_encoder(cfg)
    texts = data.texts_of([*picked["train"], *picked["val"]])
    key = data.states_key(encoder, texts)
    states_path = ckpt / data.TEXT_STATES
    if data.load_states(states_path, key) is None:
        data.save_states(states_path, texts, data.pooled_states(encoder, texts), key)
    text_seconds = time.perf_counter() - started

    started = time.perf_counter()
    result = trainer.run_workers(
        "components.steps.train_evaluator.worker:worker",
        cfg,
        te.train,
        workdir,
        ckpt,
        log_name=LOG_NAME,
        result_name=RESULT_NAME,
        manifest=manifest,
        text_states=str(states_path),
    )
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    scorer = artifacts.load_evaluator(
        str(workdir / EVALUATOR_DIR), cfg, text_encoder=encoder, max_frames=te.max_frames
    )
    val = picked["val"]
    videos = [data.read_view(i.clip, te.max_frames) for i in val]
    report = validation.validate(
        scorer,
        videos,
        [i.caption for i in val],
        te.strengths,
        resamples=te.bootstrap,
        seed=cfg.seed,
    )
    report.update(
        val_source=picked["val_source"],
        val_clips=[i.clip.name for i in val],
        sha256=scorer.sha256,
        feature_layer=scorer.feature_layer,
    )
    validate_seconds = time.perf_counter() - started
    (workdir / VALIDATION_NAME).write_text(json.dumps(report, indent=2, default=_plain))
    print(f"train_evaluator: {validation.summary(report)}")

    numbers = {
        k: float(result[k])
        for k in ("initial_loss", "final_loss", "temperature", "samples_per_s", "step_time_s")
        if result.get(k) is not None and math.isfinite(float(result[k]))
    }
    timings = {
        "text_seconds": text_seconds,
        "train_seconds": train_seconds,
        "validate_seconds": validate_seconds,
    }
    checks = validation.metrics(report)
    fvd, r, c = report["fvd"], report["retrieval"], report["clip_score"]
    values: dict[str, Any] = {
        **numbers,
        **timings,
        "steps": result["steps"],
        "parameters": result["parameters"],
        "feature_scales": result["feature_scales"],
        "precision": result["precision"],
        "train_clips": result["train_clips"],
        "val_source": picked["val_source"],
        "val_clips": len(val),
        "validated": report["validated"],
        "checks": report["checks"],
        "r1": r["r1"],
        "r5": r["r5"],
        "chance_r1": r["chance_r1"],
        "chance_r5": r["chance_r5"],
        "clip_score_matching": c["matching"],
        "clip_score_shuffled": c["shuffled"],
        "clip_score_margin": c["margin"],
        "fvd_self": fvd["self"],
        "fvd_halves": fvd["halves"]["value"],
        **{
            f"fvd_{kind}": [row["value"] for row in fvd[kind]["strengths"]]
            for kind in validation.KINDS
        },
        "strengths": list(te.strengths),
        "sha256": scorer.sha256,
        "feature_layer": scorer.feature_layer,
        "checkpoint_dir": str(ckpt),
    }
    if te.require_validated and not report["validated"]:
        failed = [k for k in validation.REQUIRED if not report["checks"][k]]
        raise EvaluatorNotValidated(
            f"the evaluator failed its held-out checks {failed}; see {workdir / VALIDATION_NAME}"
            f"\n{validation.summary(report)}\nTrain longer (train_evaluator.train.steps) or set "
            "train_evaluator.require_validated=false to commit it anyway"
        )
    return StepResult(
        files={"evaluator": EVALUATOR_DIR, "validation": VALIDATION_NAME},
        values=values,
        metrics={
            **{k: numbers[k] for k in ("initial_loss", "final_loss") if k in numbers},
            **timings,
            **checks,
        },
        artifacts=[VALIDATION_NAME, LOG_NAME, RESULT_NAME],
    )


def _plain(value: Any) -> Any:
    try:
        return float(value)
    except (TypeError, ValueError):
        return str(value)


STEP = StepSpec("train_evaluator", run, checkpoints=True, check=check)
