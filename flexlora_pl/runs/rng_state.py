"""Capture and restore every random number generator a training step may draw from.

Lightning checkpoints do not hold RNG states, so dropout after a resume would draw different masks
than the uninterrupted run. :class:`~flexlora_pl.FlexLoRAModule` stores these states in each checkpoint
and puts them back right before the first training batch after a resume.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["capture_rng_states", "restore_rng_states"]


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
