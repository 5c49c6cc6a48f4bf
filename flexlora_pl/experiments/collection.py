"""Reading run folders: each ``<sweep>/<task>/<method>/seed<k>`` folder under a results folder as a
:class:`RunResult` (its ``metrics.json`` and the classes its saved config names), and the statuses a run can have.

Runs are found by their ``metrics.json`` under a folder laid out as ``<sweep>/<task>/<method>/seed<k>`` (what
``flexlora-sweep`` writes); a sweep file's runs with no folder are added as ``missing`` (:func:`add_expected`).
How a run is scored is :mod:`flexlora_pl.experiments.selection`'s job.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from flexlora_pl.callbacks.run_record import METRICS_FILENAME
from flexlora_pl.experiments.sweep_file import Sweep

__all__ = ["FAILED", "MISSING", "NO_METRIC", "NO_TEST", "OK", "OTHER_MONITOR", "STATUSES", "UNFINISHED", "RunResult",
           "add_expected", "load_runs"]

_SEED = re.compile(r"^seed(\d+)$")
OK, FAILED, UNFINISHED, NO_METRIC, MISSING = "ok", "failed", "unfinished", "no metric", "missing"
NO_TEST, OTHER_MONITOR = "no test yet", "other monitor"
STATUSES = (FAILED, UNFINISHED, NO_TEST, OTHER_MONITOR, NO_METRIC, MISSING)
"""The reasons a run gives no value, in the order a cell lists them."""

_CONFIG_FILES = ("config.yaml", "config.fit-resume.yaml", "config.test.yaml")  # what the flexlora command saves


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
    # a tuned sweep's search trials (<sweep>/<task>/<method>/search/trial<k>) select; they are not reported
    folders = {f for f in folders if f.parent.name != "search"}
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


def add_expected(runs: list[RunResult], sweep: Sweep, root: str | Path) -> list[RunResult]:
    """Add the sweep file's runs that have no folder under ``root`` as ``missing`` (so whole tasks or methods that
    never ran are shown too)."""
    found = {(r.sweep, r.task, r.method, r.seed) for r in runs}
    extra = [RunResult(run.sweep, run.task, run.method, run.seed, Path(root) / run.task / run.method / run.version,
                       {}, status=MISSING)
             for run in sweep.runs() if (run.sweep, run.task, run.method, run.seed) not in found]
    return [*runs, *extra]
