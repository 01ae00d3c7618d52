"""Does the trained evaluator measure something? Its checks on held-out clips, before any
model is promoted on its numbers.

- **Retrieval**: each held-out caption ranks every held-out captioned clip by cosine similarity;
  R@1 / R@5 against chance (1/N, 5/N) with the binomial tail probability of that many hits
  under chance.
- **FVD self-consistency**: ``fvd_domain`` of the held-out clips against their features computed
  again (exactly 0 for a deterministic extractor) and of two disjoint halves (stratified by
  still / video): the sampling floor the corrupted values must clear.
- **FVD under corruption**: ``fvd_domain`` of the held-out clips against corrupted copies
  (:mod:`evaluation.corruptions`) at rising strengths must rise monotonically (from the exact
  self value at strength 0). Frame shuffling is FVD's known blind spot: a model that pools
  over time may not see it, and stills (most of the demo's held-out clips) do not change at all,
  so it is reported with the number of clips it touches and is not required.
- **CLIP score**: the mean cosine of each clip with its own caption against the mean with a
  shuffled caption (a fixed derangement), the margin, and the share of clips whose own caption
  wins (with its sign-test probability).

Every FVD value uses :func:`evaluation.frechet.bootstrap` (divisor N, as ``evaluation.fvd``
does) and is reported for the three candidate feature layers (``fvd_by_layer``): the FVD
features :class:`~evaluation.domain.DomainScorer` uses (pre-projection features + first-layer
detail statistics), the pre-projection features alone (``semantic``) and the normalised joint
embedding; the checks are those of the scorer's layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from evaluation.corruptions import corrupt
from evaluation.domain import FEATURE_LAYERS, DomainScorer
from evaluation.frechet import bootstrap

KINDS = ("noise", "blur", "shuffle")
REQUIRED = ("retrieval", "fvd_self", "fvd_noise", "fvd_blur", "clip_score")
DDOF = 0  # evaluation.fvd's default (StyleGAN-V divides by N)
P_VALUE = 0.05


def binomial_tail(n: int, p: float, k: int) -> float:
    """P(X >= k) for X ~ Binomial(n, p)."""
    if k <= 0:
        return 1.0
    return float(
        min(1.0, sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1)))
    )


def derangement(n: int, seed: int) -> np.ndarray:
    """A seeded permutation of range(n) without fixed points (n >= 2): a random n-cycle."""
    order = np.random.default_rng(seed).permutation(n)
    out = np.empty(n, dtype=np.int64)
    out[order] = np.roll(order, -1)
    return out


# --------------------------------------------------------------------------- retrieval and CLIP score


def retrieval(video_emb: np.ndarray, text_emb: np.ndarray) -> dict[str, Any]:
    """Text -> video retrieval of N matching pairs (row i of each belongs together)."""
    n = len(video_emb)
    sims = text_emb @ video_emb.T  # (N texts, N videos)
    ranks = (sims > np.diag(sims)[:, None]).sum(1)  # videos scored above the right one
    out: dict[str, Any] = {"n": n, "median_rank": float(np.median(ranks) + 1)}
    for k in (1, 5):
        hits = int((ranks < k).sum())
        chance = min(k, n) / n
        out[f"r{k}"] = hits / n
        out[f"chance_r{k}"] = chance
        out[f"p_r{k}"] = binomial_tail(n, chance, hits)
    out["validated"] = bool(
        out["r1"] > out["chance_r1"]
        and out["r5"] > out["chance_r5"]
        and min(out["p_r1"], out["p_r5"]) < P_VALUE
    )
    return out


def clip_score(video_emb: np.ndarray, text_emb: np.ndarray, seed: int) -> dict[str, Any]:
    """Own-caption vs shuffled-caption cosine of N matching pairs."""
    n = len(video_emb)
    own = (video_emb * text_emb).sum(1)  # (N,)
    other = (video_emb * text_emb[derangement(n, seed)]).sum(1)
    wins = int((own > other).sum())
    out = {
        "n": n,
        "matching": float(own.mean()),
        "shuffled": float(other.mean()),
        "margin": float(own.mean() - other.mean()),
        "matching_x100": max(100 * float(own.mean()), 0.0),  # torchmetrics' scale
        "shuffled_x100": max(100 * float(other.mean()), 0.0),
        "win_rate": wins / n,
        "p_sign": binomial_tail(n, 0.5, wins),
    }
    out["validated"] = bool(out["margin"] > 0 and out["p_sign"] < P_VALUE)
    return out


# --------------------------------------------------------------------------- FVD


def halves(videos: Sequence[np.ndarray], seed: int) -> tuple[list[int], list[int]]:
    """Two disjoint halves of the clips, stills and videos each split evenly (seeded)."""
    rng = np.random.default_rng(seed)
    a: list[int] = []
    b: list[int] = []
    for still in (True, False):
        group = [i for i, v in enumerate(videos) if (len(v) == 1) == still]
        first_to_a = len(a) <= len(b)  # start with the smaller half: sizes stay within one
        for j, i in enumerate(rng.permutation(group).tolist()):
            (a if (j % 2 == 0) == first_to_a else b).append(i)
    return sorted(a), sorted(b)


def _fvd(x: np.ndarray, y: np.ndarray, resamples: int, seed: int) -> dict[str, float]:
    result = bootstrap(x, y, resamples=resamples, seed=seed, ddof=DDOF)
    return {"value": result.value, "low": result.low, "high": result.high}


def monotonic(values: Sequence[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:], strict=False))


def fvd_checks(
    scorer: DomainScorer,
    videos: Sequence[np.ndarray],
    strengths: Sequence[float],
    *,
    resamples: int,
    seed: int,
) -> dict[str, Any]:
    """Self, halves and corruption FVDs of one scorer's features on ``videos``."""
    real = scorer.features(videos)
    again = scorer.features(videos)
    a, b = halves(videos, seed)
    out: dict[str, Any] = {
        "feature_layer": scorer.feature_layer,
        "dim": int(real.shape[1]),
        "n": len(videos),
        "self": _fvd(real, again, 0, seed)["value"],
        "deterministic": bool(np.array_equal(real, again)),
        "halves": _fvd(real[a], real[b], resamples, seed),
        "halves_n": [len(a), len(b)],
    }
    for kind in KINDS:
        values, rows = [out["self"]], []
        for s in strengths:
            bad = [corrupt(kind, v, s, seed=seed + i) for i, v in enumerate(videos)]
            result = _fvd(real, scorer.features(bad), resamples, seed)
            values.append(result["value"])
            rows.append({"strength": s, **result})
        out[kind] = {
            "strengths": rows,
            "monotonic": monotonic(values),
            "above_halves": bool(values[-1] > out["halves"]["value"]),
            "affected_clips": sum(len(v) > 1 for v in videos) if kind == "shuffle" else len(videos),
        }
    top = [out[k]["strengths"][-1]["value"] for k in ("noise", "blur")]
    out["self_validated"] = bool(
        out["deterministic"]
        and out["self"] <= 1e-6 * max(top)
        and out["halves"]["value"] < min(top)
    )
    return out


