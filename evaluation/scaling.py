"""The scaling-law fit of a compute sweep: ``L(C) = a · C^-b + L∞`` and the compute-optimal size.

**Loss vs compute.** :func:`fit_power_law` fits ``a > 0``, ``b > 0``, ``0 <= L∞ < min(loss)`` by
*variable projection*: for a fixed exponent ``b`` the model is linear in ``(a, L∞)``, so they are
solved exactly, and only ``b`` is searched (a coarse log-spaced grid over ``[1e-3, 3]``, then
``scipy.optimize.minimize_scalar``'s bounded search on ``log b`` around the best grid point). The
residuals are **relative**, ``r = (L - L̂) / L`` (the first-order log residual, so a point at
loss 0.5 weighs as much as one at 5), and the loss is Huber's (quadratic up to ``huber_delta``,
linear beyond, so one diverged run does not drag the exponent). The inner ``(a, L∞)`` solve is
iteratively reweighted least squares with Huber weights ``min(1, δ/|r|)``, a convex problem, so
the profile over ``b`` is exact. ``L∞ < 0`` refits with ``L∞ = 0``; ``L∞ >= min(loss)`` clamps it
just below. Compute is divided by its geometric mean inside (FLOPs of 1e12..1e20 are fine); ``a``
is reported in the caller's units. With ``huber_delta=inf`` it is ordinary least squares.

**Uncertainty.** :func:`bootstrap_power_law` is a *residual* bootstrap: the point fit's log
residuals, leverage-corrected (``r / sqrt(1 - h)``) and centred, are resampled and added back to
the fitted log curve, and every synthetic sweep is refitted. (A pairs
bootstrap breaks with the 3-6 points of a sweep: half its draws miss the ends of the range.)
:func:`holdout_largest` fits all but the largest-compute run and checks that the extrapolation
lands inside its interval: the one honest test of a scaling law.

**Compute-optimal size.** :func:`compute_optimal` takes iso-FLOP sweeps (several sizes per
budget), finds each budget's loss-minimising size from a parabola in ``log N``, and fits
``N_opt = k · C^alpha`` (Kaplan et al. 2020 found alpha ≈ 0.73, Chinchilla (Hoffmann et al. 2022)
alpha ≈ 0.5; the literature range is 0.5-0.73).

:func:`plot_scaling` draws the sweep, the fit and its band as a PNG (Agg canvas, no pyplot).
Pure NumPy/SciPy (matplotlib only in the plot); no model, storage or tracking imports.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.optimize import minimize_scalar

HUBER_DELTA = 0.01  # relative residual (≈ 1 % of the loss) where Huber turns linear
B_BOUNDS = (1e-3, 3.0)  # searched range of the exponent b
_GRID = 48  # coarse log-spaced b grid before the bounded search
_CLAMP = 1e-6  # L∞ is kept at least this fraction below min(loss)
_N_PARAMS = 3  # a, b, L∞


# --------------------------------------------------------------------------- loss vs compute


@dataclass(frozen=True)
class PowerLawFit:
    """``L(C) = a · C^-b + l_inf`` fitted to ``n_points`` (compute, loss) pairs."""

    a: float  # in the caller's compute units
    b: float
    l_inf: float
    residual_rms: float  # RMS of log(loss) - log(fit) over the points
    n_points: int
    huber_delta: float
    log_residuals: tuple[float, ...]  # log(loss) - log(fit), in the caller's point order

    def predict(self, compute: Any) -> Any:
        """The fitted loss at ``compute`` (scalar -> float, array -> array)."""
        c = np.asarray(compute, dtype=np.float64)
        value = self.a * c ** (-self.b) + self.l_inf
        return float(value) if value.ndim == 0 else value

    def to_dict(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "l_inf": self.l_inf,
            "residual_rms": self.residual_rms,
            "n_points": self.n_points,
            "huber_delta": self.huber_delta,
        }


def _points(compute: Any, loss: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validated float64 (compute, loss) vectors."""
    c = np.asarray(compute, dtype=np.float64).ravel()
    y = np.asarray(loss, dtype=np.float64).ravel()
    if c.shape != y.shape:
        raise ValueError(f"compute and loss differ in length: {c.size} vs {y.size}")
    if c.size < _N_PARAMS:
        raise ValueError(f"a power-law fit needs at least 3 points, got {c.size}")
    if not (np.isfinite(c).all() and np.isfinite(y).all()):
        raise ValueError("compute or loss contains NaN or inf")
    if (c <= 0).any() or (y <= 0).any():
        raise ValueError("compute and loss must be positive")
    if np.unique(c).size < _N_PARAMS:
        raise ValueError(f"a power-law fit needs at least 3 distinct compute values, got {c.size}")
    return c, y


