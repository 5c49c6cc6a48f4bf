"""What the runs cost and what their allocation events did: the cost table (fit wall time, peak memory,
trainable / active / allocated parameters) and the allocation table (events, directions moved, flip-flops,
dead ends, first updates of new directions), one row per sweep and method, the mean over its runs."""

from __future__ import annotations

from flexlora_pl.experiments.collection import RunResult
from flexlora_pl.experiments.tables import Cell, Table

__all__ = ["allocation_table", "cost_table"]


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
    directions moved, flip-flops (directions pruned at the event after the one that added them), dead ends (modules
    pruned to rank 1 that no later event expanded: ``fit.allocation.dead_ends``) and the first update of a new
    direction relative to its module's settled ones; ``None`` when no run has events."""
    columns = ["runs", "events", "directions moved", "flip-flops", "dead ends", "first-update ratio",
               "final total rank"]
    keys = {"events": "events", "directions moved": "moved", "flip-flops": "flip_flops", "dead ends": "dead_ends",
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
    table.notes.append("dead ends: modules an event pruned to rank 1 and no later event expanded (a single "
                       "direction's entropy is 0, the lowest score, so it stays there while any other module "
                       "scores above 0); which ones: metrics.json fit.allocation.dead_end_modules")
    return table


def _mean_text(values: list[float], fmt: str) -> str:
    return fmt.format(sum(values) / len(values)) if values else "–"
