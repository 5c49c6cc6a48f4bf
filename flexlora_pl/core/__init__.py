"""The method's math, torch only (no Lightning): the masked SVD-form layer, injection, importance metrics,
the budget schedule, allocation decisions and the orthogonality regulariser. Usable without a Trainer."""

from flexlora_pl.core.allocation import AllocationDecision, decide_allocation, expand_direction, prune_direction
from flexlora_pl.core.importance import IMPORTANCE_METRICS, SensitivityTracker, importance_scores, spectral_entropy
from flexlora_pl.core.inject import flexlora_layers, inject_flexlora
from flexlora_pl.core.layer import FlexLoRALinear
from flexlora_pl.core.orthogonality import orthogonality_penalty
from flexlora_pl.core.schedule import budget_at, event_steps, is_event_step

__all__ = [
    "IMPORTANCE_METRICS",
    "AllocationDecision",
    "FlexLoRALinear",
    "SensitivityTracker",
    "budget_at",
    "decide_allocation",
    "event_steps",
    "expand_direction",
    "flexlora_layers",
    "importance_scores",
    "inject_flexlora",
    "is_event_step",
    "orthogonality_penalty",
    "prune_direction",
    "spectral_entropy",
]