def _solve(
    u: np.ndarray, v: np.ndarray, w: np.ndarray, e: np.ndarray, l_max: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A, l)`` solving ``Σ w x xᵀ θ = Σ (w + e) x`` for ``x = (u, v)``, over the last axis.

    ``l < 0`` refits ``A`` with ``l = 0``; ``l > l_max`` (or ``A <= 0``) with ``l = l_max``.
    Returns ``(A, l, ok)``; ``ok`` is False where the system is singular or ``A <= 0``.
    """
    muu, muv, mvv = (w * u * u).sum(-1), (w * u * v).sum(-1), (w * v * v).sum(-1)
    ru, rv = ((w + e) * u).sum(-1), ((w + e) * v).sum(-1)
    det = muu * mvv - muv * muv
    with np.errstate(all="ignore"):
        a2, l2 = (ru * mvv - rv * muv) / det, (muu * rv - muv * ru) / det
        a0 = ru / muu
        a1 = (ru - l_max * muv) / muu
    pair = det > 1e-12 * muu * mvv  # else b -> 0: f is constant, A and l are not separable
    low = ~pair | (l2 < 0)
    high = ~low & ((l2 > l_max) | (a2 <= 0))
    a = np.where(low, a0, np.where(high, a1, a2))
    lv = np.where(low, 0.0, np.where(high, l_max, l2))
    ok = (muu > 0) & np.isfinite(a) & (a > 0)
    return a, lv, ok


def _huber_sum(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber loss of residuals ``r`` summed over the last axis."""
    ar = np.abs(r)
    return np.where(ar <= delta, 0.5 * r * r, delta * (ar - 0.5 * delta)).sum(-1)


