"""Collecting finished runs into tables: one cell per task × method, mean ± std over seeds.

Runs are found by their ``metrics.json`` under a folder laid out as ``<sweep>/<task>/<method>/seed<k>``
(what ``flexlora-sweep`` writes). Each task's score is taken by the first selection rule that applies
(:data:`SELECTION_RULES`):

* ``commonsense``: a run of the task is a commonsense run (its ``config.yaml`` names the
  ``CommonsenseDataModule`` or the ``FlexLoRACausalLM`` task, its ``metrics.json`` names that task class in
  ``run.module``, or its test section holds ``test/<set>/accuracy`` for a commonsense set) → one column per
  set and their mean (``test/accuracy``), rows = task × method (the paper's Table 2);
* ``vtab``: the task's name is a VTAB-1k task → ``test/accuracy`` of the test stage (run on the last
  checkpoint by the shipped sweeps: last-epoch top-1), plus group means and the mean of group means;
* ``best validation`` (GLUE and any other task): ``fit.best.value`` when the run's best checkpoint is
  ranked by ``val/score`` with mode ``max``, i.e. the dev score of its best checkpoint, as the paper
  reports GLUE (the maximum over evaluations of the set it reports, so optimistic).

The task is recognised before any run is read, so a rule never reads a value whose meaning differs from its
caption: a commonsense run whose test stage has not finished is ``no test yet``, never its validation loss,
and a ``fit.best`` ranked by another monitor or mode (``val/loss``, ``min``) is ``other monitor``, not a score.
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

import yaml

from flexlora_pl.callbacks.run_record import METRICS_FILENAME
from flexlora_pl.data.commonsense import COMMONSENSE_SETS
from flexlora_pl.data.vtab import VTAB_ALIASES, VTAB_GROUPS, VTAB_TASKS
from flexlora_pl.experiments.grid import Sweep
from flexlora_pl.experiments.paper import GLUE_COLUMNS, PAPER_TABLES, PaperTable, check_table

__all__ = ["SELECTION_RULES", "MixedMetricsError", "RunResult", "Table", "collect", "cost_table", "load_runs",
           "results_tables"]

_SEED = re.compile(r"^seed(\d+)$")
OK, FAILED, UNFINISHED, NO_METRIC, MISSING = "ok", "failed", "unfinished", "no metric", "missing"
NO_TEST, OTHER_MONITOR = "no test yet", "other monitor"
STATUSES = (FAILED, UNFINISHED, NO_TEST, OTHER_MONITOR, NO_METRIC, MISSING)
"""The reasons a run gives no value, in the order a cell lists them."""

SCORE_MONITOR, SCORE_MODE = "val/score", "max"
"""The only ``fit.best`` the ``best validation`` rule reports: ranked by the task's headline score, higher better."""

COMMONSENSE_CLASSES = ("CommonsenseDataModule", "FlexLoRACausalLM")
"""Class names (data module, task) that make a run a commonsense run, scored on its test stage."""

_CONFIG_FILES = ("config.yaml", "config.fit-resume.yaml", "config.test.yaml")  # what the flexlora command saves


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
        status: ``ok`` or one of :data:`STATUSES` (set once a rule has read the run).
        values: column → score, for ``ok`` runs.
        classes: ``data`` / ``model`` → the class path the run's saved config names (empty without one).
    """

    sweep: str
    task: str
    method: str
    seed: int | None
    folder: Path
    record: dict[str, Any]
    status: str = OK
    values: dict[str, float] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)

    @property
    def fit_status(self) -> str | None:
        return (self.record.get("fit") or {}).get("status")

    @property
    def label(self) -> str:
        """``<sweep>/<task>/<method>/<seed folder>``: the run as the notes under a table name it."""
        return f"{self.sweep}/{self.task}/{self.method}/{self.folder.name}"


@dataclass(frozen=True)
class SelectionRule:
    """How one kind of task is scored.

    Args:
        name: the rule's name, shown in the table's caption.
        description: what it reads, in words.
        applies: ``(task name, the task's runs) -> bool``, from what the runs are (their config, task
            class, metric names), before any of them is read.
        read: ``record -> (column → value, the metric names it is based on)`` of a finished fit, or the
            status the run gets instead of a value (``no metric``, ``no test yet``, ``other monitor``).
        per_set: ``True`` when a run gives several columns (rows are then task × method).
    """

    name: str
    description: str
    applies: Callable[[str, list[RunResult]], bool]
    read: Callable[[dict[str, Any]], tuple[dict[str, float], tuple[str, ...]] | str]
    per_set: bool = False


def _test_metrics(record: dict[str, Any]) -> dict[str, float] | str:
    """The metrics of a finished test stage, or ``no test yet`` (no test section, or one not finished)."""
    test = record.get("test") or {}
    return test.get("metrics") or {} if test.get("status") == "finished" else NO_TEST


def _class_name(path: str | None) -> str:
    return (path or "").rsplit(".", 1)[-1]


def _is_commonsense_run(run: RunResult) -> bool:
    """From the run's config, the task class ``RunRecord`` noted, or the names of any test metrics it has."""
    module = (run.record.get("run") or {}).get("module")
    if any(_class_name(path) in COMMONSENSE_CLASSES for path in (*run.classes.values(), module)):
        return True
    metrics = (run.record.get("test") or {}).get("metrics") or {}
    return any(f"test/{name}/accuracy" in metrics for name in COMMONSENSE_SETS)


