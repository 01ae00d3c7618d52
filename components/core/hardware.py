"""This machine's measured matmul speed: the peaks behind MFU, bf16 choice and the benchmarks.

Nothing here is a datasheet number: every figure is an n x n torch product timed on this
machine, in this process, with its current threads, so utilisation compares like with like.
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from typing import Any

from components.core.config import BenchConfig

# precision auto picks bf16 on a CPU whose bf16 matmuls are at least this much faster than fp32
# ones: CPUs with AVX512-BF16 or AMX run them 3-4x faster; elsewhere bf16 is emulated and slower.
CPU_BF16_MIN_SPEEDUP = 1.5


def median_time(fn: Callable[[], Any], warmup: int, repeats: int) -> tuple[float, list[float]]:
    """Median wall seconds of ``fn()`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


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


def peak_gflops(bench: BenchConfig, precision: str, device: Any = "cpu") -> float:
    """The practical matmul peak in GFLOP/s in ``precision`` (``"bf16"`` | ``"fp32"``): an n×n
    product, n = ``bench.matmul_size`` on CPU and 4096 on a GPU. The denominator of MFU."""
    import torch

    device = torch.device(device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 4096 if device.type == "cuda" else bench.matmul_size
    return torch_matmul_gflops(n, bench.warmup, bench.repeats, dtype, device)


@functools.cache
def cpu_bf16_speedup(n: int = 512, repeats: int = 8) -> float:
    """Measured bf16 / fp32 matmul throughput of this CPU (n×n products, current threads)."""
    import torch

    bf16 = torch_matmul_gflops(n, 1, repeats, torch.bfloat16)
    return bf16 / torch_matmul_gflops(n, 1, repeats)
