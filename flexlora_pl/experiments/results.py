"""Collecting finished runs into tables: one cell per task × method, mean ± std over seeds.

Runs are found by their ``metrics.json`` under a folder laid out as ``<sweep>/<task>/<method>/seed<k>``
(what ``flexlora-sweep`` writes). Each task's score is taken by the first selection rule that applies
(:data:`SELECTION_RULES`):

* ``commonsense``: the test section holds ``test/<set>/accuracy`` for the 8 commonsense sets → one
  column per set and their mean (``test/accuracy``), rows = task × method (the paper's Table 2);
* ``vtab``: the task's name is a VTAB-1k task → ``test/accuracy`` of the test stage (run on the last
  checkpoint by the shipped sweeps: last-epoch top-1), plus group means and the mean of group means;
* ``best validation`` (GLUE and any other task): ``fit.best.value``, the best validation ``val/score``
  of the run, i.e. the dev score of its best checkpoint, as the paper reports GLUE.

A run that did not finish, failed, or lacks the metric its task's rule reads is counted in its cell,
never dropped; runs of one task whose metrics differ (other metric names) are an error naming them.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flexlora_pl.callbacks.run_record import METRICS_FILENAME
from flexlora_pl.data.commonsense import COMMONSENSE_SETS
from flexlora_pl.data.vtab import VTAB_ALIASES, VTAB_GROUPS, VTAB_TASKS
from flexlora_pl.experiments.grid import Sweep
from flexlora_pl.experiments.paper import GLUE_COLUMNS, PAPER_TABLES, PaperTable, check_table

__all__ = ["SELECTION_RULES", "MixedMetricsError", "RunResult", "Table", "collect", "cost_table", "load_runs",
           "results_tables"]

_SEED = re.compile(r"^seed(\d+)$")
OK, FAILED, UNFINISHED, NO_METRIC, MISSING = "ok", "failed", "unfinished", "no metric", "missing"


class MixedMetricsError(ValueError):
    """Runs of one task report different metrics; the message names the runs of each kind."""


@dataclass
class RunResult:
    """One run folder as the tables see it.

    Args:
        sweep: the sweep's name (the folder above the task).
        task: the task's name.
        method: the method's name.
        seed: the seed (from ``seed<k>``, else from ``metrics.json``).
        folder: the run folder.
        record: the parsed ``metrics.json`` (empty when there is none).
        status: ``ok``, ``failed``, ``unfinished`` or ``no metric`` (set once a rule has read the run).
        values: column → score, for ``ok`` runs.
    """

    sweep: str
    task: str
    method: str
    seed: int | None
    folder: Path
    record: dict[str, Any]
    status: str = OK
    values: dict[str, float] = field(default_factory=dict)

    @property
    def fit_status(self) -> str | None:
        return (self.record.get("fit") or {}).get("status")


@dataclass(frozen=True)
class SelectionRule:
    """How one kind of task is scored.

    Args:
        name: the rule's name, shown in the table's caption.
        description: what it reads, in words.
        applies: ``(task name, the task's records) -> bool``.
        read: ``record -> (column → value, the metric names it is based on)``, or ``None`` when the
            record lacks what the rule reads.
        per_set: ``True`` when a run gives several columns (rows are then task × method).
    """

    name: str
    description: str
    applies: Callable[[str, list[dict[str, Any]]], bool]
    read: Callable[[dict[str, Any]], tuple[dict[str, float], tuple[str, ...]] | None]
    per_set: bool = False


def _test_metrics(record: dict[str, Any]) -> dict[str, float]:
    test = record.get("test") or {}
    return test.get("metrics") or {} if test.get("status") == "finished" else {}


def _is_commonsense(task: str, records: list[dict[str, Any]]) -> bool:
    return any(f"test/{name}/accuracy" in _test_metrics(r) for r in records for name in COMMONSENSE_SETS)


def _read_commonsense(record: dict[str, Any]) -> tuple[dict[str, float], tuple[str, ...]] | None:
    metrics = _test_metrics(record)
    values = {name: metrics[f"test/{name}/accuracy"] for name in COMMONSENSE_SETS if f"test/{name}/accuracy" in metrics}
    if not values:
        return None
    values["mean"] = metrics.get("test/accuracy", sum(values.values()) / len(values))
    return values, tuple(sorted(k for k in metrics if k.endswith("/accuracy")))


def vtab_name(task: str) -> str | None:
    """The VTAB-1k task a task name stands for (``cifar``, ``vtab_cifar100`` …), or ``None``."""
    key = task.removeprefix("vtab_").removeprefix("vtab-")
    key = VTAB_ALIASES.get(key, key)
    return key if key in VTAB_TASKS else None


def _read_test_accuracy(record: dict[str, Any]) -> tuple[dict[str, float], tuple[str, ...]] | None:
    metrics = _test_metrics(record)
    if "test/accuracy" not in metrics:
        return None
    return {"value": metrics["test/accuracy"]}, tuple(sorted(metrics))


def _read_best_validation(record: dict[str, Any]) -> tuple[dict[str, float], tuple[str, ...]] | None:
    best = (record.get("fit") or {}).get("best") or {}
    if best.get("value") is None:
        return None
    names = tuple(sorted(k for k in (best.get("metrics") or {}) if k != "step"))
    return {"value": best["value"]}, (f"monitor={best.get('monitor')}", *names)


SELECTION_RULES: tuple[SelectionRule, ...] = (
    SelectionRule("commonsense", "test accuracy per commonsense set (test/<set>/accuracy) and their mean",
                  _is_commonsense, _read_commonsense, per_set=True),
    SelectionRule("vtab", "test top-1 of the test stage (test/accuracy; last checkpoint in the shipped sweeps)",
                  lambda task, records: vtab_name(task) is not None, _read_test_accuracy),
    SelectionRule("best validation", "best validation score of the run (fit.best.value, val/score): the dev score "
                  "of its best checkpoint", lambda task, records: True, _read_best_validation),
)
"""The rules in order of precedence; the first that applies to a task scores all its runs."""


# ------------------------------------------------------------------------------- collection
def load_runs(root: str | Path) -> list[RunResult]:
    """Every run folder under ``root``: each ``seed<k>`` folder, and any folder holding ``metrics.json``.

    The task and method are the two folders above the run folder, the sweep everything above those
    (``root``'s own name when the runs lie directly under it).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder; give the folder the runs were written to (e.g. runs or "
                                "runs/table1_glue)")
    folders = {p.parent for p in root.rglob(METRICS_FILENAME)}
    folders |= {p for p in root.rglob("seed*") if p.is_dir() and _SEED.match(p.name)}
    runs = []
    for folder in sorted(folders):
        parts = folder.relative_to(root).parts
        if len(parts) < 3:
            raise ValueError(f"run folder {folder} is not laid out as <sweep>/<task>/<method>/seed<k> under {root}; "
                             "give the folder flexlora-sweep wrote the runs into")
        try:
            record = json.loads((folder / METRICS_FILENAME).read_text())
        except (OSError, ValueError):
            record = {}
        match = _SEED.match(parts[-1])
        seed = int(match.group(1)) if match else (record.get("run") or {}).get("seed")
        sweep = "/".join(parts[:-3]) or root.resolve().name
        runs.append(RunResult(sweep, parts[-3], parts[-2], seed, folder, record))
    return runs


def score_runs(runs: list[RunResult]) -> dict[tuple[str, str], SelectionRule]:
    """Give every run its status and values, task by task; returns each ``(sweep, task)``'s rule.

    Raises:
        MixedMetricsError: runs of one task read by the same rule are based on different metric names.
    """
    by_task: dict[tuple[str, str], list[RunResult]] = {}
    for run in runs:
        by_task.setdefault((run.sweep, run.task), []).append(run)
    rules = {}
    for (sweep, task), members in by_task.items():
        finished = [r.record for r in members if r.fit_status == "finished" and r.status != MISSING]
        rule = next(rule for rule in SELECTION_RULES if rule.applies(task, finished))
        rules[(sweep, task)] = rule
        kinds: dict[tuple[str, ...], list[RunResult]] = {}
        for run in members:
            if run.status == MISSING:
                continue
            if run.fit_status != "finished":
                run.status = FAILED if run.fit_status == "failed" else UNFINISHED
                continue
            read = rule.read(run.record)
            if read is None:
                run.status = NO_METRIC
                continue
            run.values, names = read
            kinds.setdefault(names, []).append(run)
        if len(kinds) > 1:
            described = "; ".join(f"[{', '.join(names)}]: {', '.join(str(r.folder) for r in group)}"
                                  for names, group in kinds.items())
            raise MixedMetricsError(
                f"runs of task {task!r} (sweep {sweep!r}) report different metrics, so their scores are not "
                f"comparable ({rule.name} rule): {described}. Rerun the odd ones with the task's config, or "
                "move them out of the results folder."
            )
    return rules


# ------------------------------------------------------------------------------------ tables
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
    """Build the tables of every sweep under the results folder (see the module docstring for the rules)."""
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
                          + ", ".join(f"{name} ({_rule(name).description})" for name in used), single, rows)
            _add_averages(table, scale, digits, vtab=all(vtab_name(t) for t in single))
            tables.append(table)
        if per_set:
            columns = [*COMMONSENSE_SETS, "mean"]
            rows = {f"{t} {m}": {c: _cell([r for r in members if r.task == t and r.method == m], c, len(seeds))
                                 for c in columns} for t in per_set for m in methods}
            tables.append(Table(f"{sweep}: mean ± std over seeds (n); rule: commonsense ("
                                f"{_rule('commonsense').description})", columns, rows))
    return tables


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


