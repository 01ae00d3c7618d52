"""Text-guided editing of an image or video (SDEdit): the ``edit`` step (``tessera edit``).

``model`` is a model directory URI holding ``vae/`` and ``dit/`` (see
:mod:`components.core.artifacts`); sampling settings come from ``cfg.generate``. Outputs in
``workdir``: ``edited.mp4`` (``.png`` for a still) and ``edit.json``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

from components.core import artifacts, media, storage
from components.core.config import TesseraConfig
from components.core.runner import StepResult, StepSpec

if TYPE_CHECKING:
    import torch

EDIT_JSON = "edit.json"


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


def run(
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
    workdir = Path(workdir)
    gcfg = cfg.generate
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if not prompt or not prompt.strip():
        raise ValueError("edit needs a non-empty prompt")
    with storage.local_copy(input) as path:
        width, height = media.frame_size(path)
        # downscaled as it decodes: a user's 8K clip is never held at 8K
        video = media.load_video(path, max_frames=gcfg.max_frames, max_pixels=gcfg.max_pixels)
        fps = media.video_fps(path)
    input_size = [video.shape[1], height, width]
    video = fit_to_pixels(video, gcfg.max_pixels)
    with artifacts.model_dir(model) as directory:
        generator = artifacts.load_generator(cfg, directory)
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
    path = media.save_video(edited, workdir / "edited", fps=max(1, fps_out))
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


STEP = StepSpec("edit", run)
