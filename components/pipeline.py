"""The pipeline's task bodies, shared by the Airflow DAG, the CLI and (later) KFP components.

Each function takes the run's params (profile, overrides, source) and upstream outputs (URIs
and small dicts), runs one step through :func:`components.runner.run_step`, and returns that
step's outputs. Nothing here imports Airflow.
"""

from __future__ import annotations

import json
import re
from typing import Any

from components import runner, storage
from components.config import TesseraConfig, load_config
from components.runner import RunContext

PIPELINE = "tessera_pipeline"


def sanitize_run_id(run_id: str) -> str:
    """Airflow run ids (``manual__2026-01-01T00:00:00+00:00``) made safe for paths and S3 keys."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", run_id).strip("-")


def resolve(params: dict[str, Any], run: dict[str, Any]) -> tuple[TesseraConfig, RunContext]:
    cfg = load_config(params.get("profile", "demo"), params.get("overrides") or [])
    ctx = RunContext(run["run_id"], PIPELINE, run.get("parent_run_id"), run.get("track", True))
    return cfg, ctx


def start(params: dict[str, Any], airflow_run_id: str) -> dict[str, Any]:
    """Open the pipeline's parent MLflow run (once per run id) and return the run handle."""
    from components import tracking

    cfg = load_config(params.get("profile", "demo"), params.get("overrides") or [])
    run_id = sanitize_run_id(airflow_run_id)
    track = bool(params.get("track", True))
    parent = tracking.pipeline_run(cfg, PIPELINE, run_id) if track else None
    return {"run_id": run_id, "parent_run_id": parent, "track": track}


def corpus(params: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """The raw videos to ingest: ``params.source`` if given, else the rendered demo corpus."""
    if params.get("source"):
        return {"clips": params["source"], "captions": params.get("captions") or None}
    from components import demo_data

    cfg, ctx = resolve(params, run)
    return runner.run_step("demo_data", demo_data.generate, cfg, ctx)


def ingest(params: dict[str, Any], run: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    from components import ingest as step

    cfg, ctx = resolve(params, run)
    return runner.run_step(
        "ingest", step.run, cfg, ctx, src=raw["clips"], captions=raw.get("captions")
    )


def validate(
    params: dict[str, Any], run: dict[str, Any], ingested: dict[str, Any]
) -> dict[str, Any]:
    from components import validate as step

    cfg, ctx = resolve(params, run)
    return runner.run_step(
        "validate",
        step.run,
        cfg,
        ctx,
        manifest=ingested["manifest"],
        quarantine=ingested["quarantine"],
    )


def version(
    params: dict[str, Any], run: dict[str, Any], validated: dict[str, Any], raw: dict[str, Any]
) -> dict[str, Any]:
    from components import version as step

    cfg, ctx = resolve(params, run)
    return runner.run_step(
        "version", step.run, cfg, ctx, manifest=validated["manifest"], captions=raw.get("captions")
    )


def train_vae(
    params: dict[str, Any], run: dict[str, Any], validated: dict[str, Any]
) -> dict[str, Any]:
    from components import train_vae as step

    cfg, ctx = resolve(params, run)
    return runner.run_step(
        "train_vae",
        step.run,
        cfg,
        ctx,
        manifest=validated["manifest"],
        checkpoint_dir=runner.checkpoint_dir(ctx, "train_vae"),
    )


def plan_encode(
    params: dict[str, Any], run: dict[str, Any], validated: dict[str, Any]
) -> list[dict]:
    """The shards the encode step maps over (clip ids only: XCom-sized)."""
    from components import encode

    cfg, _ = resolve(params, run)
    return encode.plan_shards(cfg, validated["manifest"])


def encode_shard(
    params: dict[str, Any],
    run: dict[str, Any],
    validated: dict[str, Any],
    vae: dict[str, Any],
    shard: dict[str, Any],
) -> dict[str, Any]:
    from components import encode

    cfg, ctx = resolve(params, run)
    return runner.run_step(
        encode.shard_step(shard),
        encode.encode_shard,
        cfg,
        ctx,
        manifest=validated["manifest"],
        vae=vae["vae"],
        shard=shard,
    )


def merge_latents(
    params: dict[str, Any], run: dict[str, Any], shards: list[dict]
) -> dict[str, Any]:
    from components import encode

    cfg, ctx = resolve(params, run)
    return runner.run_step("encode", encode.merge, cfg, ctx, shards=list(shards))


def train_dit(
    params: dict[str, Any], run: dict[str, Any], latents: dict[str, Any], vae: dict[str, Any]
) -> dict[str, Any]:
    from components import train_dit as step

    cfg, ctx = resolve(params, run)
    return runner.run_step(
        "train_dit",
        step.run,
        cfg,
        ctx,
        latents=latents["latents"],
        vae=vae["vae"],
        checkpoint_dir=runner.checkpoint_dir(ctx, "train_dit"),
    )


SAMPLE_PROMPTS = (
    "a red circle bouncing on a blue background",
    "a yellow square sliding left over a green gradient",
)
SAMPLE_ASPECTS = ("16:9", "9:16", "1:1", "image")


def samples(params: dict[str, Any], run: dict[str, Any], dit: dict[str, Any]) -> dict[str, Any]:
    """Sample videos at 16:9, 9:16 and 1:1 plus one still image from the trained model."""
    from components import generate

    cfg, ctx = resolve(params, run)
    return runner.run_step(
        "samples",
        generate.generate,
        cfg,
        ctx,
        model=dit["model"],
        prompts=list(SAMPLE_PROMPTS),
        aspects=list(SAMPLE_ASPECTS),
        frames=cfg.generate.sample_frames,
    )


def prompt_eval(
    params: dict[str, Any], run: dict[str, Any], raw: dict[str, Any], dit: dict[str, Any]
) -> dict[str, Any]:
    """Colour-following check of the trained model; it needs the demo corpus's factor sidecar,
    so a run on ``params.source`` (user data) reports why it has nothing to check."""
    if not raw.get("factors"):
        return {
            "skipped": "the corpus has no factor sidecar (params.source is user data); "
            "the colour check runs on the rendered demo corpus"
        }
    from components import prompt_eval as step

    cfg, ctx = resolve(params, run)
    return runner.run_step(
        "prompt_eval",
        step.run,
        cfg,
        ctx,
        model=dit["model"],
        clips=raw["clips"],
        captions=raw["captions"],
        factors=raw["factors"],
    )


def finish(params: dict[str, Any], run: dict[str, Any], **steps: dict[str, Any]) -> dict[str, Any]:
    """Close the parent run and write ``{store}/latest/pipeline.json``, a summary of every step."""
    cfg, ctx = resolve(params, run)
    summary = {"run_id": ctx.run_id, "profile": cfg.profile, **steps}
    if ctx.track and ctx.parent_run_id:
        from components import tracking

        tracking.finish_pipeline_run(ctx.parent_run_id)
        summary["mlflow_parent_run_id"] = ctx.parent_run_id
    text = json.dumps(summary, indent=2, sort_keys=True, default=str)
    storage.write_text(storage.join(cfg.store_uri(), "runs", ctx.run_id, "summary.json"), text)
    storage.write_text(storage.join(cfg.store_uri(), "latest", "pipeline.json"), text)
    return summary
