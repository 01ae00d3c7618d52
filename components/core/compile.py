"""``torch.compile`` for the trainers: on where it works, off by a switch, never a silent fallback.

``train.compile`` (:class:`~components.core.config.TrainConfig`) is ``auto`` (compile when the
device has a compiler toolchain: a C++ compiler for inductor's CPU backend, Triton on CUDA), ``on``
(the same, but a missing toolchain is logged as a warning) or ``off`` (eager).

:class:`CompiledFn` wraps one function: the first call that dynamo or inductor cannot compile
logs the reason and the function runs eagerly from then on (an error of the code itself reappears
in the eager call and propagates). Compilation is ``dynamic=True``: the packed token count and
clip sizes are symbolic, so a run compiles each region once (plus a few specialisations, counted
by :func:`compile_stats`) instead of once per pack shape.

Compiled kernels are cached on disk across runs and retries: :func:`cache_env` points inductor's
FX-graph and AOTAutograd caches at ``$TESSERA_HOME/cache/inductor`` (a warm cache turns the first
step's tens of seconds of compilation into a few seconds of loading).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

COMPILE_MODES = ("auto", "on", "off")


def toolchain_missing(device: torch.device) -> str | None:
    """Why inductor cannot generate kernels for ``device`` here, or None when it can."""
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "inductor's CUDA backend needs Triton (pip install triton)"
        return None
    if device.type == "cpu":
        cxx = os.environ.get("CXX") or "g++"
        if shutil.which(cxx) or shutil.which("c++") or shutil.which("clang++"):
            return None
        return f"inductor's CPU backend needs a C++ compiler ({cxx} not found; apt install g++)"
    return f"torch.compile is not set up for device type {device.type!r}"


def should_compile(mode: str, device: torch.device | str) -> tuple[bool, str]:
    """``(compile?, why)`` for ``train.compile = mode`` on ``device``; ``why`` is logged."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"train.compile must be one of {COMPILE_MODES}, got {mode!r}")
    if mode == "off":
        return False, "train.compile=off"
    missing = toolchain_missing(torch.device(device))
    if missing:
        if mode == "on":
            log.warning("train.compile=on but %s: training runs eagerly", missing)
        return False, missing
    return True, f"train.compile={mode}: torch.compile (inductor, dynamic shapes)"


class CompiledFn:
    """``torch.compile(fn, dynamic=True)`` that falls back to ``fn`` with a logged reason.

    Attributes:
        name: what is compiled (in log lines and :attr:`fallback`).
        fallback: the reason it runs eagerly, or None while compiled code runs.
        first_call_s: wall seconds of the first (compiling) call.
    """

    def __init__(self, fn: Callable[..., Any], name: str, **options: Any):
        self.fn, self.name = fn, name
        self.compiled = torch.compile(fn, dynamic=True, **options)
        self.fallback: str | None = None
        self.first_call_s: float | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.fallback is not None:
            return self.fn(*args, **kwargs)
        start = time.perf_counter()
        try:
            out = self.compiled(*args, **kwargs)
        except torch._dynamo.exc.TorchDynamoException as exc:
            first_line = (
                str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            )
            self.fallback = f"{type(exc).__name__}: {first_line}"[:500]
            log.warning(
                "torch.compile of %s failed, running it eagerly: %s", self.name, self.fallback
            )
            return self.fn(*args, **kwargs)
        if self.first_call_s is None:
            self.first_call_s = time.perf_counter() - start
        return out


def compile_stats() -> dict[str, int]:
    """Dynamo's counts in this process: graphs compiled, frames recompiled, graph breaks."""
    from torch._dynamo.utils import counters

    return {
        "graphs": int(counters["stats"].get("unique_graphs", 0)),
        "recompiles": sum(counters["recompiles"].values()),
        "graph_breaks": sum(counters["graph_break"].values()),
    }


def cache_env(home: Path | str) -> dict[str, str]:
    """Environment that keeps inductor's compiled artifacts under ``home/cache/inductor``.

    FX-graph and AOTAutograd caches are on by default in torch 2.13; only their location moves
    (from ``/tmp``, which a fresh container or a Kubernetes pod loses, to the Tessera home).
    """
    return {
        "TORCHINDUCTOR_CACHE_DIR": str(Path(home) / "cache" / "inductor"),
        "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
        "TORCHINDUCTOR_AUTOGRAD_CACHE": "1",
    }


def compile_regions(
    model: torch.nn.Module, mode: str, device: torch.device | str
) -> dict[str, Any]:
    """Compile the ``compile_regions`` methods of ``model``'s submodules (e.g. a DiT block's
    code between its attention calls) when :func:`should_compile` says so.

    Every region becomes a :class:`CompiledFn` stored on its module instance (the weights and
    their state-dict keys are untouched). Returns ``{"compiled": bool, "reason": str,
    "regions": [CompiledFn, ...]}`` for the run's log and summary (:func:`region_report`).
    """
    enabled, reason = should_compile(mode, device)
    regions: list[CompiledFn] = []
    if enabled:
        for path, module in model.named_modules():
            for name in getattr(module, "compile_regions", ()):
                fn = CompiledFn(getattr(module, name), f"{path or type(module).__name__}.{name}")
                setattr(module, name, fn)
                regions.append(fn)
    return {"compiled": enabled, "reason": reason, "regions": regions}


def region_report(info: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready summary of :func:`compile_regions`: decision, compile seconds, fallbacks and
    dynamo's graph / recompile counts."""
    regions = info["regions"]
    report: dict[str, Any] = {"compiled": info["compiled"], "reason": info["reason"]}
    if regions:
        report.update(
            regions=len(regions),
            first_call_s=round(sum(r.first_call_s or 0.0 for r in regions), 2),
            fallbacks={r.name: r.fallback for r in regions if r.fallback},
            **compile_stats(),
        )
    return report
