"""Sample clips from a trained model: the ``generate`` step (``tessera generate``; the DAG's
sample videos).

``model`` is a model directory URI (local, ``file://`` or ``s3://``) holding ``vae/`` and
``dit/`` (the train_dit output; see :mod:`components.core.artifacts`). Sampling settings come
from ``cfg.generate``, the text encoder from ``cfg.text`` (the one the DiT was trained with).

Outputs in ``workdir``: ``samples/<i>_<aspect>.mp4`` (``.png`` for ``image``; the ``:`` of an
aspect is written ``x``, e.g. ``0_16x9.mp4``) — every prompt at every aspect, prompt ``i`` with
seed ``generate.seed + i`` — and ``samples.json``, one entry per file: prompt, aspect, size
``[frames, height, width]``, seed, sampler settings and the path relative to the step dir.

All clips are sampled in packed batches (:func:`components.core.artifacts.sample`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from components.core import artifacts, media
from components.core.config import TesseraConfig
from components.core.runner import StepResult, StepSpec

log = logging.getLogger(__name__)

SAMPLES_DIR = "samples"
SAMPLES_JSON = "samples.json"
# What the pipeline samples after training: landscape, portrait, square and a still.
SAMPLE_PROMPTS = (
    "a red circle bouncing on a blue background",
    "a yellow square sliding left over a green gradient",
)
SAMPLE_ASPECTS = ("16:9", "9:16", "1:1", "image")


def aspect_slug(aspect: str) -> str:
    """``"16:9"`` -> ``"16x9"``: a file-name-safe aspect."""
    return aspect.replace(":", "x")


def run(
    cfg: TesseraConfig,
    workdir: Path,
    model: str,
    prompts: Sequence[str] = SAMPLE_PROMPTS,
    aspects: Sequence[str] = SAMPLE_ASPECTS,
    frames: int | None = None,
    expand: bool | None = None,
) -> StepResult:
    """Sample every prompt at every aspect; see the module docstring for the outputs.

    Args:
        model: URI of a directory holding ``vae/`` and ``dit/``, or a registered model
            (``models:/tessera-t2v@champion``, ``models:/tessera-t2v/3``): then the registered
            pyfunc generates, exactly as ``tessera serve`` does.
        prompts: texts; prompt ``i`` uses seed ``cfg.generate.seed + i`` at every aspect.
        aspects: names of ``model.generate.ASPECTS`` or ``"W:H"``; ``"image"`` gives one frame.
        frames: wanted frames, rounded up to the next ``1 + 4k`` (VAE temporal factor);
            default ``generate.sample_frames``.
        expand: expand every prompt into a descriptive caption first (``cfg.expand``'s
            backend, seed ``generate.seed + i``); default ``generate.expand``. The samples are
            conditioned on the expansion; ``samples.json`` keeps the prompt, the expansion and
            its metadata (backend, attributes kept and added, fallback).
    """
    from model.generate import parse_aspect

    workdir = Path(workdir)
    gcfg = cfg.generate
    frames = gcfg.sample_frames if frames is None else frames
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"generate needs at least one non-empty prompt, got {prompts!r}")
    if not aspects:
        raise ValueError("generate needs at least one aspect, e.g. 16:9")
    for aspect in aspects:
        parse_aspect(aspect)  # fail before loading any weights
    if len(set(aspects)) != len(aspects):
        raise ValueError(f"aspects repeat: {aspects}; each (prompt, aspect) names one file")

    expand = gcfg.expand if expand is None else expand
    if model.startswith("models:/"):
        return _run_registered(cfg, workdir, model, prompts, aspects, frames, expand)
    expansions = _expansions(cfg, prompts) if expand else {}
    with artifacts.model_dir(model) as directory:
        generator = artifacts.load_generator(cfg, directory)
    entries, requests = [], []
    for i, prompt in enumerate(prompts):
        expanded = expansions.get(i)
        for aspect in aspects:
            size = generator.video_size(aspect, frames)
            seed = gcfg.seed + i
            requests.append(
                {
                    "prompt": expanded.text if expanded else prompt,
                    "frames": size[0],
                    "height": size[1],
                    "width": size[2],
                    "seed": seed,
                }
            )
            entries.append(
                {
                    "index": i,
                    "prompt": prompt,
                    "aspect": aspect,
                    "size": list(size),
                    "seed": seed,
                    "steps": gcfg.steps,
                    "guidance": gcfg.guidance,
                    "sampler": gcfg.sampler,
                }
            )
            if expanded:
                entries[-1] |= {"expanded": expanded.text, "expansion": expanded.metadata}
    videos, seconds = artifacts.sample(generator, cfg, requests)
    for entry, video in zip(entries, videos, strict=True):
        name = f"{entry['index']}_{aspect_slug(entry['aspect'])}"
        path = media.save_video(video, workdir / SAMPLES_DIR / name)
        entry["path"] = path.relative_to(workdir).as_posix()
    (workdir / SAMPLES_JSON).write_text(json.dumps(entries, indent=2) + "\n")
    log.info("generated %d clips in %.1f s", len(entries), seconds)
    return StepResult(
        files={"samples": SAMPLES_DIR, "samples_json": SAMPLES_JSON},
        values={"num_samples": len(entries)},
        metrics={"generate_seconds": seconds, "seconds_per_sample": seconds / len(entries)},
        artifacts=[SAMPLES_DIR, SAMPLES_JSON],
    )


def _run_registered(
    cfg: TesseraConfig,
    workdir: Path,
    uri: str,
    prompts: Sequence[str],
    aspects: Sequence[str],
    frames: int,
    expand: bool,
) -> StepResult:
    """:func:`run` with a registered model (``models:/tessera-t2v@champion``): the same pyfunc
    the scoring server runs, loaded here (same seed -> the same frames as the served model)."""
    import base64
    import time

    import mlflow
    import pandas as pd

    from components.core import registry, tracking

    gcfg = cfg.generate
    tracking.setup()
    version = registry.resolve(uri)
    limits = {
        "model_name": version.name,
        "model_version": version.version,
        "max_frames": gcfg.max_frames,
        "max_pixels": gcfg.max_pixels,
        "max_voxels": gcfg.max_frames * gcfg.max_pixels,
    }
    pyfunc = mlflow.pyfunc.load_model(
        f"models:/{version.name}/{version.version}", model_config=limits
    )
    started = time.perf_counter()
    entries = []
    for i, prompt in enumerate(prompts):
        for aspect in aspects:
            still = aspect == "image"
            params = {
                "frames": 1 if still else frames,
                "aspect": "1:1" if still else aspect,
                "steps": gcfg.steps,
                "guidance": gcfg.guidance,
                "seed": gcfg.seed + i,
                "expand_prompt": expand,
                "format": "png" if still else "mp4",
            }
            (found,) = pyfunc.predict(pd.DataFrame({"prompt": [prompt]}), params=params)
            name = f"{i}_{aspect_slug(aspect)}.{found['format']}"
            path = workdir / SAMPLES_DIR / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(base64.b64decode(found["video"]))
            entries.append(
                {
                    "index": i,
                    "prompt": prompt,
                    "aspect": aspect,
                    "size": [found["frames"], found["height"], found["width"]],
                    "seed": found["seed"],
                    "steps": gcfg.steps,
                    "guidance": gcfg.guidance,
                    "sampler": gcfg.sampler,
                    "model": f"models:/{version.name}/{version.version}",
                    "path": path.relative_to(workdir).as_posix(),
                    **({"expanded": found["expanded_prompt"]} if found["expanded_prompt"] else {}),
                }
            )
    seconds = time.perf_counter() - started
    (workdir / SAMPLES_JSON).write_text(json.dumps(entries, indent=2) + "\n")
    log.info("generated %d clips with %s in %.1f s", len(entries), uri, seconds)
    return StepResult(
        files={"samples": SAMPLES_DIR, "samples_json": SAMPLES_JSON},
        values={"num_samples": len(entries), "model_version": version.version},
        metrics={"generate_seconds": seconds, "seconds_per_sample": seconds / len(entries)},
        artifacts=[SAMPLES_DIR, SAMPLES_JSON],
    )


def _expansions(cfg: TesseraConfig, prompts: Sequence[str]) -> dict[int, Any]:
    """Prompt ``i`` expanded with seed ``generate.seed + i`` (one backend for all)."""
    from components.core import expansion

    backend, examples = expansion.load_backend(cfg)
    found = {}
    for i, prompt in enumerate(prompts):
        found[i] = expansion.expand(
            prompt, cfg, seed=cfg.generate.seed + i, examples=examples, backend=backend
        )
        log.info("expanded %r -> %r", prompt, found[i].text)
    return found


STEP = StepSpec("generate", run)
