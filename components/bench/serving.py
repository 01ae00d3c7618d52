"""Serving: latency (p50, p95) and requests/s of the scoring server vs the same pyfunc in-process.

Ours: ``tessera serve`` (:func:`components.core.serving.serve`: uvicorn + MLflow's scoring app +
the guard) on a tiny ``tessera-t2v`` registered in a throwaway ``TESSERA_HOME``, asked over HTTP
(JSON in, base64 video in JSON out) by ``c`` client threads. Peer: the very same model directory
loaded in this process (``mlflow.pyfunc.load_model`` with the server's model config) and called
with ``predict`` by ``c`` threads. Both sides generate the same small request (``frames`` 1,
``steps`` 2, PNG), so the ratio is the cost of the served path: HTTP, JSON parsing, the guard, the
scoring server's thread hop and the JSON answer. The model generates one request at a time per
process (its lock), so at ``c`` = 8 both sides queue: latency grows ~8x, requests/s stays.

The tiny model (vae-tiny + a tessera-tiny DiT over the bundled MiniLM, default init) is built
from the model registries here, not from ``tests/`` (which the product does not import), and
registered with the ``register`` step. Records: ``serving.latency_p50.c<c>``,
``serving.latency_p95.c<c>`` (seconds, lower is better) and ``serving.requests_per_s.c<c>``.
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from components.bench import BenchRecord, benchmark
from components.bench.dit import load_average
from components.core.config import TesseraConfig, load_config

PEER = "in-process pyfunc"
PROMPT = "a red ball bouncing on a blue background"
SERVE_OVERRIDES = (
    "generate.max_pixels=4096",
    "serve.max_frames=9",
    "serve.default_frames=5",
    "serve.default_steps=2",
    "serve.max_pixels=4096",
)


@dataclass(frozen=True)
class ServingBenchSizes:
    """``requests`` timed per side and concurrency level, after ``warmup`` untimed ones."""

    frames: int = 1
    steps: int = 2
    aspect: str = "1:1"
    format: str = "png"
    requests: int = 16
    concurrency: tuple[int, ...] = (1, 8)
    warmup: int = 2
    ready_timeout_s: float = 300.0


def save_tiny_servable_model(root: Path) -> Path:
    """vae-tiny + tessera-tiny DiT over MiniLM (384-dim) text, flow config: a model directory
    the register step takes (``vae/`` + ``dit/``)."""
    import torch

    from model.diffusion import FlowConfig
    from model.dit import DiT, dit_config
    from model.generate import FLOW_CONFIG_NAME
    from model.vae import VAE_SIZES, CausalVAE

    torch.manual_seed(0)
    vae_config = VAE_SIZES.config("vae-tiny")
    CausalVAE(vae_config).eval().save_pretrained(root / "vae")
    dit = DiT(dit_config("tessera-tiny", in_channels=vae_config.latent_channels, text_dim=384))
    dit.eval().save_pretrained(root / "dit")
    FlowConfig().to_json(root / "dit" / FLOW_CONFIG_NAME)
    return root


def register_tiny_model(home: Path, model: Path | None = None) -> str:
    """Register ``model`` (default: :func:`save_tiny_servable_model`'s) in the registry of
    ``home`` (TESSERA_HOME, SQLite MLflow); its ``models:/name/N``. Call with TESSERA_HOME set
    to ``home``."""
    from components.core.runner import RunContext, run_step
    from components.steps.register import STEP

    model = model or save_tiny_servable_model(home / "model")
    evaluation = home / "evaluation.json"
    evaluation.write_text(
        json.dumps(
            {
                "metrics": {
                    "fvd_domain": 100.0,
                    "fvd_domain_n_real": 8.0,
                    "fvd_domain_n_fake": 8.0,
                },
                "extractors": {"domain": "bench"},
            }
        )
    )
    cfg = load_config("tiny", ["generate.max_pixels=4096"])
    out = run_step(STEP, cfg, RunContext.new("bench"), model=str(model), evaluation=str(evaluation))
    return str(out["model_uri"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[round(q) - 1]


def _measure(call: Any, requests: int, concurrency: int) -> dict[str, Any]:
    """Latencies of ``requests`` calls from ``concurrency`` threads, and requests/s overall."""

    def timed(_: int) -> tuple[float, Any]:
        start = time.perf_counter()
        status = call()
        return time.perf_counter() - start, status

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(timed, range(requests)))
    wall = time.perf_counter() - start
    latencies = [t for t, _ in results]
    return {
        "latencies": latencies,
        "p50_s": statistics.median(latencies),
        "p95_s": _percentile(latencies, 95),
        "requests_per_s": requests / wall,
        "statuses": sorted({str(s) for _, s in results}),
    }


@benchmark("serving")
def serving_case(
    cfg: TesseraConfig, s: ServingBenchSizes = ServingBenchSizes()
) -> list[BenchRecord]:
    import pandas as pd
    import torch

    from components.core import serving, tracking

    params = {"frames": s.frames, "steps": s.steps, "aspect": s.aspect, "format": s.format}
    params["seed"] = cfg.seed
    body = json.dumps({"dataframe_records": [{"prompt": PROMPT}], "params": params}).encode()
    frame = pd.DataFrame({"prompt": [PROMPT]})
    levels = sorted(set(s.concurrency))
    scfg = load_config("tiny", [*SERVE_OVERRIDES, f"serve.max_concurrency={max(levels)}"])
    results: dict[str, dict[int, dict[str, Any]]] = {"served": {}, "in_process": {}}
    with (
        tempfile.TemporaryDirectory(prefix="tessera-bench-serving-") as tmp,
        mock.patch.dict(os.environ, {"TESSERA_HOME": tmp}),
    ):
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # the throwaway registry; restored on exit
        home = Path(tmp)
        started = time.perf_counter()
        uri = register_tiny_model(home)
        register_s = time.perf_counter() - started
        handle = serving.serve(scfg, uri, port=_free_port(), foreground=False)
        try:
            started = time.perf_counter()
            handle.wait_ready(s.ready_timeout_s)
            ready_s = time.perf_counter() - started
            name, version = uri.removeprefix("models:/").split("/")
            settings = serving.serving_settings(scfg, name, version, uri)
            local = serving.download_version(name, version, home)
            model = serving.load_served_model(local, settings["model_config"])

            def served() -> int:
                request = urllib.request.Request(
                    f"{handle.url}/invocations",
                    data=body,
                    headers={"Content-Type": "application/json"},
                    method="POST",
                )
                try:
                    with urllib.request.urlopen(request, timeout=600) as resp:
                        json.loads(resp.read())
                        return resp.status
                except urllib.error.HTTPError as e:
                    return e.code

            def in_process() -> int:
                model.predict(frame, params=params)
                return 200

            load_before = load_average()
            for _ in range(s.warmup):
                served(), in_process()
            for c in levels:  # the two sides in turn at each level
                results["served"][c] = _measure(served, s.requests, c)
                results["in_process"][c] = _measure(in_process, s.requests, c)
            load_after = load_average()
        finally:
            handle.stop()
    tracking.setup()  # the caller's registry again
    for c in levels:
        if results["served"][c]["statuses"] != ["200"]:
            raise RuntimeError(
                f"serving bench: answers {results['served'][c]['statuses']} at concurrency {c}; "
                f"see the server log {handle.log_path}"
            )
    extra = {
        "sizes": asdict(s),
        "params": params,
        "register_s": round(register_s, 2),
        "server_ready_s": round(ready_s, 2),
        "load_average": [load_before, load_after],
        "torch_threads": torch.get_num_threads(),
        "workers": scfg.serve.workers,
        "max_concurrency": scfg.serve.max_concurrency,
        "timing": {
            side: {
                str(c): {k: v for k, v in r.items() if k != "latencies"} for c, r in by_c.items()
            }
            for side, by_c in results.items()
        },
        "overhead_ms_p50": {
            str(c): round(
                1000 * (results["served"][c]["p50_s"] - results["in_process"][c]["p50_s"]), 2
            )
            for c in levels
        },
        "weights": "default init (speed does not depend on them)",
    }
    records = []
    for c in levels:
        ours, peer = results["served"][c], results["in_process"][c]
        for key, label in (("p50_s", "latency_p50"), ("p95_s", "latency_p95")):
            records.append(
                BenchRecord(
                    f"serving.{label}.c{c}",
                    ours[key],
                    "s",
                    PEER,
                    peer[key],
                    higher_is_better=False,
                    extra=extra,
                )
            )
        records.append(
            BenchRecord(
                f"serving.requests_per_s.c{c}",
                ours["requests_per_s"],
                "req/s",
                PEER,
                peer["requests_per_s"],
                extra=extra,
            )
        )
    return records
