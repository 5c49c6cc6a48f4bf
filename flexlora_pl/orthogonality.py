"""The orthogonality regulariser over active directions (paper eq. 2, squared; SPEC §1)::

    R = mean over modules of  ‖P_mᵀ P_m − I‖²_F + ‖Q_m Q_mᵀ − I‖²_F

``P_m`` keeps only the active columns. With the mask ``m`` this is ``‖(PᵀP) ⊙ mmᵀ − diag(m)‖²_F``,
which has zero gradient on inactive columns, so masked entries stay exactly zero.

Every P of the same ``(d_out, r_max)`` is stacked into one batch and every Q of the same
``(r_max, d_in)`` into another, whatever the layer's other dimension, so a transformer with hidden
size ``h`` and MLP size ``f`` needs four batched matmuls (P and Q, ``h`` and ``f``) at any depth. No
Python loop per module beyond collecting the tensors, no transposed copies, no host sync.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from flexlora_pl.layer import FlexLoRALinear

__all__ = ["group_by_shape", "orthogonality_penalty"]


def group_by_shape(layers: Sequence[FlexLoRALinear]) -> list[list[FlexLoRALinear]]:
    """Split layers into groups of equal ``(d_out, d_in, r_max)``.

    :func:`orthogonality_penalty` takes these groups (any grouping of the layers gives the same value)
    and batches the factors across groups by their own shapes.
    """
    groups: dict[tuple[int, int, int], list[FlexLoRALinear]] = defaultdict(list)
    for layer in layers:
        groups[(layer.out_features, layer.in_features, layer.max_rank)].append(layer)
    return list(groups.values())


def _gram_penalty(gram: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over the batch of ‖gram ⊙ mmᵀ − diag(m)‖²_F; gram (B, r, r), mask (B, r) float."""
    outer = mask.unsqueeze(2) * mask.unsqueeze(1)  # (B, r, r)
    # ‖A − B‖²_F as one op (and one autograd node) rather than three: sub, pow, sum.
    return F.mse_loss(gram * outer, torch.diag_embed(mask), reduction="sum")


def _batched_penalty(layers: Sequence[FlexLoRALinear], factor: str) -> torch.Tensor:
    """One side of R (``factor`` "P" or "Q") summed over ``layers``, whose factors share a shape."""
    mask = torch.stack([layer.rank_mask for layer in layers]).float()  # (B, r)
    if factor == "P":
        stacked = torch.stack([layer.lora_P for layer in layers]).float()  # (B, d_out, r)
    else:
        stacked = torch.stack([layer.lora_Q for layer in layers]).float()  # (B, r, d_in)
    with torch.autocast(stacked.device.type, enabled=False):  # an r×r Gram matrix: keep it in fp32
        gram = stacked.transpose(1, 2) @ stacked if factor == "P" else stacked @ stacked.transpose(1, 2)
        return _gram_penalty(gram, mask)  # gram: (B, r, r)


def orthogonality_penalty(groups: Sequence[Sequence[FlexLoRALinear]]) -> torch.Tensor:
    """The regulariser R averaged over all modules in ``groups`` (see :func:`group_by_shape`)."""
    layers = [layer for group in groups for layer in group]
    if not layers:
        raise ValueError("orthogonality_penalty needs at least one FlexLoRA layer")
    by_p: dict[tuple[int, int], list[FlexLoRALinear]] = defaultdict(list)  # (d_out, r_max) -> layers
    by_q: dict[tuple[int, int], list[FlexLoRALinear]] = defaultdict(list)  # (r_max, d_in) -> layers
    for layer in layers:
        by_p[(layer.out_features, layer.max_rank)].append(layer)
        by_q[(layer.max_rank, layer.in_features)].append(layer)
    terms = [_batched_penalty(batch, "P") for batch in by_p.values()]
    terms += [_batched_penalty(batch, "Q") for batch in by_q.values()]
    return sum(terms[1:], terms[0]) / len(layers)