def _inner(f: np.ndarray, y: np.ndarray, delta: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Huber solve of ``(A, l)`` in ``y ≈ A f + l`` on relative residuals, batched.

    ``f`` and ``y`` are (..., n); the constraints are ``0 <= l <= min(y) (1 - _CLAMP)`` and
    ``A > 0``. Newton steps on the inlier/outlier partition (exact in a few steps: the problem
    is piecewise quadratic), each accepted only if it lowers the Huber loss, else an IRLS step
    with weights ``min(1, δ/|r|)`` (monotone). Returns ``(A, l, r)``, ``r`` the residuals.
    """
    u, v = np.broadcast_arrays(f / y, 1.0 / y)
    shape = u.shape
    u, v = u.reshape(-1, shape[-1]), v.reshape(-1, shape[-1])
    l_max = np.broadcast_to(y, shape).reshape(u.shape).min(-1) * (1.0 - _CLAMP)
    a, lv, _ = _solve(u, v, np.ones_like(u), np.zeros_like(u), l_max)
    r = 1.0 - a[:, None] * u - lv[:, None] * v
    active = np.flatnonzero((np.abs(r) > delta).any(-1))  # all inliers: least squares is exact
    for _ in range(60):
        if active.size == 0:
            break
        ua, va, ra, la = u[active], v[active], r[active], l_max[active]
        ar = np.abs(ra)
        inlier = ar <= delta
        outer = np.where(inlier, 0.0, delta * np.sign(ra))
        a_n, l_n, ok = _solve(ua, va, inlier * 1.0, outer, la)
        with np.errstate(divide="ignore"):
            weights = np.where(inlier, 1.0, delta / ar)
        a_i, l_i, _ = _solve(ua, va, weights, np.zeros_like(ua), la)
        r_n = 1.0 - a_n[:, None] * ua - l_n[:, None] * va
        loss_n = np.where(ok, _huber_sum(r_n, delta), np.inf)
        newton = loss_n <= _huber_sum(ra, delta) * (1 + 1e-15)
        a_new, l_new = np.where(newton, a_n, a_i), np.where(newton, l_n, l_i)
        moved = (np.abs(a_new - a[active]) > 1e-13 * np.abs(a_new)) | (
            np.abs(l_new - lv[active]) > 1e-13 * (1 + l_new)
        )
        a[active], lv[active] = a_new, l_new
        r[active] = 1.0 - a_new[:, None] * ua - l_new[:, None] * va
        active = active[moved]
    return a.reshape(shape[:-1]), lv.reshape(shape[:-1]), r.reshape(shape)


def fit_power_law(
    compute: Any,
    loss: Any,
    *,
    huber_delta: float = HUBER_DELTA,
    b_bounds: tuple[float, float] = B_BOUNDS,
) -> PowerLawFit:
    """Robust fit of ``L(C) = a · C^-b + l_inf`` by variable projection (see the module doc).

    Args:
        compute: training FLOPs per run (>= 3 distinct positive values).
        loss: the runs' validation losses (positive).
        huber_delta: relative residual where the Huber loss turns linear (``inf``: least squares).
        b_bounds: the searched range of the exponent.
    """
    c, y = _points(compute, loss)
    if not huber_delta > 0:
        raise ValueError(f"huber_delta must be positive, got {huber_delta}")
    scale = float(np.exp(np.log(c).mean()))  # geometric mean: x is O(1) around 1
    log_x = np.log(c / scale)

    def objective(log_b: float) -> float:
        _, _, r = _inner(np.exp(-math.exp(log_b) * log_x), y, huber_delta)
        return float(_huber_sum(r, huber_delta))

    grid = np.linspace(math.log(b_bounds[0]), math.log(b_bounds[1]), _GRID)
    _, _, r = _inner(np.exp(-np.exp(grid)[:, None] * log_x), y, huber_delta)
    values = _huber_sum(r, huber_delta)
    i = int(np.argmin(values))
    lo, hi = grid[max(i - 1, 0)], grid[min(i + 1, _GRID - 1)]
    best = minimize_scalar(objective, bounds=(lo, hi), method="bounded", options={"xatol": 1e-10})
    log_b = float(best.x) if best.fun <= values[i] else float(grid[i])
    b = math.exp(log_b)
    big_a, l_inf, _ = _inner(np.exp(-b * log_x), y, huber_delta)
    a, l_inf = float(big_a) * scale**b, float(l_inf)
    log_res = np.log(y) - np.log(a * c ** (-b) + l_inf)
    return PowerLawFit(
        a=float(a),
        b=b,
        l_inf=l_inf,
        residual_rms=float(np.sqrt(np.mean(log_res**2))),
        n_points=int(c.size),
        huber_delta=float(huber_delta),
        log_residuals=tuple(float(r) for r in log_res),
    )


def _fit_batch(
    c: np.ndarray, ys: np.ndarray, delta: float, b_bounds: tuple[float, float] = B_BOUNDS
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`fit_power_law` of many loss vectors ``ys`` (S, n) at once, for the bootstrap.

    The same normalisation, objective and grid; the bounded refinement is a golden-section
    search on ``log b`` run for all rows together (to 1e-9 in ``log b``, where
    ``minimize_scalar``'s Brent search would loop over them one by one). Returns ``(a, b, l)``.
    """
    scale = float(np.exp(np.log(c).mean()))
    log_x = np.log(c / scale)

    def objective(log_b: np.ndarray) -> np.ndarray:  # (S,) -> (S,)
        _, _, r = _inner(np.exp(-np.exp(log_b)[:, None] * log_x), ys, delta)
        return _huber_sum(r, delta)

    grid = np.linspace(math.log(b_bounds[0]), math.log(b_bounds[1]), _GRID)
    _, _, r = _inner(np.exp(-np.exp(grid)[None, :, None] * log_x), ys[:, None, :], delta)
    values = _huber_sum(r, delta)  # (S, G)
    i = np.argmin(values, axis=1)
    rows = np.arange(len(ys))
    best_t, best_f = grid[i], values[rows, i]
    lo, hi = grid[np.maximum(i - 1, 0)], grid[np.minimum(i + 1, _GRID - 1)]
    ratio = (math.sqrt(5) - 1) / 2
    x1, x2 = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    f1, f2 = objective(x1), objective(x2)
    steps = math.ceil(math.log(2 * (grid[1] - grid[0]) / 1e-9) / -math.log(ratio))
    for _ in range(steps):
        left = f1 < f2  # the minimum is in [lo, x2]
        lo, hi = np.where(left, lo, x1), np.where(left, x2, hi)
        x1, x2, f1, f2 = (
            np.where(left, hi - ratio * (hi - lo), x2),
            np.where(left, x1, lo + ratio * (hi - lo)),
            np.where(left, np.nan, f2),
            np.where(left, f1, np.nan),
        )
        new = np.where(left, x1, x2)
        f_new = objective(new)
        f1, f2 = np.where(left, f_new, f1), np.where(left, f2, f_new)
    t = np.where(f1 < f2, x1, x2)
    f_t = np.minimum(f1, f2)
    t = np.where(f_t <= best_f, t, best_t)
    b = np.exp(t)
    big_a, l_inf, _ = _inner(np.exp(-b[:, None] * log_x), ys, delta)
    return big_a * scale**b, b, l_inf


def _interval(values: np.ndarray, confidence: float) -> tuple[float, float]:
    lo, hi = np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])
    return float(lo), float(hi)


