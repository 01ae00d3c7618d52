"""Calibration: this machine's practical fp32 and bf16 matmul peaks, for utilisation figures."""

from __future__ import annotations

from typing import Any

from components.bench import BenchRecord, benchmark, median_time
from components.config import TesseraConfig


def torch_matmul_gflops(
    n: int, warmup: int, repeats: int, dtype: Any = None, device: Any = "cpu"
) -> float:
    """Median GFLOP/s of an n×n @ n×n torch product in ``dtype`` (default fp32) on ``device``."""
    import torch

    device = torch.device(device)
    a, b = (torch.randn(n, n, dtype=dtype or torch.float32, device=device) for _ in range(2))

    def product() -> None:
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    seconds, _ = median_time(product, warmup, repeats)
    return 2.0 * n**3 / seconds / 1e9


def matmul_gflops(cfg: TesseraConfig) -> tuple[float, float]:
    """(torch, numpy) fp32 GFLOP/s for an n×n @ n×n product, n = ``bench.matmul_size``."""
    import numpy as np

    n, b = cfg.bench.matmul_size, cfg.bench
    ours = torch_matmul_gflops(n, b.warmup, b.repeats)
    an, bn = np.random.default_rng(0).standard_normal((2, n, n), dtype=np.float32)
    t_numpy, _ = median_time(lambda: an @ bn, b.warmup, b.repeats)
    return ours, 2.0 * n**3 / t_numpy / 1e9


@benchmark("calibration.matmul_fp32")
def calibration(cfg: TesseraConfig) -> list[BenchRecord]:
    ours, peer = matmul_gflops(cfg)
    return [
        BenchRecord(
            name="calibration.matmul_fp32",
            value=ours,
            unit="GFLOP/s",
            peer="numpy.matmul",
            peer_value=peer,
            extra={"n": cfg.bench.matmul_size},
        )
    ]


@benchmark("calibration.matmul_bf16")
def calibration_bf16(cfg: TesseraConfig) -> list[BenchRecord]:
    """The bf16 matmul peak (the denominator of bf16 utilisation) against fp32 on the same CPU."""
    import torch

    n, b = cfg.bench.matmul_size, cfg.bench
    fp32 = torch_matmul_gflops(n, b.warmup, b.repeats)
    bf16 = torch_matmul_gflops(n, b.warmup, b.repeats, torch.bfloat16)
    return [
        BenchRecord(
            name="calibration.matmul_bf16",
            value=bf16,
            unit="GFLOP/s",
            peer="torch.matmul fp32",
            peer_value=fp32,
            extra={"n": n},
        )
    ]
