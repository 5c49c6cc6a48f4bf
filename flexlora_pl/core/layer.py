"""The FlexLoRA adapted linear layer.

FlexLoRA (Entropy-guided Flexible Low-Rank Adaptation, ICLR 2026) writes the update of a frozen weight
``W`` (d_out × d_in) in SVD form, with capacity for ``r_max`` directions of which a boolean mask
``m`` switches some on::

    ΔW = P · diag(λ ⊙ m) · Q · s        P: (d_out, r_max)   λ: (r_max,)   Q: (r_max, d_in)   s = α / r_init

Ranks change during training by flipping entries of ``m``; shapes never change, so the optimizer, the
LR scheduler, DDP buckets and ``torch.compile`` graphs all stay valid. The forward pass never forms
ΔW::

    y = W x + b + s · P ((λ ⊙ m) ⊙ (Q drop(x)))

Masked directions receive exactly zero gradient (their factor ``λ ⊙ m`` is zero), so with zeroed
values and optimizer moments they stay exactly zero under AdamW with weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from flexlora_pl.core.checks import require_int

__all__ = ["FlexLoRALinear"]


class FlexLoRALinear(nn.Module):
    """An ``nn.Linear`` with a masked SVD-form low-rank update whose rank can move during training.

    Args:
        base: the linear layer to adapt; its parameters are frozen.
        init_rank: number of directions active at start (``r_init``); also fixes the scale α / r_init.
        max_rank: capacity ``r_max``; the active rank never exceeds it. At most ``min(in_features,
            out_features)``, the rank a ``d_out × d_in`` update can have.
        alpha: LoRA α. The scale ``alpha / init_rank`` stays fixed when the rank changes.
        dropout: dropout probability on the adapter's input.
        init_std: standard deviation of the initial P and Q entries (λ starts at zero, so the wrapped
            layer computes exactly what ``base`` computes).
        generator: optional generator for the initial P and Q (reproducible injection).
    """

    def __init__(
        self,
        base: nn.Linear,
        init_rank: int,
        max_rank: int,
        alpha: float,
        dropout: float = 0.0,
        init_std: float = 0.02,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"FlexLoRALinear wraps an nn.Linear, got {type(base).__name__}")
        _check_ranks(init_rank, max_rank)
        _check_capacity(max_rank, base)
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.base.requires_grad_(False)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.init_rank = int(init_rank)
        self.max_rank = int(max_rank)
        self.alpha = float(alpha)
        self.scaling = self.alpha / self.init_rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

        device = base.weight.device
        self.lora_P = nn.Parameter(torch.zeros(self.out_features, self.max_rank, device=device))
        self.lora_lambda = nn.Parameter(torch.zeros(self.max_rank, device=device))
        self.lora_Q = nn.Parameter(torch.zeros(self.max_rank, self.in_features, device=device))
        mask = torch.zeros(self.max_rank, dtype=torch.bool, device=device)
        mask[: self.init_rank] = True
        self.register_buffer("rank_mask", mask, persistent=True)
        self.merged = False
        with torch.no_grad():
            r = self.init_rank
            kw = {"generator": generator} if generator is not None else {}
            p = torch.randn(self.out_features, r, **kw) * init_std
            q = torch.randn(r, self.in_features, **kw) * init_std
            self.lora_P[:, :r].copy_(p)
            self.lora_Q[:r].copy_(q)

    # ------------------------------------------------------------------ state
    @property
    def rank(self) -> int:
        """The active rank ``m.sum()`` (a host sync; for logging and events, not the hot path)."""
        return int(self.rank_mask.sum())

    def masked_lambda(self) -> torch.Tensor:
        """``λ ⊙ m``, shape (r_max,)."""
        return self.lora_lambda * self.rank_mask

    def delta_weight(self) -> torch.Tensor:
        """ΔW = s · P diag(λ ⊙ m) Q in fp32, shape (d_out, d_in). Used by merge and export only."""
        p, q = self.lora_P.float(), self.lora_Q.float()
        return (p * self.masked_lambda().float()) @ q * self.scaling

    # ---------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if self.merged:
            return out
        h = F.linear(self.dropout(x).to(self.lora_Q.dtype), self.lora_Q)  # (..., r_max)
        # Fold s·(λ ⊙ m) into P, a (d_out, r_max) weight, rather than scaling activations: no
        # elementwise pass over the (..., r_max) or (..., d_out) activations and one fewer tensor saved
        # for backward. Masked columns of the folded weight are exactly zero, so masked λ, P columns
        # and Q rows still get exactly zero gradient.
        weight = self.lora_P * (self.masked_lambda() * self.scaling).to(self.lora_P.dtype)  # (d_out, r_max)
        delta = F.linear(h, weight.to(h.dtype))  # (..., d_out)
        return out + delta.to(out.dtype)

    # ------------------------------------------------------- merge / unmerge
    @torch.no_grad()
    def merge(self) -> None:
        """Add ΔW into the base weight; the forward then costs exactly what the base layer costs."""
        if self.merged:
            return
        w = self.base.weight
        if not w.dtype.is_floating_point:
            raise ValueError(
                f"the base weight is {type(w).__name__} of {w.dtype} (a quantized base): ΔW cannot be added into it in "
                "place, since quantizing W + ΔW again would round most of the update away. Export a merged model "
                "instead (flexlora-export --format merged), which dequantizes the base and adds ΔW in float32"
            )
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract ΔW from the base weight again (exact up to the base weight's dtype rounding)."""
        if not self.merged:
            return
        w = self.base.weight
        w.copy_((w.float() - self.delta_weight()).to(w.dtype))
        self.merged = False

    # The merged flag travels with the state dict: a state dict taken while merged holds ΔW inside the
    # base weight, and loading it into an unmerged layer would otherwise add ΔW a second time.
    def get_extra_state(self) -> dict[str, bool]:
        return {"merged": self.merged}

    def set_extra_state(self, state: dict[str, bool]) -> None:
        self.merged = bool(state.get("merged", False))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"init_rank={self.init_rank}, max_rank={self.max_rank}, alpha={self.alpha}"
        )


