"""Corruptions of uint8 clips: identity at strength 0, stronger with strength, seeded, frames
kept whole by shuffling, clear errors."""

from __future__ import annotations

import numpy as np
import pytest

from evaluation.corruptions import (
    BLUR_SIGMA,
    CORRUPTIONS,
    add_noise,
    blur,
    corrupt,
    gaussian_kernel,
    shuffle_frames,
)


def _clip(frames: int = 8, height: int = 40, width: int = 64) -> np.ndarray:
    """A moving checkerboard: sharp edges and motion."""
    t, y, x = np.meshgrid(np.arange(frames), np.arange(height), np.arange(width), indexing="ij")
    board = ((x + 3 * t) // 8 + y // 8) % 2
    rgb = np.stack([board * 200 + 30, board * 100 + 60, (1 - board) * 180 + 40], axis=-1)
    return rgb.astype(np.uint8)  # (T, H, W, 3)


def _error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b).mean())


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_strength_zero_is_an_unchanged_copy_and_shapes_hold(kind):
    clip = _clip()
    same = corrupt(kind, clip, 0.0, seed=3)
    assert same is not clip and np.array_equal(same, clip)
    out = corrupt(kind, clip, 0.7, seed=3)
    assert out.dtype == np.uint8 and out.shape == clip.shape
    assert np.array_equal(out, corrupt(kind, clip, 0.7, seed=3))  # a pure function of its args


def test_noise_and_blur_grow_with_strength():
    clip = _clip()
    noise = [_error(clip, add_noise(clip, s, seed=0)) for s in (0.1, 0.25, 0.5, 1.0)]
    blurred = [_error(clip, blur(clip, s)) for s in (0.25, 0.5, 1.0)]  # 0.1: a 0.2 px sigma
    assert noise == sorted(noise) and noise[0] > 0
    assert blurred == sorted(blurred) and blurred[0] > 0 and len(set(blurred)) == 3
    assert not np.array_equal(add_noise(clip, 0.5, seed=0), add_noise(clip, 0.5, seed=1))


def test_blur_is_relative_to_the_frame_and_keeps_flat_regions():
    flat = np.full((2, 30, 50, 3), 77, np.uint8)
    assert np.array_equal(blur(flat, 1.0), flat)  # mirrored edges: nothing leaks in
    taps = gaussian_kernel(BLUR_SIGMA * 30)
    assert taps.sum() == pytest.approx(1.0) and len(taps) % 2 == 1
    small, large = _clip(2, 40, 64), np.repeat(np.repeat(_clip(2, 40, 64), 2, 1), 2, 2)
    down = blur(large, 0.5)[:, ::2, ::2]  # the same blur in frame units at twice the size
    assert _error(blur(small, 0.5), down) < 0.5 * _error(small, blur(small, 0.5))


def test_shuffling_moves_frames_whole_and_leaves_stills():
    clip = _clip(frames=10)
    ids = np.arange(10, dtype=np.uint8)[:, None, None, None] * np.ones((1, 4, 4, 3), np.uint8)
    for strength, moved in ((0.1, 0), (0.3, 3), (0.5, 5), (1.0, 10)):
        out = shuffle_frames(ids, strength, seed=1)
        order = out[:, 0, 0, 0].tolist()
        assert sorted(order) == list(range(10))  # every frame once, intact
        assert sum(o != i for i, o in enumerate(order)) == moved  # the chosen frames all move
    full = shuffle_frames(clip, 1.0, seed=2)
    assert sorted(map(bytes, full)) == sorted(map(bytes, clip))
    still = clip[:1]
    assert np.array_equal(shuffle_frames(still, 1.0, seed=0), still)


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="strength must be in \\[0, 1\\]"):
        add_noise(_clip(), 1.5)
    with pytest.raises(ValueError, match="uint8 clips"):
        blur(_clip().astype(np.float32), 0.5)
    with pytest.raises(ValueError, match="unknown corruption 'jpeg'"):
        corrupt("jpeg", _clip(), 0.5)
