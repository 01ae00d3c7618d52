"""Benchmark cases, one module per subject; each registers with ``components.bench.benchmark``."""
