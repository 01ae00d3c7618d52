"""Corruptions of real clips with a known direction: a metric that measures something must get
worse as their strength rises (FVD's usual sanity check, Unterthiner et al. 2018).

Every function takes a uint8 clip (T, H, W, 3) and a ``strength`` in [0, 1] and returns a new
uint8 clip of the same shape; strength 0 returns an unchanged copy, and each function is a pure
function of its arguments (the seed included).

- :func:`add_noise` — i.i.d. Gaussian pixel noise, sigma = ``strength * NOISE_SIGMA`` grey levels.
- :func:`blur` — per-frame Gaussian blur, sigma = ``strength * BLUR_SIGMA * short side`` pixels
  (relative to the frame, so a strength means the same at every resolution).
- :func:`shuffle_frames` — ``round(strength * T)`` frames change places (one random cycle among
  them, so every chosen frame moves); 1 is a full random reordering. Each frame stays intact:
  only the order, i.e. the motion, is destroyed. A still (T = 1) is unchanged.

Pure NumPy; no model, storage or tracking imports.
"""

from __future__ import annotations

import math

import numpy as np

NOISE_SIGMA = 64.0  # grey levels (of 255) at strength 1
BLUR_SIGMA = 1 / 20  # Gaussian sigma at strength 1, as a fraction of the frame's short side


def _check(video: np.ndarray, strength: float) -> np.ndarray:
    video = np.asarray(video)
    if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(
            f"corruptions take uint8 clips (T, H, W, 3), got {video.dtype} {video.shape}"
        )
    if not (isinstance(strength, (int, float)) and 0.0 <= strength <= 1.0):
        raise ValueError(f"strength must be in [0, 1], got {strength!r}")
    return video


def add_noise(video: np.ndarray, strength: float, seed: int = 0) -> np.ndarray:
    """``video`` + N(0, (strength * NOISE_SIGMA)²) per pixel and channel, rounded and clipped."""
    video = _check(video, strength)
    if strength == 0:
        return video.copy()
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal(video.shape, dtype=np.float32) * (strength * NOISE_SIGMA)
    return np.clip(np.rint(video.astype(np.float32) + noise), 0, 255).astype(np.uint8)


def gaussian_kernel(sigma: float) -> np.ndarray:
    """Normalised 1-D Gaussian taps out to 3 sigma (at least 3 taps)."""
    radius = max(1, math.ceil(3 * sigma))
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return (taps / taps.sum()).astype(np.float32)


def _filter_axis(x: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """Correlate ``x`` with ``taps`` along ``axis``, 'same' size, edges mirrored (symmetric)."""
    radius = len(taps) // 2
    pad = [(0, 0)] * x.ndim
    pad[axis] = (radius, radius)
    padded = np.pad(x, pad, mode="symmetric" if radius <= x.shape[axis] else "edge")
    n = x.shape[axis]
    out = np.zeros_like(x)
    for k, tap in enumerate(taps):
        out += tap * np.take(padded, np.arange(k, k + n), axis=axis)
    return out


def blur(video: np.ndarray, strength: float) -> np.ndarray:
    """Gaussian blur of every frame, sigma = ``strength * BLUR_SIGMA * min(H, W)`` pixels."""
    video = _check(video, strength)
    sigma = strength * BLUR_SIGMA * min(video.shape[1:3])
    if sigma < 0.1:  # below a tenth of a pixel the taps round to the identity
        return video.copy()
    taps = gaussian_kernel(sigma)
    out = _filter_axis(_filter_axis(video.astype(np.float32), taps, 1), taps, 2)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def shuffle_frames(video: np.ndarray, strength: float, seed: int = 0) -> np.ndarray:
    """``round(strength * T)`` randomly chosen frames moved along one random cycle."""
    video = _check(video, strength)
    t = video.shape[0]
    k = round(strength * t)
    if k < 2:
        return video.copy()
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(t)[:k]  # positions, in a random order: one k-cycle
    order = np.arange(t)
    order[chosen] = np.roll(chosen, 1)  # position chosen[i] shows frame chosen[i - 1]
    return video[order].copy()


CORRUPTIONS = {"noise": add_noise, "blur": blur, "shuffle": shuffle_frames}


def corrupt(kind: str, video: np.ndarray, strength: float, seed: int = 0) -> np.ndarray:
    """One of :data:`CORRUPTIONS` by name (``noise`` | ``blur`` | ``shuffle``)."""
    if kind == "blur":
        return blur(video, strength)
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; choose one of {sorted(CORRUPTIONS)}")
    return CORRUPTIONS[kind](video, strength, seed)