def _leverage(c: np.ndarray, fit: PowerLawFit) -> np.ndarray:
    """Leverages ``h_ii`` of the fit's log-space Jacobian in ``(log a, b, l_inf)``, at most 0.99.

    A fitted residual has variance ``σ² (1 - h_ii)``: the ends of a sweep, which pin the
    curvature, have leverages near 1, and their residuals understate the noise most.
    """
    scale = float(np.exp(np.log(c).mean()))
    log_x = np.log(c / scale)
    pred = fit.predict(c)
    term = fit.a * c ** (-fit.b)  # the power-law part of the prediction
    cols = [term / pred, -term * log_x / pred]
    if fit.l_inf > 0:  # a clamped l_inf = 0 is not a free parameter
        cols.append(1.0 / pred)
    jac = np.stack(cols, axis=1)
    q, _ = np.linalg.qr(jac)
    return np.minimum((q * q).sum(axis=1), 0.99)  # = 1 with as many points as parameters


@dataclass(frozen=True, eq=False)
class PowerLawBootstrap:
    """The point fit and residual-bootstrap (percentile) intervals of its parameters."""

    fit: PowerLawFit
    samples: int  # requested bootstrap fits
    failed: int  # of those, fits that raised (skipped)
    confidence: float
    a_interval: tuple[float, float]
    b_interval: tuple[float, float]
    l_inf_interval: tuple[float, float]
    a_samples: np.ndarray  # (samples - failed,) the successful bootstrap fits
    b_samples: np.ndarray
    l_inf_samples: np.ndarray
    noise: np.ndarray  # (samples - failed,) one resampled log residual per bootstrap fit

    def predict_interval(self, compute: Any) -> tuple[Any, Any]:
        """The ``confidence`` *prediction* interval of the loss of a new run at ``compute``.

        Each bootstrap fit's prediction is multiplied by ``exp`` of its own resampled residual,
        so the interval covers a new noisy observation (parameter uncertainty + run-to-run
        noise), not only the mean curve. Scalar -> ``(float, float)``, array -> arrays.
        """
        c = np.asarray(compute, dtype=np.float64)
        pred = (
            self.a_samples[:, None] * c.ravel()[None, :] ** (-self.b_samples[:, None])
            + self.l_inf_samples[:, None]
        ) * np.exp(self.noise)[:, None]
        q = np.quantile(pred, [(1 - self.confidence) / 2, (1 + self.confidence) / 2], axis=0)
        if c.ndim == 0:
            return float(q[0, 0]), float(q[1, 0])
        return q[0].reshape(c.shape), q[1].reshape(c.shape)

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.fit.to_dict(),
            "confidence": self.confidence,
            "samples": self.samples,
            "failed": self.failed,
            "a_interval": list(self.a_interval),
            "b_interval": list(self.b_interval),
            "l_inf_interval": list(self.l_inf_interval),
        }


