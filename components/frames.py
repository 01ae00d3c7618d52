"""Decoded pixels for the VAE steps: read clips with PyAV, fit them to the VAE's grid, write
side-by-side previews.

Frames travel as ``(T, H, W, 3)`` uint8 RGB arrays (as decoded) or ``(3, T, H, W)`` float tensors
in [-1, 1] (what the VAE takes). Rotation metadata is applied on read, so sizes match the
manifest's ``width`` / ``height`` (which are as displayed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from einops import rearrange

from components import storage
from components.config import EncodeConfig

# --------------------------------------------------------------------------- clips


@dataclass(frozen=True)
class Clip:
    """The manifest columns the VAE steps read."""

    clip_id: str
    uri: str
    kind: str
    split: str
    width: int
    height: int
    num_frames: int
    fps: float
    rotation: int = 0

    @property
    def name(self) -> str:
        return Path(self.uri.rstrip("/")).stem


def read_clips(manifest: str) -> list[Clip]:
    """Every manifest row as a :class:`Clip`, in manifest (URI) order."""
    from components import manifest as mf

    rows = mf.read_table(manifest).to_pylist()
    return [
        Clip(
            clip_id=r["clip_id"],
            uri=r["uri"],
            kind=r.get("kind") or "video",
            split=r["split"],
            width=int(r["width"]),
            height=int(r["height"]),
            num_frames=max(1, int(r["num_frames"])),
            fps=float(r.get("fps") or 0.0),
            rotation=int(r.get("rotation") or 0),
        )
        for r in rows
    ]


# --------------------------------------------------------------------------- decoding


def read_frames(
    uri: str,
    *,
    start: int = 0,
    count: int | None = None,
    rotation: int = 0,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decode frames ``[start, start + count)`` of a video or image -> (T, H, W, 3) uint8.

    Args:
        uri: a local path or store URI (fetched to a temporary file when remote).
        rotation: counter-clockwise display rotation in degrees (the manifest's ``rotation``).
        size: ``(width, height)`` as displayed to resize to (area filter), or None for native.
    """
    frames = []
    with storage.local_copy(uri) as path, av.open(str(path), metadata_errors="ignore") as box:
        stream = box.streams.video[0]
        stream.codec_context.thread_count = 1  # the CPUs are shared; parallelism is per clip
        turns = (rotation // 90) % 4
        width, height = size if size else (None, None)
        if size and turns % 2:  # resize before rotating: the stored frame is the other way up
            width, height = height, width
        for i, frame in enumerate(box.decode(stream)):
            if i < start:
                continue
            if size:
                frame = frame.reformat(width=width, height=height, interpolation="AREA")
            frames.append(np.rot90(frame.to_ndarray(format="rgb24"), k=turns))
            if count is not None and len(frames) >= count:
                break
    if not frames:
        raise ValueError(f"{uri}: no frames decoded from index {start} on")
    return np.ascontiguousarray(np.stack(frames))


def to_video(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float32 in [-1, 1]."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).float().div(127.5).sub(1.0)
    return rearrange(video, "t h w c -> c t h w")


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8, clamped."""
    pixels = video.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return rearrange(pixels, "c t h w -> t h w c").cpu().numpy()


# --------------------------------------------------------------------------- geometry


def fit_size(
    width: int, height: int, max_pixels: int, factor: int
) -> tuple[tuple[int, int], tuple[int, int]]:
    """Native-aspect size for the VAE: ``((resize_w, resize_h), (crop_w, crop_h))``.

    Downscale (never up) so that ``w * h <= max_pixels``, aspect kept; then centre-crop each side
    down to a multiple of ``factor`` (the VAE's spatial factor): at most ``factor - 1`` pixels are
    dropped per side and nothing is stretched. A side below ``factor`` is kept whole (the VAE
    pads it by replication and records the size).
    """
    scale = min(1.0, math.sqrt(max_pixels / (width * height))) if max_pixels > 0 else 1.0
    rw, rh = max(1, round(width * scale)), max(1, round(height * scale))
    cw = rw - rw % factor if rw >= factor else rw
    ch = rh - rh % factor if rh >= factor else rh
    return (rw, rh), (cw, ch)


def usable_frames(num_frames: int, max_frames: int, temporal_factor: int) -> int:
    """The longest ``1 + tf * k`` prefix of a clip, at most ``max_frames`` (0 = no limit).

    Cutting the last few frames instead of padding keeps every latent frame made of real pixels.
    """
    n = min(num_frames, max_frames) if max_frames > 0 else num_frames
    return 1 + temporal_factor * ((max(n, 1) - 1) // temporal_factor)


def center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T, H, W, C) -> (T, height, width, C) from the centre (no-op where already that size)."""
    top, left = (frames.shape[1] - height) // 2, (frames.shape[2] - width) // 2
    return frames[:, top : top + height, left : left + width]


def encode_pixels(
    clip: Clip, enc: EncodeConfig, spatial_factor: int, temporal_factor: int
) -> torch.Tensor:
    """The clip as the encode step feeds it to the VAE -> (3, T, H, W) in [-1, 1].

    Native aspect, downscaled to at most ``enc.max_pixels``, sides cropped to multiples of the
    spatial factor, frames cut to the longest ``1 + tf*k`` prefix of at most ``enc.max_frames``.
    """
    resize, (cw, ch) = fit_size(clip.width, clip.height, enc.max_pixels, spatial_factor)
    count = usable_frames(clip.num_frames, enc.max_frames, temporal_factor)
    frames = read_frames(
        clip.uri,
        count=count,
        rotation=clip.rotation,
        size=None if resize == (clip.width, clip.height) else resize,
    )
    count = usable_frames(len(frames), enc.max_frames, temporal_factor)  # headers over-counted
    return to_video(center_crop(frames[:count], ch, cw))


# --------------------------------------------------------------------------- previews


def write_comparison(
    path: Path,
    original: torch.Tensor,
    reconstruction: torch.Tensor,
    fps: float = 8.0,
    error_gain: float = 4.0,
) -> Path:
    """Write ``original | reconstruction | |error| * error_gain`` side by side as an mp4.

    original, reconstruction: (3, T, H, W) in [-1, 1]. Odd sizes are padded to even ones
    (yuv420p needs them).
    """
    from components.demo_data import encode_video

    error = (original - reconstruction).abs().mul(error_gain).clamp(0, 2).sub(1)  # in [-1, 1]
    panels = torch.cat([original, reconstruction.clamp(-1, 1), error], dim=-1)  # (3, T, H, 3W)
    frames = to_uint8(panels)  # (T, H, 3W, 3)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path.parent.mkdir(parents=True, exist_ok=True)
    encode_video(path, frames, max(1, round(fps or 8.0)))
    return path
