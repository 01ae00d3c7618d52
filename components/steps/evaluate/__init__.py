"""Evaluate a trained model (or a folder of videos) against held-out real clips: the ``evaluate``
step (``tessera evaluate``).

**Samples.** With fixed seeds, the model samples (1) every held-out (``val``) clip's caption at
that clip's aspect ratio and length (cut to ``evaluate.frames``, ``1 + 4k``), the fake side of FVD
with N equal to the real side by construction, and (2) a fixed prompt set
(``evaluation/prompts/``: the domain prompts with factor labels when the demo corpus is given,
else the general list) at every ``evaluate.aspects`` (16:9, 9:16, 1:1 and one frame). With
``videos`` instead of a model, the files of that folder are the fake side (and ``prompts.jsonl``
beside them, ``{"file": ..., "prompt": ...}`` per line, gives CLIP scores).

**Metrics** (names carry their extractor; intervals are percentile bootstraps over clips, or
Wilson intervals for proportions):

- ``fvd_<extractor>`` for every configured video extractor: ``domain`` (the train_evaluator
  output), ``i3d`` (``evaluate.i3d``, StyleGAN-V protocol), ``videomae`` (``evaluate.videomae``);
- ``clip_score_<scorer>`` of generated clips and their prompts (``domain``, ``hfclip`` or
  ``openclip`` from ``evaluate.clip``), with ``..._real`` (held-out clips and their own captions:
  the reference) beside it;
- ``recon_psnr`` / ``recon_ssim`` / ``rfvd_<extractor>``: the model's VAE round trip of
  held-out clips;
- demo corpus only: colour following (``colour_accuracy`` vs chance) and framing
  (``framing_cut_share``: generated clips whose main object is cut by the frame edge, against the
  corpus's own share), each classifier first checked on corpus files with known answers.

**Outputs** in ``workdir``: ``evaluation.json`` (every number, per-prompt rows, the extractors'
sha256), ``report.html`` (self-contained: metrics with intervals, animated samples per prompt and
aspect, reconstructions, the scaling plot when ``scaling`` names one, lineage), ``samples/``
(the prompt-set clips as WebM/PNG) and ``colour_grid.png``. The metrics and per-prompt tables go
to the step's MLflow run.
"""

from __future__ import annotations

import io
import json
import logging
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from components.core import artifacts, media, storage, tracking
from components.core import manifest as mf
from components.core.config import TesseraConfig
from components.core.runner import StepResult, StepSpec
from components.steps.evaluate import colour as colour_eval
from components.steps.evaluate import prompts as prompt_sets

log = logging.getLogger(__name__)

RESULT_JSON = "evaluation.json"
REPORT_HTML = "report.html"
SAMPLES_DIR = "samples"
COLOUR_GRID = "colour_grid.png"
VIDEO_SUFFIXES = {".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif", ".png", ".jpg", ".jpeg"}


# --------------------------------------------------------------------------- inputs


def _read_parquet(uri: str) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()


def _spread(items: list, limit: int) -> list:
    if len(items) <= limit:
        return items
    step = len(items) / limit
    return [items[int(i * step)] for i in range(limit)]


