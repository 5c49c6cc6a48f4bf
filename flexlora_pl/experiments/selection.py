"""Scoring runs: the selection rule of each task, applied to every run of it.

Each task's score is taken by the first selection rule that applies (:data:`SELECTION_RULES`):

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
Runs of one task whose metrics differ (other metric names) are an error naming them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from flexlora_pl.data.commonsense import COMMONSENSE_SETS
from flexlora_pl.data.vtab import VTAB_ALIASES, VTAB_TASKS
from flexlora_pl.experiments.collection import (
    FAILED,
    MISSING,
    NO_METRIC,
    NO_TEST,
    OTHER_MONITOR,
    UNFINISHED,
    RunResult,
)

__all__ = ["COMMONSENSE_CLASSES", "SCORE_MODE", "SCORE_MONITOR", "SELECTION_RULES", "MixedMetricsError",
           "SelectionRule", "rule_named", "score_runs", "vtab_name"]

SCORE_MONITOR, SCORE_MODE = "val/score", "max"
"""The only ``fit.best`` the ``best validation`` rule reports: ranked by the task's headline score, higher better."""

COMMONSENSE_CLASSES = ("CommonsenseDataModule", "FlexLoRACausalLM")
"""Class names (data module, task) that make a run a commonsense run, scored on its test stage."""


class MixedMetricsError(ValueError):
    """Runs of one task report different metrics; the message names the runs of each kind."""


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


def rule_named(name: str) -> SelectionRule:
    """The selection rule called ``name`` (in :data:`SELECTION_RULES`)."""
    return next(rule for rule in SELECTION_RULES if rule.name == name)


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
