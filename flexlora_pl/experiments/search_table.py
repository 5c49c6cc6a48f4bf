"""The search table of a tuned comparison: per task × method, what its search selected and what the search cost.

A tuned sweep's selection writes ``<sweep>/<task>/<method>/selected.json`` (:func:`flexlora_pl.experiments.tuned.
select`); its trials are run folders under ``<sweep>/<task>/<method>/search/trial<k>/``. The table has one row per
task × method: the selected values, the selected trial's search score (on the validation carved from training,
never the split the results table reports), the trials by state against the budget, the searched ranges, and the
fit time of all its trials together. A selected value at an end of its range gets a warning under the table: the
best may lie beyond it, so the range should be widened.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flexlora_pl.experiments.tables import Table

__all__ = ["read_searches", "search_tables"]

_SELECTED = "selected.json"


def read_searches(root: str | Path) -> list[dict[str, Any]]:
    """Every ``selected.json`` under ``root``, each with ``search_fit_s`` (the summed fit time of its trials) and
    ``trial_runs`` (how many trial folders have a ``metrics.json``) and ``task_folder`` added."""
    found = []
    for path in sorted(Path(root).rglob(_SELECTED)):
        record = json.loads(path.read_text())
        if not isinstance(record, Mapping) or "study" not in record:
            continue
        seconds, runs = 0.0, 0
        for metrics in sorted((path.parent / "search").glob("trial*/metrics.json")):
            fit = (json.loads(metrics.read_text()).get("fit") or {})
            if fit.get("wall_time_s") is not None:
                seconds, runs = seconds + float(fit["wall_time_s"]), runs + 1
        found.append({**record, "search_fit_s": seconds, "trial_runs": runs, "task_folder": str(path.parent.parent)})
    return found


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _short(flag: str) -> str:
    return flag.rsplit(".", 1)[-1]


def search_tables(root: str | Path, scale: float = 100.0, digits: int = 1) -> list[Table]:
    """One table per sweep with a search under ``root`` (none when no ``selected.json`` is there)."""
    records = read_searches(root)
    tables = []
    for sweep in dict.fromkeys(str(r["study"]).split("/")[0] for r in records):
        members = [r for r in records if str(r["study"]).split("/")[0] == sweep]
        tasks = list(dict.fromkeys(r["task"] for r in members))
        budgets = sorted({int(r.get("budget", 0)) for r in members})
        first = members[0]
        columns = ["selected", "search score", "trials: complete / pruned / failed (budget)", "searched",
                   "search fit time (s)"]
        table = Table(f"{sweep}: the search ({first.get('sampler')} sampler, pruner {first.get('pruner', 'none')}, "
                      f"{' or '.join(map(str, budgets))} trials per task and method; selected on "
                      f"{first.get('objective')} of the validation carved from training)", [], {}, derived=columns)
        for record in members:
            label = record["method"] if len(tasks) == 1 else f"{record['task']} {record['method']}"
            table.rows[label] = {}
            params = record.get("params") or {}
            value = record.get("value")
            loss = "loss" in str(record.get("objective", ""))
            counts = record.get("trials") or {}
            table.derived_values[label] = {
                "selected": ", ".join(f"{_short(flag)} {_value_text(v)}" for flag, v in params.items()),
                "search score": "–" if value is None else
                f"{value:.4g}" if loss else f"{float(value) * scale:.{digits}f}",
                columns[2]: f"{counts.get('complete', 0)} / {counts.get('pruned', 0)} / {counts.get('fail', 0)} "
                            f"({record.get('budget', '?')})",
                "searched": "; ".join(f"{_short(flag)} {text}" for flag, text in (record.get("ranges") or {}).items()),
                "search fit time (s)": f"{record['search_fit_s']:.0f} ({record['trial_runs']} runs)",
            }
            for flag in record.get("at_edge") or []:
                table.notes.append(f"warning: {record['task']} / {record['method']} selected {_short(flag)} = "
                                   f"{_value_text(params.get(flag))} at an end of its range "
                                   f"{(record.get('ranges') or {}).get(flag, '')}: the best may lie beyond it; widen "
                                   "the range and search again")
        for task_folder in dict.fromkeys(r["task_folder"] for r in members):
            figure = Path(task_folder, "sensitivity.png")
            if figure.is_file():
                table.notes.append(f"sensitivity figure (search score against the searched value): {figure}")
        table.notes.append("search score: the selected trial's objective (its best validation, or its last with "
                           "rule: last) on the held-out part of the training data; the results table above "
                           "reports the final runs at the selected values, on the split the search never loaded")
        tables.append(table)
    return tables
