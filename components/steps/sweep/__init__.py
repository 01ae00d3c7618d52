"""Training runs across compute budgets, a scaling law fitted to them, the best run selected:
the ``sweep`` step (``tessera sweep``; in the DAG it replaces a single ``train_dit`` run).

1. **Plan** (:mod:`components.steps.sweep.plan`, ``tessera sweep --dry-run`` prints it): one row
   per (framing, captions, size, budget) of ``cfg.sweep``, its steps and tokens per step from the
   analytic FLOP count, its expected wall time from this machine's calibrated matmul peak. The
   table goes to the sweep's MLflow run before anything trains.
2. **Points** (``part``, one Airflow task each in the ``accelerator`` pool): every row is a
   ``train_dit`` run (DeepSpeed, :func:`components.steps.train_dit.run`) with the row's size,
   variant, token budget and steps (its learning-rate schedule ends at its budget), a nested
   MLflow run under the sweep's run tagged with budget, size, variant, planned and measured
   FLOPs (:func:`model.flops.train_flops` summed over the packs every step actually ran). A point
   commits under ``sweep-parts/{row key}`` and checkpoints under its own directory, so a failed
   point is retried alone and resumes, and a re-triggered sweep skips finished points.
3. **Fit** (``run``, over the points): per variant (a framing and a caption set: variants are
   never mixed in one fit), the compute frontier (each budget's lowest validation loss) against
   measured compute, ``L(C) = a * C^-b + L_inf`` (:mod:`evaluation.scaling`: robust variable
   projection, bootstrap intervals); with >= 4 budgets the largest is held out and predicted
   from the rest; with several sizes per budget, the compute-optimal size per budget and
   ``N_opt ~ C^alpha``. The validation loss is deterministic (fixed held-out clips, noise seeds
   and timestep grid: :func:`components.steps.train_dit.worker.validation_loss`).
4. **Select**: the point with the lowest validation loss (ties: the larger budget) is the
   step's model (``model``/``dit``/``vae``, copied from its point), what evaluation and
   registration take.

Outputs: ``sweep.json`` (plan, points, fits), ``scaling-{variant}.png``, the model directory.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from components.core import artifacts, faults, tracking
from components.core.config import TesseraConfig
from components.core.runner import RunContext, StepResult, StepSpec
from components.steps import train_dit
from components.steps.sweep.plan import PlanRow, plan_sweep, point_config, table, workload

POINT_STEP = "sweep_point"  # the tessera.step tag of the points' nested MLflow runs
RESULT_NAME = "sweep.json"
PLAN_NAME = "sweep_plan.md"


# --------------------------------------------------------------------------- plan


def plan_rows(cfg: TesseraConfig, latents: str) -> list[PlanRow]:
    """The sweep's rows for these latents on this machine (no side effects)."""
    from components.core.hardware import peak_gflops
    from components.core.trainer import precision

    peak = peak_gflops(cfg.bench, precision(cfg.train_dit.train))
    return plan_sweep(cfg, workload(cfg, latents), peak * cfg.train_dit.train.num_processes)


def plan(
    cfg: TesseraConfig, latents: str, vae: str | None = None, ctx: RunContext | None = None
) -> list[dict[str, Any]]:
    """The points to train (``vae`` is the points' input, not read here); the table is logged to
    the sweep's MLflow run (created here when tracking) before any point trains."""
    rows = plan_rows(cfg, latents)
    if ctx is not None and ctx.track:
        import mlflow

        run_id = tracking.ensure_step_run(
            cfg, "sweep", pipeline=ctx.pipeline, run_id=ctx.run_id, parent_run_id=ctx.parent_run_id
        )
        client = mlflow.MlflowClient()
        client.log_text(run_id, table(rows), PLAN_NAME)
        import pandas as pd

        client.log_table(
            run_id, data=pd.DataFrame([r.to_dict() for r in rows]), artifact_file="sweep_plan.json"
        )
        client.log_param(run_id, "sweep.points", len(rows))
    return [r.to_dict() for r in rows]


# --------------------------------------------------------------------------- one point


