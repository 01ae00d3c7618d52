"""Calibration: this machine's practical fp32 and bf16 matmul peaks, for utilisation figures."""

from __future__ import annotations

from components.bench import BenchRecord, benchmark
from components.core.config import TesseraConfig
from components.core.hardware import median_time, torch_matmul_gflops


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
