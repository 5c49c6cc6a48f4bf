"""How large a new direction's first update is, next to its module's settled directions (a diagnostic).

A direction switched on inside a tensor whose Adam step count is large starts with zeroed moments and no bias
correction, so its first updates can be several times a settled direction's. :class:`FirstUpdateMonitor` measures
it at the optimizer step after each allocation event without a host sync on that step: the arithmetic stays on
the device until the host syncs anyway (the next event, a checkpoint, the end of training).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from flexlora_pl.core.layer import FlexLoRALinear

__all__ = ["FirstUpdateMonitor"]


class FirstUpdateMonitor:
    """Measure new directions' first λ update against their module's other active directions.

    Per event it measures ``new_direction_first_update`` (mean |Δλ| of the new directions) and
    ``new_direction_update_ratio`` (mean over new directions of |Δλ| / mean |Δλ| of the module's other active
    directions, at the same step); :meth:`drain` hands them over (the allocation callback adds them to the
    event's record and logs both as ``flexlora/<key>`` at that step).
    """

    def __init__(self) -> None:
        # (layer index, slot, other active directions, λ after the event), waiting for the next optimizer step
        self._pending: list[tuple[int, int, int, torch.Tensor]] = []
        # measured on the device, not read yet: (step, event index, sizes, ratios)
        self._measured: list[tuple[int, int, torch.Tensor, torch.Tensor]] = []

    @property
    def waiting(self) -> bool:
        """Whether directions added at the last event wait for their first update."""
        return bool(self._pending)

    def watch(self, layer_index: int, slot: int, others: int, layer: FlexLoRALinear) -> None:
        """Remember direction ``slot`` of ``layer``, just added beside ``others`` active directions."""
        self._pending.append((layer_index, slot, others, layer.lora_lambda.detach().float().clone()))

    def measure(self, layers: Sequence[FlexLoRALinear], step: int, event_index: int) -> None:
        """Take the first updates of the watched directions at optimizer step ``step`` (device arithmetic only)."""
        sizes, ratios = [], []
        for i, slot, n_others, before in self._pending:
            layer = layers[i]
            lam = layer.lora_lambda.detach().float()
            if before.device != lam.device:  # restored from a checkpoint onto an accelerator
                before = before.to(lam.device)
            delta = (lam - before).abs()
            others = layer.rank_mask.detach().clone()
            others[slot] = False
            sizes.append(delta[slot])
            settled = (delta * others).sum() / max(n_others, 1)
            ratios.append(delta[slot] / settled if n_others > 0 else torch.full_like(delta[slot], float("nan")))
        self._pending = []
        if sizes:
            self._measured.append((step, event_index, torch.stack(sizes), torch.stack(ratios)))

    def drain(self) -> list[tuple[int, int, dict[str, float]]]:
        """Read what was measured since the last call (one host sync): ``(step, event index, values)`` with
        ``values`` = ``new_direction_first_update`` and, when defined, ``new_direction_update_ratio``."""
        out = []
        for step, event, sizes, ratios in self._measured:
            measured = {"new_direction_first_update": float(sizes.mean())}
            finite = [r for r in ratios.tolist() if math.isfinite(r)]
            if finite:
                measured["new_direction_update_ratio"] = sum(finite) / len(finite)
            out.append((step, event, measured))
        self._measured = []
        return out

    def state_dict(self) -> list[tuple[int, int, int, list[float]]]:
        """The directions still waiting for their first update (call :meth:`drain` first for the rest)."""
        return [(i, slot, n, before.cpu().tolist()) for i, slot, n, before in self._pending]

    def load_state_dict(self, pending: Sequence[Sequence[Any]]) -> None:
        self._pending = [(i, slot, n, torch.tensor(before)) for i, slot, n, before in pending]
