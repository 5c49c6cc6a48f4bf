"""Experiments: sweep files (:mod:`.sweep_file`), the sweep runner (:mod:`.sweep_runner`), results tables
(:mod:`.results`: run folders read by :mod:`.collection`, scored by :mod:`.selection`, laid out by
:mod:`.tables`, costs and allocation events by :mod:`.costs`, intervals and seed-paired differences by
:mod:`.statistics`) and the paper's published cells (:mod:`.paper`).
Commands: ``flexlora-sweep`` and ``flexlora-results``; see docs/experiments.md. ``grid`` and ``sweep`` are the
sweep file's and runner's former module names, kept as aliases."""

from flexlora_pl.experiments.paper import PAPER_TABLES, check_table
from flexlora_pl.experiments.results import MixedMetricsError, collect
from flexlora_pl.experiments.statistics import PairedDifference, Summary, paired_difference, summarize
from flexlora_pl.experiments.sweep_file import Run, Sweep, SweepError, load_sweep, parse_sweep

__all__ = ["PAPER_TABLES", "MixedMetricsError", "PairedDifference", "Run", "Summary", "Sweep", "SweepError",
           "check_table", "collect", "load_sweep", "paired_difference", "parse_sweep", "summarize"]
