"""The scaling-law fit on synthetic sweeps: exact recovery, interval coverage, robustness to an
outlier, the held-out extrapolation, the compute-optimal exponent and the plot."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from evaluation.scaling import _fit_batch as fit_batch
from evaluation.scaling import (
    bootstrap_power_law,
    compute_optimal,
    fit_power_law,
    holdout_largest,
    plot_scaling,
)

A, B, L_INF = 50.0, 0.15, 0.3
COMPUTE = np.geomspace(1e12, 1e16, 6)


def curve(c: np.ndarray, a: float = A, b: float = B, l_inf: float = L_INF) -> np.ndarray:
    return a * c ** (-b) + l_inf


def test_recovers_noise_free_parameters():
    fit = fit_power_law(COMPUTE, curve(COMPUTE))
    assert abs(fit.b - B) / B < 1e-3
    assert abs(fit.l_inf - L_INF) < 1e-3
    assert fit.a == pytest.approx(A, rel=1e-3)  # in the caller's FLOP units
    assert fit.n_points == 6 and fit.residual_rms < 1e-8
    assert fit.predict(1e17) == pytest.approx(float(curve(np.array(1e17))), rel=1e-6)
    assert fit.predict(COMPUTE).shape == (6,)
    assert json.loads(json.dumps(fit.to_dict()))["b"] == pytest.approx(B, rel=1e-3)


def test_batched_bootstrap_fit_matches_the_point_fit():
    rng = np.random.default_rng(3)
    ys = curve(COMPUTE) * np.exp(0.01 * rng.standard_normal((5, 6)))
    _, b, l_inf = fit_batch(COMPUTE, ys, 0.01)
    for row, b_row, l_row in zip(ys, b, l_inf, strict=True):
        fit = fit_power_law(COMPUTE, row)
        assert b_row == pytest.approx(fit.b, rel=1e-6)
        assert l_row == pytest.approx(fit.l_inf, rel=1e-5, abs=1e-8)


def test_pure_power_law_gives_zero_floor():
    fit = fit_power_law(COMPUTE, curve(COMPUTE, l_inf=0.0))
    assert fit.l_inf == pytest.approx(0.0, abs=1e-6)
    assert fit.b == pytest.approx(B, rel=1e-4)


def test_exactly_three_points_fit_and_fewer_refused():
    fit = fit_power_law(COMPUTE[[0, 2, 5]], curve(COMPUTE[[0, 2, 5]]))
    assert fit.b == pytest.approx(B, rel=1e-3)
    with pytest.raises(ValueError, match="at least 3 points, got 2"):
        fit_power_law(COMPUTE[:2], curve(COMPUTE[:2]))


def test_huber_resists_one_outlier():
    loss = curve(COMPUTE)
    loss = loss * np.exp(0.005 * np.random.default_rng(0).standard_normal(6))
    bad = loss.copy()
    bad[3] *= 1.3  # one diverged run
    shift_huber = abs(fit_power_law(COMPUTE, bad).b - fit_power_law(COMPUTE, loss).b)
    shift_ols = abs(
        fit_power_law(COMPUTE, bad, huber_delta=float("inf")).b
        - fit_power_law(COMPUTE, loss, huber_delta=float("inf")).b
    )
    assert shift_huber < 0.25 * shift_ols


def test_bootstrap_is_seeded_and_brackets_the_fit():
    loss = curve(COMPUTE) * np.exp(0.01 * np.random.default_rng(1).standard_normal(6))
    one = bootstrap_power_law(COMPUTE, loss, samples=200, seed=4)
    two = bootstrap_power_law(COMPUTE, loss, samples=200, seed=4)
    assert one.b_interval == two.b_interval and one.failed == 0
    assert one.b_interval[0] < one.fit.b < one.b_interval[1]
    low, high = one.predict_interval(COMPUTE)
    assert low.shape == (6,) and (low < one.fit.predict(COMPUTE)).all()
    assert (high > one.fit.predict(COMPUTE)).all()
    assert json.loads(json.dumps(one.to_dict()))["samples"] == 200


def test_interval_coverage_on_noisy_replicates():
    # 100 sweeps of 6 runs with 1 % log-normal noise, 200 bootstrap fits each (~6 s). Measured
    # coverage of the true b by the nominal 90 % interval: 0.78 over 200 replicates, 0.79 on these
    # 100 (seeded, so this number is fixed). The percentile residual bootstrap under-covers with
    # 3 fitted parameters and 3 residual degrees of freedom (a t(3) quantile would be ~1.4x the
    # normal one), so the bounds are the honest band around the measurement, not 0.9 +- noise:
    # a broken bootstrap (intervals collapsing or spanning everything) lands outside it.
    rng = np.random.default_rng(123)
    covered = 0
    replicates = 100
    for k in range(replicates):
        loss = curve(COMPUTE) * np.exp(0.01 * rng.standard_normal(6))
        boot = bootstrap_power_law(COMPUTE, loss, samples=200, seed=k)
        covered += boot.b_interval[0] <= B <= boot.b_interval[1]
    assert 0.68 <= covered / replicates <= 0.97


def test_holdout_predicts_the_largest_run():
    holdout = holdout_largest(COMPUTE, curve(COMPUTE), samples=100, confidence=0.9, seed=0)
    assert holdout.compute == COMPUTE[-1]
    assert abs(holdout.relative_error) < 0.01
    assert holdout.inside
    assert json.loads(json.dumps(holdout.to_dict()))["inside"] is True
    with pytest.raises(ValueError, match="at least 4 points"):
        holdout_largest(COMPUTE[:3], curve(COMPUTE[:3]), samples=10, confidence=0.9, seed=0)
    # 3 runs fitted: the law passes through them, no residual to resample, no interval
    four = holdout_largest(COMPUTE[:4], curve(COMPUTE[:4]) * [1, 1.02, 1, 1], samples=10)
    assert four.interval is None and four.inside is None and math.isfinite(four.predicted)


def chinchilla_points(budgets: np.ndarray) -> list[tuple[float, float, float]]:
    """Iso-FLOP sweeps of L(N, D) = E + A/N^0.34 + B/D^0.28 with D = C / (6 N), the 5 sizes
    of a fixed log grid nearest each budget's true optimum."""
    e, a, b, alpha, beta = 1.69, 406.4, 410.7, 0.34, 0.28
    sizes = np.geomspace(1e6, 1e12, 25)  # 4 sizes per decade
    points = []
    for c in budgets:
        loss = e + a / sizes**alpha + b / (c / (6 * sizes)) ** beta
        best = int(np.argmin(loss))
        for i in range(best - 2, best + 3):
            points.append((float(c), float(sizes[i]), float(loss[i])))
    return points


