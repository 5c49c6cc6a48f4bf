"""The sensitivity figure of a tuned comparison: each method's search score against a searched value, per task.

For one task, every method's ``selected.json`` (written by the search's selection, beside its seed folders) holds
the complete trials of its study as ``curve``: ``[[values in the order of params], score]``. The figure draws, for
one searched parameter (the first by default, in practice the learning rate), one line per method through its
trials' scores, the value axis on a log scale where the range was searched on one; where a method searched more
than one parameter, the line at each value is the best score over the others (what tuning those would reach).
Each method's selected trial is ringed, so a reader sees at once whether it lies inside the range or at an end,
and how flat the curve is around it: a method whose curve is narrow is easy to mis-tune at a shared rate.

Drawn with matplotlib's Agg canvas (no ``pyplot``, no display), into a PNG a paper can use.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["SELECTED_FILENAME", "read_selections", "sensitivity_figure", "write_sensitivity"]

SELECTED_FILENAME = "selected.json"


def read_selections(task_folder: str | Path) -> dict[str, dict[str, Any]]:
    """Method name → its ``selected.json`` under ``<sweep>/<task>/<method>/``, in name order."""
    folder = Path(task_folder)
    return {path.parent.name: json.loads(path.read_text())
            for path in sorted(folder.glob(f"*/{SELECTED_FILENAME}"))}


def _line(record: Mapping[str, Any], index: int, maximize: bool) -> list[tuple[Any, float]]:
    """(value of parameter ``index``, best score over the other parameters) for each value tried, in order."""
    best: dict[Any, float] = {}
    for values, score in record.get("curve") or []:
        if score is None:
            continue
        value = values[index]
        if value not in best or (score > best[value] if maximize else score < best[value]):
            best[value] = float(score)
    return sorted(best.items(), key=lambda item: item[0])


def sensitivity_figure(selections: Mapping[str, Mapping[str, Any]], task: str, param: str | None = None,
                       scale: float = 100.0, dpi: int = 120) -> Figure:
    """Each method's search score against ``param`` (a flag; default: the first searched) for ``task``.

    Args:
        selections: method → its ``selected.json`` content (:func:`read_selections`).
        task: the task's name, for the title.
        param: the searched flag on the horizontal axis; every method must have searched it.
        scale: multiply scores by this (100: percentages) unless the objective is a loss.
        dpi: the figure's resolution.

    Raises:
        ValueError: no selection, or a method that did not search ``param`` (the message lists what it did).
    """
    if not selections:
        raise ValueError(f"task {task}: no selected.json to draw (run the search stage of the tuned sweep first)")
    first = next(iter(selections.values()))
    flags = list(first.get("params") or {})
    param = param or (flags[0] if flags else None)
    objective = str(first.get("objective", "val/score"))
    maximize = first.get("direction", "maximize") == "maximize"
    factor = 1.0 if "loss" in objective else scale
    figure = Figure(figsize=(5.2, 3.4), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    log = False
    for method, record in selections.items():
        names = list(record.get("params") or {})
        if param not in names:
            raise ValueError(f"task {task}: method {method} did not search {param} (it searched "
                             f"{', '.join(names) or 'nothing'}); name a parameter every method searched")
        log = log or "(log" in str((record.get("ranges") or {}).get(param, ""))
        points = _line(record, names.index(param), maximize)
        numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x, _ in points)
        xs = [x for x, _ in points] if numeric else list(range(len(points)))
        (line,) = axes.plot(xs, [y * factor for _, y in points], marker="o", markersize=3.5, linewidth=1.4,
                            label=f"{method} ({len(record.get('curve') or [])} trials)")
        chosen = record["params"][param]
        if record.get("value") is not None and (not numeric or isinstance(chosen, (int, float))):
            x = chosen if numeric else [p for p, _ in points].index(chosen)
            axes.plot([x], [float(record["value"]) * factor], marker="o", markersize=9, markerfacecolor="none",
                      markeredgecolor=line.get_color(), markeredgewidth=1.6)
        if not numeric:
            axes.set_xticks(xs, [str(x) for x, _ in points])
    if log:
        axes.set_xscale("log")
    short = param.rsplit(".", 1)[-1] if param else "value"
    axes.set_xlabel(f"{short} (searched: {first.get('ranges', {}).get(param, '')})", fontsize=8)
    axes.set_ylabel(f"{objective} on the search's validation" + ("" if factor == 1.0 else " (%)"), fontsize=8)
    axes.set_title(f"{task}: search score against {short} (ringed: selected)", fontsize=9)
    axes.tick_params(labelsize=7)
    axes.grid(alpha=0.3, linewidth=0.5)
    axes.legend(fontsize=7, frameon=False)
    figure.tight_layout()
    return figure


def write_sensitivity(task_folder: str | Path, out: str | Path | None = None, param: str | None = None,
                      methods: Sequence[str] | None = None) -> Path:
    """Draw ``<task_folder>``'s sensitivity figure into ``out`` (default: ``<task_folder>/sensitivity.png``)."""
    folder = Path(task_folder)
    selections = read_selections(folder)
    if methods is not None:
        selections = {m: selections[m] for m in methods if m in selections}
    target = Path(out) if out is not None else folder / "sensitivity.png"
    figure = sensitivity_figure(selections, folder.name, param)
    target.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(target, bbox_inches="tight")
    return target