def held_out(cfg: TesseraConfig, manifest: str) -> list[dict[str, Any]]:
    """The captioned ``val`` clips of the manifest (at most ``evaluate.max_real``, spread over
    it), each decoded as the encode step sees it at the generator's pixel budget, cut to the
    longest ``1 + 4k`` prefix of at most ``evaluate.frames``: ``video`` (3, T, H, W) in [-1, 1]."""
    ecfg = cfg.evaluate
    captions = {r["clip_id"]: r.get("caption") or "" for r in mf.read_table(manifest).to_pylist()}
    captioned = [c for c in mf.read_clips(manifest) if captions.get(c.clip_id)]
    clips = [c for c in captioned if c.split == "val"]
    if len(clips) < 2:  # a tiny corpus: measure on training clips, and say so in the report
        log.warning(
            "evaluate: %s has %d captioned held-out (val) clips; using the %d captioned training "
            "clips as the real side instead: the numbers are optimistic (raise "
            "ingest.val_fraction)",
            manifest,
            len(clips),
            len(captioned),
        )
        clips = captioned
    if len(clips) < 2:
        raise ValueError(
            f"{manifest} has {len(clips)} captioned clips; FVD and the other metrics need at "
            "least 2 (held-out ones: raise ingest.val_fraction, or add captions)"
        )
    enc = replace(cfg.encode, max_pixels=cfg.generate.max_pixels, max_frames=ecfg.frames)
    out = []
    for clip in _spread(clips, ecfg.max_real):
        video = media.encode_pixels(clip, enc, 8, 4)  # (3, T, H, W), sides multiples of 8
        out.append({"clip": clip, "caption": captions[clip.clip_id], "video": video})
    return out


def _aspect(width: int, height: int) -> str:
    g = math.gcd(width, height)
    return f"{width // g}:{height // g}"


def _folder_videos(
    uri: str, max_frames: int, max_pixels: int
) -> tuple[list[np.ndarray], list[str | None]]:
    """The videos of a folder (uint8 (T, H, W, 3), sorted by name) and their prompts, read as
    the real side is: their first ``max_frames`` frames, downscaled as they are decoded to at
    most ``max_pixels`` per frame (a user's 8K upload is never held at 8K)."""
    videos, prompts = [], []
    with artifacts.local_tree(uri) as root:
        prompt_of = {}
        if (root / "prompts.jsonl").exists():
            for line in (root / "prompts.jsonl").read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    prompt_of[row["file"]] = row["prompt"]
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES)
        if len(files) < 2:
            raise ValueError(f"{uri} holds {len(files)} video files; evaluate needs at least 2")
        for path in files:
            videos.append(media.read_frames(path, count=max_frames, max_pixels=max_pixels))
            prompts.append(prompt_of.get(str(path.relative_to(root))))
    return videos, prompts


# --------------------------------------------------------------------------- extractors


def load_extractors(cfg: TesseraConfig, evaluator: str) -> tuple[list[Any], list[Any]]:
    """(video feature extractors, video-text scorers) from the config and the evaluator."""
    from evaluation import clip_score, fvd

    ecfg = cfg.evaluate
    video, text = [], []
    if evaluator:
        domain = artifacts.load_evaluator(evaluator, cfg)
        video.append(domain)
        text.append(domain)
    if ecfg.i3d:
        with storage.local_copy(ecfg.i3d) as path:
            video.append(
                fvd.I3DExtractor.from_file(path, num_frames=ecfg.i3d_frames, stride=ecfg.i3d_stride)
            )
    if ecfg.videomae:
        with storage.local_copy(ecfg.videomae) as path:
            video.append(fvd.VideoMAEExtractor.from_file(path))
    if ecfg.clip:
        if ecfg.clip_model:
            with storage.local_copy(ecfg.clip) as path:
                text.append(clip_score.OpenClipScorer.from_file(path, ecfg.clip_model))
        else:
            with artifacts.local_tree(ecfg.clip) as path:
                text.append(clip_score.HFClipScorer.from_dir(path))
    if not video:
        raise ValueError(
            "evaluate has no video feature extractor: pass the train_evaluator step's output "
            "(--evaluator) or set evaluate.i3d to an i3d_torchscript.pt"
        )
    return video, text


def _usable(extractor: Any, videos: list[np.ndarray]) -> list[int]:
    need = getattr(extractor, "num_frames", 0) or 0
    stride = getattr(extractor, "stride", 1) or 1
    length = 1 + (need - 1) * stride if need else 1
    return [i for i, v in enumerate(videos) if len(v) >= length]


# --------------------------------------------------------------------------- the step


