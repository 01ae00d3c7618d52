"""Tessera: the pipeline steps (steps/), the plumbing they share (core/), orchestration, benchmarks and the CLI."""