def part(
    cfg: TesseraConfig,
    workdir: Path,
    part: dict[str, Any],
    latents: str,
    checkpoint_dir: Path,
    ctx: RunContext,
    vae: str | None = None,
) -> StepResult:
    """Train one plan row with ``train_dit`` in its own nested MLflow run; a retry resumes from
    the row's checkpoints (a finished one only exports)."""
    point = point_config(cfg, part)

    def train() -> StepResult:
        done = train_dit.run(point, workdir, latents, checkpoint_dir, vae)
        faults.check(f"sweep.point.{part['key']}")  # after training: a retry must resume
        return done

    tags = {
        "tessera.sweep.key": part["key"],
        "tessera.sweep.budget": f"{part['budget']:.4g}",
        "tessera.sweep.size": part["size"],
        "tessera.sweep.variant": f"{part['framing']}/{part['captions']}",
        "tessera.sweep.planned_flops": f"{part['planned_flops']:.4g}",
    }
    point_run = None
    if ctx.track:
        import mlflow

        sweep_run = tracking.ensure_step_run(
            cfg, "sweep", pipeline=ctx.pipeline, run_id=ctx.run_id, parent_run_id=ctx.parent_run_id
        )
        with tracking.step_run(
            point,
            POINT_STEP,
            pipeline=ctx.pipeline,
            run_id=ctx.run_id,
            parent_run_id=sweep_run,
            tags=tags,
            part=part["key"],
        ) as active:
            point_run = active.info.run_id
            result = train()
            measured = result.values["train_flops"]
            mlflow.set_tag("tessera.sweep.measured_flops", f"{measured:.4g}")
            mlflow.log_metrics({**result.metrics, "sweep.measured_flops": measured})
            for name in result.artifacts:
                mlflow.log_artifact(str(Path(workdir) / name))
    else:
        result = train()
    values = {**part, **result.values, "point_run_id": point_run}
    metrics = {k: v for k, v in result.metrics.items() if math.isfinite(v)}
    return StepResult(files=result.files, values=values, metrics=metrics)


# --------------------------------------------------------------------------- fit and select


def run(cfg: TesseraConfig, workdir: Path, parts: list[dict[str, Any]]) -> StepResult:
    """Fit the law per variant over the trained points and select the best point's model."""
    from evaluation import scaling

    if not parts:
        raise ValueError("the sweep has no points: sweep.budgets / sweep.sizes planned nothing")
    workdir = Path(workdir)
    points = [_point(p) for p in parts]
    usable = [p for p in points if math.isfinite(p["val_loss"])]
    if not usable:
        raise ValueError(
            "no sweep point has a validation loss: give train_dit.val_clips >= 1 held-out clips"
        )
    fits: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    for variant in sorted({p["variant"] for p in usable}):
        mine = [p for p in usable if p["variant"] == variant]
        fits[variant] = fit = _fit_variant(cfg, mine)
        name = variant.replace("/", ".")
        for key in ("b", "a", "l_inf"):
            if key in fit.get("law", {}):
                metrics[f"sweep.{name}.{key}"] = fit["law"][key]
        if "holdout" in fit:
            metrics[f"sweep.{name}.holdout_error"] = fit["holdout"]["relative_error"]
        if "compute_optimal" in fit:
            metrics[f"sweep.{name}.alpha"] = fit["compute_optimal"]["alpha"]
        plot = workdir / f"scaling-{variant.replace('/', '-')}.png"
        scaling.plot_scaling(
            [{"compute": p["compute"], "loss": p["val_loss"], "size": p["size"]} for p in mine],
            fit=fit.get("_fit"),
            bootstrap=fit.get("_bootstrap"),
            holdout=fit.get("_holdout"),
            path=plot,
        )
        fit["plot"] = plot.name
    best = min(usable, key=lambda p: (p["val_loss"], -p["compute"]))
    with artifacts.model_dir(best["model"]) as src:
        for sub in (artifacts.DIT_DIR, artifacts.VAE_DIR):
            if (src / sub).is_dir():
                shutil.copytree(src / sub, workdir / sub)
    report = {
        "points": points,
        "fits": {v: {k: x for k, x in f.items() if not k.startswith("_")} for v, f in fits.items()},
        "best": best["key"],
    }
    (workdir / RESULT_NAME).write_text(json.dumps(report, indent=2, default=str) + "\n")
    metrics.update({"sweep.best_val_loss": best["val_loss"], "sweep.points": len(points)})
    files = {"dit": artifacts.DIT_DIR, "result": RESULT_NAME}
    if (workdir / artifacts.VAE_DIR).is_dir():
        files.update(vae=artifacts.VAE_DIR, model="")
    summary = {v: f["summary"] for v, f in report["fits"].items()}
    return StepResult(
        files=files,
        values={
            "best": best["key"],
            "best_val_loss": best["val_loss"],
            "best_size": best["size"],
            "best_budget": best["budget"],
            "points": len(points),
            "fits": summary,
        },
        metrics=metrics,
        artifacts=[RESULT_NAME, *(f["plot"] for f in fits.values())],
    )


