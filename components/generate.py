"""Generate and edit steps: sample clips from a trained model, or SDEdit an existing clip.

``tessera generate`` / ``tessera edit``. ``model`` is a directory URI (local, ``file://`` or
``s3://``) holding ``vae/`` (``CausalVAE.save_pretrained``, from train_vae) and ``dit/``
(``DiT.save_pretrained`` + ``flow.json``, from train_dit); an S3 model is downloaded to a
temporary directory first. Sampling settings come from ``cfg.generate``, the text encoder from
``cfg.text`` (it must be the one the DiT was trained with).

Outputs in ``workdir``:

- generate: ``samples/<i>_<aspect>.mp4`` (``.png`` for ``image``; the ``:`` of an aspect is
  written ``x``, e.g. ``0_16x9.mp4``) — every prompt at every aspect, prompt ``i`` with seed
  ``generate.seed + i`` — and ``samples.json``, one entry per file: prompt, aspect, size
  ``[frames, height, width]``, seed, sampler settings and the path relative to the step dir.
- edit: ``edited.mp4`` (``.png`` for a still) and ``edit.json``.

All clips of a generate call are sampled in packed batches of at most
``train_dit.token_budget`` patch tokens (a budget training fits with activations kept for
backward, so sampling with guidance's doubled rows fits too); a clip over it runs alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components import storage
from components.config import TesseraConfig
from components.runner import StepResult

if TYPE_CHECKING:
    import torch

    from model.generate import VideoGenerator

log = logging.getLogger(__name__)

MODEL_PARTS = ("vae", "dit")
SAMPLES_DIR = "samples"
SAMPLES_JSON = "samples.json"
EDIT_JSON = "edit.json"


# --------------------------------------------------------------------------- loading


@contextlib.contextmanager
def model_dir(uri: str) -> Iterator[Path]:
    """A local directory with the model's ``vae/`` and ``dit/`` (downloaded when on S3)."""
    if not storage.is_s3(uri):
        yield storage.local_path(uri)
        return
    with tempfile.TemporaryDirectory(prefix="tessera-model-") as tmp:
        found = 0
        for part in MODEL_PARTS:
            prefix = storage.join(uri, part)
            try:
                objects = list(storage.list_objects(prefix))
            except storage.StorageNotFound:
                objects = []
            for obj in objects:
                rel = obj.uri[len(prefix.rstrip("/")) + 1 :]
                if rel and Path(rel).name != storage.SUCCESS:
                    storage.download_file(obj.uri, Path(tmp) / part / rel)
                    found += 1
        if not found:
            raise storage.StorageNotFound(
                f"{uri} holds no model files; expected vae/ (from train_vae) and dit/ "
                "(from train_dit) under it"
            )
        yield Path(tmp)


def load_text_encoder(cfg: TesseraConfig) -> Any:
    """The text encoder of ``cfg.text`` (the one the DiT was trained with)."""
    from model.text import load_text_encoder as load

    return load(cfg.text.encoder, max_length=cfg.text.max_length)


def default_device() -> torch.device:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_generator(
    cfg: TesseraConfig, directory: Path, device: str | torch.device | None = None
) -> VideoGenerator:
    """A VideoGenerator from a local model directory, with ``cfg.generate``'s limits."""
    from model.generate import VideoGenerator, check_pretrained

    check_pretrained(directory / "vae", directory / "dit")  # before the text encoder loads
    return VideoGenerator.from_pretrained(
        directory / "vae",
        directory / "dit",
        load_text_encoder(cfg),
        device=device or default_device(),
        max_frames=cfg.generate.max_frames,
        max_pixels=cfg.generate.max_pixels,
    )


def aspect_slug(aspect: str) -> str:
    """``"16:9"`` -> ``"16x9"``: a file-name-safe aspect."""
    return aspect.replace(":", "x")


# --------------------------------------------------------------------------- generate


