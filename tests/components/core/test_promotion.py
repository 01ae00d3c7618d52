"""The promotion gate: evidence from evaluation.json, comparability, the paired bootstrap and
the decision's rules (absolute, max_regression, min_improvement, paired)."""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest

from components.core.config import GateConfig
from components.core.promotion import (
    Check,
    Decision,
    Evidence,
    IncomparableError,
    check_comparable,
    decide,
    evidence,
    extractor_of,
    paired_bootstrap,
    sample_counts,
)

SHA_A = "a" * 64
SHA_B = "b" * 64


def summary(
    *,
    fvd: float = 812.3,
    clip: float = 0.31,
    n_real: float = 64.0,
    domain_sha: str = SHA_A,
    correct: int = 10,
    trials: int = 40,
) -> dict:
    """A realistic evaluation.json: ``correct`` of ``trials`` colour trials are right."""
    colours = ["red", "green", "blue", "yellow"]
    records = [
        {
            "base": f"clips/{i // 4:02d}.mp4",
            "asked": colours[i % 4],
            "seen": colours[i % 4] if i < correct else None,
            "correct": i < correct,
            "foreground": 0.4,
            "seed": 7 + i,
        }
        for i in range(trials)
    ]
    return {
        "metrics": {
            "fvd_domain": fvd,
            "fvd_domain_low": fvd - 100.0,
            "fvd_domain_high": fvd + 100.0,
            "fvd_domain_n_real": n_real,
            "fvd_domain_n_fake": 64.0,
            "clip_score_domain": clip,
            "clip_score_domain_low": clip - 0.02,
            "clip_score_domain_high": clip + 0.02,
            "clip_score_domain_n_samples": 80.0,
            "clip_score_domain_n_frames": 900.0,
            "colour_accuracy": correct / trials if trials else math.nan,
            "colour_accuracy_low": 0.1,
            "colour_accuracy_high": 0.4,
            "colour_trials": float(trials),
            "recon_psnr": 24.1,
            "evaluate_seconds": 12.5,
        },
        "extractors": {"domain": domain_sha, "i3d": "c" * 64},
        "notes": [],
        "prompts": [{"prompt": "a red ball", "file": "x.mp4"}],
        "colour_following": {"accuracy": correct / max(trials, 1), "trials": records},
        "lineage": {"model": "models:/tessera-t2v/3"},
    }


def ev(**kwargs) -> Evidence:
    return evidence(summary(**kwargs))


# --------------------------------------------------------------------------- evidence


def test_evidence_from_a_realistic_summary():
    e = ev(correct=30)
    assert e.metrics["fvd_domain"] == 812.3
    assert e.metrics["fvd_domain_n_real"] == 64.0
    assert e.extractors == {"domain": SHA_A, "i3d": "c" * 64}
    outcomes = e.outcomes["colour_accuracy"]
    assert len(outcomes) == 40
    assert sum(outcomes.values()) == 30.0
    assert outcomes["clips/00.mp4|red"] == 1.0
    assert outcomes["clips/09.mp4|yellow"] == 0.0
    assert set(e.outcomes) == {"colour_accuracy"}


def test_evidence_without_colour_following():
    s = summary()
    s["colour_following"] = None
    assert evidence(s).outcomes == {}
    del s["colour_following"]
    assert evidence(s).outcomes == {}


def test_evidence_missing_metrics_names_the_key():
    s = summary()
    del s["metrics"]
    with pytest.raises(ValueError, match="'metrics'"):
        evidence(s)


def test_evidence_rejects_bad_shapes():
    s = summary()
    s["metrics"]["fvd_domain"] = "812"
    with pytest.raises(ValueError, match=r"metrics\.fvd_domain"):
        evidence(s)
    s = summary()
    del s["colour_following"]["trials"][3]["asked"]
    with pytest.raises(ValueError, match=r"trials\[3\].*'asked'"):
        evidence(s)
    s = summary()
    del s["extractors"]
    with pytest.raises(ValueError, match="'extractors'"):
        evidence(s)


def test_extractor_of():
    assert extractor_of("fvd_domain") == "domain"
    assert extractor_of("rfvd_i3d") == "i3d"
    assert extractor_of("clip_score_domain") == "domain"
    assert extractor_of("clip_score_domain_real") == "domain"
    assert extractor_of("colour_accuracy") is None
    assert extractor_of("recon_psnr") is None


