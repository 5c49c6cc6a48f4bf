"""``last.ckpt`` holds the end of training even when the monitored checkpoint stops improving.

Lightning 2.6 rewrites ``last.ckpt`` of a ``ModelCheckpoint(monitor=…, save_last=True)`` only at a step where it also
saves a top-k checkpoint. At learning rate 0 the validation score never changes, so only the first validation saves:
without ``FinalCheckpoint`` (which the ``flexlora`` command attaches to every fit) ``last.ckpt`` would hold step 6 of
18, and ``--ckpt_path last`` would evaluate that.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from conftest import tiny_run_folder

from flexlora_pl.cli import build_cli

CHANGES = {"trainer": {"max_epochs": 3, "callbacks": [
    {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
     "init_args": {"monitor": "val/score", "mode": "max", "filename": "best-{step}", "save_last": True}}]},
    "model": {"init_args": {"optimizer": {"init_args": {"lr": 0.0}}}}}


def test_last_ckpt_holds_the_final_step_when_the_monitor_stops_improving(tmp_path, tiny_glue_root, caplog):
    root = tiny_run_folder(tmp_path, tiny_glue_root, CHANGES)
    with caplog.at_level(logging.INFO):
        cli = build_cli(["fit", "--config", str(root / "run.yaml")])
    steps = cli.trainer.global_step
    folder = Path(cli.trainer.log_dir) / "checkpoints"
    best = sorted(folder.glob("best-*.ckpt"))
    assert steps == 18 and [p.name for p in best] == ["best-step=6.ckpt"]  # the score never improved after epoch 0
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == steps
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("FinalCheckpoint:")]
    assert len(said) == 1 and f"optimizer step {steps}" in said[0]
    tested = build_cli(["validate", "--config", str(root / "run.yaml"), "--ckpt_path", "last"])
    assert torch.load(tested.trainer.ckpt_path, weights_only=False)["global_step"] == steps


def test_no_extra_checkpoint_when_the_final_step_was_saved(tmp_path, tiny_glue_root, caplog):
    changes = {**CHANGES, "model": {"init_args": {"optimizer": {"init_args": {"lr": 0.01}}}}}
    changes["trainer"] = {**CHANGES["trainer"], "callbacks": [
        {"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_last": True}}]}
    root = tiny_run_folder(tmp_path, tiny_glue_root, changes)  # no monitor: every validation saves, last.ckpt too
    with caplog.at_level(logging.INFO):
        cli = build_cli(["fit", "--config", str(root / "run.yaml")])
    folder = Path(cli.trainer.log_dir) / "checkpoints"
    assert torch.load(folder / "last.ckpt", weights_only=False)["global_step"] == cli.trainer.global_step
    assert not [r for r in caplog.records if r.getMessage().startswith("FinalCheckpoint:")]