def _rule(name: str) -> SelectionRule:
    return next(rule for rule in SELECTION_RULES if rule.name == name)


def _cell(runs: list[RunResult], column: str, expected: int) -> Cell:
    cell = Cell(expected=max(expected, len(runs)), counts={FAILED: 0, UNFINISHED: 0, NO_METRIC: 0, MISSING: 0})
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


# -------------------------------------------------------------------------------------- paper
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


# --------------------------------------------------------------------------------------- cost
def cost_table(runs: list[RunResult]) -> Table:
    """Per sweep and method: runs, fit wall time, peak memory and the trainable/active/allocated parameters."""
    columns = ["runs", "fit wall time (s)", "peak memory (MB)", "trainable", "active", "allocated"]
    rows: dict[str, dict[str, Cell]] = {}
    texts: dict[str, dict[str, str]] = {}
    kinds = set()
    for run in runs:
        label = f"{run.sweep} {run.method}"
        rows.setdefault(label, {})
        entry = texts.setdefault(label, {"runs": 0, "_wall": [], "_mem": [], "trainable": [], "active": [],
                                         "allocated": []})
        entry["runs"] += 1
        fit = run.record.get("fit") or {}
        if fit.get("wall_time_s") is not None:
            entry["_wall"].append(fit["wall_time_s"])
        if fit.get("peak_memory_mb") is not None:
            entry["_mem"].append(fit["peak_memory_mb"])
            kinds.add(fit.get("peak_memory_kind", "unknown"))
        for key in ("trainable", "active", "allocated"):
            value = (run.record.get("parameters") or {}).get(key)
            if value is not None:
                entry[key].append(value)
    table = Table("cost per method: mean over its runs (paper Tables 12-14)", [], rows, derived=columns)
    for label, entry in texts.items():
        table.derived_values[label] = {
            "runs": str(entry["runs"]),
            "fit wall time (s)": _mean_text(entry["_wall"], "{:.1f}"),
            "peak memory (MB)": _mean_text(entry["_mem"], "{:.0f}"),
            **{key: _mean_text(entry[key], "{:,.0f}") for key in ("trainable", "active", "allocated")},
        }
    if kinds:
        names = {"process_peak_rss": "the process's peak resident set size (CPU)",
                 "cuda_max_memory_allocated": "torch.cuda.max_memory_allocated (GPU)"}
        table.notes.append("peak memory: " + "; ".join(names.get(kind, kind) for kind in sorted(kinds)))
    return table


