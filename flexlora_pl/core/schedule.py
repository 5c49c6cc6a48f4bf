"""When allocation events happen and how many ranks move at each (paper §4.2, eq. 4).

An event runs after optimizer step ``t`` (``trainer.global_step``) when
``t_warmup < t < T − t_final`` and ``(t − t_warmup) % ΔT == 0``. Its budget is::

    b(t) = round(b0 · (1 − (t − t_warmup) / (T − t_final))³)      clamped to [0, b0]

(``cubic``), or ``b0`` (``constant``). ``round`` rounds halves up.
"""

from __future__ import annotations

import math

__all__ = ["BUDGET_SCHEDULES", "budget_at", "event_steps", "is_event_step"]

BUDGET_SCHEDULES = ("cubic", "constant")


def is_event_step(step: int, t_warmup: int, t_final: int, delta_t: int, total_steps: int) -> bool:
    """Whether an allocation event runs after optimizer step ``step``."""
    return t_warmup < step < total_steps - t_final and (step - t_warmup) % delta_t == 0


def event_steps(t_warmup: int, t_final: int, delta_t: int, total_steps: int) -> range:
    """All steps at which an event runs, in order (empty when the schedule can never fire)."""
    return range(t_warmup + delta_t, max(total_steps - t_final, t_warmup + delta_t), delta_t)


def budget_at(
    step: int, b0: int, t_warmup: int, t_final: int, total_steps: int, schedule: str = "cubic"
) -> int:
    """The number of modules that prune (and expand) at ``step``: paper eq. 4, clamped to [0, b0]."""
    if schedule == "constant":
        return b0
    if schedule != "cubic":
        raise ValueError(f"unknown budget schedule {schedule!r}; choose one of {list(BUDGET_SCHEDULES)}")
    horizon = total_steps - t_final
    if horizon <= 0:
        return 0
    frac = 1.0 - (step - t_warmup) / horizon
    value = math.floor(b0 * frac**3 + 0.5)
    return min(max(value, 0), b0)
