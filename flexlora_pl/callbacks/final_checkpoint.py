"""``FinalCheckpoint``: ``last.ckpt`` holds the end of training, whatever the monitored checkpoint did.

Since Lightning 2.6, ``ModelCheckpoint(monitor=…, save_last=True)`` rewrites ``last.ckpt`` only at a step where it
also saves a top-k checkpoint. When the last validations do not improve the monitored metric, ``last.ckpt`` stays
at the best step and no file holds the state training ended in; ``--ckpt_path last`` (a sweep's ``test: last``, the
commonsense and VTAB protocols that test the model at the end of training) would then test an earlier model.

At the end of a fit that has trained, this callback looks at every ``ModelCheckpoint`` with ``save_last``: if none
of them wrote the final optimizer step, it writes that callback's ``last.ckpt`` (every process takes part, as in any
checkpoint save; rank zero writes) and says so once. The ``flexlora`` command attaches it to every fit.
"""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

__all__ = ["FinalCheckpoint"]


class FinalCheckpoint(Callback):
    """Write ``last.ckpt`` at the end of a fit when no ``ModelCheckpoint(save_last=True)`` wrote the final step."""

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        keepers = [cb for cb in trainer.checkpoint_callbacks
                   if isinstance(cb, ModelCheckpoint) and cb.save_last and cb.dirpath is not None]
        if trainer.global_step == 0 or not keepers or trainer.interrupted:
            return  # nothing trained, no last.ckpt wanted, or the interrupt checkpoint holds the stop
        if any(getattr(cb, "_last_global_step_saved", None) == trainer.global_step for cb in keepers):
            return  # a checkpoint (and with it last.ckpt) was written at the final step
        keeper = keepers[0]
        path = keeper.format_checkpoint_name({}, keeper.CHECKPOINT_NAME_LAST)
        trainer.save_checkpoint(path)
        keeper.last_model_path = path
        keeper._last_global_step_saved = trainer.global_step  # what the callback's own save would record
        rank_zero_info(f"FinalCheckpoint: {path} holds the end of training (optimizer step {trainer.global_step}); "
                       "the monitored checkpoint had not written this step")
