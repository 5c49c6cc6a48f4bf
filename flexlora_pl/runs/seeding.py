"""One seed drives a run: every seeded component falls back to the run's ``seed_everything``.

LightningCLI calls ``seed_everything`` before it builds the model, the data and the callbacks, and
Lightning records the seed in the ``PL_GLOBAL_SEED`` environment variable. Components whose own
``seed`` argument is left at ``None`` (data order, adapter initialisation, new directions at
allocation events) read it from there, so ``--seed_everything 3`` alone changes all of them; an
explicit ``seed`` stays an override.
"""

from __future__ import annotations

import os

from flexlora_pl.core.checks import require_int

__all__ = ["resolve_seed"]

#: the seed used when neither an explicit seed nor ``seed_everything`` was given
DEFAULT_SEED = 0


def resolve_seed(seed: int | None) -> int:
    """``seed`` if given, else the run's global seed (``seed_everything``), else :data:`DEFAULT_SEED`.

    Args:
        seed: an explicit seed, or ``None`` to follow ``seed_everything``.
    """
    if seed is not None:
        return require_int("seed", seed, 0, hint="or None: follow seed_everything")
    env = os.environ.get("PL_GLOBAL_SEED")
    return int(env) if env not in (None, "") else DEFAULT_SEED
