import dataclasses
import math

import numpy as np
import pytest

from components.core.config import load_config
from components.core.demo_corpus import (
    BACKGROUND_PALETTE,
    MIN_CONTRAST,
    PALETTE,
    background_range,
)
from components.steps.demo_data import plan_corpus, render_frames
from evaluation import prompt_following as pf


def _frame(background, colour=None, box=(10, 20, 12, 22), size=(32, 48)):
    frame = np.empty((1, *size, 3), np.uint8)
    frame[:] = background
    if colour is not None:
        y0, y1, x0, x1 = box
        frame[:, y0:y1, x0:x1] = colour
    return frame


def test_dominant_colour_reads_the_object_not_the_background():
    navy = BACKGROUND_PALETTE["navy"]
    vote = pf.dominant_colour(_frame(navy, PALETTE["orange"]), PALETTE, (navy, navy))
    assert vote.colour == "orange"
    assert vote.foreground == pytest.approx(100 / (32 * 48))
    assert vote.votes == {"orange": 1.0}


def test_dominant_colour_survives_noise_and_says_none_for_an_empty_frame():
    rng = np.random.default_rng(0)
    grey = BACKGROUND_PALETTE["light grey"]
    noisy = _frame(grey, PALETTE["blue"]).astype(np.int16) + rng.integers(-20, 21, (1, 32, 48, 3))
    plain = (grey, grey)
    assert (
        pf.dominant_colour(np.clip(noisy, 0, 255).astype(np.uint8), PALETTE, plain).colour == "blue"
    )
    assert pf.dominant_colour(_frame(grey), PALETTE, plain).colour is None


def test_dominant_colour_reads_every_rendered_single_object_file():
    """The classifier on the corpus renderer's own frames (plain, gradient and mottled
    backdrops, solid and textured objects): its ceiling is 1.0."""
    dd = load_config(
        "tiny",
        [
            "demo_data.num_clips=60",
            "demo_data.num_images=20",
            "demo_data.base_pixels=1024",
            "demo_data.max_frames=5",
        ],
    ).demo_data
    specs = [s for s in plan_corpus(dd) if len(s.objects) == 1]
    assert {s.background for s in specs} == {"solid", "gradient", "noise"}
    assert {s.primary.texture for s in specs} == {"solid", "striped", "checkered"}
    for spec in specs:
        bg = background_range(spec.background, spec.background_colors)
        vote = pf.dominant_colour(render_frames(spec), PALETTE, bg)
        assert vote.colour == spec.primary.color, (spec, vote)


def test_a_model_that_follows_scores_one_and_one_that_ignores_stays_at_chance():
    dd = load_config(
        "tiny", ["demo_data.num_clips=30", "demo_data.base_pixels=1024", "demo_data.max_frames=5"]
    ).demo_data
    bases = [s for s in plan_corpus(dd) if len(s.objects) == 1][:3]
    follows, ignores = [], []
    for base in bases:
        bg = background_range(base.background, base.background_colors)
        colours = pf.contrasting(PALETTE, bg, MIN_CONTRAST)
        fixed = pf.dominant_colour(render_frames(base), PALETTE, bg).colour  # same clip for all
        for colour in colours:
            recoloured = dataclasses.replace(
                base, objects=(dataclasses.replace(base.primary, color=colour),)
            )
            seen = pf.dominant_colour(render_frames(recoloured), PALETTE, bg).colour
            follows.append(pf.Trial(base.path, colour, seen, len(colours)))
            ignores.append(pf.Trial(base.path, colour, fixed, len(colours)))
    good, bad = pf.score(follows), pf.score(ignores)
    assert good.accuracy == 1.0 and good.p_value < 1e-6 and good.bases == 3
    assert bad.correct == 3 and bad.accuracy == pytest.approx(bad.chance)  # one hit per base
    assert bad.p_value > 0.05


def test_contrasting_keeps_away_from_every_background_colour():
    grey = BACKGROUND_PALETTE["light grey"]
    kept = pf.contrasting(PALETTE, (grey, grey), MIN_CONTRAST)
    assert "white" not in kept and "blue" in kept
    assert all(math.dist(PALETTE[c], grey) >= MIN_CONTRAST for c in kept)
    gradient = background_range("gradient", ["light grey", "navy"])
    across = pf.contrasting(PALETTE, gradient, MIN_CONTRAST)
    assert set(across) < set(kept) and "purple" not in across  # purple is near the mid-grade


def test_segment_distance_and_background_ranges():
    points = np.array([[0, 0, 0], [50, 50, 50], [200, 0, 0]], np.float32)
    dist = pf.segment_distance(points, ((0, 0, 0), (100, 100, 100)))
    assert dist[:2] == pytest.approx([0, 0], abs=1e-4)
    assert dist[2] == pytest.approx(math.dist((200, 0, 0), (200 / 3,) * 3), rel=1e-4)
    navy = BACKGROUND_PALETTE["navy"]
    assert background_range("solid", ["navy"]) == (navy, navy)
    low, high = background_range("noise", ["navy"])
    assert low == tuple(0.5 * v for v in navy) and high == tuple(1.5 * v for v in navy)
    with pytest.raises(ValueError, match="unknown background"):
        background_range("stripes", ["navy"])


def test_poisson_binomial_tail_matches_the_binomial():
    n, p = 12, 0.2
    for k in (0, 3, 7, 12):
        expected = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
        assert pf.poisson_binomial_tail([p] * n, k) == pytest.approx(expected)
    assert pf.poisson_binomial_tail([0.5, 0.25], 2) == pytest.approx(0.125)


def test_score_needs_trials_and_dominant_colour_a_palette():
    with pytest.raises(ValueError, match="at least one trial"):
        pf.score([])
    with pytest.raises(ValueError, match="non-empty palette"):
        pf.dominant_colour(_frame((0, 0, 0)), {}, (0, 0, 0))
