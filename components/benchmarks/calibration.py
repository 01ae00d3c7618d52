"""Calibration: this machine's practical fp32 matmul peak, for utilisation figures elsewhere."""

from __future__ import annotations

from components.bench import BenchRecord, benchmark, median_time
from components.config import TesseraConfig


def matmul_gflops(cfg: TesseraConfig) -> tuple[float, float]:
    """(torch, numpy) fp32 GFLOP/s for an n×n @ n×n product, n = ``bench.matmul_size``."""
    import torch

    n = cfg.bench.matmul_size
    flops = 2.0 * n**3
    a, b = torch.randn(n, n), torch.randn(n, n)
    t_torch, _ = median_time(lambda: a @ b, cfg.bench.warmup, cfg.bench.repeats)
    an, bn = a.numpy(), b.numpy()
    t_numpy, _ = median_time(lambda: an @ bn, cfg.bench.warmup, cfg.bench.repeats)
    return flops / t_torch / 1e9, flops / t_numpy / 1e9


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
