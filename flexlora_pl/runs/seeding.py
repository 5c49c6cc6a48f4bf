"""One seed drives a run: every seeded component falls back to the run's ``seed_everything``.

LightningCLI calls ``seed_everything`` before it builds the model, the data and the callbacks, and
Lightning records the seed in the ``PL_GLOBAL_SEED`` environment variable. Components whose own
``seed`` argument is left at ``None`` (data order, adapter initialisation, new directions at
allocation events) read it from there, so ``--seed_everything 3`` alone changes all of them; an
explicit ``seed`` stays an override.
"""

from __future__ import annotations

import os

__all__ = ["resolve_seed"]

#: the seed used when neither an explicit seed nor ``seed_everything`` was given
DEFAULT_SEED = 0


def resolve_seed(seed: int | None) -> int:
    """``seed`` if given, else the run's global seed (``seed_everything``), else :data:`DEFAULT_SEED`.

    Args:
        seed: an explicit seed, or ``None`` to follow ``seed_everything``.
    """
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer or None (follow seed_everything), got {seed!r}")
        return seed
    env = os.environ.get("PL_GLOBAL_SEED")
    return int(env) if env not in (None, "") else DEFAULT_SEED