def test_sample_counts():
    e = ev()
    assert sample_counts(e, "fvd_domain") == {"fvd_domain_n_fake": 64.0, "fvd_domain_n_real": 64.0}
    assert sample_counts(e, "clip_score_domain") == {
        "clip_score_domain_n_frames": 900.0,
        "clip_score_domain_n_samples": 80.0,
    }
    assert sample_counts(e, "colour_accuracy") == {"colour_trials": 40.0}
    assert sample_counts(e, "recon_psnr") == {}


# --------------------------------------------------------------------------- absolute


def test_absolute_lower_is_better_passes_and_fails():
    gates = [GateConfig("fvd_domain", absolute=900.0)]
    ok = decide(ev(fvd=812.3), None, gates)
    assert ok.passed
    assert ok.checks[0].rule == "absolute" and ok.checks[0].threshold == 900.0
    assert ok.checks[0].detail == "fvd_domain 812.3 <= 900 (absolute)"
    assert "no champion: absolute thresholds only" in ok.reason
    bad = decide(ev(fvd=950.0), None, gates)
    assert not bad.passed
    assert bad.reason.startswith("refused: fvd_domain 950 > 900 (absolute)")


def test_absolute_higher_is_better_passes_and_fails():
    gates = [GateConfig("clip_score_domain", higher_is_better=True, absolute=0.3)]
    assert decide(ev(clip=0.31), None, gates).passed
    bad = decide(ev(clip=0.29), None, gates)
    assert not bad.passed
    assert bad.checks[0].detail == "clip_score_domain 0.29 < 0.3 (absolute)"


def test_absolute_is_checked_with_a_champion_too():
    gates = [GateConfig("fvd_domain", absolute=900.0, max_regression=1000.0)]
    d = decide(ev(fvd=950.0), ev(fvd=990.0), gates)
    assert [(c.rule, c.passed) for c in d.checks] == [
        ("absolute", False),
        ("max_regression", True),
    ]
    assert not d.passed


def test_first_model_skips_relative_rules():
    gates = [
        GateConfig("fvd_domain", absolute=900.0, max_regression=0.0),
        GateConfig("clip_score_domain", higher_is_better=True, min_improvement=0.1),
    ]
    d = decide(ev(), None, gates)
    assert [c.rule for c in d.checks] == ["absolute"]
    assert d.passed
    assert d.reason == "no champion: absolute thresholds only; all 1 check passed"


def test_nothing_to_check():
    d = decide(ev(), None, [GateConfig("fvd_domain", max_regression=0.0)])
    assert d.passed and d.checks == ()
    assert "nothing to check" in d.reason


# --------------------------------------------------------------------------- relative


def test_max_regression_vs_champion():
    gates = [GateConfig("fvd_domain", max_regression=10.0)]
    assert decide(ev(fvd=805.0), ev(fvd=800.0), gates).passed  # worse by 5
    bad = decide(ev(fvd=815.0), ev(fvd=800.0), gates)  # worse by 15
    assert not bad.passed
    check = bad.checks[0]
    assert (check.challenger, check.champion, check.threshold) == (815.0, 800.0, 10.0)
    assert "max_regression 10" in check.detail


def test_max_regression_higher_is_better():
    gates = [GateConfig("clip_score_domain", higher_is_better=True, max_regression=0.0)]
    assert decide(ev(clip=0.31), ev(clip=0.31), gates).passed
    assert decide(ev(clip=0.35), ev(clip=0.31), gates).passed
    assert not decide(ev(clip=0.30), ev(clip=0.31), gates).passed


def test_min_improvement_vs_champion():
    gates = [GateConfig("fvd_domain", min_improvement=50.0)]
    assert decide(ev(fvd=700.0), ev(fvd=800.0), gates).passed  # better by 100
    bad = decide(ev(fvd=780.0), ev(fvd=800.0), gates)  # better by only 20
    assert not bad.passed
    assert bad.checks[0].rule == "min_improvement"
    assert bad.reason.startswith("refused: fvd_domain 780 vs champion 800: +20")


def test_all_checks_passed_reason():
    gates = [
        GateConfig("fvd_domain", absolute=900.0, max_regression=0.0),
        GateConfig("clip_score_domain", higher_is_better=True, max_regression=0.0),
    ]
    d = decide(ev(fvd=800.0, clip=0.32), ev(fvd=810.0, clip=0.31), gates)
    assert d.passed
    assert d.reason == "all 3 checks passed"


# --------------------------------------------------------------------------- comparability


def test_different_extractor_sha_is_incomparable():
    gates = [GateConfig("fvd_domain", max_regression=0.0)]
    with pytest.raises(IncomparableError) as err:
        decide(ev(domain_sha=SHA_A), ev(domain_sha=SHA_B), gates)
    message = str(err.value)
    assert "fvd_domain" in message and SHA_A in message and SHA_B in message
    assert "fix:" in message


