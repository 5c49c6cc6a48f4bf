"""The authors' code's optimizer rebuild after an allocation event (``reallocation.rebuild_optimizer``).

Kept only to measure what it costs (``docs/differences.md``, section 4): every moment is lost at each event and
the learning rate stays at its base value from the first event on.
"""

from __future__ import annotations

import inspect

from lightning.pytorch import Trainer

__all__ = ["rebuild_optimizer"]


def rebuild_optimizer(trainer: Trainer) -> None:
    """Replace the optimizer as the authors' code does after an event (``rebuild_optimizer``).

    Their patched HF Trainer builds ``type(opt)(model.parameters(), **opt.defaults)`` and tries to keep
    the state of unchanged parameters, but compares ``id(param)`` with the integer keys of
    ``state_dict()`` and so keeps none; ``defaults`` carries the base learning rate and weight decay 0
    (HF's AdamW default; the decay went into parameter groups that are not rebuilt); the LR scheduler
    still holds the old optimizer. Here the new optimizer keeps the parameter groups (so checkpoints
    keep their layout) with every group's hyper-parameters reset to those defaults, which is the same
    update as one group; the scheduler configs are left untouched, so they step the old optimizer.
    """
    optimizers = trainer.optimizers
    if len(optimizers) != 1:
        raise ValueError(
            f"RankReallocation(rebuild_optimizer=True) rebuilds a single optimizer, as the authors' code does; "
            f"this run has {len(optimizers)}"
        )
    strategy = type(trainer.strategy).__name__
    if "DeepSpeed" in strategy or "FSDP" in strategy:
        raise ValueError(
            f"RankReallocation(rebuild_optimizer=True) cannot replace the optimizer under {strategy}, which "
            "wraps it; use a single device or DDP, or leave rebuild_optimizer off"
        )
    old = optimizers[0]
    accepted = inspect.signature(type(old)).parameters  # ``defaults`` may hold more (AdamW: decoupled_weight_decay)
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    defaults = {key: value for key, value in old.defaults.items() if takes_any or key in accepted}
    if "weight_decay" in defaults:
        defaults["weight_decay"] = 0.0
    # keep only the parameters and the group names (what LearningRateMonitor labels by); every
    # hyper-parameter, and the scheduler's ``initial_lr``, comes from the defaults again
    groups = [{key: group[key] for key in ("params", "name") if key in group} for group in old.param_groups]
    trainer.optimizers = [type(old)(groups, **defaults)]
