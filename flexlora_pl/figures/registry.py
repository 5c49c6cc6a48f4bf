"""The figures a run can be drawn as, by name: ``FIGURES`` and the ``register_figure`` decorator.

A figure is a function of a run's rank record (the content of ``rank_pattern.json``: ``rank_pattern``,
``max_rank``, ``events``) that returns a matplotlib ``Figure``. Drawing is kept apart from the callbacks that log
figures, so the same figure reaches any logger, a notebook or a script (``docs/figures/draw.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["FIGURES", "register_figure"]

FigureFn = Callable[..., Any]

FIGURES: dict[str, FigureFn] = {}
"""Figure name → ``draw(record, dpi=100) -> matplotlib.figure.Figure``."""


def register_figure(name: str) -> Callable[[FigureFn], FigureFn]:
    """Decorator: make a figure of a run's rank record available as ``FIGURES[name]``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"a figure needs a non-empty name, got {name!r}")

    def add(fn: FigureFn) -> FigureFn:
        if name in FIGURES and FIGURES[name] is not fn:
            raise ValueError(f"figure name {name!r} is taken by {FIGURES[name].__qualname__}")
        FIGURES[name] = fn
        return fn

    return add
