"""Benchmark harness behind ``make bench``: warm-up + median of N, one JSON record per case.

Cases live in ``components/bench/*.py`` and register with :func:`benchmark`. Each case
measures Tessera **and a named peer in the same run** and reports the ratio, so numbers from
different machines or days are never compared directly. Results go to
``$TESSERA_HOME/bench/results.json`` and a table on stdout.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from components.core.config import Environment, TesseraConfig


@dataclass
class BenchRecord:
    name: str
    value: float
    unit: str
    peer: str
    peer_value: float
    higher_is_better: bool = True
    extra: dict[str, Any] = field(default_factory=dict)
    machine: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float:
        """How many times better than the peer (>1 means Tessera wins)."""
        if not self.peer_value or not self.value:
            return float("nan")
        return (
            self.value / self.peer_value if self.higher_is_better else self.peer_value / self.value
        )

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratio": self.ratio}


BenchCase = Callable[[TesseraConfig], list[BenchRecord]]
BENCHMARKS: dict[str, BenchCase] = {}


def benchmark(name: str) -> Callable[[BenchCase], BenchCase]:
    def register(fn: BenchCase) -> BenchCase:
        if name in BENCHMARKS:
            raise ValueError(f"benchmark {name!r} is registered twice")
        BENCHMARKS[name] = fn
        return fn

    return register


def machine_info() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
    }


def load_cases() -> dict[str, BenchCase]:
    for mod in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{mod.name}")
    return BENCHMARKS


def run_benchmarks(
    cfg: TesseraConfig, only: list[str] | None = None, out: Path | None = None
) -> list[BenchRecord]:
    """Run the registered cases (or those whose name starts with one of ``only``)."""
    cases = load_cases()
    selected = [n for n in sorted(cases) if not only or any(n.startswith(o) for o in only)]
    if not selected:
        raise ValueError(f"no benchmark matches {only}; available: {sorted(cases)}")
    machine = machine_info()
    records: list[BenchRecord] = []
    for name in selected:
        for record in cases[name](cfg):
            record.machine = machine
            records.append(record)
    out = out or Environment.read().home / "bench" / "results.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps([r.to_json() for r in records], indent=2))
    return records


def print_table(records: list[BenchRecord], out: Path | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tessera bench")
    for col in ("case", "tessera", "peer", "peer value", "ratio"):
        table.add_column(col, justify="right" if col != "case" else "left")
    for r in records:
        table.add_row(
            r.name,
            f"{r.value:.4g} {r.unit}",
            r.peer,
            f"{r.peer_value:.4g} {r.unit}",
            f"{r.ratio:.2f}x",
        )
    console = Console(width=max(120, Console().width))
    console.print(table)
    if out:
        console.print(f"results: {out}")
