"""The promotion gate of the model registry: may a *challenger* replace the *champion*?

The gate reads the two versions' evaluation summaries (the ``evaluation.json`` the evaluate
step writes) and applies the rules of ``promote.gates`` (:class:`GateConfig`), one gate per
metric:

* ``absolute``: the challenger alone must be at least this good. Always checked, also for the
  first model of a registry (no champion yet).
* ``max_regression``: the challenger may be worse than the champion by at most this much
  (metric units).
* ``min_improvement``: the challenger must be better than the champion by at least this much.
* ``paired``: the improvement, measured item by item on outcomes both versions share (for
  ``colour_accuracy``: the colour-following trials, keyed ``"{base}|{asked}"``), must have a
  paired-bootstrap interval strictly above 0. With ``paired`` set, ``min_improvement`` is
  folded into the same ``"paired"`` check: the paired mean improvement must also reach it (no
  separate ``"min_improvement"`` check is made).

Relative rules only mean something between comparable numbers: before any of them is checked,
:func:`check_comparable` refuses (:class:`IncomparableError`) when the two versions measured a
metric with different extractor weights (sha256 of ``evaluation.json``'s ``"extractors"``) or
different sample counts. Without a champion only the absolute thresholds are checked.

Everything here is a pure function of its inputs: no registry, no files.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from components.core.config import GateConfig

COLOUR_METRIC = "colour_accuracy"
COLOUR_COUNT = "colour_trials"  # the sample count of colour_accuracy
_EXTRACTOR_METRIC = re.compile(r"^(?:r?fvd|clip_score)_(?P<name>.+)$")
_FIX = (
    "fix: evaluate both versions with the same extractor weights and the same sample counts "
    "(re-run evaluate on the champion with the challenger's evaluate settings), or drop the "
    "relative rules for these metrics"
)


class IncomparableError(ValueError):
    """Challenger and champion measured a metric differently, so they cannot be compared."""


# --------------------------------------------------------------------------- evidence


@dataclass(frozen=True)
class Evidence:
    """What the gate needs of one version's evaluation summary."""

    metrics: dict[str, float]
    extractors: dict[str, str]
    # paired per-item outcomes per metric; colour_accuracy: key f"{base}|{asked}" -> 1.0/0.0
    outcomes: dict[str, dict[str, float]]


def evidence(summary: Mapping) -> Evidence:
    """The :class:`Evidence` of an ``evaluation.json`` dict; ValueError names what is missing."""
    if not isinstance(summary, Mapping):
        raise ValueError(f"an evaluation summary must be a mapping, got {type(summary).__name__}")
    for key in ("metrics", "extractors"):
        if key not in summary:
            raise ValueError(f"evaluation summary has no {key!r} (keys: {sorted(summary)})")
    outcomes: dict[str, dict[str, float]] = {}
    colour = summary.get("colour_following")
    if colour is not None:
        outcomes[COLOUR_METRIC] = _colour_outcomes(colour)
    return Evidence(_metrics(summary["metrics"]), _extractors(summary["extractors"]), outcomes)


def _metrics(raw: Any) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"evaluation summary 'metrics' must be a mapping, got {raw!r}")
    out = {}
    for name, value in raw.items():
        if value is None:  # a metric that could not be computed
            out[str(name)] = math.nan
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out[str(name)] = float(value)
        else:
            raise ValueError(f"evaluation summary 'metrics.{name}' is not a number: {value!r}")
    return out


def _extractors(raw: Any) -> dict[str, str]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"evaluation summary 'extractors' must be a mapping, got {raw!r}")
    for name, sha in raw.items():
        if not isinstance(sha, str):
            raise ValueError(f"evaluation summary 'extractors.{name}' is not a sha: {sha!r}")
    return {str(k): v for k, v in raw.items()}


