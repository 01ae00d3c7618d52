"""The one Fréchet-distance core (FID, FVD, rFVD, ... all call it), in float64.

For Gaussians fitted to two feature sets,

    d² = |μ₁ − μ₂|² + Tr(Σ₁) + Tr(Σ₂) − 2 Tr((Σ₁^½ Σ₂ Σ₁^½)^½)

The cross term uses the symmetric form: ``Σ₁^½`` from ``eigh`` (negative round-off eigenvalues
clipped to 0), then the eigenvalues of the symmetric PSD matrix ``Σ₁^½ Σ₂ Σ₁^½``, whose square roots
sum to the trace. It equals ``Tr(sqrtm(Σ₁ Σ₂))`` (what pytorch-fid and StyleGAN-V compute with
``scipy.linalg.sqrtm``), but needs no general matrix square root, stays real, and is stable for
near-singular covariances (fewer samples than feature dimensions), where ``sqrtm`` of the product
goes complex or needs an ``eps`` on the diagonal.

The covariance divisor is explicit and recorded: ``ddof=1`` (N − 1, unbiased; numpy's ``np.cov``,
pytorch-fid, torch-fidelity) is the default; ``ddof=0`` (N) is what StyleGAN-V and cd-fvd compute
(their ``FeatureStats.get_mean_cov``: ``E[xxᵀ] − μμᵀ``), so FVD (:mod:`evaluation.fvd`) uses it.
Pure NumPy; no model, storage or tracking imports.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Statistics:
    """Mean and covariance of ``n`` feature vectors, the covariance divided by ``n - ddof``."""

    mean: np.ndarray  # (D,) float64
    cov: np.ndarray  # (D, D) float64
    n: int
    ddof: int

    @property
    def dim(self) -> int:
        return int(self.mean.shape[0])


def statistics(features: np.ndarray, ddof: int = 1) -> Statistics:
    """Float64 mean and covariance of (N, D) features (divisor ``N - ddof``)."""
    x = np.asarray(features, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {x.shape}")
    if ddof not in (0, 1):
        raise ValueError(f"ddof must be 0 (divide by N) or 1 (divide by N - 1), got {ddof}")
    n = x.shape[0]
    if n <= ddof:
        raise ValueError(f"need more than {ddof} feature vectors for a covariance, got {n}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf")
    mean = x.mean(axis=0)
    centred = x - mean
    cov = centred.T @ centred / (n - ddof)
    return Statistics(mean=mean, cov=cov, n=n, ddof=ddof)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric PSD matrix (round-off negatives clipped)."""
    w, v = np.linalg.eigh((matrix + matrix.T) / 2)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray) -> float:
    """Tr((Σ₁^½ Σ₂ Σ₁^½)^½) = Tr(sqrtm(Σ₁ Σ₂)) for symmetric PSD Σ₁, Σ₂."""
    root = _psd_sqrt(np.asarray(cov1, np.float64))
    inner = root @ np.asarray(cov2, np.float64) @ root
    w = np.linalg.eigvalsh((inner + inner.T) / 2)
    return float(np.sqrt(np.clip(w, 0.0, None)).sum())


def frechet_distance(a: Statistics, b: Statistics) -> float:
    """The Fréchet distance between the Gaussians of two :class:`Statistics` (>= 0)."""
    if a.dim != b.dim:
        raise ValueError(f"feature dimensions differ: {a.dim} vs {b.dim} (different extractors?)")
    if a.ddof != b.ddof:
        raise ValueError(f"covariance divisors differ: ddof {a.ddof} vs {b.ddof}")
    diff = a.mean - b.mean
    value = diff @ diff + np.trace(a.cov) + np.trace(b.cov) - 2.0 * trace_sqrt_product(a.cov, b.cov)
    return float(max(value, 0.0))  # round-off can leave -1e-12 for identical sets


def frechet_from_features(x: np.ndarray, y: np.ndarray, ddof: int = 1) -> float:
    """:func:`frechet_distance` of two (N, D) feature sets."""
    return frechet_distance(statistics(x, ddof), statistics(y, ddof))


@dataclass(frozen=True)
class FrechetResult:
    """A Fréchet distance with its bootstrap interval and what it was computed from."""

    value: float  # on all samples
    low: float  # percentile bootstrap interval
    high: float
    confidence: float
    resamples: int
    n_a: int
    n_b: int
    ddof: int

    def as_metrics(self, name: str) -> dict[str, float]:
        return {
            name: self.value,
            f"{name}_low": self.low,
            f"{name}_high": self.high,
            f"{name}_n_real": float(self.n_a),
            f"{name}_n_fake": float(self.n_b),
        }


def bootstrap(
    x: np.ndarray,
    y: np.ndarray,
    *,
    resamples: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
    ddof: int = 1,
) -> FrechetResult:
    """Fréchet distance of (N, D) ``x`` and (M, D) ``y`` with a percentile bootstrap interval:
    both sets are resampled with replacement, independently, ``resamples`` times (fixed seed)."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    value = frechet_from_features(x, y, ddof)
    rng = np.random.default_rng(seed)
    draws = [
        frechet_from_features(
            x[rng.integers(0, len(x), len(x))], y[rng.integers(0, len(y), len(y))], ddof
        )
        for _ in range(resamples)
    ]
    tail = (1 - confidence) / 2 * 100
    low, high = (
        (float(v) for v in np.percentile(draws, [tail, 100 - tail]))
        if draws
        else (
            value,
            value,
        )
    )
    return FrechetResult(value, low, high, confidence, resamples, len(x), len(y), ddof)


__all__ = [
    "FrechetResult",
    "Statistics",
    "bootstrap",
    "frechet_distance",
    "frechet_from_features",
    "statistics",
    "trace_sqrt_product",
]