def bootstrap_power_law(
    compute: Any,
    loss: Any,
    *,
    samples: int = 1000,
    confidence: float = 0.9,
    seed: int = 0,
    huber_delta: float = HUBER_DELTA,
) -> PowerLawBootstrap:
    """Residual bootstrap of :func:`fit_power_law` (deterministic for a ``seed``).

    The point fit's log residuals, divided by ``sqrt(1 - h_ii)`` (their leverages: fitted
    residuals understate the noise, most at the ends of the sweep) and centred, are resampled
    with replacement and added to the fitted log curve; each synthetic sweep is refitted with
    the same ``huber_delta`` (batched: see :func:`_fit_batch`). Non-finite fits are skipped and
    counted in ``failed``. With exactly 3 points there are no residual degrees of freedom and
    the intervals collapse to the fit. Percentile intervals; with 3 free parameters and 5-6
    points they under-cover (about 0.75-0.8 for a nominal 0.9 in the tests' simulation).
    """
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    c, y = _points(compute, loss)
    fit = fit_power_law(c, y, huber_delta=huber_delta)
    n = c.size
    log_curve = np.log(fit.predict(c))
    res = np.asarray(fit.log_residuals) / np.sqrt(1.0 - _leverage(c, fit))
    res = res - res.mean()
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(samples, n + 1))  # the last column: prediction noise
    ys = np.exp(log_curve[None, :] + res[draws[:, :n]])
    a, b, l_inf = _fit_batch(c, ys, huber_delta)
    good = np.isfinite(a) & np.isfinite(b) & np.isfinite(l_inf) & (a > 0)
    failed = int((~good).sum())
    if not good.any():
        raise ValueError(f"all {samples} bootstrap fits failed")
    p = np.stack([a[good], b[good], l_inf[good]], axis=1)
    noise = res[draws[good, n]]
    return PowerLawBootstrap(
        fit=fit,
        samples=samples,
        failed=failed,
        confidence=confidence,
        a_interval=_interval(p[:, 0], confidence),
        b_interval=_interval(p[:, 1], confidence),
        l_inf_interval=_interval(p[:, 2], confidence),
        a_samples=p[:, 0],
        b_samples=p[:, 1],
        l_inf_samples=p[:, 2],
        noise=noise,
    )


@dataclass(frozen=True)
class Holdout:
    """The largest-compute run predicted from a fit of all the others."""

    compute: float
    observed: float
    predicted: float  # the point fit of the other runs
    relative_error: float  # (predicted - observed) / observed
    # the bootstrap prediction interval at ``compute``; None when 3 runs are fitted: the fit then
    # passes through them and leaves no residual to resample, so no interval can be given
    interval: tuple[float, float] | None
    inside: bool | None  # observed within ``interval`` (to a relative 1e-9 of round-off)
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "compute": self.compute,
            "observed": self.observed,
            "predicted": self.predicted,
            "relative_error": self.relative_error,
            "interval": None if self.interval is None else list(self.interval),
            "inside": self.inside,
            "confidence": self.confidence,
        }


def holdout_largest(
    compute: Any,
    loss: Any,
    *,
    samples: int = 1000,
    confidence: float = 0.9,
    seed: int = 0,
    huber_delta: float = HUBER_DELTA,
) -> Holdout:
    """Fit all runs but the largest-compute one (>= 4 runs), and predict that one.

    The interval is :meth:`PowerLawBootstrap.predict_interval` of the other runs' bootstrap; with
    4 runs (3 fitted, as many as the law's parameters) there is none (``None``).
    With ties at the largest compute, the last of them in input order is held out.
    """
    c, y = _points(compute, loss)
    if c.size < _N_PARAMS + 1:
        raise ValueError(
            f"holding out the largest run needs at least 4 points (3 to fit), got {c.size}"
        )
    last = int(c.size - 1 - np.argmax(c[::-1]))
    keep = np.arange(c.size) != last
    boot = bootstrap_power_law(
        c[keep], y[keep], samples=samples, confidence=confidence, seed=seed, huber_delta=huber_delta
    )
    predicted = float(boot.fit.predict(c[last]))
    observed = float(y[last])
    interval, inside = None, None
    if keep.sum() > _N_PARAMS:  # 3 fitted runs: exact fit, nothing to resample
        low, high = boot.predict_interval(c[last])
        tol = 1e-9 * observed  # round-off: noise-free sweeps give a zero-width interval
        interval, inside = (low, high), bool(low - tol <= observed <= high + tol)
    return Holdout(
        compute=float(c[last]),
        observed=observed,
        predicted=predicted,
        relative_error=(predicted - observed) / observed,
        interval=interval,
        inside=inside,
        confidence=confidence,
    )


