"""The evaluate step's wall time on a profile's corpus and settings (``make bench``: demo).

The corpus is rendered and ingested as the pipeline does; the models have the profile's sizes and
random weights (training is not what this measures): the VAE, the DiT and the in-domain
evaluator. The step runs untracked, once (it is minutes on the demo profile).

Peer: sampling alone, i.e. the seconds of that same run spent in the generator on exactly the
clips the step needs (held-out captions, the prompt set at every aspect, colour-following
variants). The ratio ``sampling / whole step`` is the share of the step that is sampling; the
rest is decoding held-out clips, features, bootstraps, the VAE round trip, the report.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from components.bench import BenchRecord, benchmark
from components.core.config import TesseraConfig, load_config

PEER = "sampling the same clips (generator only)"


def build_random_models(cfg: TesseraConfig, root: Path, text_dim: int) -> tuple[Path, Path]:
    """A model directory (vae/ + dit/) and an evaluator of ``cfg``'s sizes, random weights."""
    import torch

    from components.steps.train_dit.worker import model_config
    from components.steps.train_evaluator.worker import model_config as evaluator_config
    from components.steps.train_vae.worker import build_model
    from model.diffusion import FlowConfig
    from model.dit import DiT
    from model.evaluator import VideoTextModel
    from model.generate import FLOW_CONFIG_NAME

    torch.manual_seed(cfg.seed)
    vae = build_model(cfg.train_vae)
    vae.save_pretrained(root / "model" / "vae")
    dit = DiT(model_config(cfg.train_dit, cfg.train_vae.latent_channels, text_dim))
    dit.save_pretrained(root / "model" / "dit")
    FlowConfig().to_json(root / "model" / "dit" / FLOW_CONFIG_NAME)
    evaluator = VideoTextModel(evaluator_config(cfg, text_dim))
    evaluator.save_pretrained(root / "evaluator")
    return root / "model", root / "evaluator"


def evaluate_step(
    cfg: TesseraConfig, profile: str, overrides: list[str] | None = None
) -> list[BenchRecord]:
    from components.core import artifacts
    from components.steps import demo_data, evaluate, ingest

    run_cfg = load_config(profile, overrides or [])
    with tempfile.TemporaryDirectory(prefix="tessera-bench-evaluate-") as tmp:
        root = Path(tmp)
        (root / "raw").mkdir()
        (root / "ingest").mkdir()
        (root / "work").mkdir()
        demo_data.run(run_cfg, root / "raw")
        ingest.run(
            run_cfg,
            root / "ingest",
            str(root / "raw" / "clips"),
            captions=str(root / "raw" / "captions.parquet"),
            previous="",
        )
        text_dim = artifacts.load_text_encoder(run_cfg).dim
        model, evaluator = build_random_models(run_cfg, root, text_dim)
        started = time.perf_counter()
        evaluate.run(
            run_cfg,
            root / "work",
            manifest=str(root / "ingest" / "manifest.parquet"),
            model=str(model),
            evaluator=str(evaluator),
            clips=str(root / "raw" / "clips"),
            captions=str(root / "raw" / "captions.parquet"),
            factors=str(root / "raw" / "factors.parquet"),
        )
        seconds = time.perf_counter() - started
        summary = json.loads((root / "work" / evaluate.RESULT_JSON).read_text())
    metrics = summary["metrics"]
    colour = summary.get("colour_following") or {}
    sampling = metrics["generate_seconds"] + float(colour.get("generate_seconds", 0.0))
    clips = len(summary["prompts"]) + int(metrics.get("fvd_domain_n_fake", 0))
    clips += len(colour.get("trials", []))
    return [
        BenchRecord(
            name=f"evaluate.step.{profile}",
            value=seconds,
            unit="s",
            peer=PEER,
            peer_value=sampling,
            higher_is_better=False,
            extra={
                "profile": profile,
                "clips_sampled": clips,
                "sampling_share": sampling / seconds,
                "metrics": sorted(k for k in metrics if not k.endswith(("_low", "_high"))),
            },
        )
    ]


@benchmark("evaluate.step")
def evaluate_demo(cfg: TesseraConfig) -> list[BenchRecord]:
    return evaluate_step(cfg, "demo")