def test_compute_optimal_recovers_the_chinchilla_exponent():
    result = compute_optimal(chinchilla_points(np.geomspace(1e18, 1e22, 5)), samples=300)
    assert result.alpha == pytest.approx(0.28 / (0.34 + 0.28), abs=0.05)
    assert result.alpha_interval is not None
    assert result.alpha_interval[0] <= result.alpha <= result.alpha_interval[1]
    assert all(interpolated for _, _, interpolated in result.per_budget)
    assert len(result.per_budget) == 5
    json.dumps(result.to_dict())


def test_compute_optimal_needs_two_budgets():
    points = chinchilla_points(np.array([1e19]))
    with pytest.raises(ValueError, match="at least 2 compute budgets"):
        compute_optimal(points)
    two = compute_optimal(chinchilla_points(np.array([1e19, 1e21])))
    assert two.alpha_interval is None


def test_plot_writes_a_png(tmp_path):
    loss = curve(COMPUTE) * np.exp(0.01 * np.random.default_rng(2).standard_normal(6))
    names = ["S", "S", "M", "M", "L", "L"]
    points = [
        {"compute": c, "loss": y, "size": s} for c, y, s in zip(COMPUTE, loss, names, strict=True)
    ]
    boot = bootstrap_power_law(COMPUTE[:-1], loss[:-1], samples=100)
    holdout = holdout_largest(COMPUTE, loss, samples=100, confidence=0.9, seed=0)
    path = plot_scaling(points, bootstrap=boot, holdout=holdout, path=tmp_path / "s" / "p.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
