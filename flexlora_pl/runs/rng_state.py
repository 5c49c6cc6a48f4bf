"""Capture and restore every random number generator a training step may draw from.

Lightning checkpoints do not hold RNG states, so dropout after a resume would draw different masks
than the uninterrupted run. :class:`~flexlora_pl.FlexLoRAModule` stores these states in each checkpoint,
one entry per process (:func:`gather_rng_states`), and puts this process's back
(:func:`rng_states_of_rank`) right before the first training batch after a resume.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

__all__ = ["capture_rng_states", "gather_rng_states", "restore_rng_states", "rng_states_of_rank"]


def capture_rng_states() -> dict[str, Any]:
    """The states of Python's, NumPy's, torch's CPU and (if present) every CUDA device's generator."""
    states: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state_to_tensors(np.random.get_state()),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _numpy_state_to_tensors(state: tuple) -> tuple:
    """NumPy's state with its key array as a tensor: checkpoints load with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = state
    return name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def restore_rng_states(states: dict[str, Any]) -> None:
    """Put back states from :func:`capture_rng_states` (missing entries are left alone)."""
    if "python" in states:
        random.setstate(states["python"])
    if "numpy" in states:
        name, keys, pos, has_gauss, cached = states["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "torch" in states:
        torch.set_rng_state(states["torch"].cpu() if torch.is_tensor(states["torch"]) else states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def gather_rng_states() -> list[dict[str, Any]]:
    """Every process's :func:`capture_rng_states`, in rank order (one entry without a process group).

    Under DDP each rank draws its own dropout masks, and every rank builds the checkpoint (Lightning then
    writes rank 0's), so all ranks must call this together.
    """
    states = capture_rng_states()
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return [states]
    per_rank: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, states)
    return per_rank


def rng_states_of_rank(per_rank: list[dict[str, Any]], rank: int) -> dict[str, Any] | None:
    """The states ``rank`` saved, or rank 0's when the checkpoint came from fewer processes (another world
    size changes the data order too, so any rank's states are as good as another's); ``None`` for none."""
    if not per_rank:
        return None
    return per_rank[rank] if rank < len(per_rank) else per_rank[0]