# --------------------------------------------------------------------------- compute-optimal size


@dataclass(frozen=True)
class ComputeOptimal:
    """Loss-minimising size per compute budget and the fitted ``N_opt = k · C^alpha``."""

    per_budget: list[tuple[float, float, bool]]  # (budget, n_opt, interpolated)
    alpha: float
    alpha_interval: tuple[float, float] | None  # None with 2 budgets (no residual freedom)
    k: float
    confidence: float

    def predict(self, compute: Any) -> Any:
        """The compute-optimal parameter count at ``compute``."""
        value = self.k * np.asarray(compute, dtype=np.float64) ** self.alpha
        return float(value) if value.ndim == 0 else value

    def to_dict(self) -> dict[str, Any]:
        return {
            "per_budget": [[b, n, i] for b, n, i in self.per_budget],
            "alpha": self.alpha,
            "alpha_interval": None if self.alpha_interval is None else list(self.alpha_interval),
            "k": self.k,
            "confidence": self.confidence,
        }


def _optimal_size(n: np.ndarray, loss: np.ndarray) -> tuple[float, bool]:
    """Vertex of the parabola of loss vs log N, or the best sampled size (``False``)."""
    t = np.log(n)
    centre = t.mean()
    p2, p1, _ = np.polyfit(t - centre, loss, 2)
    if p2 > 0:
        vertex = centre - p1 / (2 * p2)
        if t.min() <= vertex <= t.max():
            return float(np.exp(vertex)), True
    return float(n[int(np.argmin(loss))]), False


def compute_optimal(
    points: Iterable[tuple[float, float, float]],
    *,
    samples: int = 1000,
    confidence: float = 0.9,
    seed: int = 0,
) -> ComputeOptimal:
    """``N_opt = k · C^alpha`` from iso-FLOP sweeps.

    Args:
        points: ``(compute_budget, params N, loss)`` per run; runs whose budgets agree to a
            relative 1e-6 form one iso-FLOP curve.
        samples, confidence, seed: the bootstrap of ``alpha``.

    Each budget with >= 3 distinct sizes gets a parabola of loss vs ``log N``; its vertex is
    ``N_opt`` (``interpolated=True``) unless it opens downward or the vertex lies outside the
    sampled sizes, when the best sampled size is used (``interpolated=False``; still fitted, but
    it means that budget's sizes do not bracket its optimum). Budgets with fewer sizes are
    skipped. ``log N_opt`` is fitted against ``log C`` by least squares; ``alpha``'s interval is a
    residual bootstrap of that line (residuals scaled by ``sqrt(m / (m - 2))`` for ``m``
    budgets): with 2 budgets the line is exact and the interval is ``None``. Kaplan et al.
    report alpha ≈ 0.73, Chinchilla ≈ 0.5.
    """
    rows = np.asarray([tuple(p) for p in points], dtype=np.float64).reshape(-1, 3)
    if not np.isfinite(rows).all() or (rows <= 0).any():
        raise ValueError("compute_optimal needs positive finite (budget, params, loss) triples")
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    groups: list[np.ndarray] = []
    start = 0
    for i in range(1, len(rows) + 1):
        if i == len(rows) or rows[i, 0] > rows[start, 0] * (1 + 1e-6):
            groups.append(rows[start:i])
            start = i
    per_budget = []
    for g in groups:
        if np.unique(g[:, 1]).size >= 3:
            n_opt, interpolated = _optimal_size(g[:, 1], g[:, 2])
            per_budget.append((float(np.exp(np.log(g[:, 0]).mean())), n_opt, interpolated))
    if len(per_budget) < 2:
        raise ValueError(
            "compute_optimal needs at least 2 compute budgets with >= 3 distinct sizes each, "
            f"got {len(per_budget)} (of {len(groups)} budgets)"
        )
    log_c = np.log([b for b, _, _ in per_budget])
    log_n = np.log([n for _, n, _ in per_budget])
    centre = log_c.mean()
    alpha, icpt = np.polyfit(log_c - centre, log_n, 1)
    m = len(per_budget)
    interval = None
    if m > 2:
        res = log_n - (icpt + alpha * (log_c - centre))
        res = (res - res.mean()) * math.sqrt(m / (m - 2))
        rng = np.random.default_rng(seed)
        fitted = icpt + alpha * (log_c - centre)
        draws = fitted[None, :] + res[rng.integers(0, m, size=(samples, m))]
        xc = log_c - centre
        slopes = draws @ xc / (xc @ xc)  # least-squares slope of each synthetic line
        interval = _interval(slopes, confidence)
    return ComputeOptimal(
        per_budget=per_budget,
        alpha=float(alpha),
        alpha_interval=interval,
        k=float(np.exp(icpt - alpha * centre)),
        confidence=confidence,
    )


