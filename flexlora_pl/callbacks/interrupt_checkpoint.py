"""``InterruptCheckpoint``: a resumable checkpoint when a run that has trained is stopped or crashes.

Lightning's ``OnExceptionCheckpoint`` has two properties that spoil experiments: its presence makes
``Trainer.fit(ckpt_path=None)`` resume from ``"last"`` (so a repeated command silently continues an
old run), and it writes a full checkpoint on *any* exception, including a bad config found before the
first step. This callback writes ``<run folder>/checkpoints/on_exception.ckpt`` only when the run has
trained at least one optimizer step since it started, and never changes what ``ckpt_path=None`` means.

SIGTERM (and, through the ``flexlora`` command, the first Ctrl-C) stops the run after the next batch that
steps the optimizer: a stop that arrives inside a gradient-accumulation window is held until the window's
last micro-batch (or the epoch's last batch) has been trained and stepped, so the checkpoint never drops
accumulated gradients and a resume with ``--ckpt_path last`` is exact (see
:func:`defer_stop_to_optimizer_step`).
"""

from __future__ import annotations

import os
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from typing_extensions import override

from flexlora_pl.runs.interrupts import defer_stop_to_optimizer_step

__all__ = ["InterruptCheckpoint", "defer_stop_to_optimizer_step"]


class InterruptCheckpoint(Checkpoint):
    """Write a resumable checkpoint when a run that has trained is interrupted (SIGTERM, Ctrl-C, a crash).

    Its ``setup`` calls :func:`defer_stop_to_optimizer_step`, so with gradient accumulation a SIGTERM stops
    the run after the current window's optimizer step, never inside the window.

    Args:
        dirpath: folder of the checkpoint; ``None`` (recommended) uses the run folder's ``checkpoints/``,
            next to the ``ModelCheckpoint`` files.
        filename: file name without the ``.ckpt`` extension.
    """

    FILE_EXTENSION = ".ckpt"

    def __init__(self, dirpath: str | None = None, filename: str = "on_exception") -> None:
        super().__init__()
        if not filename:
            raise ValueError("InterruptCheckpoint: filename must not be empty")
        self.dirpath = dirpath
        self.filename = filename
        self._start_step: int | None = None

    @property
    def ckpt_path(self) -> str:
        if self.dirpath is None:
            raise RuntimeError("InterruptCheckpoint.ckpt_path is known once fitting has started")
        return os.path.join(self.dirpath, self.filename + self.FILE_EXTENSION)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        defer_stop_to_optimizer_step(trainer)
        if self.dirpath is None:
            root = trainer.log_dir if trainer.loggers else trainer.default_root_dir
            self.dirpath = os.path.join(root or trainer.default_root_dir, "checkpoints")

    @override
    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start_step = trainer.global_step  # after a resume: the restored step

    def has_trained(self, trainer: Trainer) -> bool:
        """Whether this run took at least one optimizer step since it started (or resumed)."""
        return self._start_step is not None and trainer.global_step > self._start_step

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if not self.has_trained(trainer):
            return  # a failed start: nothing new to keep
        try:
            trainer.save_checkpoint(self.ckpt_path)
        except Exception as err:  # e.g. the module refuses to save a diverged state: keep the first error
            rank_zero_warn(f"InterruptCheckpoint: no checkpoint written ({type(err).__name__}: {err})")
            return
        rank_zero_info(f"Interrupted at optimizer step {trainer.global_step}: checkpoint written to {self.ckpt_path}")

    @override
    def state_dict(self) -> dict[str, Any]:
        return {}
