"""The DyLoRA adapted linear layer: one LoRA factor pair trained at every rank ``b`` in 1..r.

DyLoRA (Valipour et al., 2022, https://arxiv.org/abs/2210.07558, Section 3) keeps LoRA's factors, ``A`` (r × d_in)
and ``B`` (d_out × r, zeros at start), and trains them truncated to a rank ``b`` drawn anew for every batch::

    y = W x + bias + (α / b) · B[:, :b] (A[:b] drop(x))        b ~ U{1, …, r}

so that every leading block ``B[:, :k] A[:k]`` is a usable rank-``k`` adapter once trained. The scale is α / b, the
paper's (Section 3: the truncated update is scaled by α over the sampled rank), so a rank-``k`` adapter cut from
the trained pair is an ordinary LoRA adapter of rank ``k`` and α. Which entries of the truncated pair learn from
a batch is the ``update`` rule:

- ``frozen`` (the paper's rule, its default): only the ``b``-th row of ``A`` and ``b``-th column of ``B`` are
  updated; rows and columns ``1..b-1`` take part in the forward pass but are held fixed (detached);
- ``all``: every row and column ``1..b`` of the truncated pair is updated (the paper's non-frozen variant).

Directions above ``b`` are not used at all. Each row of ``A`` and each column of ``B`` is its own parameter
(``lora_A.<i>``, ``lora_B.<i>``): a direction that took no part in a batch's backward pass keeps a ``None``
gradient, and torch's optimizers skip such a parameter entirely (no moment update, no weight decay), so under
AdamW too the rule holds exactly: what it does not update stays bitwise unchanged. In eval mode the layer
computes at its ``eval_rank``, every direction up to it at full value.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from flexlora_pl.core.checks import require_choice, require_int

__all__ = ["UPDATE_RULES", "DyLoRALinear", "dylora_layers"]

#: the ``update`` rules: which directions of the truncated adapter learn from a batch
UPDATE_RULES = ("frozen", "all")


class DyLoRALinear(nn.Module):
    """An ``nn.Linear`` with a LoRA update trained at a rank sampled per batch, evaluated at ``eval_rank``.

    Args:
        base: the linear layer to adapt; its parameters are frozen.
        r: the largest rank (the number of directions allocated); at most ``min(in_features, out_features)``.
        alpha: LoRA α; the update at rank ``b`` is scaled by α / b.
        dropout: dropout probability on the adapter's input.
        eval_rank: the rank the layer computes at in eval mode (``None``: ``r``).
        update: ``frozen`` (only the ``b``-th direction learns) or ``all`` (directions ``1..b`` learn).
        generator: optional generator for the initial ``A`` (reproducible injection).
    """

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0, eval_rank: int | None = None,
                 update: str = "frozen", generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"DyLoRALinear wraps an nn.Linear, got {type(base).__name__}")
        require_int("r", r, 1, owner="DyLoRALinear")
        if r > min(base.in_features, base.out_features):
            raise ValueError(f"DyLoRALinear: r={r} exceeds min(in_features, out_features) = "
                             f"{min(base.in_features, base.out_features)} of a {base.out_features}×{base.in_features} "
                             "weight; its update cannot have a higher rank")
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha = int(r), float(alpha)
        self.update = require_choice("update", update, UPDATE_RULES, owner="DyLoRALinear")
        self.eval_rank = self.check_rank(eval_rank if eval_rank is not None else r)
        self.rank = self.r  # the training rank b, set by the method before every training batch
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # LoRA's initialisation: A ~ U(-1/√d_in, 1/√d_in) (Kaiming-uniform with a = √5), B = 0
        kw = {"generator": generator} if generator is not None else {}
        a = (torch.rand(self.r, self.in_features, **kw) * 2 - 1) / math.sqrt(self.in_features)  # (r, d_in)
        device = base.weight.device
        self.lora_A = nn.ParameterList([nn.Parameter(row.to(device)) for row in a])  # r × (d_in,)
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(self.out_features, device=device))
                                        for _ in range(self.r)])  # r × (d_out,): the columns of B
        # how many training batches ran at each rank 1..r (a buffer: it travels with checkpoints)
        self.register_buffer("lora_rank_counts", torch.zeros(self.r, dtype=torch.long, device=device))

    def check_rank(self, rank: int) -> int:
        """``rank`` if it is an integer in 1..r; else a ``ValueError``."""
        require_int("rank", rank, 1, owner="DyLoRALinear")
        if rank > self.r:
            raise ValueError(f"DyLoRALinear: rank {rank} exceeds r = {self.r}, the directions allocated")
        return int(rank)

    def scaling(self, rank: int) -> float:
        """α / b: the scale of the update truncated to ``rank`` (DyLoRA, Section 3)."""
        return self.alpha / rank

    def factors(self, rank: int, learn_from: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``A[:rank]`` (rank, d_in) and ``B[:, :rank]`` (d_out, rank); directions below ``learn_from`` detached."""
        a = [p if i >= learn_from else p.detach() for i, p in enumerate(self.lora_A[:rank])]
        b = [p if i >= learn_from else p.detach() for i, p in enumerate(self.lora_B[:rank])]
        return torch.stack(a), torch.stack(b, dim=1)

    def delta_weight(self, rank: int) -> torch.Tensor:
        """ΔW = (α / rank) · B[:, :rank] A[:rank] in fp32, shape (d_out, d_in). Used by merge and export only."""
        a, b = self.factors(self.check_rank(rank))
        return (b.float() @ a.float()) * self.scaling(rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        rank = self.rank if self.training else self.eval_rank
        frozen = self.training and self.update == "frozen"
        a, b = self.factors(rank, learn_from=rank - 1 if frozen else 0)  # (rank, d_in), (d_out, rank)
        h = F.linear(self.dropout(x).to(a.dtype), a)  # (..., rank)
        delta = F.linear(h, (b * self.scaling(rank)).to(h.dtype))  # (..., d_out)
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, r={self.r}, alpha={self.alpha}, "
                f"eval_rank={self.eval_rank}, update={self.update!r}")


def dylora_layers(model: nn.Module) -> Iterator[tuple[str, DyLoRALinear]]:
    """Yield ``(dotted name, layer)`` for every :class:`DyLoRALinear` of ``model``, in model order."""
    for name, module in model.named_modules():
        if isinstance(module, DyLoRALinear):
            yield name, module
