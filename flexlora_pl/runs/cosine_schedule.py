"""Linear warm-up then cosine decay: the schedule of the VTAB-1k literature (10 warm-up epochs of 100)."""

from __future__ import annotations

import math

from torch.optim import Optimizer

from flexlora_pl.runs.lr_scheduler import WarmupSchedule

__all__ = ["WarmupCosine"]


class WarmupCosine(WarmupSchedule):
    """LR factor rises linearly from 0 to 1 over the warm-up, then follows a half cosine down to ``min_factor``
    at ``total_steps``.

    Step it every optimizer step. :class:`~flexlora_pl.FlexLoRAModule` fills in ``total_steps`` from the
    Trainer when a config leaves it out, so a warm-up given as a ratio follows the run's length: 0.1 of a
    100-epoch run is the literature's 10 warm-up epochs.

    Args:
        optimizer: the wrapped optimizer.
        total_steps: total optimizer steps of the run (``None``: FlexLoRAModule passes the Trainer's).
        warmup_ratio: warm-up length as a fraction of ``total_steps``.
        warmup_steps: warm-up length in steps; overrides ``warmup_ratio``.
        min_factor: the LR factor at the end of the run (0: decay to zero).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        warmup_ratio: float = 0.1,
        warmup_steps: int | None = None,
        min_factor: float = 0.0,
    ) -> None:
        if not 0.0 <= min_factor <= 1.0:
            raise ValueError(f"WarmupCosine: min_factor must be in [0, 1], got {min_factor}")
        self.min_factor = min_factor
        super().__init__(optimizer, total_steps, warmup_ratio, warmup_steps)

    def decay(self, progress: float) -> float:
        return self.min_factor + (1.0 - self.min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))