def generate(
    cfg: TesseraConfig,
    workdir: Path,
    model: str,
    prompts: list[str],
    aspects: list[str],
    frames: int,
) -> StepResult:
    """Sample every prompt at every aspect; see the module docstring for the outputs.

    Args:
        model: URI of a directory holding ``vae/`` and ``dit/``.
        prompts: texts; prompt ``i`` uses seed ``cfg.generate.seed + i`` at every aspect.
        aspects: names of ``model.generate.ASPECTS`` or ``"W:H"``; ``"image"`` gives one frame.
        frames: wanted frames, rounded up to the next ``1 + 4k`` (VAE temporal factor).
    """
    from model.generate import parse_aspect, save_video

    workdir = Path(workdir)
    gcfg = cfg.generate
    if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ValueError(f"generate needs at least one non-empty prompt, got {prompts!r}")
    if not aspects:
        raise ValueError("generate needs at least one aspect, e.g. 16:9")
    for aspect in aspects:
        parse_aspect(aspect)  # fail before loading any weights
    if len(set(aspects)) != len(aspects):
        raise ValueError(f"aspects repeat: {aspects}; each (prompt, aspect) names one file")

    with model_dir(model) as directory:
        generator = load_generator(cfg, directory)
    entries, requests = [], []
    for i, prompt in enumerate(prompts):
        for aspect in aspects:
            size = generator.video_size(aspect, frames)
            seed = gcfg.seed + i
            requests.append(
                {
                    "prompt": prompt,
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
    start = time.perf_counter()
    videos = generator.generate_many(
        requests,
        steps=gcfg.steps,
        guidance=gcfg.guidance,
        sampler=gcfg.sampler,
        token_budget=cfg.train_dit.token_budget,
    )
    seconds = time.perf_counter() - start
    for entry, video in zip(entries, videos, strict=True):
        name = f"{entry['index']}_{aspect_slug(entry['aspect'])}"
        path = save_video(video, workdir / SAMPLES_DIR / name)
        entry["path"] = path.relative_to(workdir).as_posix()
    (workdir / SAMPLES_JSON).write_text(json.dumps(entries, indent=2) + "\n")
    log.info("generated %d clips in %.1f s", len(entries), seconds)
    return StepResult(
        files={"samples": SAMPLES_DIR, "samples_json": SAMPLES_JSON},
        values={"num_samples": len(entries)},
        metrics={"generate_seconds": seconds, "seconds_per_sample": seconds / len(entries)},
        artifacts=[SAMPLES_DIR, SAMPLES_JSON],
    )


# --------------------------------------------------------------------------- edit


def _video_fps(path: Path) -> float | None:
    """Average frame rate of the file's video stream, or None when it has none."""
    import av

    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate
        return float(rate) if rate else None


def fit_to_pixels(video: torch.Tensor, max_pixels: int) -> torch.Tensor:
    """Downscale (3, T, H, W) keeping the aspect so that H * W <= max_pixels (antialiased)."""
    import torch.nn.functional as F
    from einops import rearrange

    _, _, height, width = video.shape
    if height * width <= max_pixels:
        return video
    scale = math.sqrt(max_pixels / (height * width))
    size = (max(1, math.floor(height * scale)), max(1, math.floor(width * scale)))
    frames = rearrange(video, "c t h w -> t c h w")
    frames = F.interpolate(
        frames, size=size, mode="bilinear", antialias=True, align_corners=False
    )  # (T, 3, h, w)
    return rearrange(frames, "t c h w -> c t h w").clamp(-1.0, 1.0)


def edit(
    cfg: TesseraConfig,
    workdir: Path,
    model: str,
    input: str,
    prompt: str,
    strength: float,
) -> StepResult:
    """SDEdit ``input`` (an mp4 / png path or URI) toward ``prompt``.

    ``strength`` in [0, 1]: 0 returns the VAE reconstruction, 1 a fresh sample. The clip is cut
    to ``generate.max_frames`` and downscaled to ``generate.max_pixels`` if larger; otherwise
    its size is kept (padded and cropped back internally) and so is its frame rate.
    """
    from model.generate import load_video, save_video

    workdir = Path(workdir)
    gcfg = cfg.generate
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if not prompt or not prompt.strip():
        raise ValueError("edit needs a non-empty prompt")
    with storage.local_copy(input) as path:
        video = load_video(path, max_frames=gcfg.max_frames)  # (3, T, H, W)
        fps = _video_fps(path)
    input_size = list(video.shape[1:])
    video = fit_to_pixels(video, gcfg.max_pixels)
    with model_dir(model) as directory:
        generator = load_generator(cfg, directory)
    start = time.perf_counter()
    edited = generator.edit(
        video,
        prompt,
        strength=strength,
        steps=gcfg.steps,
        guidance=gcfg.guidance,
        seed=gcfg.seed,
        sampler=gcfg.sampler,
    )
    seconds = time.perf_counter() - start
    fps_out = round(fps) if fps else 12
    path = save_video(edited, workdir / "edited", fps=max(1, fps_out))
    rel = path.relative_to(workdir).as_posix()
    record = {
        "input": input,
        "prompt": prompt,
        "strength": strength,
        "seed": gcfg.seed,
        "steps": gcfg.steps,
        "guidance": gcfg.guidance,
        "sampler": gcfg.sampler,
        "input_size": input_size,
        "size": list(edited.shape[1:]),
        "fps": fps_out,
        "path": rel,
    }
    (workdir / EDIT_JSON).write_text(json.dumps(record, indent=2) + "\n")
    return StepResult(
        files={"video": rel, "edit_json": EDIT_JSON},
        values={"size": list(edited.shape[1:]), "strength": strength},
        metrics={"edit_seconds": seconds},
        artifacts=[rel, EDIT_JSON],
    )
