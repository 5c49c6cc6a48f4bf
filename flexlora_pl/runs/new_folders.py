"""The output folders a command creates, so that a command failing before its first step leaves none behind."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from lightning.pytorch import Trainer

__all__ = ["new_output_dirs"]


def new_output_dirs(trainer: Trainer) -> Callable[[], list[str]]:
    """Note which of the run's output directories exist now; the returned call lists those created since.

    Candidates are the loggers' log directories (the version is fixed when first read) and explicit
    checkpoint ``dirpath``s; a checkpoint callback without one writes inside the logger's directory.

    Args:
        trainer: the command's Trainer, before its subcommand runs.
    """
    candidates = []
    for logger in trainer.loggers:
        log_dir, save_dir = getattr(logger, "log_dir", None), getattr(logger, "save_dir", None)
        if log_dir and save_dir:  # the run folder and the parents it brings (<save_dir>/<name>), outermost first
            parents = [p for p in Path(log_dir).parents if p == Path(save_dir) or Path(save_dir) in p.parents]
            candidates += [str(p) for p in reversed(parents)]
        candidates.append(log_dir)
    candidates += [getattr(cb, "dirpath", None) for cb in trainer.checkpoint_callbacks]
    fresh = [path for path in dict.fromkeys(candidates) if path and not os.path.exists(path)]
    # only the outermost new folder of each chain needs removing
    roots = [p for p in fresh if not any(p != q and Path(q) in Path(p).parents for q in fresh)]
    return lambda: [path for path in roots if os.path.exists(path)]