def check(cfg: TesseraConfig) -> None:
    """Fail on a prompt set or aspect that cannot be used, before any model loads."""
    from model.generate import parse_aspect

    for aspect in cfg.evaluate.aspects:
        if aspect != "image":
            parse_aspect(aspect)
    prompt_sets.load(cfg.evaluate.prompts, demo=True)


def run(
    cfg: TesseraConfig,
    workdir: Path,
    manifest: str,
    model: str = "",
    videos: str = "",
    evaluator: str = "",
    clips: str = "",
    captions: str = "",
    factors: str = "",
    scaling: str = "",
) -> StepResult:
    """Evaluate ``model`` (or the files of ``videos``) on the held-out clips of ``manifest``.

    Args:
        manifest: the versioned manifest (its ``val`` split is the real side).
        model: a model directory (``vae/`` + ``dit/``, train_dit's ``model`` output).
        videos: instead of a model, a folder of generated videos (+ optional ``prompts.jsonl``).
        evaluator: the train_evaluator step's ``evaluator`` output (``fvd_domain``,
            ``clip_score_domain``).
        clips, captions, factors: the demo corpus (demo_data's outputs): enables the domain
            prompts, colour following and framing.
        scaling: a scaling-law plot (PNG) of a sweep, shown in the report.
    """
    from evaluation import clip_score, fvd, reconstruction
    from evaluation import report as html_report

    if bool(model) == bool(videos):
        raise ValueError("evaluate needs exactly one of model (a trained model) or videos")
    started = time.perf_counter()
    workdir = Path(workdir)
    ecfg, gcfg = cfg.evaluate, cfg.generate
    lineage = mf.read_lineage(manifest)
    if lineage is not None:
        tracking.log_lineage(lineage, context="evaluation")
    factor_rows = _read_parquet(factors) if factors else []
    if factor_rows:
        colour_eval.check_factors(factor_rows, factors)
    prompt_set = prompt_sets.load(ecfg.prompts, demo=bool(factor_rows))
    extractors, scorers = load_extractors(cfg, evaluator)
    real = held_out(cfg, manifest)
    real_u8 = [media.to_uint8(r["video"]) for r in real]
    real_split = "val" if all(r["clip"].split == "val" for r in real) else "train"

    metrics: dict[str, float] = {}
    rows: list[dict[str, Any]] = []  # per-prompt table
    notes: list[str] = []
    if real_split != "val":
        notes.append(
            "the manifest has fewer than 2 captioned held-out clips: the real side is training "
            "clips, so every number is optimistic (raise ingest.val_fraction)"
        )
    metric_rows: list[Any] = []
    report = html_report.Report(title="Tessera evaluation")

    # 1. samples: held-out captions at their sizes, the prompt set at every aspect
    generator = None
    if model:
        with artifacts.model_dir(model) as directory:
            generator = artifacts.load_generator(cfg, directory)
        requests = []
        for i, r in enumerate(real):
            _, t, h, w = r["video"].shape
            clip = r["clip"]
            size = generator.video_size(_aspect(clip.width, clip.height), t)
            requests.append(
                {
                    "prompt": r["caption"],
                    "frames": size[0],
                    "height": size[1],
                    "width": size[2],
                    "seed": gcfg.seed + 10_000 + i,
                }
            )
        items = prompt_set.items(generator, ecfg.aspects, ecfg.frames, gcfg.seed)
        requests += [item.request for item in items]
        sampled, sample_seconds = artifacts.sample(generator, cfg, requests)
        fakes = [media.to_uint8(v) for v in sampled[: len(real)]]
        fake_prompts: list[str | None] = [r["caption"] for r in real]
        prompt_videos = [media.to_uint8(v) for v in sampled[len(real) :]]
    else:
        fakes, fake_prompts = _folder_videos(videos, ecfg.frames, gcfg.max_pixels)
        items, prompt_videos, sample_seconds = [], [], 0.0
    metrics["generate_seconds"] = sample_seconds

    # 2. FVD per extractor (N real == N fake, or the numbers are not comparable)
    extractor_info = {}
    for ext in extractors:
        extractor_info[ext.name] = ext.sha256
        usable = sorted(set(_usable(ext, real_u8)) & set(_usable(ext, fakes)))
        n = min(len(usable), len(fakes), len(real_u8))
        usable = usable[:n]
        if n < 2:
            notes.append(
                f"fvd_{ext.name}: only {n} clip pair(s) have the {ext.num_frames} frames it needs; "
                "raise evaluate.frames or use longer held-out clips"
            )
            continue
        result = fvd.fvd(
            ext.features([real_u8[i] for i in usable]),
            ext.features([fakes[i] for i in usable]),
            extractor=ext,
            resamples=ecfg.resamples,
            seed=cfg.seed,
        )
        metrics.update(result.as_metrics())
        notes += [f"{result.metric_name}: {w}" for w in result.warnings]
        metric_rows.append(
            html_report.MetricRow(
                result.metric_name,
                result.value,
                result.low,
                result.high,
                f"{result.n_real} real / {result.n_fake} fake",
                f"{ext.name} {ext.sha256[:12]}",
                "lower is better",
            )
        )

    # 3. CLIP scores per scorer: generated vs their prompts, and the real reference
    scored = [(v, p) for v, p in zip(fakes, fake_prompts, strict=True) if p]
    for s in scorers:
        extractor_info.setdefault(s.name, s.sha256)
        for label, pairs in (
            ("", scored + [(v, it.prompt) for v, it in zip(prompt_videos, items, strict=True)]),
            ("_real", [(v, r["caption"]) for v, r in zip(real_u8, real, strict=True)]),
        ):
            if len(pairs) < 2:
                continue
            result = clip_score.clip_score(
                s,
                [v for v, _ in pairs],
                [p for _, p in pairs],
                resamples=ecfg.resamples,
                seed=cfg.seed,
            )
            named = {
                k.replace(f"clip_score_{s.name}", f"clip_score_{s.name}{label}", 1): v
                for k, v in result.as_metrics().items()
            }
            metrics.update(named)
            main = f"clip_score_{s.name}{label}"
            metric_rows.append(
                html_report.MetricRow(
                    main,
                    named[main],
                    named.get(f"{main}_low", math.nan),
                    named.get(f"{main}_high", math.nan),
                    f"{len(pairs)} clips",
                    f"{s.name} {s.sha256[:12]}",
                    "held-out clips and their own captions (reference)"
                    if label
                    else "generated clips and their prompts; higher is better",
                )
            )
        if items:  # per-prompt scores for the table
            per = clip_score.clip_score(s, prompt_videos, [it.prompt for it in items], resamples=0)
            for item, value in zip(items, per.per_sample, strict=True):
                item.row[f"clip_score_{s.name}"] = round(float(value), 4)

    # 4. reconstruction: the model's VAE on held-out clips
    if generator is not None and ecfg.recon_clips > 0:
        originals, recons = [], []
        for r in real[: ecfg.recon_clips]:
            originals.append(r["video"])
            recons.append(generator.reconstruct(r["video"].to(generator.device)).float().cpu())
        psnrs = [
            reconstruction.psnr(o[None], x[None]).item()
            for o, x in zip(originals, recons, strict=True)
        ]
        ssims = [
            reconstruction.ssim(o[None], x[None]).item()
            for o, x in zip(originals, recons, strict=True)
        ]
        for name, values in (("recon_psnr", psnrs), ("recon_ssim", ssims)):
            low, high = _bootstrap_mean(values, ecfg.resamples, ecfg.confidence, cfg.seed)
            metrics.update({name: float(np.mean(values)), f"{name}_low": low, f"{name}_high": high})
            metric_rows.append(
                html_report.MetricRow(
                    name, float(np.mean(values)), low, high, f"{len(values)} clips", "", ""
                )
            )
        recon_u8 = [media.to_uint8(x) for x in recons]
        for ext in extractors:
            usable = _usable(ext, recon_u8)
            if len(usable) >= 2:
                result = fvd.fvd(
                    ext.features([real_u8[i] for i in usable]),
                    ext.features([recon_u8[i] for i in usable]),
                    extractor=ext,
                    resamples=ecfg.resamples,
                    seed=cfg.seed,
                )
                name = f"rfvd_{ext.name}"
                metrics[name] = result.value
                metrics[f"{name}_low"], metrics[f"{name}_high"] = result.low, result.high
                metric_rows.append(
                    html_report.MetricRow(
                        name,
                        result.value,
                        result.low,
                        result.high,
                        f"{len(usable)} clips",
                        f"{ext.name} {ext.sha256[:12]}",
                        "VAE round trip vs original",
                    )
                )
        for o, x in list(zip(originals, recons, strict=True))[: ecfg.report_examples]:
            report.reconstructions.append(
                _comparison_media(workdir, o, x, len(report.reconstructions))
            )

    # 5. demo corpus: colour following and framing
    colour_summary: dict[str, Any] | None = None
    framing_summary: dict[str, Any] | None = None
    if factor_rows and generator is not None:
        caption_rows = _read_parquet(captions)
        caption_of = {r["path"]: r["caption"] for r in caption_rows}
        short_of = {r["path"]: r.get("short_caption") for r in caption_rows}
        colour_summary, cells, _ = colour_eval.colour_following(
            cfg, generator, clips, caption_of, factor_rows, short_of
        )
        colour_eval.grid(cells, workdir / COLOUR_GRID)
        metrics.update(
            {
                "colour_accuracy": colour_summary["accuracy"],
                "colour_accuracy_low": colour_summary["accuracy_low"],
                "colour_accuracy_high": colour_summary["accuracy_high"],
                "colour_chance": colour_summary["chance"],
                "colour_p_value": colour_summary["p_value"],
                "colour_trials": float(len(colour_summary["trials"])),
                "colour_classifier_accuracy": colour_summary["classifier_accuracy_on_corpus"],
            }
        )
        metric_rows.append(
            html_report.MetricRow(
                "colour_accuracy",
                colour_summary["accuracy"],
                colour_summary["accuracy_low"],
                colour_summary["accuracy_high"],
                f"{len(colour_summary['trials'])} trials, {colour_summary['bases']} bases",
                "known-background classifier",
                f"chance {colour_summary['chance']:.3f}, p = {colour_summary['p_value']:.2g}; "
                f"classifier on corpus {colour_summary['classifier_accuracy_on_corpus']:.2f}",
            )
        )
        framing_summary = _framing(cfg, clips, factor_rows, items, prompt_videos)
        if framing_summary:
            metrics.update({k: v for k, v in framing_summary.items() if isinstance(v, float)})
            metric_rows.append(
                html_report.MetricRow(
                    "framing_cut_share",
                    framing_summary["framing_cut_share"],
                    framing_summary["framing_cut_share_low"],
                    framing_summary["framing_cut_share_high"],
                    f"{framing_summary['framing_clips']} clips",
                    "known-background classifier",
                    f"corpus share {framing_summary['framing_cut_share_corpus']:.2f}; classifier "
                    f"accuracy on corpus {framing_summary['framing_classifier_accuracy']:.2f} "
                    f"(n={framing_summary['framing_classifier_n']})",
                )
            )

    # 6. files, tables, report
    for item, video in zip(items, prompt_videos, strict=True):
        item.row["file"] = _save_sample(workdir, item, video)
        rows.append(item.row)
    report.metrics = metric_rows
    report.notes = notes
    report.summary = (
        f"{len(real)} real ({real_split} split) clips vs {len(fakes)} generated; {len(items)} prompt-set samples "
        f"at {', '.join(ecfg.aspects)}; fixed seeds from generate.seed = {gcfg.seed}."
    )
    report.grids = _grids(workdir, items)
    if (workdir / COLOUR_GRID).exists():
        report.figures.append(
            html_report.Media((workdir / COLOUR_GRID).read_bytes(), "image/png", "colour following")
        )
    if scaling and storage.exists(scaling):
        report.figures.append(
            html_report.Media(storage.read_bytes(scaling), "image/png", "scaling law")
        )
    report.tables.append(("Per-prompt samples", rows))
    report.lineage = _lineage(lineage, model or videos, evaluator, extractor_info)
    html_report.write(report, workdir / REPORT_HTML)

    seconds = time.perf_counter() - started
    metrics["evaluate_seconds"] = seconds
    summary = {
        "metrics": metrics,
        "extractors": extractor_info,
        "notes": notes,
        "real_split": real_split,
        "prompts": rows,
        "colour_following": colour_summary,
        "framing": framing_summary,
        "lineage": report.lineage,
    }
    (workdir / RESULT_JSON).write_text(json.dumps(summary, indent=2, default=str) + "\n")
    _log_tables(rows, colour_summary)
    log.info(
        "evaluate: %s in %.0f s; report %s",
        ", ".join(f"{m.name} {m.value:.4g}" for m in metric_rows),
        seconds,
        workdir / REPORT_HTML,
    )
    files = {"result": RESULT_JSON, "report": REPORT_HTML, "samples": SAMPLES_DIR}
    artifacts_out = [RESULT_JSON, REPORT_HTML, SAMPLES_DIR]
    if (workdir / COLOUR_GRID).exists():
        files["colour_grid"] = COLOUR_GRID
        artifacts_out.append(COLOUR_GRID)
    headline = {k: v for k, v in metrics.items() if not k.endswith(("_low", "_high"))}
    return StepResult(
        files=files,
        values={**{k: round(v, 6) for k, v in headline.items()}, "real_split": real_split},
        metrics={k: float(v) for k, v in metrics.items() if np.isfinite(v)},
        artifacts=artifacts_out,
    )


