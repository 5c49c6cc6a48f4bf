"""Collecting finished runs into tables: one cell per task × method, mean ± std and its interval over seeds, and
with a reference method each method's seed-paired differences from it.

:func:`collect` is what ``flexlora-results`` runs; the work is split by job:

* :mod:`~flexlora_pl.experiments.collection`: reading the run folders under ``<sweep>/<task>/<method>/seed<k>``
  (what ``flexlora-sweep`` writes) into :class:`RunResult` records;
* :mod:`~flexlora_pl.experiments.selection`: the selection rule that scores each task (:data:`SELECTION_RULES`:
  ``commonsense``, ``vtab``, ``best validation``) and the status of a run that gives no value;
* :mod:`~flexlora_pl.experiments.tables`: cells, derived columns, notes, the paper's cells, the difference
  tables, Markdown and CSV;
* :mod:`~flexlora_pl.experiments.statistics`: the summaries (mean, std, t interval) and paired differences;
* :mod:`~flexlora_pl.experiments.costs`: the cost and allocation tables;
* :mod:`~flexlora_pl.experiments.search_table`: a tuned sweep's search (selected values, trials, ranges, edge
  warnings, search cost).

A run that did not finish, failed, or lacks the metric its task's rule reads is counted in its cell, never
dropped; runs of one task whose metrics differ (other metric names) are an error naming them. Every name this
module had before the split is still importable from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from flexlora_pl.experiments.collection import (
    FAILED,
    MISSING,
    NO_METRIC,
    NO_TEST,
    OK,
    OTHER_MONITOR,
    STATUSES,
    UNFINISHED,
    RunResult,
    add_expected,
    load_runs,
)
from flexlora_pl.experiments.costs import allocation_table, cost_table
from flexlora_pl.experiments.paper import PAPER_TABLES
from flexlora_pl.experiments.search_table import search_tables
from flexlora_pl.experiments.selection import (
    COMMONSENSE_CLASSES,
    SCORE_MODE,
    SCORE_MONITOR,
    SELECTION_RULES,
    MixedMetricsError,
    SelectionRule,
    score_runs,
    vtab_name,
)
from flexlora_pl.experiments.sweep_file import Sweep
from flexlora_pl.experiments.tables import (
    Cell,
    DifferenceCell,
    Table,
    add_paper,
    paper_markdown,
    results_tables,
    write_csv,
)

__all__ = ["COMMONSENSE_CLASSES", "FAILED", "MISSING", "NO_METRIC", "NO_TEST", "OK", "OTHER_MONITOR", "SCORE_MODE",
           "SCORE_MONITOR", "SELECTION_RULES", "STATUSES", "UNFINISHED", "Cell", "DifferenceCell", "MixedMetricsError",
           "RunResult", "SelectionRule", "Table", "add_expected", "add_paper", "allocation_table", "collect",
           "cost_table", "load_runs", "paper_markdown", "results_tables", "score_runs", "vtab_name", "write_csv"]


def collect(root: str | Path, paper: str | None = None, scale: float = 100.0, digits: int = 1,
            sweep: Sweep | None = None, reference: str | None = None, confidence: float = 0.95,
            contrasts: Sequence[tuple[str, str]] = ()) -> list[Table]:
    """Load the runs under ``root`` and build the results tables (each sweep's followed by its differences
    against ``reference``, if given), the search tables of tuned sweeps, the cost table and the allocation table.

    Args:
        root: the folder the sweep wrote to (``runs`` or ``runs/<sweep>``).
        sweep: the sweep file the runs came from: its runs without a folder are shown as missing (without
            it, a cell expects the seeds seen anywhere in its sweep, and tasks or methods with no folder at
            all cannot be known).
        paper: ``table1``, ``table2`` or ``table3``: put the paper's cells beside the measured rows.
        scale: multiply scores by this (100: percentages as the paper prints them).
        digits: decimals shown.
        reference: the method every other method is compared with, seed by seed (``None``: no difference
            tables); a method no run has is refused, naming the methods there are.
        confidence: the level of every interval (0.95: 95 %).
        contrasts: ``(method, base)`` pairs for one more table per sweep of the seed-paired differences
            method − base (an attribution table).
    """
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"no run folders (metrics.json or seed<k>/) under {root}")
    measured = runs
    if sweep is not None:
        runs = add_expected(runs, sweep, root)
    tables = results_tables(runs, scale, digits, reference, confidence, contrasts)
    if paper is not None:
        if paper not in PAPER_TABLES:
            raise ValueError(f"--paper {paper!r}: the shipped paper tables are {', '.join(PAPER_TABLES)}")
        for table in tables:
            if table.reference is None:  # the paper prints scores, not differences
                add_paper(table, PAPER_TABLES[paper], digits)
    allocation = allocation_table(measured)
    return [*tables, *search_tables(root, scale, digits), cost_table(measured),
            *([allocation] if allocation is not None else [])]
