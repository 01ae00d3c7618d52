"""Prompt following: does a generated clip show the colour its prompt names?

A counterfactual test. For a base prompt (a caption of the corpus naming one object of a known
colour on a known background) the colour word alone is swapped through a palette, and every
variant is sampled **with the same seed**. A model that ignores the word renders the same clip
for every variant, so at most one variant of a base can be right: its expected accuracy is at
most ``1 / k`` for ``k`` variants (the *chance* level reported here). Accuracy above it, with a
small binomial tail probability, means the colour word steers the output.

The colour classifier is deliberately simple and checked on real corpus files (where the
colour is known from the factor sidecar) before it scores generated clips:

- the background is known as a segment of RGB space (one colour for a plain backdrop, the two
  ends of a gradient, the darkest and brightest shade of a mottled texture); pixels farther
  than ``min_distance`` (RGB, 0..255) from that segment are the foreground;
- each foreground pixel votes for the nearest palette colour or darker shade of one (textures
  are drawn with a dark shade); the top vote is the clip's colour (``None`` when fewer than
  ``min_fraction`` of the pixels are foreground).

Pure NumPy; no model, storage or tracking imports.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

RGB = tuple[float, float, float]
Segment = tuple[RGB, RGB]  # a background: every colour between the two ends


def segment_distance(points: np.ndarray, segment: Segment) -> np.ndarray:
    """Euclidean distance of (N, 3) RGB points to the RGB segment ``segment``."""
    a, b = (np.asarray(end, np.float32) for end in segment)
    ab = b - a
    length = float(ab @ ab)
    t = (
        np.zeros(len(points), np.float32)
        if length == 0
        else np.clip((points - a) @ ab / length, 0.0, 1.0)
    )
    return np.linalg.norm(points - (a + t[:, None] * ab), axis=1)


@dataclass(frozen=True)
class ColourVote:
    """The classifier's answer for one clip."""

    colour: str | None  # None: too little foreground to say
    foreground: float  # fraction of pixels that differ from the background
    votes: dict[str, float]  # palette colour -> fraction of the foreground voting for it


def dominant_colour(
    frames: np.ndarray,
    palette: Mapping[str, RGB],
    background: Segment,
    *,
    min_distance: float = 55.0,
    min_fraction: float = 0.002,
    shades: Sequence[float] = (1.0, 0.7, 0.45),
) -> ColourVote:
    """The palette colour most of the foreground is nearest to.

    Args:
        frames: (T, H, W, 3) uint8 (``model.generate.to_uint8_frames`` of a clip).
        palette: the candidate object colours, name -> RGB.
        background: the RGB segment the backdrop's colours lie on (``(c, c)`` when plain).
        min_distance: RGB distance from that segment above which a pixel is foreground.
        min_fraction: below this foreground fraction the answer is ``None``.
        shades: brightness factors of each palette colour that vote for it too (striped and
            checkered objects are drawn with a dark shade, 0.45, of their colour).
    """
    if not palette:
        raise ValueError("dominant_colour needs a non-empty palette")
    pixels = np.asarray(frames, dtype=np.float32).reshape(-1, 3)
    if pixels.size == 0:
        raise ValueError("dominant_colour got an empty clip")
    names = list(palette)
    colours = np.array(
        [[f * v for v in palette[n]] for f in shades for n in names], dtype=np.float32
    )  # (S * K, 3): shade-major
    far = segment_distance(pixels, background) > min_distance
    fg = pixels[far]
    fraction = float(far.mean())
    if fraction < min_fraction or len(fg) == 0:
        return ColourVote(None, fraction, {})
    nearest = np.argmin(((fg[:, None, :] - colours[None]) ** 2).sum(-1), axis=1) % len(names)
    counts = np.bincount(nearest, minlength=len(names)) / len(fg)
    votes = {n: float(c) for n, c in zip(names, counts, strict=True) if c > 0}
    return ColourVote(names[int(np.argmax(counts))], fraction, votes)


def poisson_binomial_tail(probabilities: Sequence[float], successes: int) -> float:
    """P(at least ``successes`` of independent trials succeed), trial ``i`` with prob ``p_i``."""
    dist = np.zeros(len(probabilities) + 1)
    dist[0] = 1.0
    for p in probabilities:
        dist[1:] = dist[1:] * (1 - p) + dist[:-1] * p
        dist[0] *= 1 - p
    return float(min(1.0, dist[max(0, successes) :].sum()))


@dataclass(frozen=True)
class Trial:
    """One generated variant: the base it came from, the colour asked for and the one seen."""

    base: str
    asked: str
    seen: str | None
    variants: int  # how many colours the base was tried with (its chance is 1 / variants)

    @property
    def correct(self) -> bool:
        return self.seen == self.asked


@dataclass(frozen=True)
class FollowingScore:
    trials: int
    correct: int
    accuracy: float
    chance: float  # expected accuracy of a model that ignores the colour word (upper bound)
    p_value: float  # P(>= correct successes) if every trial succeeded at its chance rate
    bases: int

    def as_metrics(self, prefix: str = "colour_") -> dict[str, float]:
        return {f"{prefix}{k}": float(v) for k, v in vars(self).items()}


def score(trials: Sequence[Trial]) -> FollowingScore:
    """Accuracy, chance level and binomial tail of a set of counterfactual trials."""
    if not trials:
        raise ValueError("score needs at least one trial")
    chances = [1.0 / t.variants for t in trials]
    correct = sum(t.correct for t in trials)
    return FollowingScore(
        trials=len(trials),
        correct=correct,
        accuracy=correct / len(trials),
        chance=float(np.mean(chances)),
        p_value=poisson_binomial_tail(chances, correct),
        bases=len({t.base for t in trials}),
    )


def contrasting(palette: Mapping[str, RGB], background: Segment, min_contrast: float) -> list[str]:
    """Palette colours at least ``min_contrast`` (RGB distance) from every background colour."""
    names = list(palette)
    points = np.array([palette[n] for n in names], np.float32)
    far = segment_distance(points, background) >= min_contrast
    return [n for n, keep in zip(names, far, strict=True) if keep]


__all__ = [
    "ColourVote",
    "FollowingScore",
    "Segment",
    "Trial",
    "contrasting",
    "dominant_colour",
    "poisson_binomial_tail",
    "score",
    "segment_distance",
]
