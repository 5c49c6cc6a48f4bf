"""Experiments: sweep files (:mod:`.grid`), the sweep runner (:mod:`.sweep`), results and cost tables
(:mod:`.results`) and the paper's published cells (:mod:`.paper`). Commands: ``flexlora-sweep`` and
``flexlora-results``; see docs/experiments.md."""

from flexlora_pl.experiments.grid import Run, Sweep, SweepError, load_sweep, parse_sweep
from flexlora_pl.experiments.paper import PAPER_TABLES, check_table
from flexlora_pl.experiments.results import MixedMetricsError, collect

__all__ = ["PAPER_TABLES", "MixedMetricsError", "Run", "Sweep", "SweepError", "check_table", "collect", "load_sweep",
           "parse_sweep"]
