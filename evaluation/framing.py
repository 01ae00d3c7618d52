"""Framing: is a clip's main object cut by the frame edge?

The Sora report claims that training at native aspect ratios improves composition, where
square-crop training leaves subjects partly out of frame. On the demo corpus this is measurable:
the backdrop is known (as in :mod:`evaluation.prompt_following`, an RGB segment), so a pixel far
from it is foreground, and the main object is the foreground whose nearest palette colour (or dark
shade of one, for textures) is the object's colour. The clip counts as **cut** when, in some
frame, at least ``min_pixels`` pixels on the one-pixel border of the frame belong to the main
object. The classifier is checked on corpus files whose ground truth the factor sidecar states
(``primary_cut``, from the renderer's geometry) before it scores generated clips.

Pure NumPy; no model, storage or tracking imports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from evaluation.prompt_following import RGB, Segment, segment_distance


@dataclass(frozen=True)
class FramingVote:
    cut: bool
    frames_cut: int  # frames with the main object on the border
    max_border_pixels: int  # most main-object border pixels in one frame
    foreground: float  # fraction of all pixels that are the main object


def main_object_cut(
    frames: np.ndarray,
    palette: Mapping[str, RGB],
    background: Segment,
    colour: str,
    *,
    min_distance: float = 55.0,
    min_pixels: int = 2,
    shades: Sequence[float] = (1.0, 0.7, 0.45),
) -> FramingVote:
    """Whether the ``colour`` object of (T, H, W, 3) uint8 ``frames`` touches the frame border."""
    if colour not in palette:
        raise ValueError(f"unknown object colour {colour!r}; the palette is {sorted(palette)}")
    video = np.asarray(frames)
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] == 0:
        raise ValueError(f"frames must be (T, H, W, 3) with T >= 1, got {video.shape}")
    t, h, w, _ = video.shape
    names = list(palette)
    target = names.index(colour)
    colours = np.array(
        [[f * v for v in palette[n]] for f in shades for n in names], dtype=np.float32
    )  # (S * K, 3): shade-major
    pixels = video.reshape(-1, 3).astype(np.float32)
    far = segment_distance(pixels, background) > min_distance
    nearest = np.full(len(pixels), -1)
    nearest[far] = np.argmin(((pixels[far, None, :] - colours[None]) ** 2).sum(-1), axis=1) % len(
        names
    )
    main = (nearest == target).reshape(t, h, w)
    border = np.zeros((h, w), bool)
    border[[0, -1], :] = True
    border[:, [0, -1]] = True
    on_border = (main & border).reshape(t, -1).sum(axis=1)  # (T,)
    return FramingVote(
        cut=bool((on_border >= min_pixels).any()),
        frames_cut=int((on_border >= min_pixels).sum()),
        max_border_pixels=int(on_border.max()),
        foreground=float(main.mean()),
    )


@dataclass(frozen=True)
class ClassifierCheck:
    """The classifier against known answers."""

    n: int
    accuracy: float
    precision: float  # of "cut" answers, the share that are cut
    recall: float  # of cut clips, the share found

    @classmethod
    def of(cls, predicted: Sequence[bool], truth: Sequence[bool]) -> ClassifierCheck:
        p, y = np.asarray(predicted, bool), np.asarray(truth, bool)
        if p.shape != y.shape or p.size == 0:
            raise ValueError(f"need equal, non-empty answer lists, got {p.size} and {y.size}")
        tp = float((p & y).sum())
        return cls(
            n=int(p.size),
            accuracy=float((p == y).mean()),
            precision=tp / p.sum() if p.any() else float("nan"),
            recall=tp / y.sum() if y.any() else float("nan"),
        )


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion."""
    if n <= 0:
        return float("nan"), float("nan")
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return float(centre - half), float(centre + half)


__all__ = ["ClassifierCheck", "FramingVote", "main_object_cut", "wilson_interval"]
