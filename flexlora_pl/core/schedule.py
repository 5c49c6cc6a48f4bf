"""When allocation events happen and how many ranks move at each (paper §4.2, eq. 4).

An event runs after optimizer step ``t`` (``trainer.global_step``) when
``t_warmup < t < T − t_final`` and ``(t − t_warmup) % ΔT == 0``. Its budget is::

    b(t) = round(b0 · (1 − (t − t_warmup) / (T − t_final))³)      clamped to [0, b0]

(``cubic``), or ``b0`` (``constant``). ``round`` rounds halves up.

``formula="reference"`` reproduces the cubic of the authors' code (``RankAllocator._b_scheduler``)
instead, for measuring what the difference costs::

    p = clamp((t − t_warmup) / (T − t_final − t_warmup), 0, 1)      b(t) = round(b0 · (1 − p³))

It normalises by the length of the reallocation window and cubes the progress rather than the
remaining fraction, so b stays near b0 for most of the window and falls to 0 only at its end; Python's
``round`` rounds halves to even. (The authors' runs switch this schedule off and keep b = b0.)
"""

from __future__ import annotations

import math

__all__ = ["BUDGET_FORMULAS", "BUDGET_SCHEDULES", "budget_at", "event_steps", "is_event_step"]

BUDGET_SCHEDULES = ("cubic", "constant")
BUDGET_FORMULAS = ("paper", "reference")


def is_event_step(step: int, t_warmup: int, t_final: int, delta_t: int, total_steps: int) -> bool:
    """Whether an allocation event runs after optimizer step ``step``."""
    return t_warmup < step < total_steps - t_final and (step - t_warmup) % delta_t == 0


def event_steps(t_warmup: int, t_final: int, delta_t: int, total_steps: int) -> range:
    """All steps at which an event runs, in order (empty when the schedule can never fire)."""
    return range(t_warmup + delta_t, max(total_steps - t_final, t_warmup + delta_t), delta_t)


def budget_at(
    step: int,
    b0: int,
    t_warmup: int,
    t_final: int,
    total_steps: int,
    schedule: str = "cubic",
    formula: str = "paper",
) -> int:
    """The number of modules that prune (and expand) at ``step``, clamped to [0, b0].

    ``schedule="cubic"`` with ``formula="paper"`` is paper eq. 4; ``formula="reference"`` is the
    authors' code's cubic (see the module docstring). ``schedule="constant"`` is ``b0`` either way.
    """
    if formula not in BUDGET_FORMULAS:
        raise ValueError(f"unknown budget formula {formula!r}; choose one of {list(BUDGET_FORMULAS)}")
    if schedule == "constant":
        return b0
    if schedule != "cubic":
        raise ValueError(f"unknown budget schedule {schedule!r}; choose one of {list(BUDGET_SCHEDULES)}")
    if formula == "reference":
        return _reference_budget(step, b0, t_warmup, t_final, total_steps)
    horizon = total_steps - t_final
    if horizon <= 0:
        return 0
    frac = 1.0 - (step - t_warmup) / horizon
    value = math.floor(b0 * frac**3 + 0.5)
    return min(max(value, 0), b0)


def _reference_budget(step: int, b0: int, t_warmup: int, t_final: int, total_steps: int) -> int:
    """``round(b0 · (1 − p³))`` with ``p`` the clamped progress through ``(t_warmup, T − t_final)``."""
    window = total_steps - t_final - t_warmup
    if window <= 0:  # no event can fire; the authors' code refuses such a run outright
        return 0
    progress = min(max((step - t_warmup) / window, 0.0), 1.0)
    value = round(b0 + (0 - b0) * progress**3)  # the authors' expression, Python's half-to-even round
    return min(max(value, 0), b0)