# --------------------------------------------------------------------------- all checks


def validate(
    scorer: DomainScorer,
    videos: Sequence[np.ndarray],
    captions: Sequence[str],
    strengths: Sequence[float],
    *,
    resamples: int = 100,
    seed: int = 0,
) -> dict[str, Any]:
    """Every check on held-out ``videos`` (uint8 (T, H, W, 3)); ``captions[i]`` is video i's
    caption or '' (uncaptioned clips join the FVD checks only)."""
    if len(videos) != len(captions):
        raise ValueError(f"{len(videos)} videos but {len(captions)} captions")
    paired = [i for i, c in enumerate(captions) if c]
    video_emb = scorer.embed_videos([videos[i] for i in paired])
    text_emb = scorer.embed_text([captions[i] for i in paired])
    report: dict[str, Any] = {
        "clips": len(videos),
        "captioned": len(paired),
        "videos": sum(len(v) > 1 for v in videos),
        "retrieval": retrieval(video_emb, text_emb),
        "clip_score": clip_score(video_emb, text_emb, seed),
    }
    layers = {}
    for layer in FEATURE_LAYERS:
        view = DomainScorer(
            scorer.model,
            scorer.text_encoder,
            scorer.sha256,
            max_frames=scorer.max_frames,
            batch_size=scorer.batch_size,
            feature_layer=layer,
        )
        layers[layer] = fvd_checks(view, videos, strengths, resamples=resamples, seed=seed)
    report["fvd"] = layers[scorer.feature_layer]
    report["fvd_by_layer"] = layers
    fvd = report["fvd"]
    checks = {
        "retrieval": report["retrieval"]["validated"],
        "clip_score": report["clip_score"]["validated"],
        "fvd_self": fvd["self_validated"],
        "fvd_noise": fvd["noise"]["monotonic"],
        "fvd_blur": fvd["blur"]["monotonic"],
        "fvd_shuffle": fvd["shuffle"]["monotonic"],  # reported, not required
    }
    report["checks"] = checks
    report["required"] = list(REQUIRED)
    report["validated"] = all(checks[k] for k in REQUIRED)
    return report


