"""The orthogonality regulariser over active directions (paper eq. 2, squared; docs/method.md)::

    R = mean over modules of  ‖P_mᵀ P_m − I‖²_F + ‖Q_m Q_mᵀ − I‖²_F

``P_m`` keeps only the active columns. With the mask ``m`` this is ``‖(PᵀP) ⊙ mmᵀ − diag(m)‖²_F``,
which has zero gradient on inactive columns, so masked entries stay exactly zero.

Every P of the same ``(d_out, r_max)`` is stacked into one batch and every Q of the same
``(r_max, d_in)`` into another, whatever the layer's other dimension, so a transformer with hidden
size ``h`` and MLP size ``f`` needs four batched matmuls (P and Q, ``h`` and ``f``) at any depth. No
Python loop per module beyond collecting the tensors, no transposed copies, no host sync.

``form="plain"`` computes the authors' code's variant instead: the plain (unsquared) Frobenius norm of
each factor's residual, averaged over factor matrices (two per module)::

    R_plain = 1/(2M) · Σ_m ( ‖P_mᵀ P_m − I‖_F + ‖Q_m Q_mᵀ − I‖_F )
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flexlora_pl.core.layer import FlexLoRALinear

__all__ = ["ORTH_REG_FORMS", "FactorBatch", "group_by_shape", "orthogonality_penalty"]

ORTH_REG_FORMS = ("squared", "plain")


@dataclass(frozen=True)
class FactorBatch:
    """Layers whose ``factor`` ("P" or "Q") has one shape: one batched Gram matmul per step."""

    factor: str
    layers: tuple[FlexLoRALinear, ...]


def group_by_shape(layers: Sequence[FlexLoRALinear]) -> list[FactorBatch]:
    """The batching plan of R, computed once: every P of one ``(d_out, r_max)`` in one batch, every Q of
    one ``(r_max, d_in)`` in another (four batches for a plain transformer, whatever its depth)."""
    by_p: dict[tuple[int, int], list[FlexLoRALinear]] = defaultdict(list)
    by_q: dict[tuple[int, int], list[FlexLoRALinear]] = defaultdict(list)
    for layer in layers:
        by_p[(layer.out_features, layer.max_rank)].append(layer)
        by_q[(layer.max_rank, layer.in_features)].append(layer)
    return [FactorBatch("P", tuple(b)) for b in by_p.values()] + [FactorBatch("Q", tuple(b)) for b in by_q.values()]


def _gram_penalty(gram: torch.Tensor, mask: torch.Tensor, form: str = "squared") -> torch.Tensor:
    """Σ over the batch of ‖gram ⊙ mmᵀ − diag(m)‖²_F (``plain``: ‖·‖_F); gram (B, r, r), mask (B, r) float."""
    outer = mask.unsqueeze(2) * mask.unsqueeze(1)  # (B, r, r)
    if form == "plain":
        # vector_norm's gradient at a zero residual (a module with no active direction) is 0, not NaN
        residual = gram * outer - torch.diag_embed(mask)  # (B, r, r)
        return torch.linalg.vector_norm(residual.flatten(1), dim=1).sum()
    # ‖A − B‖²_F as one op (and one autograd node) rather than three: sub, pow, sum.
    return F.mse_loss(gram * outer, torch.diag_embed(mask), reduction="sum")


def _batched_penalty(layers: Sequence[FlexLoRALinear], factor: str, form: str = "squared") -> torch.Tensor:
    """One side of R (``factor`` "P" or "Q") summed over ``layers``, whose factors share a shape."""
    mask = torch.stack([layer.rank_mask for layer in layers]).float()  # (B, r)
    if factor == "P":
        stacked = torch.stack([layer.lora_P for layer in layers]).float()  # (B, d_out, r)
    else:
        stacked = torch.stack([layer.lora_Q for layer in layers]).float()  # (B, r, d_in)
    with torch.autocast(stacked.device.type, enabled=False):  # an r×r Gram matrix: keep it in fp32
        gram = stacked.transpose(1, 2) @ stacked if factor == "P" else stacked @ stacked.transpose(1, 2)
        return _gram_penalty(gram, mask, form)  # gram: (B, r, r)


def orthogonality_penalty(plan: Sequence[FactorBatch], form: str = "squared") -> torch.Tensor:
    """The regulariser R over the modules of ``plan`` (build it once with :func:`group_by_shape`).

    Args:
        plan: the batches of :func:`group_by_shape`.
        form: ``squared`` (paper eq. 2: squared norms, averaged over modules) or ``plain`` (the authors'
            code: unsquared norms, averaged over the 2 factor matrices of every module).
    """
    if form not in ORTH_REG_FORMS:
        raise ValueError(f"unknown orthogonality regulariser form {form!r}; choose one of {list(ORTH_REG_FORMS)}")
    count = sum(len(batch.layers) for batch in plan if batch.factor == "P")  # each layer has one P batch
    if count == 0:
        raise ValueError("orthogonality_penalty needs at least one FlexLoRA layer")
    terms = [_batched_penalty(batch.layers, batch.factor, form) for batch in plan]
    return sum(terms[1:], terms[0]) / (count if form == "squared" else 2 * count)
