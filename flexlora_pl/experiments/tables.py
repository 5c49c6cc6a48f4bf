"""Building and rendering the results tables: one :class:`Cell` per task × method (mean ± std over seeds, and
the runs that give no value counted by reason), derived columns (averages, VTAB group means), the notes under a
table, the paper's cells beside the measured rows, Markdown and CSV.

Rows and columns follow the paper where it fixes them (GLUE and VTAB column order; the baselines, then FlexLoRA,
then variants). A run that did not finish, failed, or lacks the metric its task's rule reads is counted in its
cell, never dropped.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexlora_pl.data.commonsense import COMMONSENSE_SETS
from flexlora_pl.data.vtab import VTAB_GROUPS, VTAB_TASKS
from flexlora_pl.experiments.collection import NO_METRIC, NO_TEST, OK, OTHER_MONITOR, STATUSES, RunResult
from flexlora_pl.experiments.paper import GLUE_COLUMNS, PaperTable, check_table
from flexlora_pl.experiments.selection import SCORE_MODE, SCORE_MONITOR, rule_named, score_runs, vtab_name

__all__ = ["Cell", "Table", "add_paper", "paper_markdown", "results_tables", "write_csv"]


@dataclass
class Cell:
    """The runs of one table cell: their values and how many did not count, by reason."""

    values: list[float] = field(default_factory=list)
    expected: int = 0
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def mean(self) -> float | None:
        return sum(self.values) / len(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """The sample standard deviation over seeds (``None`` below two values)."""
        if len(self.values) < 2:
            return None
        mean = self.mean
        return math.sqrt(sum((v - mean) ** 2 for v in self.values) / (len(self.values) - 1))

    def text(self, scale: float, digits: int) -> str:
        n, total = len(self.values), self.expected
        notes = [f"{count} {reason}" for reason, count in self.counts.items() if count]
        missing = total - n - sum(self.counts.values())
        if missing > 0:
            notes.append(f"{missing} missing")
        count = f"{n}" if n == total and not notes else f"{n}/{total}"
        tail = f"({', '.join([count, *notes])})"
        if self.mean is None:
            return f"– {tail}"
        spread = f" ± {self.std * scale:.{digits}f}" if self.std is not None else ""
        return f"{self.mean * scale:.{digits}f}{spread} {tail}"


@dataclass
class Table:
    """A results table: rows × columns of cells, plus derived columns (averages, group means).

    Args:
        title: the caption.
        columns: the measured columns (tasks, or commonsense sets).
        rows: row label → column → cell.
        derived: names of the derived columns, in order; ``row → name → value`` in :attr:`derived_values`.
    """

    title: str
    columns: list[str]
    rows: dict[str, dict[str, Cell]]
    derived: list[str] = field(default_factory=list)
    derived_values: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra_rows: dict[str, dict[str, str]] = field(default_factory=dict)

    def markdown(self, scale: float = 100.0, digits: int = 1) -> str:
        header = ["", *self.columns, *self.derived]
        lines = [f"**{self.title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row, cells in self.rows.items():
            texts = [cells[c].text(scale, digits) if c in cells else "–" for c in self.columns]
            texts += [self.derived_values.get(row, {}).get(d, "–") for d in self.derived]
            lines.append("| " + " | ".join([row, *texts]) + " |")
            for label, extra in self.extra_rows.items():
                if label.split(" (paper")[0] == row:
                    lines.append("| " + " | ".join([label, *[extra.get(c, "") for c in [*self.columns,
                                                                                          *self.derived]]]) + " |")
        return "\n".join(lines + ([""] + [f"- {note}" for note in self.notes] if self.notes else []))

    def csv_rows(self, scale: float = 100.0) -> list[dict[str, Any]]:
        """One dict per row: ``<column> mean``, ``<column> std``, ``<column> n`` and the derived columns."""
        out = []
        for row, cells in self.rows.items():
            line: dict[str, Any] = {"table": self.title, "row": row}
            for column in self.columns:
                cell = cells.get(column, Cell())
                line[f"{column} mean"] = _round(cell.mean, scale)
                line[f"{column} std"] = _round(cell.std, scale)
                line[f"{column} n"] = f"{len(cell.values)}/{cell.expected}"
            for name in self.derived:
                line[name] = self.derived_values.get(row, {}).get(name, "")
            out.append(line)
        return out


def _round(value: float | None, scale: float) -> float | str:
    return "" if value is None else round(value * scale, 6)


def _mean(values: Iterable[float | None]) -> float | None:
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    return sum(values) / len(values)


def results_tables(runs: list[RunResult], scale: float = 100.0, digits: int = 1) -> list[Table]:
    """Build the tables of every sweep under the results folder (scored by :mod:`.selection`'s rules)."""
    rules = score_runs(runs)
    tables = []
    for sweep in dict.fromkeys(r.sweep for r in runs):
        members = [r for r in runs if r.sweep == sweep]
        seeds = sorted({r.seed for r in members if r.seed is not None})
        tasks = sorted({r.task for r in members}, key=_task_key)
        methods = sorted({r.method for r in members}, key=_method_key)
        single = [t for t in tasks if not rules[(sweep, t)].per_set]
        per_set = [t for t in tasks if rules[(sweep, t)].per_set]
        if single:
            rows = {m: {t: _cell([r for r in members if r.task == t and r.method == m], "value", len(seeds))
                        for t in single} for m in methods}
            used = sorted({rules[(sweep, t)].name for t in single})
            table = Table(f"{sweep}: mean ± std over seeds (n); rule: "
                          + ", ".join(f"{name} ({rule_named(name).description})" for name in used), single, rows)
            _add_averages(table, scale, digits, vtab=all(vtab_name(t) for t in single))
            table.notes += _status_notes([r for r in members if r.task in single])
            tables.append(table)
        if per_set:
            columns = [*COMMONSENSE_SETS, "mean"]
            rows = {f"{t} {m}": {c: _cell([r for r in members if r.task == t and r.method == m], c, len(seeds))
                                 for c in columns} for t in per_set for m in methods}
            tables.append(Table(f"{sweep}: mean ± std over seeds (n); rule: commonsense ("
                                f"{rule_named('commonsense').description})", columns, rows,
                                notes=_status_notes([r for r in members if r.task in per_set])))
    return tables


def _status_notes(runs: list[RunResult]) -> list[str]:
    """What the table's ``no test yet`` and ``other monitor`` runs are, naming them, and what to do."""
    notes = []
    waiting = [run.label for run in runs if run.status == NO_TEST]
    if waiting:
        notes.append(f"no test yet: {len(waiting)} run(s) finished the fit but not the test stage their task is "
                     f"scored on (none yet, still running, failed or interrupted): {', '.join(waiting)}. Wait for a "
                     "running test, or run the sweep again: it runs the test stage of such runs.")
    other = [run for run in runs if run.status == OTHER_MONITOR]
    if other:
        by_monitor: dict[str, list[str]] = {}
        for run in other:
            best = run.record["fit"]["best"]
            by_monitor.setdefault(f"{best.get('monitor')} ({best.get('mode')})", []).append(run.label)
        named = "; ".join(f"{monitor}: {', '.join(labels)}" for monitor, labels in by_monitor.items())
        notes.append(f"other monitor: {len(other)} run(s) rank their best checkpoint by another metric or mode than "
                     f"the {SCORE_MONITOR} ({SCORE_MODE}) the best validation rule reports, so their fit.best is "
                     f"not a score: {named}. A task scored on its test stage must be recognised as such (a commonsense "
                     f"run by the config.yaml the flexlora command saves in its folder, a VTAB task by its name); any "
                     f"other task must be fitted with RunRecord monitor {SCORE_MONITOR}, mode {SCORE_MODE}.")
    return notes


_TASK_ORDER = [*GLUE_COLUMNS, *VTAB_TASKS]  # the paper's column order where it is known
_METHOD_ORDER = ["lora", "adalora", "static", "flexlora"]  # baselines first, as the paper's rows


def _natural(text: str) -> list[Any]:
    """``r8`` before ``r32``: digits compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def _task_key(task: str) -> tuple[int, list[Any]]:
    known = vtab_name(task) or task
    return (_TASK_ORDER.index(known) if known in _TASK_ORDER else len(_TASK_ORDER), _natural(task))


def _method_key(method: str) -> tuple[int, list[Any]]:
    # the baselines and FlexLoRA first, as the paper's rows; variants (ablations, switches) after them
    return (_METHOD_ORDER.index(method) if method in _METHOD_ORDER else len(_METHOD_ORDER), _natural(method))


def _cell(runs: list[RunResult], column: str, expected: int) -> Cell:
    cell = Cell(expected=max(expected, len(runs)), counts=dict.fromkeys(STATUSES, 0))
    for run in sorted(runs, key=lambda r: (r.seed is None, r.seed)):
        if run.status == OK and column in run.values:
            cell.values.append(run.values[column])
        else:
            cell.counts[run.status if run.status != OK else NO_METRIC] += 1
    return cell


def _add_averages(table: Table, scale: float, digits: int, vtab: bool) -> None:
    """The average over tasks of each row's cell means; for VTAB also group means and their mean."""
    groups = {}
    if vtab:
        for group in VTAB_GROUPS:
            members = [t for t in table.columns if VTAB_TASKS[vtab_name(t)].group == group]
            if members:
                groups[group.capitalize()] = members
        table.derived += [*groups, "Mean of groups"]
    table.derived.append("Avg.")
    for row, cells in table.rows.items():
        values = table.derived_values.setdefault(row, {})
        group_means = []
        for name, members in groups.items():
            mean = _mean(cells[t].mean for t in members)
            group_means.append(mean)
            values[name] = _format(mean, scale, digits, members, cells)
        if groups:
            of_groups = _mean(group_means)
            values["Mean of groups"] = "–" if of_groups is None else f"{of_groups * scale:.{digits}f}"
        values["Avg."] = _format(_mean(cells[t].mean for t in table.columns), scale, digits, table.columns, cells)


def _format(mean: float | None, scale: float, digits: int, members: Sequence[str], cells: dict[str, Cell]) -> str:
    if mean is not None:
        return f"{mean * scale:.{digits}f}"
    present = [t for t in members if cells[t].mean is not None]
    if not present:
        return "–"
    partial = sum(cells[t].mean for t in present) / len(present)
    return f"({partial * scale:.{digits}f} over {len(present)}/{len(members)})"


def add_paper(table: Table, paper: PaperTable, digits: int = 1) -> None:
    """Put the paper's cells under each measured row that has a paper row, and the paper's notes below."""
    checked = check_table(paper)
    keyed = {row.key: row for row in paper.rows}
    for row in list(table.rows):
        printed = keyed.get(row)
        if printed is None:
            continue
        cells = dict(zip(paper.columns, printed.cells, strict=True))
        extra = {c: f"{cells[c]:.{digits}f}" for c in table.columns if c in cells}
        average, notes = checked[row]
        extra["Avg."] = f"{printed.printed_average:.{digits}f}" + (f" (cells: {average:.{digits}f})" if notes else "")
        if "mean" in table.columns:
            extra["mean"] = extra.pop("Avg.")
        table.extra_rows[f"{row} (paper: {printed.label})"] = extra
    for key, (_, notes) in checked.items():
        for note in notes:
            table.notes.append(f"paper {paper.name}, {keyed[key].label}: {note}")


def paper_markdown(paper: PaperTable, digits: int = 1) -> str:
    """The paper's table as printed, with each row's recomputed average and what does not add up."""
    checked = check_table(paper)
    header = ["", *paper.columns, "Avg. (printed)", "Avg. (cells)", "note"]
    lines = [f"**Paper {paper.caption}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in paper.rows:
        average, notes = checked[row.key]
        lines.append("| " + " | ".join([row.label, *(f"{v:.{digits}f}" for v in row.cells),
                                        f"{row.printed_average:.{digits}f}", f"{average:.{digits}f}",
                                        "; ".join(notes)]) + " |")
    return "\n".join(lines)


def write_csv(tables: Sequence[Table], path: str | Path, scale: float = 100.0) -> None:
    """All tables' rows in one CSV file (see :meth:`Table.csv_rows`; the cost table's columns as they are)."""
    rows = [line for table in tables for line in table.csv_rows(scale)]
    names = list(dict.fromkeys(key for line in rows for key in line))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)