# --------------------------------------------------------------------------- helpers


def _bootstrap_mean(
    values: list[float], resamples: int, confidence: float, seed: int
) -> tuple[float, float]:
    x = np.asarray(values, np.float64)
    if len(x) < 2 or resamples < 1:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, len(x), (resamples, len(x)))].mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def _framing(
    cfg: TesseraConfig, clips: str, factor_rows: list[dict], items: list, videos: list
) -> dict[str, Any] | None:
    """Framing: the classifier checked on corpus files, then the share of cut generated clips."""
    from components.core.demo_corpus import PALETTE, background_range
    from evaluation import framing

    ecfg = cfg.evaluate
    known = [r for r in factor_rows if r.get("primary_cut") is not None]
    labelled = [(it, v) for it, v in zip(items, videos, strict=True) if it.factors]
    if not known or not labelled:
        return None
    checked = _spread(sorted(known, key=lambda r: r["path"]), ecfg.framing_checks)
    predicted, truth = [], []
    for row in checked:
        with storage.local_copy(storage.join(clips, row["path"])) as path:
            frames = media.read_frames(path)
        background = background_range(row["background"], row["background_colors"].split(","))
        vote = framing.main_object_cut(
            frames, PALETTE, background, row["primary_color"], min_distance=ecfg.min_distance
        )
        predicted.append(vote.cut)
        truth.append(bool(row["primary_cut"]))
    check_result = framing.ClassifierCheck.of(predicted, truth)
    cuts = []
    for item, video in labelled:
        f = item.factors
        vote = framing.main_object_cut(
            video,
            PALETTE,
            background_range(f["background"], f["background_colors"]),
            f["color"],
            min_distance=ecfg.min_distance,
        )
        item.row["cut_by_frame"] = vote.cut
        cuts.append(vote.cut)
    low, high = framing.wilson_interval(sum(cuts), len(cuts), ecfg.confidence)
    return {
        "framing_cut_share": sum(cuts) / len(cuts),
        "framing_cut_share_low": low,
        "framing_cut_share_high": high,
        "framing_clips": len(cuts),
        "framing_cut_share_corpus": float(np.mean([bool(r["primary_cut"]) for r in known])),
        "framing_classifier_accuracy": check_result.accuracy,
        "framing_classifier_precision": check_result.precision,
        "framing_classifier_recall": check_result.recall,
        "framing_classifier_n": check_result.n,
    }