def allocation_table(runs: list[RunResult]) -> Table | None:
    """Per sweep and method, what the allocation events did (``metrics.json`` ``fit.allocation``): events,
    directions moved, flip-flops (directions pruned at the event after the one that added them) and the first
    update of a new direction relative to its module's settled ones; ``None`` when no run has events."""
    columns = ["runs", "events", "directions moved", "flip-flops", "first-update ratio", "final total rank"]
    keys = {"events": "events", "directions moved": "moved", "flip-flops": "flip_flops",
            "first-update ratio": "new_direction_update_ratio", "final total rank": "final_total_rank"}
    values: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        summary = (run.record.get("fit") or {}).get("allocation")
        if not summary:
            continue
        entry = values.setdefault(f"{run.sweep} {run.method}", {column: [] for column in columns})
        entry["runs"].append(1)
        for column, key in keys.items():
            if summary.get(key) is not None:
                entry[column].append(summary[key])
    if not values:
        return None
    table = Table("allocation events per method: mean over its runs", [], {label: {} for label in values},
                  derived=columns)
    for label, entry in values.items():
        table.derived_values[label] = {"runs": str(len(entry["runs"])), **{
            column: _mean_text(entry[column], "{:.2f}" if column == "first-update ratio" else "{:.1f}")
            for column in columns[1:]}}
    table.notes.append("first-update ratio: |Δλ| of a new direction at the optimizer step after the event that "
                       "added it, over the mean |Δλ| of its module's other active directions at that step")
    return table


