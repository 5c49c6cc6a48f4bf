"""Reproducible benchmarks for flexlora_pl (run from the repository root, e.g. ``python -m benchmarks.step_time``)."""
