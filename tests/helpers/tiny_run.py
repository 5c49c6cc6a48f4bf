"""The tests' one tiny-run config: ``tiny_run.yaml`` beside this file, plus what a test changes.

``tiny_run_config(root, out, changes)`` reads the file, merges ``changes`` into it, puts ``root`` (the folder
with ``model/``, ``train.csv`` and ``dev.csv``) and ``out`` (where the run writes) in place of ``{root}`` and
``{out}`` in every string (the file's and the changes') and returns the YAML text to write. ``changes`` is
nested like the config: a mapping is merged key by key, any other value (a list of callbacks included) replaces
what the file has, and :data:`DROP` removes the key, so a test keeps a setting at its library default.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

BASE = Path(__file__).with_name("tiny_run.yaml")
DROP = object()  # a change that removes its key

# What the run-folder tests (tests/runs/test_runs.py, tests/methods/test_methods.py) change in the tiny run:
# two epochs, the shipped configs' checkpoints and reports, events every 2 steps, adapter dropout, a test split.
RUN_CHANGES = {
    "trainer": {"max_epochs": 2,
                "callbacks": [
                    {"class_path": "flexlora_pl.RankHeatmap"},
                    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                     "init_args": {"monitor": "val/score", "mode": "max", "filename": "best-{epoch}-{step}",
                                   "save_last": True}},
                    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                     "init_args": {"every_n_train_steps": 4, "filename": "periodic-{step}"}},
                    {"class_path": "flexlora_pl.InterruptCheckpoint"},
                    {"class_path": "flexlora_pl.FinalMetricsReport"}]},
    "reallocation": {"t_warmup": 2, "delta_t": 2},
    "model": {"init_args": {"method": {"init_args": {"dropout": 0.1}}}},
    "data": {"init_args": {"data_files": {"test": "{root}/dev.csv"}}},
}


def merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in changes.items():
        if value is DROP:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def tiny_run_dict(root: str | Path, out: str | Path | None = None,
                  changes: dict[str, Any] | None = None) -> dict[str, Any]:
    """The tiny run's config as a dict (``out`` defaults to ``root``)."""
    places = {"{root}": str(root), "{out}": str(out if out is not None else root)}
    return _filled(merged(yaml.safe_load(BASE.read_text()), changes or {}), places)


def _filled(value: Any, places: dict[str, str]) -> Any:
    if isinstance(value, str):
        for marker, path in places.items():
            value = value.replace(marker, path)
        return value
    if isinstance(value, dict):
        return {key: _filled(item, places) for key, item in value.items()}
    if isinstance(value, list):
        return [_filled(item, places) for item in value]
    return value


def tiny_run_config(root: str | Path, out: str | Path | None = None, changes: dict[str, Any] | None = None) -> str:
    """The tiny run's config as YAML text, ready to write as a ``--config`` file, laid out as the shipped configs
    are (list items indented under their key), so a test can edit it as text."""
    return yaml.dump(tiny_run_dict(root, out, changes), Dumper=_IndentedLists, sort_keys=False)


class _IndentedLists(yaml.SafeDumper):
    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)
