"""Every video and image read and write, through PyAV: codecs, x264 options, PNG, uint8.

Frames travel as ``(T, H, W, 3)`` uint8 RGB arrays (as decoded) or ``(3, T, H, W)`` float tensors
in [-1, 1] (what the models take). Rotation metadata is applied on read, so sizes match the
manifest's ``width`` / ``height`` (which are as displayed).

Writing: mp4 is H.264 (libx264, crf 18, yuv420p) where this FFmpeg build has it, else MPEG-4
Part 2 (built in everywhere); with ``mbtree=0`` and one thread the x264 in PyAV's wheel writes the
same bytes for the same frames on every run. Stills are PNG (lossless) or JPEG.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np
import torch
from einops import rearrange

from components.core import storage
from components.core.config import EncodeConfig
from components.core.manifest import Clip

# --------------------------------------------------------------------------- pixels


def to_video(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (3, T, H, W) float32 in [-1, 1]."""
    video = torch.from_numpy(np.ascontiguousarray(frames)).float().div(127.5).sub(1.0)
    return rearrange(video, "t h w c -> c t h w")


def to_uint8(video: torch.Tensor) -> np.ndarray:
    """(3, T, H, W) in [-1, 1] -> (T, H, W, 3) uint8, clamped."""
    pixels = video.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return rearrange(pixels, "c t h w -> t h w c").cpu().numpy()


# --------------------------------------------------------------------------- reading


# Decoding is bounded wherever a video is read: frames of at most MAX_DECODE_PIXELS (the
# headers' size, checked before anything is decoded) and at most MAX_DECODE_BYTES of decoded
# RGB per call; a caller wanting a whole long clip at native size gets a clear error, not an OOM.
MAX_DECODE_PIXELS = 8192 * 8192
MAX_DECODE_BYTES = 2 * 2**30


def read_frames(
    uri: str | Path,
    *,
    start: int = 0,
    count: int | None = None,
    rotation: int = 0,
    size: tuple[int, int] | None = None,
    max_pixels: int | None = None,
    max_bytes: int = MAX_DECODE_BYTES,
    crop: tuple[int, int, int, int] | None = None,
) -> np.ndarray:
    """Decode frames ``[start, start + count)`` of a video or image -> (T, H, W, 3) uint8.

    Args:
        uri: a local path or store URI (fetched to a temporary file when remote).
        rotation: counter-clockwise display rotation in degrees (the manifest's ``rotation``).
        size: ``(width, height)`` as displayed to resize to (area filter), or None for native.
        max_pixels: without ``size``, downscale each frame as it is decoded (aspect kept) so
            that width x height <= max_pixels: an 8K upload never exists at 8K in memory.
        max_bytes: the most decoded RGB this call may hold; past it a ValueError says so.
        crop: ``(top, left, height, width)`` as displayed (after rotation and resizing), cut
            from each frame as it is decoded: a crop of an 8K clip holds one 8K frame at a time.
    """
    frames = []
    with storage.local_copy(str(uri)) as path:
        try:
            with av.open(str(path), metadata_errors="ignore") as box:
                if not box.streams.video:
                    raise ValueError(f"{uri} has no video stream")
                stream = box.streams.video[0]
                stream.codec_context.thread_count = 1  # the CPUs are shared; parallel per clip
                declared = (stream.codec_context.width or 0) * (stream.codec_context.height or 0)
                if declared > MAX_DECODE_PIXELS:
                    raise ValueError(
                        f"{uri} declares {stream.codec_context.width}x"
                        f"{stream.codec_context.height} frames, more than the "
                        f"{MAX_DECODE_PIXELS:,} pixels Tessera decodes; re-encode it smaller"
                    )
                turns = (rotation // 90) % 4
                if size is None and max_pixels and declared > max_pixels:
                    scale = math.sqrt(max_pixels / declared)
                    size = (
                        max(1, math.floor(stream.codec_context.width * scale)),
                        max(1, math.floor(stream.codec_context.height * scale)),
                    )
                    if turns % 2:  # size is as displayed
                        size = size[::-1]
                width, height = size if size else (None, None)
                if size and turns % 2:  # resize before rotating: stored the other way up
                    width, height = height, width
                held = 0
                for i, frame in enumerate(box.decode(stream)):
                    if i < start:
                        continue
                    if size:
                        frame = frame.reformat(width=width, height=height, interpolation="AREA")
                    pixels = np.rot90(frame.to_ndarray(format="rgb24"), k=turns)
                    if crop:
                        top, left, h, w = crop
                        pixels = np.ascontiguousarray(pixels[top : top + h, left : left + w])
                    held += pixels.shape[0] * pixels.shape[1] * 3
                    if held > max_bytes:
                        raise ValueError(
                            f"{uri}: decoding more than {max_bytes / 2**20:,.0f} MiB of frames "
                            f"({len(frames)} of {pixels.shape[1]}x{pixels.shape[0]} so far); "
                            "read fewer frames (count) or smaller ones (size / max_pixels / crop)"
                        )
                    frames.append(pixels)
                    if count is not None and len(frames) >= count:
                        break
        except av.FFmpegError as exc:
            raise ValueError(f"{uri} is not a readable video or image: {exc}") from exc
    if not frames:
        raise ValueError(f"{uri}: no frames decoded from index {start} on")
    return np.ascontiguousarray(np.stack(frames))


def load_video(
    uri: str | Path, max_frames: int | None = None, max_pixels: int | None = None
) -> torch.Tensor:
    """A video or image file (path or URI) -> (3, T, H, W) float32 in [-1, 1]; images have
    T = 1 and ``max_frames`` keeps only the first frames."""
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be >= 1 or None, got {max_frames}")
    return to_video(read_frames(uri, count=max_frames, max_pixels=max_pixels))


def frame_size(path: str | Path) -> tuple[int, int]:
    """``(width, height)`` of a local video or image's frames, from its headers."""
    with av.open(str(path), metadata_errors="ignore") as box:
        ctx = box.streams.video[0].codec_context
        return int(ctx.width), int(ctx.height)


def video_fps(path: str | Path) -> float | None:
    """Average frame rate of the file's video stream, or None for a still or an unknown rate."""
    with av.open(str(path)) as container:
        rate = container.streams.video[0].average_rate
        return float(rate) if rate else None


# --------------------------------------------------------------------------- writing


@functools.cache
def video_codec() -> str:
    """``libx264`` when this FFmpeg build has the encoder, else ``mpeg4`` (always built in)."""
    try:
        av.Codec("libx264", "w")
        return "libx264"
    except Exception:  # av raises UnknownCodecError (a ValueError) or FFmpegError by version
        return "mpeg4"


def add_video_stream(
    container: Any, codec: str, rate: Fraction | int, width: int, height: int
) -> Any:
    """A yuv420p video stream with Tessera's encoder settings (see the module docstring)."""
    stream = container.add_stream(codec, rate=rate)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    if codec == "libvpx-vp9":  # the web formats' codec (report pages): constant quality
        stream.options = {
            "crf": "32",
            "b": "0",
            "deadline": "good",
            "cpu-used": "5",
            "threads": "1",
        }
    elif codec == "libx264":
        # mbtree=0: with MB-tree on, the x264 in PyAV 18.1's wheel encodes the same small
        # frames differently from run to run (measured); without it the bytes are reproducible.
        # One thread: the CPUs are shared with other workers.
        stream.options = {"crf": "18", "preset": "fast", "threads": "1", "x264-params": "mbtree=0"}
    else:
        stream.codec_context.qscale = 3  # constant quality (ffmpeg -q:v 3)
        stream.codec_context.thread_count = 1
    return stream


def encode_video(path: Path, frames: np.ndarray, fps: float, codec: str | None = None) -> Path:
    """Write (T, H, W, 3) uint8 RGB ``frames`` at ``fps`` (yuv420p: even sizes): an mp4, or a
    VP9 WebM when ``path`` ends in ``.webm`` (what every browser plays, for report pages)."""
    t, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"{Path(path).name}: yuv420p needs even sizes, got {w}x{h}")
    webm = Path(path).suffix.lower() == ".webm"
    codec = "libvpx-vp9" if webm else codec or video_codec()
    with av.open(str(path), "w", format="webm" if webm else "mp4") as container:
        stream = add_video_stream(container, codec, int(fps), w, h)
        for i in range(t):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frames[i]), format="rgb24")
            frame.pts = i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return Path(path)


