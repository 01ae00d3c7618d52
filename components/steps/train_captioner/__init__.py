"""Train the captioner, a video-to-text model that also expands prompts, and measure it on held-out
clips: the ``train_captioner`` step.

**Model** (:mod:`model.captioner`): a pixel video encoder and a text decoder over MiniLM's
WordPiece vocabulary (trimmed to the training captions' word pieces), three tasks selected by
a task token: the ``descriptive`` caption of a clip, its ``short`` caption, and ``expand``
(the short caption as text -> the descriptive caption), one decoder for all three.

**Data** (:mod:`.data`). The manifest's ``train`` clips with a caption whose
``caption_source`` is ``given`` or ``synthetic``; videos repeated to at least ``video_share`` of
the samples. A sample is the descriptive task, or with probability ``short_rate`` the short one,
or with ``expand_rate`` prompt expansion (the last two where the clip has a short caption),
drawn from (seed, sample position) so a resume sees what an uninterrupted run would. Clips are
decoded once, at the model's working size (``short_side``, ``frames`` sampled evenly), into a
memory cache of ``cache_mb``. A video sample is augmented only in ways its captions survive
(also drawn from seed and position): mirrored left-right with probability ``hflip``, its
captions' left/right words swapped (:func:`.data.mirror_caption`), then translated by up to
``shift`` of the short side. On the demo corpus this lowers the best held-out loss from 0.40 to
0.37 and keeps it from climbing with longer training (0.49 -> 0.41 at 1,200 steps).

**Training** is :class:`components.core.trainer.Trainer` (DeepSpeed; AdamW, warm-up/cosine,
clipping, checkpoints outside the staging area, resume with optimizer, scheduler, RNG and data
position) on the teacher-forced cross-entropy; rank 0 logs ``train/loss``, ``lr``,
``grad_norm``, ``samples_per_s`` and every ``eval_every`` steps the held-out ``val_loss``.

**Report** (``report.json``), after training, on the saved model loaded as other steps load it
(:func:`components.core.artifacts.load_captioner`): the held-out (``val`` split) captioned clips
decoded in both styles by beam search (``num_beams``): BLEU-4 (sacrebleu, 0-100) and ROUGE-L
(0-1) against their captions per style; with the demo corpus's factor sidecar (``factors``),
the attribute accuracy (colour, shape, motion on videos, background; against the majority
answer of the training clips' factors) of the descriptive captions of the held-out clips and of
every clip that has no caption (never trained on). With fewer than 2 captioned val clips the
report is on training clips (``val_source = "train"``) and says so.

**Outputs**: ``captioner/`` (``Captioner.save_pretrained``), ``pairs.json`` (every training
(short, long) caption pair: few-shot examples for the other expansion backends),
``report.json``, the training log and result.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path
from typing import Any

from components.core import artifacts, storage, tracking, trainer
from components.core import manifest as mf
from components.core.config import TesseraConfig
from components.core.runner import StepResult, StepSpec
from components.steps.train_captioner import data
from components.steps.train_captioner.worker import CAPTIONER_DIR, LOG_NAME, RESULT_NAME
from model.captioner import STYLES

PAIRS_NAME = "pairs.json"
REPORT_NAME = "report.json"
DECODE_BATCH = 32  # clips per beam-search call of the report


def check(cfg: TesseraConfig) -> None:
    """Fail before any work on a size that does not exist or a config it cannot build."""
    from model.captioner import CAPTIONER_SIZES

    tc = cfg.train_captioner
    CAPTIONER_SIZES[tc.size]  # raises UnknownSizeError listing the sizes
    CAPTIONER_SIZES.config(  # the model config validates its own fields
        tc.size, short_side=tc.short_side, frames=tc.frames, max_tokens=tc.max_tokens
    )


def run(
    cfg: TesseraConfig,
    workdir: Path,
    manifest: str,
    factors: str = "",
    checkpoint_dir: str | Path | None = None,
) -> StepResult:
    """Train the captioner on ``manifest`` and report on held-out clips; see the module docstring.

    Args:
        manifest: URI of the versioned manifest Parquet (the version step's ``manifest``).
        factors: the demo_data step's ``factors.parquet`` URI ("" = no attribute accuracy).
        checkpoint_dir: where checkpoints and the log go, outside ``workdir`` so that a retried
            task resumes from them (the runner passes it; default: ``workdir/checkpoints``).

    Returns:
        ``files={"captioner", "pairs", "report"}``, the report's headline numbers as metrics.
    """
    workdir = Path(workdir)
    ckpt = Path(checkpoint_dir) if checkpoint_dir is not None else workdir / "checkpoints"
    tc = cfg.train_captioner
    lineage = mf.read_lineage(manifest)
    if lineage is not None:
        tracking.log_lineage(lineage)
    picked = data.select(data.read_items(manifest), tc)
    (workdir / PAIRS_NAME).write_text(json.dumps(data.pairs(picked["train"]), indent=2) + "\n")

    started = time.perf_counter()
    result = trainer.run_workers(
        "components.steps.train_captioner.worker:worker",
        cfg,
        tc.train,
        workdir,
        ckpt,
        log_name=LOG_NAME,
        result_name=RESULT_NAME,
        manifest=manifest,
    )
    train_seconds = time.perf_counter() - started

    started = time.perf_counter()
    model, tokenizer = artifacts.load_captioner(str(workdir / CAPTIONER_DIR))
    report = held_out_report(model, tokenizer, picked, factors, tc.num_beams)
    report_seconds = time.perf_counter() - started
    (workdir / REPORT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"train_captioner: {summary(report)}", flush=True)

    metrics = {
        k: float(result[k])
        for k in ("initial_loss", "final_loss", "val_loss")
        if result.get(k) is not None and math.isfinite(float(result[k]))
    }
    metrics.update(train_seconds=train_seconds, report_seconds=report_seconds)
    metrics.update(report_metrics(report))
    values: dict[str, Any] = {
        **{k: result[k] for k in ("steps", "parameters", "vocab", "train_clips", "precision")},
        "val_source": report["val_source"],
        "val_clips": report["val_clips"],
        "pairs_count": len(data.pairs(picked["train"])),
        "checkpoint_dir": str(ckpt),
        **metrics,
    }
    return StepResult(
        files={"captioner": CAPTIONER_DIR, "pairs": PAIRS_NAME, "report": REPORT_NAME},
        values=values,
        metrics=metrics,
        artifacts=[REPORT_NAME, PAIRS_NAME, LOG_NAME, RESULT_NAME],
    )


# --------------------------------------------------------------------------- the report


def decode(model: Any, tokenizer: Any, items: list[data.Item], style: str, beams: int) -> list:
    """(caption, mean token log-prob) of each item's clip, in ``style``."""
    from model.captioner import caption_videos

    cfg, out = model.config, []
    for start in range(0, len(items), DECODE_BATCH):
        chunk = items[start : start + DECODE_BATCH]
        videos = [data.read_clip(i.clip, cfg.frames, cfg.short_side) for i in chunk]
        out += caption_videos(
            model, tokenizer, videos, style, beams, max_new_tokens=cfg.max_tokens - 1
        )
    return out


def held_out_report(
    model: Any, tokenizer: Any, picked: dict[str, Any], factors: str, beams: int
) -> dict[str, Any]:
    """Text overlap per style on the held-out captioned clips and, with ``factors``, attribute
    accuracy of descriptive captions on them and on every uncaptioned clip with a factor row."""
    import torch

    captioning = _captioning()
    val: list[data.Item] = picked["val"]
    report: dict[str, Any] = {
        "val_source": picked["val_source"],
        "val_clips": len(val),
        "num_beams": beams,
        "styles": {},
        "notes": [],
    }
    with torch.no_grad():
        predicted = {style: decode(model, tokenizer, val, style, beams) for style in STYLES}
    for style, found in predicted.items():
        refs = [i.caption if style == "descriptive" else i.short_caption for i in val]
        keep = [k for k, r in enumerate(refs) if r]
        entry: dict[str, Any] = {
            "confidence": _mean([found[k][1] for k in keep]),
            "exact": _mean([float(found[k][0] == refs[k]) for k in keep]),
            "examples": [
                {"clip": val[k].file_name, "reference": refs[k], "predicted": found[k][0]}
                for k in keep[:8]
            ],
        }
        if captioning is not None and keep:
            entry.update(
                captioning.text_metrics([found[k][0] for k in keep], [refs[k] for k in keep])
            )
        report["styles"][style] = entry
    if captioning is None:
        report["notes"].append("evaluation.captioning is missing: no BLEU-4, ROUGE-L or attributes")
    if factors and captioning is not None:
        report["attributes"] = _attributes(
            model, tokenizer, picked, factors, beams, predicted["descriptive"], captioning
        )
    elif not factors:
        report["notes"].append("no factors sidecar given: no attribute accuracy")
    return report


def _attributes(model, tokenizer, picked, factors, beams, val_found, captioning) -> dict[str, Any]:
    import pyarrow.parquet as pq
    import torch

    from components.core.demo_corpus import parse_caption

    rows = pq.read_table(io.BytesIO(storage.read_bytes(factors))).to_pylist()
    by_name = {Path(r["path"]).name: r for r in rows}
    val = [(i, f) for i, f in zip(picked["val"], val_found, strict=True) if i.file_name in by_name]
    unseen = [i for i in picked["uncaptioned"] if i.file_name in by_name]
    with torch.no_grad():
        unseen_found = decode(model, tokenizer, unseen, "descriptive", beams)
    items = [i for i, _ in val] + unseen
    predictions = [f[0] for _, f in val] + [f[0] for f in unseen_found]
    if not items:
        return {"n": 0, "note": "no decoded clip has a factor row"}
    train_rows = [by_name[i.file_name] for i in picked["train"] if i.file_name in by_name]
    scores = captioning.attribute_accuracy(
        predictions,
        [by_name[i.file_name] for i in items],
        parse=parse_caption,
        train_rows=train_rows,
    )
    return {
        "clips": len(items),
        "held_out_captioned": len(val),
        "uncaptioned": len(unseen),
        "scores": scores,
        "examples": [
            {"clip": i.file_name, "predicted": p}
            for i, p in list(zip(items, predictions, strict=True))[-8:]
        ],
    }


def _captioning() -> Any:
    try:
        from evaluation import captioning
    except ImportError:
        return None
    return captioning


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's numbers as flat MLflow metrics (``bleu4_descriptive``, ``accuracy_colour``)."""
    out: dict[str, float] = {}
    for style, entry in report["styles"].items():
        for key in ("bleu4", "rouge_l", "confidence", "exact"):
            if key in entry and math.isfinite(float(entry[key])):
                out[f"{key}_{style}"] = float(entry[key])
    for attribute, s in (report.get("attributes") or {}).get("scores", {}).items():
        for key in ("accuracy", "chance"):
            if s["n"] and math.isfinite(float(s[key])):
                out[f"{key}_{attribute}"] = float(s[key])
    return out


def summary(report: dict[str, Any]) -> str:
    """One line: text metrics per style, attribute accuracy against chance."""
    parts = []
    for style, entry in report["styles"].items():
        if "bleu4" in entry:
            parts.append(f"{style} BLEU-4 {entry['bleu4']:.1f} ROUGE-L {entry['rouge_l']:.3f}")
    for attribute, s in (report.get("attributes") or {}).get("scores", {}).items():
        parts.append(f"{attribute} {s['accuracy']:.3f} (chance {s['chance']:.3f}, n {s['n']:.0f})")
    return f"held-out ({report['val_source']}, {report['val_clips']} clips): " + "; ".join(
        parts or report["notes"]
    )


STEP = StepSpec("train_captioner", run, checkpoints=True, check=check)