def _colour_outcomes(colour: Any) -> dict[str, float]:
    if not isinstance(colour, Mapping) or "trials" not in colour:
        raise ValueError("evaluation summary 'colour_following' has no 'trials'")
    if not isinstance(colour["trials"], Sequence):
        raise ValueError("evaluation summary 'colour_following.trials' must be a list")
    out: dict[str, float] = {}
    for i, trial in enumerate(colour["trials"]):
        for key in ("base", "asked", "correct"):
            if not isinstance(trial, Mapping) or key not in trial:
                raise ValueError(
                    f"evaluation summary 'colour_following.trials[{i}]' has no {key!r}"
                )
        item = f"{trial['base']}|{trial['asked']}"
        if item in out:
            raise ValueError(f"evaluation summary 'colour_following.trials' repeats {item!r}")
        out[item] = 1.0 if trial["correct"] else 0.0
    return out


def extractor_of(metric: str) -> str | None:
    """The extractor a metric was measured with: ``fvd_<x>``, ``rfvd_<x>``, ``clip_score_<x>``
    and ``clip_score_<x>_real`` use ``<x>``; other metrics use none."""
    match = _EXTRACTOR_METRIC.match(metric)
    if not match:
        return None
    name = match["name"]
    if metric.startswith("clip_score_") and name.endswith("_real"):
        name = name[: -len("_real")]
    return name or None


def sample_counts(ev: Evidence, metric: str) -> dict[str, float]:
    """The sample counts behind a metric: every ``f"{metric}_n_..."`` metric, and for
    ``colour_accuracy`` the number of colour-following trials (``"colour_trials"``)."""
    prefix = f"{metric}_n_"
    counts = {k: v for k, v in ev.metrics.items() if k.startswith(prefix)}
    if metric == COLOUR_METRIC:
        if COLOUR_METRIC in ev.outcomes:
            counts[COLOUR_COUNT] = float(len(ev.outcomes[COLOUR_METRIC]))
        elif COLOUR_COUNT in ev.metrics:
            counts[COLOUR_COUNT] = ev.metrics[COLOUR_COUNT]
    return dict(sorted(counts.items()))


def available_metrics(ev: Evidence) -> list[str]:
    """The metric names a gate can use (no ``_low``/``_high`` bounds, no ``_n_`` counts, no NaN)."""
    return sorted(
        k
        for k, v in ev.metrics.items()
        if not (k.endswith(("_low", "_high")) or "_n_" in k or math.isnan(v))
    )


# --------------------------------------------------------------------------- comparability


def check_comparable(challenger: Evidence, champion: Evidence, metrics: Sequence[str]) -> None:
    """Raise :class:`IncomparableError` listing every difference that makes a metric of the two
    versions incomparable: a missing value, the extractor sha, a sample count."""
    problems = [p for metric in metrics for p in _differences(challenger, champion, metric)]
    if problems:
        raise IncomparableError(
            "challenger and champion are not comparable: " + "; ".join(problems) + f". {_FIX}"
        )


def _differences(challenger: Evidence, champion: Evidence, metric: str) -> list[str]:
    out = []
    for side, ev in (("challenger", challenger), ("champion", champion)):
        if math.isnan(ev.metrics.get(metric, math.nan)):
            out.append(f"{metric}: the {side} has no value")
    name = extractor_of(metric)
    if name is not None:
        a, b = challenger.extractors.get(name), champion.extractors.get(name)
        if a != b:
            out.append(
                f"{metric}: extractor {name!r} sha256 differs (challenger {a}, champion {b})"
            )
    a_counts, b_counts = sample_counts(challenger, metric), sample_counts(champion, metric)
    for key in sorted(set(a_counts) | set(b_counts)):
        a, b = a_counts.get(key), b_counts.get(key)
        if a != b:
            out.append(f"{metric}: {key} differs (challenger {_num(a)}, champion {_num(b)})")
    return out


# --------------------------------------------------------------------------- paired bootstrap


