"""Check that every process of a distributed run took the same allocation decision.

Under DDP each process runs the allocation event on its own replica. The processes decide alike only
because their replicas are bitwise identical; if they ever diverged (a non-deterministic kernel, a
process-local RNG draw, a user's importance score that reads process-local data), DDP's buffer broadcast
would quietly copy rank 0's ``rank_mask`` onto every process at the next forward pass while P, Q, λ and the
optimizer moments stayed different: the run would go on, silently wrong. One small collective per event
(a checksum of what the event decided, reduced with ``max`` over ``[c, −c]``, i.e. the maximum and the
minimum at once) finds that at the event where it happens.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence

import torch

__all__ = ["DecisionMismatchError", "check_same_decision", "decision_checksum"]


class DecisionMismatchError(RuntimeError):
    """The processes of a distributed run decided different allocations at one event."""


def decision_checksum(step: int, budget: int, prune: Sequence[int], expand: Sequence[int]) -> int:
    """A checksum of one event's decision that is the same in every process (CRC-32; ``hash`` is salted).

    Args:
        step: the event's optimizer step.
        budget: b(t) at the event.
        prune: indices of the modules that lose a direction.
        expand: indices of the modules that gain one.
    """
    text = json.dumps([int(step), int(budget), [int(i) for i in prune], [int(i) for i in expand]])
    return zlib.crc32(text.encode())


def check_same_decision(strategy, step: int, budget: int, prune: Sequence[int], expand: Sequence[int],
                        device: torch.device | str = "cpu") -> None:
    """Raise :class:`DecisionMismatchError` when the processes of ``strategy`` decided differently at ``step``.

    A single process (or a strategy without a world) returns at once, without a collective.

    Args:
        strategy: the Trainer's strategy (``trainer.strategy``); its ``reduce`` runs the collective.
        step: the event's optimizer step (named in the error).
        budget: b(t) at the event.
        prune: indices of the modules this process prunes.
        expand: indices of the modules this process expands.
        device: where the collective's tensor lives (the module's device: NCCL needs a CUDA tensor).
    """
    if getattr(strategy, "world_size", 1) <= 1:
        return
    checksum = decision_checksum(step, budget, prune, expand)
    both = torch.tensor([checksum, -checksum], dtype=torch.int64, device=device)
    both = strategy.reduce(both, reduce_op="max")  # [max over processes, −min over processes]
    high, low = int(both[0]), -int(both[1])
    if high != low:
        raise DecisionMismatchError(
            f"the allocation event at optimizer step {step} decided differently across the "
            f"{strategy.world_size} processes (this process, rank {getattr(strategy, 'global_rank', '?')}: "
            f"b(t)={budget}, prune modules {list(prune)}, expand modules {list(expand)}; decision checksums range "
            f"from {low} to {high}). Their replicas have diverged, and DDP would quietly copy rank 0's rank masks "
            "onto the others while P, Q and λ stay different. Look for process-local state in the importance "
            "scores (a custom importance_scores, a non-deterministic kernel); Trainer(deterministic=True) "
            "rules out the kernels."
        )
