"""Building and rendering the results tables: one :class:`Cell` per task × method (mean ± std and the interval
of the mean over seeds, and the runs that give no value counted by reason), derived columns (averages, VTAB group
means), the notes under a table, the paper's cells beside the measured rows, the seed-paired differences against a
reference method (:class:`DifferenceCell`), Markdown and CSV.

Rows and columns follow the paper where it fixes them (GLUE and VTAB column order; the baselines, then FlexLoRA,
then variants). A run that did not finish, failed, or lacks the metric its task's rule reads is counted in its
cell, never dropped.

An average (``Avg.``, a VTAB group, the mean of groups) is taken per seed, over the seeds that have a score in
every task it covers, and then summarized like a cell; the other seeds are counted as ``incomplete``. Without
such a seed it shows the mean of the task means there are, as ``(x over k/m)``, with no spread or interval. The
statistics are :mod:`.statistics`'s; docs/statistics.md explains them.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexlora_pl.data.commonsense import COMMONSENSE_SETS
from flexlora_pl.data.vtab import VTAB_GROUPS, VTAB_TASKS
from flexlora_pl.experiments.collection import NO_METRIC, NO_TEST, OK, OTHER_MONITOR, STATUSES, RunResult
from flexlora_pl.experiments.paper import GLUE_COLUMNS, PaperTable, check_table
from flexlora_pl.experiments.selection import SCORE_MODE, SCORE_MONITOR, rule_named, score_runs, vtab_name
from flexlora_pl.experiments.statistics import (
    NO_MEASURABLE_DIFFERENCE,
    PairedDifference,
    Summary,
    paired_difference,
    summarize,
)

__all__ = ["Cell", "DifferenceCell", "Table", "add_paper", "paper_markdown", "results_tables", "write_csv"]

INCOMPLETE = "incomplete"
"""The reason an average leaves a seed out: it lacks a score in a task the average covers."""


@dataclass
class Cell:
    """The runs of one table cell: their values (and seeds) and how many did not count, by reason.

    Args:
        values: the scores that count, one per run.
        expected: how many runs the cell expects.
        counts: reason → how many runs gave no value for it.
        seeds: the seed of each value (``None`` for a run without one), in the order of ``values``.
        confidence: the level of the interval the cell shows.
    """

    values: list[float] = field(default_factory=list)
    expected: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    seeds: list[int | None] = field(default_factory=list)
    confidence: float = 0.95

    @property
    def summary(self) -> Summary:
        return summarize(self.values, self.confidence)

    @property
    def mean(self) -> float | None:
        return self.summary.mean

    @property
    def std(self) -> float | None:
        """The sample standard deviation over seeds (``None`` below two values)."""
        return self.summary.std

    @property
    def by_seed(self) -> dict[int, float]:
        """Seed → value, for the values whose run has a seed (what pairs with another method's cell)."""
        return {seed: value for seed, value in zip(self.seeds, self.values, strict=True) if seed is not None}

    def text(self, scale: float, digits: int) -> str:
        """``mean ± std [low, high] (n)``, ``–`` for what is undefined, and the runs that did not count."""
        n, total = len(self.values), self.expected
        notes = [f"{count} {reason}" for reason, count in self.counts.items() if count]
        missing = total - n - sum(self.counts.values())
        if missing > 0:
            notes.append(f"{missing} missing")
        count = f"{n}" if n == total and not notes else f"{n}/{total}"
        tail = f"({', '.join([count, *notes])})"
        summary = self.summary
        if summary.mean is None:
            return f"– {tail}"
        std, low, high = (_number(v, scale, digits) for v in (summary.std, summary.low, summary.high))
        return f"{_number(summary.mean, scale, digits)} ± {std} [{low}, {high}] {tail}"

    def csv_fields(self, scale: float) -> dict[str, Any]:
        summary = self.summary
        return {"mean": _round(summary.mean, scale), "std": _round(summary.std, scale),
                "low": _round(summary.low, scale), "high": _round(summary.high, scale),
                "n": f"{len(self.values)}/{self.expected}"}


@dataclass
class DifferenceCell:
    """One method against the reference in one column: the mean of their seed-paired differences.

    Args:
        difference: the paired difference (method − reference) over the seeds both have.
        unseeded: runs with a value but no seed, on either side: they cannot be paired and are left out too.
    """

    difference: PairedDifference
    unseeded: int = 0

    @property
    def dropped(self) -> int:
        """How many values were left out of the pairing."""
        return self.difference.unpaired + self.unseeded

    def text(self, scale: float, digits: int) -> str:
        """``+d [low, high], p = … (n)`` and ``no measurable difference`` where the interval holds 0."""
        d = self.difference
        dropped = f"; {self.dropped} unpaired dropped" if self.dropped else ""
        if d.mean is None:
            return f"– (no common seed{dropped})"
        mean = f"{d.mean * scale:+.{digits}f}"
        if d.low is None or d.high is None:
            return f"{mean} ({d.n} common seed: no interval, no test{dropped})"
        low, high = f"{d.low * scale:+.{digits}f}", f"{d.high * scale:+.{digits}f}"
        text = f"{mean} [{low}, {high}], {_p_text(d.p)} ({d.n}{dropped})"
        return text if d.measurable else f"{text}, {NO_MEASURABLE_DIFFERENCE}"

    def csv_fields(self, scale: float) -> dict[str, Any]:
        d = self.difference
        return {"mean": _round(d.mean, scale), "std": _round(d.std, scale), "low": _round(d.low, scale),
                "high": _round(d.high, scale), "t": "" if d.t is None else d.t, "p": "" if d.p is None else d.p,
                "n": d.n, "unpaired": self.dropped, "measurable": "" if d.measurable is None else d.measurable}


@dataclass
class Table:
    """A results table: rows × columns of cells, plus derived columns (averages, group means).

    Args:
        title: the caption.
        columns: the measured columns (tasks, or commonsense sets).
        rows: row label → column → cell (a :class:`DifferenceCell` in a difference table).
        derived: names of the derived columns, in order; ``row → name → text`` in :attr:`derived_values`,
            and ``row → name → cell`` in :attr:`derived_cells` where the text is a cell's (for the CSV).
        reference: the reference method of a difference table; ``None`` for any other table.
    """

    title: str
    columns: list[str]
    rows: dict[str, dict[str, Cell | DifferenceCell]]
    derived: list[str] = field(default_factory=list)
    derived_values: dict[str, dict[str, str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra_rows: dict[str, dict[str, str]] = field(default_factory=dict)
    derived_cells: dict[str, dict[str, Cell | DifferenceCell]] = field(default_factory=dict)
    reference: str | None = None

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
        """One dict per row: ``<column> mean``, ``std``, ``low``, ``high`` (the interval), ``n`` (a difference
        table adds ``t``, ``p``, ``unpaired``, ``measurable``), each derived column's text and, where it is a
        cell's, the same fields."""
        out = []
        for row, cells in self.rows.items():
            line: dict[str, Any] = {"table": self.title, "row": row}
            for column in self.columns:
                fields = cells.get(column, Cell()).csv_fields(scale)
                line.update({f"{column} {key}": value for key, value in fields.items()})
            for name in self.derived:
                line[name] = self.derived_values.get(row, {}).get(name, "")
                if (cell := self.derived_cells.get(row, {}).get(name)) is not None:
                    line.update({f"{name} {key}": value for key, value in cell.csv_fields(scale).items()})
            out.append(line)
        return out


def _round(value: float | None, scale: float) -> float | str:
    return "" if value is None else round(value * scale, 6)


def _number(value: float | None, scale: float, digits: int) -> str:
    return "–" if value is None else f"{value * scale:.{digits}f}"


def _p_text(p: float | None) -> str:
    if p is None:
        return "p = –"  # every paired difference is 0: no test
    return "p < 0.001" if p < 0.001 else f"p = {p:.3g}"


def _level(confidence: float) -> str:
    return f"{confidence * 100:g} %"


def results_tables(runs: list[RunResult], scale: float = 100.0, digits: int = 1, reference: str | None = None,
                   confidence: float = 0.95, contrasts: Sequence[tuple[str, str]] = ()) -> list[Table]:
    """Build the tables of every sweep under the results folder (scored by :mod:`.selection`'s rules).

    Args:
        runs: the runs, as :func:`.collection.load_runs` reads them.
        scale: multiply scores by this (100: percentages).
        digits: decimals shown in the derived columns.
        reference: a method: each sweep's tables are followed by its methods' seed-paired differences against
            it (``None``: no difference tables). A method no run has is refused, naming the methods there are.
        confidence: the level of every interval.
        contrasts: (method, base) pairs: each sweep's tables are then followed by one table of the seed-paired
            differences method − base, a row each (e.g. an attribution: static − lora, flexlora − static, ...).
    """
    rules = score_runs(runs)
    methods = sorted({r.method for r in runs}, key=_method_key)
    if reference is not None and reference not in methods:
        raise ValueError(f"--reference {reference!r}: no run of that method here; the methods are "
                         f"{', '.join(methods)}")
    missing = sorted({m for pair in contrasts for m in pair} - set(methods))
    if missing:
        raise ValueError(f"--contrast: no run of {', '.join(missing)} here; the methods are {', '.join(methods)}")
    level = _level(confidence)
    tables = []
    for sweep in dict.fromkeys(r.sweep for r in runs):
        members = [r for r in runs if r.sweep == sweep]
        seeds = sorted({r.seed for r in members if r.seed is not None})
        tasks = sorted({r.task for r in members}, key=_task_key)
        methods = sorted({r.method for r in members}, key=_method_key)
        single = [t for t in tasks if not rules[(sweep, t)].per_set]
        per_set = [t for t in tasks if rules[(sweep, t)].per_set]
        if single:
            rows = {m: {t: _cell([r for r in members if r.task == t and r.method == m], "value", len(seeds),
                                 confidence) for t in single} for m in methods}
            used = sorted({rules[(sweep, t)].name for t in single})
            table = Table(f"{sweep}: mean ± std [{level} interval] over seeds (n); rule: "
                          + ", ".join(f"{name} ({rule_named(name).description})" for name in used), single, rows)
            averages = _averages(single, vtab=all(vtab_name(t) for t in single))
            _add_averages(table, averages, scale, digits, confidence)
            table.notes += _status_notes([r for r in members if r.task in single])
            pairs = {m: (m, reference) for m in methods if m != reference}
            tables += [table, *_differences(table, sweep, methods, pairs, reference, averages, scale, digits,
                                            confidence),
                       *_contrasts(table, sweep, methods, contrasts, averages, scale, digits, confidence)]
        if per_set:
            columns = [*COMMONSENSE_SETS, "mean"]
            rows = {f"{t} {m}": {c: _cell([r for r in members if r.task == t and r.method == m], c, len(seeds),
                                          confidence) for c in columns} for t in per_set for m in methods}
            table = Table(f"{sweep}: mean ± std [{level} interval] over seeds (n); rule: commonsense ("
                          f"{rule_named('commonsense').description})", columns, rows,
                          notes=_status_notes([r for r in members if r.task in per_set]))
            pairs = {f"{t} {m}": (f"{t} {m}", f"{t} {reference}") for t in per_set for m in methods if m != reference}
            tables += [table, *_differences(table, sweep, methods, pairs, reference, {}, scale, digits, confidence)]
    return tables


def _differences(table: Table, sweep: str, methods: list[str], pairs: Mapping[str, tuple[str, str]],
                 reference: str | None, averages: Mapping[str, list[list[str]]], scale: float, digits: int,
                 confidence: float, title: str | None = None) -> list[Table]:
    """The table of seed-paired differences, a row each (``pairs``: label → (row, its reference row)).

    None without a reference; none, and a note under ``table`` saying so, when the sweep has no run of it.
    """
    if reference is None:
        return []
    if reference not in methods:
        table.notes.append(f"no differences against {reference}: the sweep {sweep} has no {reference} runs (its "
                           f"methods: {', '.join(methods)})")
        return []
    level = _level(confidence)
    basis = reference if title is None else "base"
    title = title or (f"{sweep}: differences against {reference}: mean of the seed-paired differences (method − "
                      f"{reference}) [{level} interval], paired t-test p (n common seeds)")
    differences = Table(title, table.columns, {}, derived=list(averages), reference=reference)
    for label, (row, other) in pairs.items():
        cells, base = table.rows[row], table.rows[other]
        differences.rows[label] = {c: _difference(cells[c], base[c]) for c in table.columns}
        derived = differences.derived_cells.setdefault(label, {})
        for name, groups in averages.items():
            derived[name] = DifferenceCell(paired_difference(_seed_averages(cells, groups),
                                                             _seed_averages(base, groups), confidence))
        differences.derived_values[label] = {name: cell.text(scale, digits) for name, cell in derived.items()}
    differences.notes += [
        f"{NO_MEASURABLE_DIFFERENCE}: the {level} interval of the mean difference holds 0 (p ≥ {1 - confidence:.3g});"
        " a difference whose interval excludes 0 is measurable. Differences are in the table's units, each seed's "
        f"score minus the {basis} score of the same seed; seeds only one of the two has are counted as "
        "unpaired and left out. See docs/statistics.md.",
        *([f"{', '.join(averages)}: each seed's average over the tasks of the column, for the seeds with a score "
           "in every one of them, then paired like a task."] if averages else [])]
    return [differences]


def _contrasts(table: Table, sweep: str, methods: list[str], contrasts: Sequence[tuple[str, str]],
               averages: Mapping[str, list[list[str]]], scale: float, digits: int, confidence: float) -> list[Table]:
    """The table of the ``(method, base)`` contrasts of a sweep that has both methods (a note names the others)."""
    present = [(m, b) for m, b in contrasts if m in methods and b in methods]
    skipped = [f"{m} − {b}" for m, b in contrasts if (m, b) not in present]
    if skipped:
        table.notes.append(f"no contrast {', '.join(skipped)}: the sweep {sweep} lacks runs of a method in it")
    if not present:
        return []
    title = (f"{sweep}: contrasts: mean of the seed-paired differences (method − base) [{_level(confidence)} "
             "interval], paired t-test p (n common seeds)")
    pairs = {f"{m} − {b}": (m, b) for m, b in present}
    return _differences(table, sweep, methods, pairs, present[0][1], averages, scale, digits, confidence, title)


def _difference(cell: Cell, base: Cell) -> DifferenceCell:
    unseeded = len(cell.values) - len(cell.by_seed) + len(base.values) - len(base.by_seed)
    return DifferenceCell(paired_difference(cell.by_seed, base.by_seed, cell.confidence), unseeded)


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


def _cell(runs: list[RunResult], column: str, expected: int, confidence: float) -> Cell:
    cell = Cell(expected=max(expected, len(runs)), counts=dict.fromkeys(STATUSES, 0), confidence=confidence)
    for run in sorted(runs, key=lambda r: (r.seed is None, r.seed)):
        if run.status == OK and column in run.values:
            cell.values.append(run.values[column])
            cell.seeds.append(run.seed)
        else:
            cell.counts[run.status if run.status != OK else NO_METRIC] += 1
    return cell


def _averages(columns: list[str], vtab: bool) -> dict[str, list[list[str]]]:
    """Each derived column → the groups of tasks it averages: the mean over the groups of each group's task mean.

    ``Avg.`` is every task as its own group (the mean over tasks); for VTAB also one column per group
    (Natural, Specialized, Structured) and ``Mean of groups``.
    """
    averages = {}
    if vtab:
        for group in VTAB_GROUPS:
            members = [t for t in columns if VTAB_TASKS[vtab_name(t)].group == group]
            if members:
                averages[group.capitalize()] = [members]
        averages["Mean of groups"] = [members for [members] in averages.values()]
    averages["Avg."] = [[t] for t in columns]
    return averages


def _mean_of_means(groups: list[list[str]], value: Callable[[str], float | None]) -> tuple[float | None, int]:
    """The mean over ``groups`` of the mean of ``value(task)`` over each group's tasks, skipping the tasks
    without a value; and how many tasks have one."""
    means = []
    for members in groups:
        found = [v for v in map(value, members) if v is not None]
        if found:
            means.append(sum(found) / len(found))
    present = sum(value(t) is not None for members in groups for t in members)
    return (sum(means) / len(means) if means else None), present


def _seed_averages(cells: Mapping[str, Cell], groups: list[list[str]]) -> dict[Hashable, float]:
    """Seed → its average over ``groups``, for each seed with a value in every task of them."""
    tasks = [t for members in groups for t in members]
    seeds = [seed for seed in cells[tasks[0]].by_seed if all(seed in cells[t].by_seed for t in tasks)]
    return {seed: _mean_of_means(groups, lambda t, seed=seed: cells[t].by_seed[seed])[0] for seed in sorted(seeds)}


def _add_averages(table: Table, averages: Mapping[str, list[list[str]]], scale: float, digits: int,
                  confidence: float) -> None:
    """Each row's derived columns: the per-seed averages over the seeds that have every task, summarized; or,
    without such a seed, the mean of the task means there are, as ``(x over k/m)``."""
    table.derived += list(averages)
    for row, cells in table.rows.items():
        values = table.derived_values.setdefault(row, {})
        for name, groups in averages.items():
            per_seed = _seed_averages(cells, groups)
            tasks = [t for members in groups for t in members]
            if per_seed:
                expected = max(cells[t].expected for t in tasks)
                cell = Cell(list(per_seed.values()), expected, {INCOMPLETE: expected - len(per_seed)},
                            list(per_seed), confidence)
                table.derived_cells.setdefault(row, {})[name] = cell
                values[name] = cell.text(scale, digits)
                continue
            partial, present = _mean_of_means(groups, lambda t, cells=cells: cells[t].mean)
            values[name] = "–" if partial is None else f"({partial * scale:.{digits}f} over {present}/{len(tasks)})"
    if any(cell.counts[INCOMPLETE] for cells in table.derived_cells.values() for cell in cells.values()):
        table.notes.append(f"{INCOMPLETE}: seeds without a score in every task an average covers; the average is "
                           "summarized over the other seeds.")


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