def _point(out: dict[str, Any]) -> dict[str, Any]:
    val = out.get("val_loss")
    return {
        "key": out["key"],
        "size": out["size"],
        "params": out["params"],
        "budget": out["budget"],
        "variant": f"{out['framing']}/{out['captions']}",
        "steps": out["steps"],
        "planned_flops": out["planned_flops"],
        "compute": out["train_flops"],  # measured: what the steps ran
        "val_loss": float(val) if val is not None else float("nan"),
        "initial_val_loss": out.get("initial_val_loss"),
        "train_seconds": out.get("train_seconds"),
        "expected_s": out["expected_s"],
        "model": out["step_uri"],  # the point's directory: dit/ (+ vae/ when sampled)
        "point_run_id": out.get("point_run_id"),
    }


def _fit_variant(cfg: TesseraConfig, points: list[dict[str, Any]]) -> dict[str, Any]:
    """Frontier, law, bootstrap, held-out largest budget and compute-optimal sizes of one
    variant; what could not be fitted says why."""
    from evaluation import scaling

    scfg = cfg.sweep
    by_budget: dict[float, list[dict[str, Any]]] = {}
    for p in points:
        by_budget.setdefault(p["budget"], []).append(p)
    frontier = [min(group, key=lambda p: p["val_loss"]) for _, group in sorted(by_budget.items())]
    losses = [p["val_loss"] for p in frontier]
    out: dict[str, Any] = {
        "frontier": [
            {"key": p["key"], "compute": p["compute"], "loss": p["val_loss"]} for p in frontier
        ],
        "monotonic": all(b < a for a, b in zip(losses, losses[1:], strict=False)),
    }
    compute = [p["compute"] for p in frontier]
    notes = []
    if len(frontier) >= 3:
        boot = scaling.bootstrap_power_law(
            compute, losses, samples=scfg.bootstrap, confidence=scfg.confidence, seed=cfg.seed
        )
        out.update(law=boot.fit.to_dict(), bootstrap=boot.to_dict(), _fit=boot.fit, _bootstrap=boot)
    else:
        notes.append(f"law: {len(frontier)} budgets, the fit needs >= 3")
    if len(frontier) >= 4:
        held = scaling.holdout_largest(
            compute, losses, samples=scfg.bootstrap, confidence=scfg.confidence, seed=cfg.seed
        )
        out.update(holdout=held.to_dict(), _holdout=held)
    else:
        notes.append(f"holdout: {len(frontier)} budgets, holding out the largest needs >= 4")
    sized = [g for g in by_budget.values() if len({p["size"] for p in g}) >= 3]
    if len(sized) >= 2:
        optimal = scaling.compute_optimal(
            [(p["compute"], p["params"], p["val_loss"]) for g in sized for p in g]
        )
        out["compute_optimal"] = optimal.to_dict()
    else:
        notes.append("compute-optimal size: needs >= 2 budgets with >= 3 sizes each")
    out["summary"] = {
        "budgets": len(frontier),
        "monotonic": out["monotonic"],
        **({"b": out["law"]["b"]} if "law" in out else {}),
        **({"holdout_error": out["holdout"]["relative_error"]} if "holdout" in out else {}),
        **({"alpha": out["compute_optimal"]["alpha"]} if "compute_optimal" in out else {}),
    }
    out["notes"] = notes
    return out


def check(cfg: TesseraConfig) -> None:
    """Fail before anything trains on a size that does not exist."""
    from model.dit import DIT_SIZES

    for size in cfg.sweep.sizes or (cfg.train_dit.size,):
        DIT_SIZES[size]  # raises UnknownSizeError listing the sizes


STEP = StepSpec("sweep", run, checkpoints=True, check=check, plan=plan, part=part)