def _is_commonsense(task: str, runs: list[RunResult]) -> bool:
    return any(_is_commonsense_run(run) for run in runs)


def _read_commonsense(record: dict[str, Any]) -> tuple[dict[str, float], tuple[str, ...]] | str:
    metrics = _test_metrics(record)
    if isinstance(metrics, str):
        return metrics
    values = {name: metrics[f"test/{name}/accuracy"] for name in COMMONSENSE_SETS if f"test/{name}/accuracy" in metrics}
    if not values:
        return NO_METRIC
    values["mean"] = metrics.get("test/accuracy", sum(values.values()) / len(values))
    return values, tuple(sorted(k for k in metrics if k.endswith("/accuracy")))


def vtab_name(task: str) -> str | None:
    """The VTAB-1k task a task name stands for (``cifar``, ``vtab_cifar100`` …), or ``None``."""
    key = task.removeprefix("vtab_").removeprefix("vtab-")
    key = VTAB_ALIASES.get(key, key)
    return key if key in VTAB_TASKS else None


def _read_test_accuracy(record: dict[str, Any]) -> tuple[dict[str, float], tuple[str, ...]] | str:
    metrics = _test_metrics(record)
    if isinstance(metrics, str):
        return metrics
    if "test/accuracy" not in metrics:
        return NO_METRIC
    return {"value": metrics["test/accuracy"]}, tuple(sorted(metrics))


def _read_best_validation(record: dict[str, Any]) -> tuple[dict[str, float], tuple[str, ...]] | str:
    best = (record.get("fit") or {}).get("best") or {}
    if best.get("value") is None:
        return NO_METRIC
    if best.get("monitor") != SCORE_MONITOR or best.get("mode") != SCORE_MODE:
        return OTHER_MONITOR  # e.g. the lowest val/loss: not a score, and lower is better
    names = tuple(sorted(k for k in (best.get("metrics") or {}) if k != "step"))
    return {"value": best["value"]}, (f"monitor={best.get('monitor')}", *names)


SELECTION_RULES: tuple[SelectionRule, ...] = (
    SelectionRule("commonsense", "test accuracy per commonsense set (test/<set>/accuracy) and their mean",
                  _is_commonsense, _read_commonsense, per_set=True),
    SelectionRule("vtab", "test top-1 of the test stage (test/accuracy; last checkpoint in the shipped sweeps)",
                  lambda task, runs: vtab_name(task) is not None, _read_test_accuracy),
    SelectionRule("best validation", "best validation score of the run (fit.best.value, val/score): the dev score "
                  "of its best checkpoint", lambda task, runs: True, _read_best_validation),
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
        runs.append(RunResult(sweep, parts[-3], parts[-2], seed, folder, record, classes=_config_classes(folder)))
    return runs


def _config_classes(folder: Path) -> dict[str, str]:
    """``data`` / ``model`` → class path, from the first config the ``flexlora`` command saved in the run folder."""
    for name in _CONFIG_FILES:
        try:
            config = yaml.safe_load((folder / name).read_text())
        except (OSError, yaml.YAMLError):
            continue
        if isinstance(config, dict):
            return {key: value["class_path"] for key in ("data", "model")
                    if isinstance(value := config.get(key), dict) and isinstance(value.get("class_path"), str)}
    return {}


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
        present = [r for r in members if r.status != MISSING]
        rule = next(rule for rule in SELECTION_RULES if rule.applies(task, present))
        rules[(sweep, task)] = rule
        kinds: dict[tuple[str, ...], list[RunResult]] = {}
        for run in members:
            if run.status == MISSING:
                continue
            if run.fit_status != "finished":
                run.status = FAILED if run.fit_status == "failed" else UNFINISHED
                continue
            read = rule.read(run.record)
            if isinstance(read, str):
                run.status = read
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
            table.notes += _status_notes([r for r in members if r.task in single])
            tables.append(table)
        if per_set:
            columns = [*COMMONSENSE_SETS, "mean"]
            rows = {f"{t} {m}": {c: _cell([r for r in members if r.task == t and r.method == m], c, len(seeds))
                                 for c in columns} for t in per_set for m in methods}
            tables.append(Table(f"{sweep}: mean ± std over seeds (n); rule: commonsense ("
                                f"{_rule('commonsense').description})", columns, rows,
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


def _rule(name: str) -> SelectionRule:
    return next(rule for rule in SELECTION_RULES if rule.name == name)


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