# --------------------------------------------------------------------------- plot


def plot_scaling(
    points: Iterable[Mapping[str, Any]],
    fit: PowerLawFit | None = None,
    bootstrap: PowerLawBootstrap | None = None,
    holdout: Holdout | None = None,
    path: str | Path = "scaling.png",
    *,
    title: str | None = None,
) -> Path:
    """Log-log PNG of validation loss vs training FLOPs; returns ``path``.

    Args:
        points: one mapping per run, ``{"compute": FLOPs, "loss": val loss, "size": "S"}``;
            each size gets its own marker and colour, in order of first appearance.
        fit: the curve to draw (default: ``bootstrap.fit`` when a bootstrap is given).
        bootstrap: shades its prediction band around the curve.
        holdout: the held-out run, highlighted, with its prediction interval as an error bar.
        title: a first title line (the fitted formula goes below it).
    """
    from matplotlib.figure import Figure  # Agg canvas via savefig: no pyplot, no global backend

    runs = list(points)
    if not runs:
        raise ValueError("plot_scaling needs at least one point")
    fit = fit if fit is not None else (bootstrap.fit if bootstrap is not None else None)
    fig = Figure(figsize=(7, 4.8), dpi=120)
    ax = fig.add_subplot()
    markers = "os^DvPX*<>"
    sizes = list(dict.fromkeys(str(r["size"]) for r in runs))
    for i, size in enumerate(sizes):
        mine = [r for r in runs if str(r["size"]) == size]
        ax.scatter(
            [float(r["compute"]) for r in mine],
            [float(r["loss"]) for r in mine],
            marker=markers[i % len(markers)],
            color=f"C{i % 10}",
            s=36,
            zorder=3,
            label=size,
        )
    computes = [float(r["compute"]) for r in runs]
    lo, hi = min(computes), max(computes)
    if holdout is not None:
        hi = max(hi, holdout.compute)
    if fit is not None:
        grid = np.geomspace(lo / 1.5, hi * 1.5, 200)
        if bootstrap is not None:
            band_lo, band_hi = bootstrap.predict_interval(grid)
            ax.fill_between(
                grid,
                band_lo,
                band_hi,
                color="0.6",
                alpha=0.3,
                lw=0,
                label=f"{bootstrap.confidence:.0%} prediction band",
            )
        ax.plot(grid, fit.predict(grid), color="k", lw=1.4, label="fit")
        if fit.l_inf > 0:
            ax.axhline(fit.l_inf, color="k", lw=0.8, ls=":", label="L∞")
    if holdout is not None and holdout.interval is not None:
        ax.errorbar(
            [holdout.compute],
            [holdout.predicted],
            yerr=[
                [max(holdout.predicted - holdout.interval[0], 0.0)],
                [max(holdout.interval[1] - holdout.predicted, 0.0)],
            ],
            fmt="none",
            ecolor="crimson",
            capsize=4,
            lw=1.4,
        )
    if holdout is not None:
        where = {True: "inside", False: "outside", None: "no interval from 3 runs"}
        ax.scatter(
            [holdout.compute],
            [holdout.observed],
            marker="*",
            s=180,
            facecolor="none",
            edgecolor="crimson",
            lw=1.5,
            zorder=4,
            label=f"held out ({holdout.relative_error:+.1%}, {where[holdout.inside]})",
        )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("training compute (FLOPs)")
    ax.set_ylabel("validation loss")
    lines = [title] if title else []
    if fit is not None:
        lines.append(
            f"$L = {fit.a:.3g}\\cdot C^{{-{fit.b:.3f}}} + {fit.l_inf:.3g}$"
            f"  (n={fit.n_points}, rms log residual {fit.residual_rms:.3f})"
        )
    if lines:
        ax.set_title("\n".join(lines), fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out