def _check_ranks(init_rank: int, max_rank: int) -> None:
    require_int("init_rank", init_rank, 1)
    require_int("max_rank", max_rank, 1)
    if max_rank < init_rank:
        raise ValueError(
            f"max_rank ({max_rank}) must be >= init_rank ({init_rank}): the capacity r_max holds the "
            "initial directions plus room to expand"
        )


def _check_capacity(
    max_rank: int, base: nn.Linear, name: str | None = None, also: Sequence[str] = (), fix: int | None = None
) -> None:
    """Refuse a ``max_rank`` above ``min(in_features, out_features)``: those directions can never add rank.

    Args:
        max_rank: the capacity ``r_max`` asked for.
        base: the linear layer to adapt.
        name: its dotted name in the model, for the message.
        also: names of other layers that are too narrow as well, for the message.
        fix: the largest ``max_rank`` to suggest (default: this layer's limit).
    """
    d_in, d_out = base.in_features, base.out_features
    limit = min(d_in, d_out)
    if max_rank <= limit:
        return
    layer = f"layer {name!r}" if name is not None else "the layer"
    others = ""
    if also:
        others = f" ({len(also)} more adapted layers are too narrow as well, e.g. {list(also[:3])})"
    raise ValueError(
        f"max_rank={max_rank} is more than {layer} can use: its weight is {d_out}×{d_in} (out_features × "
        f"in_features), so its update has rank at most min(in_features, out_features) = {limit}, and the "
        f"other {max_rank - limit} r_max directions would be allocated and trained for nothing{others}. Set "
        f"max_rank <= {limit if fix is None else fix} (and init_rank <= max_rank), or leave "
        f"{'such layers' if also else 'this layer'} out of target_modules."
    )


def gaussian_std(dim: int) -> float:
    """σ = 1/√d: a Gaussian vector of length ``dim`` then has expected unit norm."""
    return 1.0 / math.sqrt(dim)
