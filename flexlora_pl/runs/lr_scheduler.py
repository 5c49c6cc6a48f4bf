"""Linear warm-up then linear decay to zero: the schedule of the paper's GLUE and commonsense runs."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from flexlora_pl.core.checks import require_int

__all__ = ["LinearWarmupDecay", "WarmupSchedule", "wants_keyword"]


class WarmupSchedule(LambdaLR):
    """Linear warm-up from 0 to 1 over ``warmup_steps`` (or ``warmup_ratio · total_steps``), then
    :meth:`decay` of the progress through the rest of the run. Subclasses define :meth:`decay`.

    Args:
        optimizer: the wrapped optimizer.
        total_steps: total optimizer steps of the run (``None``: FlexLoRAModule passes the Trainer's).
        warmup_ratio: warm-up length as a fraction of ``total_steps``.
        warmup_steps: warm-up length in steps; overrides ``warmup_ratio``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        total_steps: int | None = None,
        warmup_ratio: float = 0.1,
        warmup_steps: int | None = None,
    ) -> None:
        name = type(self).__name__
        require_int("total_steps", total_steps, 1, owner=name,
                    hint="FlexLoRAModule fills it in from the Trainer; pass it when building the scheduler yourself")
        if not 0.0 <= warmup_ratio < 1.0:
            raise ValueError(f"{name}: warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if warmup_steps is not None and not 0 <= warmup_steps < total_steps:
            raise ValueError(f"{name}: warmup_steps must be in [0, total_steps={total_steps}), got {warmup_steps}")
        self.total_steps = total_steps
        self.warmup_steps = warmup_steps if warmup_steps is not None else int(warmup_ratio * total_steps)
        super().__init__(optimizer, self._factor)

    def decay(self, progress: float) -> float:
        """The LR factor after the warm-up, at ``progress`` ∈ [0, 1] of the remaining steps."""
        raise NotImplementedError

    def _factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        return self.decay(min(1.0, (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)))


class LinearWarmupDecay(WarmupSchedule):
    """LR factor rises linearly from 0 to 1 over the warm-up, then falls linearly to 0 at ``total_steps``.

    Step it every optimizer step. :class:`~flexlora_pl.FlexLoRAModule` fills in ``total_steps`` from
    the Trainer when a config leaves it out.

    Args:
        optimizer: the wrapped optimizer.
        total_steps: total optimizer steps of the run (``None``: FlexLoRAModule passes the Trainer's).
        warmup_ratio: warm-up length as a fraction of ``total_steps`` (paper: 0.1 on GLUE).
        warmup_steps: warm-up length in steps; overrides ``warmup_ratio`` (paper: 100 on commonsense).
    """

    def decay(self, progress: float) -> float:
        return 1.0 - progress


def wants_keyword(factory: Callable, name: str) -> bool:
    """Whether ``factory`` takes keyword ``name`` and was not given a value for it.

    Handles plain classes and functions and ``functools.partial`` objects, including the ones the CLI
    builds (``partial(call, instantiator, SchedulerClass, **init_args)``): the module passes
    ``total_steps`` to a scheduler factory that wants it.
    """
    keywords = getattr(factory, "keywords", None) or {}
    if name in keywords:
        return keywords[name] is None
    for target in (getattr(factory, "func", factory), *getattr(factory, "args", ())):
        if not callable(target):
            continue
        try:
            if name in inspect.signature(target).parameters:
                return True
        except (TypeError, ValueError):
            continue
    return False