def test_different_n_real_is_incomparable():
    with pytest.raises(IncomparableError) as err:
        check_comparable(ev(n_real=64.0), ev(n_real=32.0), ["fvd_domain"])
    message = str(err.value)
    assert "fvd_domain_n_real" in message
    assert "challenger 64" in message and "champion 32" in message


def test_check_comparable_lists_every_difference():
    with pytest.raises(IncomparableError) as err:
        check_comparable(
            ev(n_real=64.0, domain_sha=SHA_A),
            ev(n_real=32.0, domain_sha=SHA_B, trials=36),
            ["fvd_domain", "clip_score_domain", "colour_accuracy"],
        )
    message = str(err.value)
    assert message.count("sha256 differs") == 2  # fvd_domain and clip_score_domain
    assert "fvd_domain_n_real" in message
    assert "colour_trials differs (challenger 40, champion 36)" in message


def test_comparable_passes_and_absolute_only_metrics_are_not_compared():
    check_comparable(ev(), ev(fvd=700.0, clip=0.2), ["fvd_domain", "clip_score_domain"])
    # an absolute-only gate on an incomparable metric does not refuse
    gates = [GateConfig("fvd_domain", absolute=900.0)]
    assert decide(ev(domain_sha=SHA_A), ev(domain_sha=SHA_B), gates).passed


def test_champion_without_the_metric_is_incomparable():
    champion = ev()
    del champion.metrics["recon_psnr"]
    with pytest.raises(IncomparableError, match="recon_psnr: the champion has no value"):
        decide(ev(), champion, [GateConfig("recon_psnr", higher_is_better=True, max_regression=1)])


# --------------------------------------------------------------------------- paired


PAIRED = [GateConfig("colour_accuracy", higher_is_better=True, paired=True)]


def test_paired_clearly_better_challenger_passes():
    d = decide(ev(correct=30), ev(correct=10), PAIRED)
    assert d.passed
    (check,) = d.checks
    assert check.rule == "paired" and check.passed
    assert check.challenger == 0.75 and check.champion == 0.25
    mean, low, high = paired_bootstrap(
        ev(correct=30).outcomes["colour_accuracy"],
        ev(correct=10).outcomes["colour_accuracy"],
        resamples=1000,
        confidence=0.95,
        seed=0,
        higher_is_better=True,
    )
    assert mean == pytest.approx(0.5)
    assert 0 < low < mean < high <= 1
    assert "needs interval above 0" in check.detail


def test_paired_equal_challenger_fails():
    d = decide(ev(correct=20), ev(correct=20), PAIRED)
    assert not d.passed
    assert d.reason.startswith("refused: colour_accuracy +0 [+0, +0] over champion")


def test_paired_worse_challenger_fails():
    assert not decide(ev(correct=10), ev(correct=30), PAIRED).passed


def test_paired_with_min_improvement_is_one_check():
    gates = [GateConfig("colour_accuracy", higher_is_better=True, paired=True, min_improvement=0.6)]
    d = decide(ev(correct=30), ev(correct=10), gates)  # interval above 0, but mean 0.5 < 0.6
    assert [c.rule for c in d.checks] == ["paired"]
    assert d.checks[0].threshold == 0.6
    assert not d.passed
    gates = [GateConfig("colour_accuracy", higher_is_better=True, paired=True, min_improvement=0.4)]
    assert decide(ev(correct=30), ev(correct=10), gates).passed


def test_paired_lower_is_better_sign():
    a, b = {"x": 1.0, "y": 2.0, "z": 1.0}, {"x": 3.0, "y": 4.0, "z": 3.0}
    mean, low, _ = paired_bootstrap(
        a, b, resamples=200, confidence=0.9, seed=1, higher_is_better=False
    )
    assert mean == pytest.approx(2.0) and low == pytest.approx(2.0)
    mean, _, high = paired_bootstrap(
        a, b, resamples=200, confidence=0.9, seed=1, higher_is_better=True
    )
    assert mean == pytest.approx(-2.0) and high == pytest.approx(-2.0)


