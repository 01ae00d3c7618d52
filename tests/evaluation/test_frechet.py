"""The Fréchet core against pytorch-fid and torch-fidelity on identical inputs, and its contract
(recorded divisor, refused mismatches, a seeded bootstrap)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evaluation.frechet import (
    bootstrap,
    frechet_distance,
    frechet_from_features,
    statistics,
    trace_sqrt_product,
)
from tests.testing_utils import no_torchvision

no_torchvision.install()  # both packages import torchvision at module level, never call it here

from pytorch_fid.fid_score import calculate_frechet_distance  # noqa: E402
from torch_fidelity.metric_fid import (  # noqa: E402
    KEY_METRIC_FID,
    fid_features_to_statistics,
    fid_statistics_to_metric,
)


def features(n: int, d: int, seed: int, shift: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Two correlated (n, d) feature sets; the second shifted, rescaled and mixed."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(d, d)) / np.sqrt(d)
    x = rng.normal(size=(n, d)) @ mix
    y = (rng.normal(size=(n, d)) @ mix) * 1.3 + shift + 0.2 * rng.normal(size=(n, d))
    return x.astype(np.float32), y.astype(np.float32)


def references(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(pytorch-fid, torch-fidelity) on the same features, both with np.cov (ddof=1)."""
    sx = fid_features_to_statistics(torch.from_numpy(x).double())
    sy = fid_features_to_statistics(torch.from_numpy(y).double())
    pfid = calculate_frechet_distance(sx["mu"], sx["sigma"], sy["mu"], sy["sigma"])
    tfid = fid_statistics_to_metric(sx, sy, verbose=False)[KEY_METRIC_FID]
    return float(pfid), float(tfid)


@pytest.mark.parametrize(
    "n, d",
    [(600, 32), (40, 64)],  # well conditioned; near-singular (fewer samples than dimensions)
    ids=["n>d", "n<d"],
)
def test_matches_pytorch_fid_and_torch_fidelity(n, d):
    x, y = features(n, d, seed=n + d, shift=0.5)
    ours = frechet_from_features(x, y, ddof=1)
    pfid, tfid = references(x, y)
    assert ours > 1.0  # a distance worth comparing, not round-off
    assert ours == pytest.approx(pfid, rel=1e-6)
    assert ours == pytest.approx(tfid, rel=1e-6)
    # the statistics are torch-fidelity's (np.mean, np.cov) to float64 round-off
    ref = fid_features_to_statistics(torch.from_numpy(x).double())
    s = statistics(x, ddof=1)
    np.testing.assert_allclose(s.mean, ref["mu"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(s.cov, ref["sigma"], rtol=0, atol=1e-12)


def test_trace_term_equals_trace_of_sqrtm_of_product():
    import scipy.linalg

    x, y = features(300, 16, seed=1)
    a, b = statistics(x).cov, statistics(y).cov
    root = scipy.linalg.sqrtm(a @ b)
    assert trace_sqrt_product(a, b) == pytest.approx(float(np.trace(root).real), rel=1e-9)
    assert trace_sqrt_product(a, b) == pytest.approx(trace_sqrt_product(b, a), rel=1e-9)


@pytest.mark.parametrize("n, d", [(500, 16), (20, 64)], ids=["n>d", "n<d"])
def test_identical_sets_give_zero(n, d):
    x, _ = features(n, d, seed=3)
    scale = np.trace(statistics(x).cov)
    assert 0.0 <= frechet_from_features(x, x) <= 1e-9 * scale
    assert 0.0 <= frechet_from_features(x, x.copy(), ddof=0) <= 1e-9 * scale


def test_divisor_is_recorded_and_mismatches_are_refused():
    x, y = features(50, 8, seed=4)
    s0, s1 = statistics(x, ddof=0), statistics(x, ddof=1)
    assert (s0.ddof, s1.ddof, s0.n, s0.dim) == (0, 1, 50, 8)
    np.testing.assert_allclose(s0.cov, np.cov(x, rowvar=False, ddof=0), atol=1e-12)
    np.testing.assert_allclose(s1.cov, np.cov(x, rowvar=False, ddof=1), atol=1e-12)
    with pytest.raises(ValueError, match="divisors differ"):
        frechet_distance(s0, statistics(y, ddof=1))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(s1, statistics(y[:, :4], ddof=1))
    with pytest.raises(ValueError, match="ddof must be"):
        statistics(x, ddof=2)
    with pytest.raises(ValueError, match="more than 1"):
        statistics(x[:1], ddof=1)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        statistics(x[0])
    with pytest.raises(ValueError, match="NaN"):
        statistics(np.where(np.eye(50, 8) > 0, np.nan, x))


def test_bootstrap_is_deterministic_under_a_seed():
    x, y = features(80, 6, seed=5, shift=0.3)
    a = bootstrap(x, y, resamples=50, seed=7, ddof=0)
    b = bootstrap(x, y, resamples=50, seed=7, ddof=0)
    c = bootstrap(x, y, resamples=50, seed=8, ddof=0)
    assert (a.low, a.high) == (b.low, b.high)
    assert (a.low, a.high) != (c.low, c.high)
    assert a.value == c.value == pytest.approx(frechet_from_features(x, y, ddof=0))
    assert a.low < a.high and (a.n_a, a.n_b, a.ddof, a.resamples) == (80, 80, 0, 50)
    none = bootstrap(x, y, resamples=0)
    assert none.low == none.value == none.high
    assert set(a.as_metrics("fd")) == {"fd", "fd_low", "fd_high", "fd_n_real", "fd_n_fake"}
    with pytest.raises(ValueError, match="confidence"):
        bootstrap(x, y, confidence=1.0)
