"""The orthogonality regulariser over active directions (paper eq. 2, squared; SPEC §1)::

    R = mean over modules of  ‖P_mᵀ P_m − I‖²_F + ‖Q_m Q_mᵀ − I‖²_F

``P_m`` keeps only the active columns. With the mask ``m`` this is ``‖(PᵀP) ⊙ mmᵀ − diag(m)‖²_F``,
which has zero gradient on inactive columns, so masked entries stay exactly zero.

Both terms have the same form, ``‖(F Fᵀ) ⊙ mmᵀ − diag(m)‖²_F`` for an ``(r_max, d)`` factor ``F``
(``F = Pᵀ`` or ``F = Q``). So every factor of equal ``(r_max, d)`` — P or Q, of any module — is stacked
into one batch and handled by one batched matmul: a transformer with hidden size ``h`` and MLP size
``f`` needs two batches (``d = h`` and ``d = f``) whatever its depth. No Python loop per module beyond
collecting the tensors, and no host sync.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from flexlora_pl.layer import FlexLoRALinear

__all__ = ["group_by_shape", "orthogonality_penalty"]


def group_by_shape(layers: Sequence[FlexLoRALinear]) -> list[list[FlexLoRALinear]]:
    """Split layers into groups of equal ``(d_out, d_in, r_max)`` so each group is one batched matmul."""
    groups: dict[tuple[int, int, int], list[FlexLoRALinear]] = defaultdict(list)
    for layer in layers:
        groups[(layer.out_features, layer.in_features, layer.max_rank)].append(layer)
    return list(groups.values())


def _gram_penalty(gram: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over the batch of ‖gram ⊙ mmᵀ − diag(m)‖²_F; gram (B, r, r), mask (B, r) float."""
    outer = mask.unsqueeze(2) * mask.unsqueeze(1)  # (B, r, r)
    return (gram * outer - torch.diag_embed(mask)).pow(2).sum()


def orthogonality_penalty(groups: Sequence[Sequence[FlexLoRALinear]]) -> torch.Tensor:
    """The regulariser R averaged over all modules in ``groups`` (see :func:`group_by_shape`)."""
    factors: dict[tuple[int, int], list[torch.Tensor]] = defaultdict(list)  # (r_max, d) -> factors
    masks: dict[tuple[int, int], list[torch.Tensor]] = defaultdict(list)
    count = 0
    for group in groups:
        for layer in group:
            r = layer.max_rank
            factors[(r, layer.out_features)].append(layer.lora_P.t())  # (r, d_out), a view
            masks[(r, layer.out_features)].append(layer.rank_mask)
            factors[(r, layer.in_features)].append(layer.lora_Q)  # (r, d_in)
            masks[(r, layer.in_features)].append(layer.rank_mask)
        count += len(group)
    if count == 0:
        raise ValueError("orthogonality_penalty needs at least one FlexLoRA layer")
    total = None
    for key, batch in factors.items():
        stacked = torch.stack(batch).float()  # (B, r, d)
        mask = torch.stack(masks[key]).float()  # (B, r)
        with torch.autocast(stacked.device.type, enabled=False):  # an r×r Gram matrix: keep it in fp32
            term = _gram_penalty(stacked @ stacked.transpose(1, 2), mask)
        total = term if total is None else total + term
    return total / count
