"""Does re-captioning help prompt following? The seed's 2x2 claim, measured: the
``recaption_ablation`` step (the ``recaption_ablation`` DAG).

Sora and DALL-E 3 claim that training on descriptive synthetic captions, and expanding short user
prompts into such captions at inference, improves prompt following. The measurement:

- **Two models at equal compute** on the same latents: a sweep with
  ``sweep.captions=[short, recaptioned]`` and one budget trains a DiT on the clips' short
  captions and one on the captioner's descriptive captions (the DAG runs that sweep first).
- **Four cells** (the parts): each model sampled from the same **short** prompts, as typed and
  expanded (``evaluate.colour_prompts`` = ``short`` | ``expanded``; the expander is the configured
  ``expand`` backend). The prompts are colour following's (``components.steps.evaluate.colour``):
  single-object corpus files, each asked for in every contrasting colour with one seed per base,
  the colour read back from the pixels.
- **Per cell**: colour-following accuracy against the chance level of a model that ignores the
  colour word (Wilson interval), and ``clip_score_domain`` of the clips against the short prompt
  the user typed (bootstrap interval over clips), from the in-domain evaluator.
- **The claim**: accuracy of (recaptioned, expanded) minus (short, short), with a paired
  bootstrap interval over bases (every cell asks the same bases with the same seeds).

Outputs: ``ablation.json`` (every cell, every trial, the differences) and ``ablation.md`` (the 2x2
table), logged to MLflow with the metrics ``ablation.<captions>.<prompts>.colour_accuracy``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from components.core import artifacts, storage
from components.core.config import TesseraConfig
from components.core.runner import StepResult, StepSpec
from components.steps.evaluate import colour as colour_eval

CAPTIONS = ("short", "recaptioned")  # what the two models trained on
PROMPTS = ("short", "expanded")  # what they are asked with
CELL_NAME = "cell.json"
RESULT_NAME = "ablation.json"
TABLE_NAME = "ablation.md"


def _models(sweep: str) -> dict[str, dict[str, Any]]:
    """The sweep's best point per training-caption variant (``short`` and ``recaptioned``)."""
    report = json.loads(storage.read_text(sweep))
    found: dict[str, dict[str, Any]] = {}
    for point in report.get("points", []):
        captions = point["variant"].split("/")[-1]
        if captions in CAPTIONS and (
            captions not in found or point["val_loss"] < found[captions]["val_loss"]
        ):
            found[captions] = point
    missing = [c for c in CAPTIONS if c not in found]
    if missing:
        raise ValueError(
            f"the sweep {sweep} trained no {missing} point: run it with "
            "sweep.captions=[short, recaptioned] (the recaption_ablation DAG sets this)"
        )
    budgets = {found[c]["budget"] for c in CAPTIONS}
    if len(budgets) != 1:
        raise ValueError(
            f"the ablation compares models at equal compute, but the sweep's short and "
            f"recaptioned points have budgets {sorted(budgets)}: give the sweep one budget"
        )
    return found


def plan(cfg: TesseraConfig, sweep: str, **_: Any) -> list[dict[str, Any]]:
    """The four cells: (training captions, prompts), each with its model directory."""
    models = _models(sweep)
    return [
        {
            "key": f"{captions}-{prompts}",
            "captions": captions,
            "prompts": prompts,
            "model": models[captions]["model"],
            "budget": models[captions]["budget"],
            "compute": models[captions]["compute"],
        }
        for captions in CAPTIONS
        for prompts in PROMPTS
    ]


def cell(
    cfg: TesseraConfig,
    workdir: Path,
    part: dict[str, Any],
    sweep: str,
    clips: str,
    captions: str,
    factors: str,
    evaluator: str,
) -> StepResult:
    """Sample one cell's prompts with its model; colour accuracy and ``clip_score_domain``.

    Args:
        part: one item of :func:`plan`.
        sweep: the ablation sweep's ``sweep.json`` (unused here: the part names the model).
        clips, captions, factors: the demo corpus (demo_data's outputs).
        evaluator: the train_evaluator step's output (``clip_score_domain``).
    """
    from evaluation import clip_score

    workdir = Path(workdir)
    evaluate = dataclasses.replace(cfg.evaluate, colour_prompts=part["prompts"])
    cfg = dataclasses.replace(cfg, evaluate=evaluate)
    rows = _parquet(captions)
    factor_rows = _parquet(factors)
    colour_eval.check_factors(factor_rows, factors)
    with artifacts.model_dir(part["model"]) as directory:
        generator = artifacts.load_generator(cfg, directory)
    summary, _, videos = colour_eval.colour_following(
        cfg,
        generator,
        clips,
        {r["path"]: r["caption"] for r in rows},
        factor_rows,
        {r["path"]: r.get("short_caption") for r in rows},
    )
    typed = [t.get("expansion", {}).get("short_prompt") or t["prompt"] for t in summary["trials"]]
    scorer = artifacts.load_evaluator(evaluator, cfg)
    score = clip_score.clip_score(
        scorer, videos, typed, resamples=cfg.evaluate.resamples, seed=cfg.seed
    )
    for trial, value in zip(summary["trials"], score.per_sample, strict=True):
        trial["clip_score_domain"] = round(float(value), 4)
        trial["typed"] = trial.get("expansion", {}).get("short_prompt") or trial["prompt"]
    result = {
        **{k: part[k] for k in ("key", "captions", "prompts", "model", "budget", "compute")},
        "colour": summary,
        "clip_score": {k: float(v) for k, v in score.as_metrics().items()},
    }
    (workdir / CELL_NAME).write_text(json.dumps(result, indent=2, default=str) + "\n")
    return StepResult(
        files={"cell": CELL_NAME},
        values={
            "key": part["key"],
            "colour_accuracy": summary["accuracy"],
            "chance": summary["chance"],
            "clip_score_domain": float(score.cosine),
        },
        metrics={
            "colour_accuracy": summary["accuracy"],
            "colour_chance": summary["chance"],
            "clip_score_domain": float(score.cosine),
        },
    )