def _save_sample(workdir: Path, item: Any, video: np.ndarray) -> str:
    folder = workdir / SAMPLES_DIR
    folder.mkdir(parents=True, exist_ok=True)
    video = np.pad(
        video, ((0, 0), (0, video.shape[1] % 2), (0, video.shape[2] % 2), (0, 0)), "edge"
    )
    name = f"{item.slug}.{'png' if len(video) == 1 else 'webm'}"
    if len(video) == 1:
        media.encode_image(folder / name, video[0])
    else:
        media.encode_video(folder / name, video, 8)
    return f"{SAMPLES_DIR}/{name}"


def _grids(workdir: Path, items: list) -> list:
    from evaluation.report import Media

    grids: dict[str, list] = {}
    for item in items:
        path = workdir / item.row["file"]
        mime = "image/png" if path.suffix == ".png" else "video/webm"
        grids.setdefault(item.prompt_id, []).append(
            (item.aspect, Media(path.read_bytes(), mime, item.aspect))
        )
    titles = {item.prompt_id: item.title for item in items}
    return [(titles[k], cells) for k, cells in grids.items()]


def _comparison_media(workdir: Path, original: Any, recon: Any, index: int) -> Any:
    from evaluation.report import Media

    error = (original - recon).abs().mul(4).clamp(0, 2).sub(1)
    import torch

    panels = torch.cat([original, recon.clamp(-1, 1), error], dim=-1)  # (3, T, H, 3W)
    frames = media.to_uint8(panels)
    frames = np.pad(
        frames, ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0)), "edge"
    )
    folder = workdir / SAMPLES_DIR / "reconstructions"
    folder.mkdir(parents=True, exist_ok=True)
    if len(frames) == 1:
        path = media.encode_image(folder / f"{index}.png", frames[0])
        return Media(path.read_bytes(), "image/png", f"held-out clip {index}")
    path = media.encode_video(folder / f"{index}.webm", frames, 8)
    return Media(path.read_bytes(), "video/webm", f"held-out clip {index}")


def _lineage(lineage: Any, model: str, evaluator: str, extractors: dict) -> dict[str, str]:
    import mlflow

    out = {"model": model, "evaluator": evaluator or "(none)", "git sha": tracking.git_sha()}
    if lineage is not None:
        out |= {"dataset rev": lineage.dataset_rev, "manifest": lineage.manifest}
    active = mlflow.active_run()
    if active is not None:
        out["mlflow run"] = active.info.run_id
        out["tessera run"] = active.data.tags.get("tessera.run_id", "")
    out |= {f"extractor {name}": sha for name, sha in extractors.items()}
    return out


def _log_tables(rows: list[dict], colour_summary: dict | None) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    if rows:
        columns = list(dict.fromkeys(k for r in rows for k in r))
        mlflow.log_table({c: [r.get(c) for r in rows] for c in columns}, "tables/prompts.json")
    if colour_summary:
        trials = colour_summary["trials"]
        columns = ["base", "asked", "seen", "correct", "prompt", "seed"]
        mlflow.log_table({c: [t[c] for t in trials] for c in columns}, "tables/colour_trials.json")


STEP = StepSpec("evaluate", run, check=check)