def _mean_text(values: list[float], fmt: str) -> str:
    return fmt.format(sum(values) / len(values)) if values else "–"


# --------------------------------------------------------------------------------------- files
def write_csv(tables: Sequence[Table], path: str | Path, scale: float = 100.0) -> None:
    """All tables' rows in one CSV file (see :meth:`Table.csv_rows`; the cost table's columns as they are)."""
    rows = [line for table in tables for line in table.csv_rows(scale)]
    names = list(dict.fromkeys(key for line in rows for key in line))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=names)
        writer.writeheader()
        writer.writerows(rows)


def add_expected(runs: list[RunResult], sweep: Sweep, root: str | Path) -> list[RunResult]:
    """Add the sweep file's runs that have no folder under ``root`` as ``missing`` (so whole tasks or methods that
    never ran are shown too)."""
    found = {(r.sweep, r.task, r.method, r.seed) for r in runs}
    extra = [RunResult(run.sweep, run.task, run.method, run.seed, Path(root) / run.task / run.method / run.version,
                       {}, status=MISSING)
             for run in sweep.runs() if (run.sweep, run.task, run.method, run.seed) not in found]
    return [*runs, *extra]


def collect(root: str | Path, paper: str | None = None, scale: float = 100.0, digits: int = 1,
            sweep: Sweep | None = None) -> list[Table]:
    """Load the runs under ``root`` and build the results tables and the cost table.

    Args:
        root: the folder the sweep wrote to (``runs`` or ``runs/<sweep>``).
        sweep: the sweep file the runs came from: its runs without a folder are shown as missing (without
            it, a cell expects the seeds seen anywhere in its sweep, and tasks or methods with no folder at
            all cannot be known).
        paper: ``table1``, ``table2`` or ``table3``: put the paper's cells beside the measured rows.
        scale: multiply scores by this (100: percentages as the paper prints them).
        digits: decimals shown.
    """
    runs = load_runs(root)
    if not runs:
        raise FileNotFoundError(f"no run folders (metrics.json or seed<k>/) under {root}")
    measured = runs
    if sweep is not None:
        runs = add_expected(runs, sweep, root)
    tables = results_tables(runs, scale, digits)
    if paper is not None:
        if paper not in PAPER_TABLES:
            raise ValueError(f"--paper {paper!r}: the shipped paper tables are {', '.join(PAPER_TABLES)}")
        for table in tables:
            add_paper(table, PAPER_TABLES[paper], digits)
    allocation = allocation_table(measured)
    return [*tables, cost_table(measured), *([allocation] if allocation is not None else [])]