# --------------------------------------------------------------------------- the table


def paired_difference(
    a: list[dict[str, Any]], b: list[dict[str, Any]], resamples: int, confidence: float, seed: int
) -> dict[str, float]:
    """Accuracy of trials ``a`` minus trials ``b`` (records with ``base`` and ``correct``) and
    a percentile bootstrap interval that resamples bases, keeping each base's trials in both
    cells together (the cells ask the same bases with the same seeds)."""
    bases = sorted({t["base"] for t in a} | {t["base"] for t in b})
    counts = np.zeros((len(bases), 4))  # correct_a, n_a, correct_b, n_b per base
    index = {base: i for i, base in enumerate(bases)}
    for trials, col in ((a, 0), (b, 2)):
        for t in trials:
            counts[index[t["base"]], col] += bool(t["correct"])
            counts[index[t["base"]], col + 1] += 1

    def diff(c: np.ndarray) -> float:
        return c[:, 0].sum() / max(c[:, 1].sum(), 1) - c[:, 2].sum() / max(c[:, 3].sum(), 1)

    rng = np.random.default_rng(seed)
    draws = [diff(counts[rng.integers(0, len(bases), len(bases))]) for _ in range(resamples)]
    alpha = (1 - confidence) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha]) if draws else (np.nan, np.nan)
    return {"difference": float(diff(counts)), "low": float(low), "high": float(high)}


def run(cfg: TesseraConfig, workdir: Path, parts: list[dict[str, Any]]) -> StepResult:
    """Gather the four cells into the 2x2 table and the differences that test the claim."""
    workdir = Path(workdir)
    cells = {}
    for part in parts:
        found = json.loads(storage.read_text(part["cell"]))
        cells[(found["captions"], found["prompts"])] = found
    missing = [f"{c}-{p}" for c in CAPTIONS for p in PROMPTS if (c, p) not in cells]
    if missing:
        raise ValueError(f"the ablation lacks cells {missing}: every (captions, prompts) pair runs")
    ecfg = cfg.evaluate

    def trials(captions: str, prompts: str) -> list[dict[str, Any]]:
        return cells[(captions, prompts)]["colour"]["trials"]

    claims = {
        "recaptioned_expanded_vs_short_short": paired_difference(
            trials("recaptioned", "expanded"),
            trials("short", "short"),
            ecfg.resamples,
            ecfg.confidence,
            cfg.seed,
        ),
        "recaptioned_vs_short_captions_on_short_prompts": paired_difference(
            trials("recaptioned", "short"),
            trials("short", "short"),
            ecfg.resamples,
            ecfg.confidence,
            cfg.seed,
        ),
        "expansion_on_recaptioned": paired_difference(
            trials("recaptioned", "expanded"),
            trials("recaptioned", "short"),
            ecfg.resamples,
            ecfg.confidence,
            cfg.seed,
        ),
    }
    table = _table(cells, claims)
    (workdir / TABLE_NAME).write_text(table)
    result = {
        "cells": {f"{c}-{p}": cell for (c, p), cell in cells.items()},
        "differences": claims,
        "budget": next(iter(cells.values()))["budget"],
    }
    (workdir / RESULT_NAME).write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(table)
    metrics = {}
    for (c, p), found in cells.items():
        metrics[f"ablation.{c}.{p}.colour_accuracy"] = found["colour"]["accuracy"]
        metrics[f"ablation.{c}.{p}.clip_score_domain"] = found["clip_score"]["clip_score_domain"]
    for name, d in claims.items():
        metrics[f"ablation.{name}"] = d["difference"]
    return StepResult(
        files={"result": RESULT_NAME, "table": TABLE_NAME},
        values={name: d for name, d in claims.items()},
        metrics=metrics,
        artifacts=[RESULT_NAME, TABLE_NAME],
    )


def _table(cells: dict[tuple[str, str], dict[str, Any]], claims: dict[str, dict]) -> str:
    def fmt(found: dict[str, Any]) -> str:
        colour, score = found["colour"], found["clip_score"]
        return (
            f"colour {colour['accuracy']:.3f} [{colour['accuracy_low']:.3f}, "
            f"{colour['accuracy_high']:.3f}] (chance {colour['chance']:.3f}, "
            f"{len(colour['trials'])} trials); clip_score_domain {score['clip_score_domain']:.3f} "
            f"[{score['clip_score_domain_low']:.3f}, {score['clip_score_domain_high']:.3f}]"
        )

    lines = [
        "| trained on \\ prompted with | short prompt | expanded prompt |",
        "|---|---|---|",
    ]
    for c in CAPTIONS:
        lines.append(
            f"| {c} captions | {fmt(cells[(c, 'short')])} | {fmt(cells[(c, 'expanded')])} |"
        )
    lines += ["", "| difference in colour accuracy | value | interval |", "|---|---|---|"]
    for name, d in claims.items():
        lines.append(f"| {name} | {d['difference']:+.3f} | [{d['low']:+.3f}, {d['high']:+.3f}] |")
    return "\n".join(lines) + "\n"


def _parquet(uri: str) -> list[dict]:
    import io

    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(storage.read_bytes(uri))).to_pylist()


STEP = StepSpec("recaption_ablation", run, plan=plan, part=cell)