def metrics(report: dict[str, Any]) -> dict[str, float]:
    """The report's numbers as flat MLflow metrics."""
    r, c, fvd = report["retrieval"], report["clip_score"], report["fvd"]
    out = {
        "val_r1": r["r1"],
        "val_r5": r["r5"],
        "val_chance_r1": r["chance_r1"],
        "val_chance_r5": r["chance_r5"],
        "clip_score_domain_matching": c["matching"],
        "clip_score_domain_shuffled": c["shuffled"],
        "clip_score_domain_margin": c["margin"],
        "fvd_domain_self": fvd["self"],
        "fvd_domain_halves": fvd["halves"]["value"],
        "validated": float(report["validated"]),
    }
    for kind in KINDS:
        for row in fvd[kind]["strengths"]:
            out[f"fvd_domain_{kind}_{row['strength']:g}"] = row["value"]
    out.update({f"check_{k}": float(v) for k, v in report["checks"].items()})
    return out


def summary(report: dict[str, Any]) -> str:
    """A few lines for the log."""
    r, c, fvd = report["retrieval"], report["clip_score"], report["fvd"]
    lines = [
        f"held-out: {report['clips']} clips ({report['videos']} videos, {report['captioned']} "
        f"captioned); validated={report['validated']} {report['checks']}",
        f"retrieval text->video R@1 {r['r1']:.3f} (chance {r['chance_r1']:.3f}, p {r['p_r1']:.2g}) "
        f"R@5 {r['r5']:.3f} (chance {r['chance_r5']:.3f}, p {r['p_r5']:.2g})",
        f"clip score: matching {c['matching']:.4f} vs shuffled {c['shuffled']:.4f} "
        f"(margin {c['margin']:.4f}, own caption wins {c['win_rate']:.2f})",
        f"fvd_domain ({fvd['feature_layer']}, {fvd['dim']}-d): self {fvd['self']:.3g}, halves "
        f"{fvd['halves']['value']:.4g}",
    ]
    for kind in KINDS:
        values = ", ".join(
            f"{row['strength']:g}: {row['value']:.4g}" for row in fvd[kind]["strengths"]
        )
        lines.append(f"  {kind}: {values} (monotonic {fvd[kind]['monotonic']})")
    for layer, f in report.get("fvd_by_layer", {}).items():
        top = ", ".join(f"{k} {f[k]['strengths'][-1]['value']:.4g}" for k in KINDS)
        lines.append(
            f"  by layer: {layer} ({f['dim']}-d): halves {f['halves']['value']:.4g}; at 1: {top}"
        )
    return "\n".join(lines)
