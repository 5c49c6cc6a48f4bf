"""The tiny sweep that the sweep and results tests share: two tasks (the tiny run at two learning rates) × FlexLoRA
and LoRA × two seeds, run once per test session through ``flexlora-sweep``, then re-run the ways a user would
(``--print``, a resume after an interrupted run, a failing task, a test stage, a finished grid).
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

from tiny_run import tiny_run_config

from flexlora_pl.cli.sweep import main as sweep_main

REPO = Path(__file__).resolve().parents[2]


def task_changes(lr: float) -> dict:
    """A sweep task: the tiny run (tests/helpers/tiny_run.yaml) at learning rate ``lr``, seed 1, logging to
    ``runs`` under the run's folder, checkpoints for ``--ckpt_path last``/``best``, events every 2 steps and a
    test split."""
    return {
        "seed_everything": 1,
        "trainer": {"logger": {"init_args": {"save_dir": "runs"}},
                    "callbacks": [
                        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                         "init_args": {"monitor": "val/score", "mode": "max", "filename": "best-{epoch}-{step}",
                                       "save_last": True}},
                        {"class_path": "flexlora_pl.InterruptCheckpoint"}]},
        "reallocation": {"delta_t": 2},
        "model": {"init_args": {"optimizer": {"init_args": {"lr": lr}}}},
        "data": {"init_args": {"data_files": {"test": "{root}/dev.csv"}}},
    }
# 48 training rows in batches of 8: 6 optimizer steps per epoch.

_CACHE: dict[str, dict] = {}


def invoke_sweep(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = sweep_main(list(argv))
    return code, out.getvalue()


def run_tiny_sweep(tmp_path_factory, tiny_glue_root) -> dict:
    """Run the tiny grid once per test session (test_sweep.py and test_results.py share it); note what each call
    said."""
    if "sweep" in _CACHE:
        return _CACHE["sweep"]
    root = tmp_path_factory.mktemp("sweep")
    (root / "a.yaml").write_text(tiny_run_config(tiny_glue_root, changes=task_changes(0.01)))
    (root / "b.yaml").write_text(tiny_run_config(tiny_glue_root, changes=task_changes(0.005)))
    (root / "broken.yaml").write_text(f"data:\n  init_args:\n    data_files: {{train: {root}/none.csv}}\n")
    lora = REPO / "configs" / "methods" / "lora.yaml"
    grid = root / "grid.yaml"
    grid.write_text(f"name: grid\nsave_dir: {root}/runs\nseeds: [0, 1]\n"
                    f"tasks:\n  a: {root}/a.yaml\n  b: {root}/b.yaml\n"
                    f"methods:\n  flexlora: []\n  lora: {lora}\n")
    # the same runs, with a task that fails first and a test stage for task b
    grid2 = root / "grid2.yaml"
    grid2.write_text(f"name: grid\nsave_dir: {root}/runs\nseeds: [0, 1]\n"
                     f"tasks:\n  broken: [{root}/a.yaml, {root}/broken.yaml]\n  a: {root}/a.yaml\n"
                     f"  b: {{configs: [{root}/b.yaml], test: last}}\n"
                     f"methods:\n  flexlora: []\n  lora: {lora}\n")
    state = {"root": root, "runs": root / "runs" / "grid", "grid": grid, "grid2": grid2}
    state["first"] = invoke_sweep(str(grid))
    # a.flexlora.seed1 as a run stopped by a signal leaves it: metrics.json says interrupted, checkpoints remain
    interrupted = state["runs"] / "a" / "flexlora" / "seed1"
    record = json.loads((interrupted / "metrics.json").read_text())
    record["fit"]["status"] = "interrupted"
    (interrupted / "metrics.json").write_text(json.dumps(record))
    state["print"] = invoke_sweep(str(grid2), "--print")
    # the broken task fails first, then a.flexlora.seed1 resumes (to 2 epochs) and b.flexlora.seed1 is tested
    state["second"] = invoke_sweep(str(grid2), "--methods", "flexlora", "--seeds", "1", "--",
                                   "--trainer.max_epochs", "2")
    state["third"] = invoke_sweep(str(grid), "--workers", "2")  # a finished grid, through the parallel runner
    _CACHE["sweep"] = state
    return state
