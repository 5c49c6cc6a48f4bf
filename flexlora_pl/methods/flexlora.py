"""FlexLoRA (ICLR 2026): ΔW = P·diag(λ ⊙ m)·Q with ranks that move at allocation events.

Every adapted linear layer becomes a :class:`~flexlora_pl.core.layer.FlexLoRALinear` with capacity r_max and
r_init active directions; the masked orthogonality regulariser R = Σ‖PᵀP − I‖² + ‖QQᵀ − I‖² (paper eq. 2,
over active directions) is added to the loss with weight γ. The ``RankReallocation`` callback moves
directions between layers by spectral-entropy importance under the budget b(t).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from flexlora_pl.core.inject import flexlora_layers, inject_flexlora
from flexlora_pl.core.orthogonality import ORTH_REG_FORMS, FactorBatch, group_by_shape, orthogonality_penalty
from flexlora_pl.methods.base import AdaptationMethod, register_method

__all__ = ["FlexLoRA"]


@register_method
class FlexLoRA(AdaptationMethod):
    """FlexLoRA adapters: masked SVD-form updates whose ranks the ``reallocation:`` schedule moves.

    Args:
        target_modules: linear layers to adapt (``None``: the task's defaults).
        init_rank: initial rank r_init of every adapted layer.
        max_rank: rank capacity r_max of every adapted layer (paper: 1.5 · r_init).
        alpha: LoRA α; the update is scaled by α / r_init.
        dropout: dropout on the adapter inputs.
        orth_reg_weight: γ, the weight of the orthogonality regulariser (paper: 0.1).
        orth_reg_form: ``squared`` (paper eq. 2: ‖PᵀP − I‖²_F + ‖QQᵀ − I‖²_F, averaged over modules) or
            ``plain``, the authors' code's: unsquared Frobenius norms averaged over the factor matrices
            (2 per module): half the weight per module, and a gradient of the same size however close
            to orthogonal the factors already are.
    """

    name = "flexlora"

    def __init__(self, target_modules: Sequence[str] | None = None, init_rank: int = 8, max_rank: int = 12,
                 alpha: float = 16.0, dropout: float = 0.0, orth_reg_weight: float = 0.1,
                 orth_reg_form: str = "squared") -> None:
        super().__init__(target_modules, alpha, dropout, reg_weight=orth_reg_weight)
        if max_rank < init_rank:
            raise ValueError(f"max_rank ({max_rank}) must be >= init_rank ({init_rank}): the capacity r_max holds "
                             "the initial directions plus room to expand")
        if orth_reg_form not in ORTH_REG_FORMS:
            raise ValueError(f"FlexLoRA: orth_reg_form={orth_reg_form!r} is not one of {list(ORTH_REG_FORMS)}")
        self.init_rank, self.max_rank, self.orth_reg_weight = init_rank, max_rank, orth_reg_weight
        self.orth_reg_form = orth_reg_form
        self._plans: dict[int, list[FactorBatch]] = {}

    def adapt(self, backbone: nn.Module, modules_to_save: Sequence[str], seed: int) -> nn.Module:
        if not self.target_modules:
            raise ValueError("FlexLoRA needs target_modules: name the linear layers to adapt")
        inject_flexlora(backbone, self.target_modules, init_rank=self.init_rank, max_rank=self.max_rank,
                        alpha=self.alpha, dropout=self.dropout, modules_to_save=modules_to_save, seed=seed)
        return backbone

    def adapter_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for _, layer in flexlora_layers(model) for p in (layer.lora_P, layer.lora_lambda, layer.lora_Q)]

    def regularizer(self, model: nn.Module) -> torch.Tensor:
        plan = self._plans.get(id(model))
        if plan is None:  # shapes never change: plan the batches once per model
            plan = self._plans[id(model)] = group_by_shape([layer for _, layer in flexlora_layers(model)])
        return orthogonality_penalty(plan, self.orth_reg_form)

    def rank_pattern(self, model: nn.Module) -> dict[str, int]:
        return {name: layer.rank for name, layer in flexlora_layers(model)}

    def max_ranks(self, model: nn.Module) -> dict[str, int]:
        return {name: layer.max_rank for name, layer in flexlora_layers(model)}

    def matrix_shapes(self, model: nn.Module) -> dict[str, int]:
        # a direction is a P column, a Q row and a λ
        return {name: layer.in_features + layer.out_features + 1 for name, layer in flexlora_layers(model)}