def paired_bootstrap(
    challenger: Mapping[str, float],
    champion: Mapping[str, float],
    *,
    resamples: int,
    confidence: float,
    seed: int,
    higher_is_better: bool,
    metric: str = "paired",
) -> tuple[float, float, float]:
    """(mean improvement, low, high) of per-item outcomes both versions share.

    The improvement is signed so that positive means the challenger is better. The interval is
    the percentile bootstrap over items resampled with replacement (``default_rng(seed)``).
    ``metric`` only names the outcomes in errors. IncomparableError if the item sets differ.
    """
    if resamples < 1 or not 0 < confidence < 1:
        raise ValueError(
            f"paired bootstrap needs resamples >= 1 and 0 < confidence < 1, got {resamples}, "
            f"{confidence}"
        )
    only_a, only_b = set(challenger) - set(champion), set(champion) - set(challenger)
    if only_a or only_b:
        examples = ", ".join(repr(k) for k in sorted(only_a | only_b)[:3])
        raise IncomparableError(
            f"{metric} trials differ: {len(only_a)} only in challenger, {len(only_b)} only in "
            f"champion (e.g. {examples}). {_FIX}"
        )
    if not challenger:
        raise ValueError(f"{metric}: no paired outcomes to bootstrap")
    keys = sorted(challenger)
    diff = np.array([challenger[k] - champion[k] for k in keys], dtype=np.float64)
    if not higher_is_better:
        diff = -diff
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(resamples, len(diff)))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return float(diff.mean()), float(low), float(high)


# --------------------------------------------------------------------------- decision


@dataclass(frozen=True)
class Check:
    """One rule of one gate, applied.

    ``threshold`` is the rule's configured number (``absolute``, ``max_regression``,
    ``min_improvement``; for ``paired`` the ``min_improvement`` folded into it, else 0).
    """

    metric: str
    rule: str  # "absolute" | "max_regression" | "min_improvement" | "paired"
    passed: bool
    challenger: float
    champion: float | None
    threshold: float | None
    detail: str  # one human sentence

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Decision:
    """Whether the challenger may replace the champion, and why."""

    passed: bool
    checks: tuple[Check, ...]
    reason: str  # one line

    def as_dict(self) -> dict:
        return {
            "passed": self.passed,
            "reason": self.reason,
            "checks": [c.as_dict() for c in self.checks],
        }


def decide(
    challenger: Evidence,
    champion: Evidence | None,
    gates: Sequence[GateConfig],
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
) -> Decision:
    """Apply ``gates`` to the challenger (and the champion, if there is one).

    ValueError for a gate without a rule, an unknown or NaN metric, or a paired rule without
    outcomes; :class:`IncomparableError` when a relative rule's metric is incomparable.
    """
    for gate in gates:
        _validate(gate, challenger)
    checks = [_absolute(g, challenger.metrics[g.metric]) for g in gates if g.absolute is not None]
    if champion is not None:
        relative = [g for g in gates if _is_relative(g)]
        check_comparable(challenger, champion, [g.metric for g in relative])
        for gate in relative:
            checks += _relative(gate, challenger, champion, resamples, confidence, seed)
    return Decision(all(c.passed for c in checks), tuple(checks), _reason(checks, champion))


def _validate(gate: GateConfig, challenger: Evidence) -> None:
    if gate.absolute is None and not _is_relative(gate):
        raise ValueError(
            f"promote gate {gate.metric!r} has no rule: set absolute, max_regression, "
            "min_improvement or paired"
        )
    if math.isnan(challenger.metrics.get(gate.metric, math.nan)):
        raise ValueError(
            f"promote gate metric {gate.metric!r} is not in the challenger's evaluation "
            f"(or is NaN); available: {', '.join(available_metrics(challenger))}"
        )


def _is_relative(gate: GateConfig) -> bool:
    return gate.max_regression is not None or gate.min_improvement is not None or gate.paired


