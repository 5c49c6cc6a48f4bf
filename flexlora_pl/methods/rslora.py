"""rsLoRA (Kalajdzievski 2023, https://arxiv.org/abs/2312.03732): LoRA whose update is scaled by α / √r.

LoRA scales its update by γ_r = α / r. For a fixed learning rate that makes the update's size fall as the rank
grows, so higher ranks learn no faster than low ones (the factors' gradients shrink with 1 / r while the product
needs them to stay of order one). The rank-stabilised factor is

    ΔW = (α / √r) · B A        A: r × d_in (Kaiming-uniform),  B: d_out × r (zeros)

which keeps the update's scale steady in r. Nothing else changes: the same layers, the same zero update at start,
the same exports. It is peft's ``LoraConfig(use_rslora=True)``, and :class:`~flexlora_pl.methods.LoRA`'s switch
``rslora`` with the switch on; every other variant of LoRA (DoRA, PiSSA, MiLoRA) takes the switch as well.

With a ``rank_pattern`` every layer keeps the one scale α / √r (``r`` the pattern's FlexLoRA ``init_rank``):
peft's ``alpha_pattern`` holds α_m = α · √(r_m / r), so α_m / √r_m = α / √r, as LoRA's fixed-pattern arm keeps
α / r in every layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

from flexlora_pl.methods.base import register_method
from flexlora_pl.methods.lora import LoRA

__all__ = ["RSLoRA"]


@register_method
class RSLoRA(LoRA):
    """rsLoRA through peft's ``LoraConfig(use_rslora=True)``: LoRA of rank ``r`` scaled by α / √r.

    Args:
        target_modules: linear layers to adapt: dotted-name suffixes (``query``) or ``re:<regex>``
            (``None``: the task's defaults).
        r: the rank of every adapted layer.
        alpha: the update is scaled by α / √r.
        dropout: dropout on the adapter inputs.
        rank_pattern: a fixed rank per module (see :class:`~flexlora_pl.methods.LoRA`); every layer keeps the
            scale α / √r.
        loraplus_ratio: LoRA+: train every ``B`` factor at this multiple of ``A``'s learning rate (``None``: off).
    """

    name = "rslora"
    peft_fields: ClassVar[dict[str, str]] = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout"}
    peft_variant: ClassVar[dict[str, Any]] = {"use_dora": False, "use_rslora": True, "init_lora_weights": True}

    def __init__(self, target_modules: Sequence[str] | None = None, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, rank_pattern: str | dict[str, int] | None = None,
                 loraplus_ratio: float | None = None) -> None:
        super().__init__(target_modules, r=r, alpha=alpha, dropout=dropout, rank_pattern=rank_pattern,
                         loraplus_ratio=loraplus_ratio, rslora=True)