def encode_image(path: Path, frame: np.ndarray) -> Path:
    """Write an (H, W, 3) uint8 RGB frame as PNG (lossless) or JPEG, chosen by the suffix."""
    h, w, _ = frame.shape
    suffix = Path(path).suffix.lower()
    if suffix == ".png":
        codec, pix_fmt = "png", "rgb24"
    elif suffix in (".jpg", ".jpeg"):
        codec, pix_fmt = "mjpeg", "yuvj420p"
    else:
        raise ValueError(f"{Path(path).name}: images are written as .png or .jpg, not {suffix!r}")
    ctx = av.CodecContext.create(codec, "w")
    ctx.width, ctx.height, ctx.pix_fmt, ctx.time_base = w, h, pix_fmt, Fraction(1, 1)
    if codec == "mjpeg":
        ctx.qscale = 2  # high quality; the default rate control starves a single frame
    image = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
    image = image.reformat(format=pix_fmt)
    image.pts = 0
    Path(path).write_bytes(b"".join(bytes(p) for p in ctx.encode(image) + ctx.encode(None)))
    return Path(path)


def save_video(video: torch.Tensor, path: Path, fps: float = 12) -> Path:
    """Write a clip (3, T, H, W) in [-1, 1]: mp4 when T > 1, PNG when T == 1.

    The suffix of ``path`` is set to ``.mp4`` / ``.png`` accordingly; the returned path is the
    file written. yuv420p needs even sides, so an odd height or width is padded by repeating
    the last row / column (the file is then one pixel larger).
    """
    if video.ndim != 4 or video.shape[0] != 3:
        raise ValueError(f"save_video takes (3, T, H, W), got {tuple(video.shape)}")
    frames = to_uint8(video)  # (T, H, W, 3)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if frames.shape[0] == 1:
        return encode_image(path.with_suffix(".png"), frames[0])
    _, height, width, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    return encode_video(path.with_suffix(".mp4"), frames, fps)


def write_comparison(
    path: Path,
    original: torch.Tensor,
    reconstruction: torch.Tensor,
    fps: float = 8.0,
    error_gain: float = 4.0,
) -> Path:
    """Write ``original | reconstruction | |error| * error_gain`` side by side as an mp4 (also
    for a single frame). original, reconstruction: (3, T, H, W) in [-1, 1]; odd sizes are padded.
    """
    error = (original - reconstruction).abs().mul(error_gain).clamp(0, 2).sub(1)  # in [-1, 1]
    panels = torch.cat([original, reconstruction.clamp(-1, 1), error], dim=-1)  # (3, T, H, 3W)
    frames = to_uint8(panels)  # (T, H, 3W, 3)
    pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
    frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
    path.parent.mkdir(parents=True, exist_ok=True)
    return encode_video(path, frames, max(1, round(fps or 8.0)))


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
