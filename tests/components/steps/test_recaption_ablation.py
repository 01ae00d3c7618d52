"""The re-captioning ablation's plan (two models at one budget, four cells) and its 2x2 table
with paired differences; the cells themselves are colour-following runs (test_evaluate)."""

from __future__ import annotations

import json

import pytest

from components.core.config import load_config
from components.steps import recaption_ablation as ablation


def _sweep(tmp_path, points: list[tuple[str, float, float]]) -> str:
    path = tmp_path / "sweep.json"
    path.write_text(
        json.dumps(
            {
                "points": [
                    {
                        "variant": f"native/{captions}",
                        "budget": budget,
                        "compute": budget,
                        "val_loss": loss,
                        "model": f"/models/{captions}-{loss}",
                    }
                    for captions, budget, loss in points
                ]
            }
        )
    )
    return str(path)


def test_the_plan_is_four_cells_over_two_models_at_one_budget(tmp_path):
    sweep = _sweep(tmp_path, [("short", 1e12, 0.3), ("recaptioned", 1e12, 0.2)])
    cells = ablation.plan(load_config("tiny"), sweep)
    assert [c["key"] for c in cells] == [
        "short-short",
        "short-expanded",
        "recaptioned-short",
        "recaptioned-expanded",
    ]
    assert {c["model"] for c in cells} == {"/models/short-0.3", "/models/recaptioned-0.2"}


def test_the_plan_refuses_a_missing_variant_or_unequal_compute(tmp_path):
    with pytest.raises(ValueError, match=r"sweep.captions=\[short, recaptioned\]"):
        ablation.plan(load_config("tiny"), _sweep(tmp_path, [("original", 1e12, 0.3)]))
    unequal = _sweep(tmp_path, [("short", 1e12, 0.3), ("recaptioned", 2e12, 0.2)])
    with pytest.raises(ValueError, match="equal compute"):
        ablation.plan(load_config("tiny"), unequal)


def _trials(correct: list[list[bool]]) -> list[dict]:
    return [{"base": f"b{i}", "correct": c} for i, per_base in enumerate(correct) for c in per_base]


def test_the_paired_difference_resamples_bases():
    better = _trials([[True, True], [True, False], [True, True]])  # 5/6
    worse = _trials([[False, False], [True, False], [False, True]])  # 2/6
    d = ablation.paired_difference(better, worse, resamples=500, confidence=0.9, seed=0)
    assert d["difference"] == pytest.approx(0.5)
    assert d["low"] <= d["difference"] <= d["high"]
    same = ablation.paired_difference(better, better, resamples=200, confidence=0.9, seed=0)
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}  # paired: no spread at all


def test_the_table_has_every_cell_and_the_claims(tmp_path):
    parts = []
    for captions in ablation.CAPTIONS:
        for prompts in ablation.PROMPTS:
            good = captions == "recaptioned" and prompts == "expanded"
            trials = _trials([[good, True], [good, False]])
            cell = {
                "key": f"{captions}-{prompts}",
                "captions": captions,
                "prompts": prompts,
                "budget": 1e12,
                "colour": {
                    "accuracy": sum(t["correct"] for t in trials) / 4,
                    "accuracy_low": 0.0,
                    "accuracy_high": 1.0,
                    "chance": 0.2,
                    "trials": trials,
                },
                "clip_score": {
                    "clip_score_domain": 0.5,
                    "clip_score_domain_low": 0.4,
                    "clip_score_domain_high": 0.6,
                },
            }
            path = tmp_path / f"{captions}-{prompts}.json"
            path.write_text(json.dumps(cell))
            parts.append({"cell": str(path)})
    result = ablation.run(load_config("tiny"), tmp_path, parts)
    claim = result.values["recaptioned_expanded_vs_short_short"]
    assert claim["difference"] == pytest.approx(0.5)
    table = (tmp_path / ablation.TABLE_NAME).read_text()
    assert "| recaptioned captions |" in table and "| short captions |" in table
    assert result.metrics["ablation.recaptioned.expanded.colour_accuracy"] == 0.75
    with pytest.raises(ValueError, match="lacks cells"):
        ablation.run(load_config("tiny"), tmp_path, parts[:3])