def test_paired_differing_trials_are_incomparable():
    champion = summary(correct=10)
    trials = champion["colour_following"]["trials"]
    trials[0] = {**trials[0], "base": "clips/other.mp4"}
    del trials[1:4]  # 3 only in the challenger now plus the renamed one
    gates = [GateConfig("colour_accuracy", higher_is_better=True, paired=True)]
    with pytest.raises(IncomparableError, match="4 only in challenger, 1 only in champion"):
        paired_bootstrap(
            ev(correct=30).outcomes["colour_accuracy"],
            evidence(champion).outcomes["colour_accuracy"],
            resamples=100,
            confidence=0.95,
            seed=0,
            higher_is_better=True,
            metric="colour_accuracy",
        )
    # decide refuses too (here already on the trial count)
    with pytest.raises(IncomparableError, match="colour_trials"):
        decide(ev(correct=30), evidence(champion), gates)


def test_paired_same_count_different_keys_refused_by_decide():
    champion = summary(correct=10)
    trial = champion["colour_following"]["trials"][0]
    champion["colour_following"]["trials"][0] = {**trial, "base": "clips/other.mp4"}
    with pytest.raises(IncomparableError, match="colour_accuracy trials differ: 1 only in"):
        decide(ev(correct=30), evidence(champion), PAIRED)


def test_paired_bootstrap_is_deterministic_by_seed():
    a = ev(correct=24).outcomes["colour_accuracy"]
    b = {k: float(i % 3 == 0) for i, k in enumerate(sorted(a))}
    kwargs = {"resamples": 500, "confidence": 0.95, "higher_is_better": True}
    first = paired_bootstrap(a, b, seed=3, **kwargs)
    assert paired_bootstrap(a, b, seed=3, **kwargs) == first
    other = paired_bootstrap(a, b, seed=4, **kwargs)
    assert other[0] == first[0]  # the mean does not depend on the seed
    assert other[1:] != first[1:]  # the interval does


def test_paired_needs_outcomes_in_both():
    champion = summary(correct=10)
    champion["colour_following"] = None
    with pytest.raises(ValueError, match="colour_accuracy.*champion"):
        decide(ev(correct=30), evidence(champion), PAIRED)


# --------------------------------------------------------------------------- errors, output


def test_unknown_metric_lists_available_ones():
    with pytest.raises(ValueError) as err:
        decide(ev(), None, [GateConfig("fvd_i3d", absolute=100.0)])
    message = str(err.value)
    assert "'fvd_i3d'" in message
    available = message.split("available: ")[1].split(", ")
    assert available == sorted(available)
    assert {"fvd_domain", "clip_score_domain", "colour_accuracy", "recon_psnr"} <= set(available)
    assert not [m for m in available if m.endswith(("_low", "_high")) or "_n_" in m]


def test_nan_metric_is_unknown():
    s = summary(trials=0)
    assert math.isnan(evidence(s).metrics["colour_accuracy"])
    with pytest.raises(ValueError, match="'colour_accuracy'"):
        decide(evidence(s), None, [GateConfig("colour_accuracy", absolute=0.5)])


def test_gate_without_rule_is_refused_at_decide_time():
    gate = GateConfig("fvd_domain", absolute=1.0)
    object.__setattr__(gate, "absolute", None)  # GateConfig itself refuses this at load time
    with pytest.raises(ValueError, match="'fvd_domain' has no rule"):
        decide(ev(), None, [gate])


def test_zero_rules_are_rules():
    gates = [GateConfig("fvd_domain", absolute=0.0), GateConfig("recon_psnr", max_regression=0.0)]
    d = decide(ev(), ev(), gates)
    assert [c.rule for c in d.checks] == ["absolute", "max_regression"]
    assert d.checks[0].passed is False and d.checks[1].passed is True


def test_decision_as_dict_is_json_serialisable():
    gates = [
        GateConfig("fvd_domain", absolute=900.0, max_regression=0.0),
        GateConfig("colour_accuracy", higher_is_better=True, paired=True),
    ]
    d = decide(ev(correct=30), ev(correct=10), gates)
    assert isinstance(d, Decision) and all(isinstance(c, Check) for c in d.checks)
    out = json.loads(json.dumps(d.as_dict()))
    assert out["passed"] is True
    assert out["reason"] == d.reason
    assert [c["rule"] for c in out["checks"]] == ["absolute", "max_regression", "paired"]
    assert out["checks"][0] == dataclasses.asdict(d.checks[0])
    assert set(out["checks"][2]) == {
        "metric",
        "rule",
        "passed",
        "challenger",
        "champion",
        "threshold",
        "detail",
    }


def test_decide_does_not_mutate_inputs():
    challenger, champion = ev(correct=30), ev(correct=10)
    before = copy.deepcopy((challenger, champion))
    decide(challenger, champion, PAIRED + [GateConfig("fvd_domain", max_regression=0.0)])
    assert (challenger, champion) == before
