"""The non-finite loss guard: remember the first optimizer step whose loss was NaN or inf, without a host sync.

The step lives in a device tensor (``-1``: none yet) that is written every step with ``torch.where`` and read
only where the host syncs anyway (the logging cadence, allocation events, checkpoint writes), so a diverged
run stops before it can overwrite a good checkpoint and a healthy run pays no sync per step.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["nonfinite_error", "record_nonfinite"]


def record_nonfinite(first: torch.Tensor, loss: torch.Tensor, step: int) -> None:
    """Write ``step`` into ``first`` (a 0-d integer tensor) if ``loss`` is not finite and none was recorded yet."""
    hit = ~torch.isfinite(loss.detach()) & (first < 0)
    first.copy_(torch.where(hit, step, first))


def nonfinite_error(step: int, where: str, trainer: Any) -> FloatingPointError:
    """The error that stops a run whose loss went non-finite at ``step``, naming the last good checkpoint."""
    good = [cb.last_model_path or cb.best_model_path for cb in getattr(trainer, "checkpoint_callbacks", [])
            if getattr(cb, "last_model_path", None) or getattr(cb, "best_model_path", None)]
    return FloatingPointError(
        f"the training loss became non-finite (NaN or inf) at optimizer step {step} (noticed {where}); "
        f"training stopped before writing another checkpoint. Last good checkpoint: "
        f"{good[0] if good else 'none written yet'}. Lower the learning rate, check the data, or "
        "use gradient clipping (trainer.gradient_clip_val)."
    )