def _improvement(gate: GateConfig, challenger: float, champion: float) -> float:
    """Signed so that positive means the challenger is better."""
    return challenger - champion if gate.higher_is_better else champion - challenger


def _absolute(gate: GateConfig, value: float) -> Check:
    limit = float(gate.absolute)
    passed = value >= limit if gate.higher_is_better else value <= limit
    op = (">=" if passed else "<") if gate.higher_is_better else ("<=" if passed else ">")
    detail = f"{gate.metric} {_num(value)} {op} {_num(limit)} (absolute)"
    return Check(gate.metric, "absolute", passed, value, None, limit, detail)


def _relative(
    gate: GateConfig,
    challenger: Evidence,
    champion: Evidence,
    resamples: int,
    confidence: float,
    seed: int,
) -> list[Check]:
    a, b = challenger.metrics[gate.metric], champion.metrics[gate.metric]
    gain = _improvement(gate, a, b)
    checks = []
    if gate.max_regression is not None:
        limit = float(gate.max_regression)
        passed = gain >= -limit
        detail = (
            f"{gate.metric} {_num(a)} vs champion {_num(b)}: {_signed(gain)} "
            f"{'within' if passed else 'beyond'} max_regression {_num(limit)}"
        )
        checks.append(Check(gate.metric, "max_regression", passed, a, b, limit, detail))
    if gate.min_improvement is not None and not gate.paired:
        limit = float(gate.min_improvement)
        passed = gain >= limit
        detail = (
            f"{gate.metric} {_num(a)} vs champion {_num(b)}: {_signed(gain)}, needs at least "
            f"{_signed(limit)} (min_improvement)"
        )
        checks.append(Check(gate.metric, "min_improvement", passed, a, b, limit, detail))
    if gate.paired:
        checks.append(_paired(gate, challenger, champion, resamples, confidence, seed))
    return checks


def _paired(
    gate: GateConfig,
    challenger: Evidence,
    champion: Evidence,
    resamples: int,
    confidence: float,
    seed: int,
) -> Check:
    metric = gate.metric
    for side, ev in (("challenger", challenger), ("champion", champion)):
        if metric not in ev.outcomes:
            raise ValueError(
                f"promote gate {metric!r} is paired but the {side}'s evaluation has no paired "
                f"outcomes for it (paired outcomes exist for: {sorted(ev.outcomes) or 'none'})"
            )
    mean, low, high = paired_bootstrap(
        challenger.outcomes[metric],
        champion.outcomes[metric],
        resamples=resamples,
        confidence=confidence,
        seed=seed,
        higher_is_better=gate.higher_is_better,
        metric=metric,
    )
    need = "needs interval above 0"
    passed = low > 0
    limit = 0.0
    if gate.min_improvement is not None:
        limit = float(gate.min_improvement)
        passed = passed and mean >= limit
        need += f" and mean at least {_signed(limit)}"
    detail = (
        f"{metric} {_signed(mean)} [{_signed(low)}, {_signed(high)}] over champion "
        f"({len(challenger.outcomes[metric])} paired items, {confidence:.0%}), {need}"
    )
    a, b = challenger.metrics[metric], champion.metrics.get(metric)
    return Check(metric, "paired", passed, a, b, limit, detail)


def _reason(checks: Sequence[Check], champion: Evidence | None) -> str:
    prefix = "no champion: absolute thresholds only; " if champion is None else ""
    if not checks:
        return prefix + "nothing to check (no applicable gate rules)"
    failed = [c.detail for c in checks if not c.passed]
    if failed:
        suffix = "; no champion: absolute thresholds only" if champion is None else ""
        return "refused: " + "; ".join(failed) + suffix
    return prefix + f"all {len(checks)} check{'s' if len(checks) != 1 else ''} passed"


def _num(x: float | None) -> str:
    return "none" if x is None else f"{x:.6g}"


def _signed(x: float) -> str:
    return f"{x:+.6g}"
