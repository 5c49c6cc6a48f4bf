"""DoRA (Liu et al., ICML 2024, https://arxiv.org/abs/2402.09353): weight-decomposed low-rank adaptation.

Every adapted weight ``W`` (d_out × d_in) is split into a magnitude and a direction; LoRA adapts the direction
and the magnitude is trained on its own::

    W' = m ⊙ (W + s · B A) / ‖W + s · B A‖_row     m: d_out (peft's ``lora_magnitude_vector``), s = α / r
    A: r × d_in (Kaiming-uniform),  B: d_out × r (zeros),  m = ‖W‖_row at start

``‖·‖_row`` is the norm of each output row (each output unit's weight vector), taken through a detached copy
as the paper's memory-saving gradient suggests. At start B = 0 and m = ‖W‖_row, so W' = W: the model is its
base model. The trained parameters are A, B and m: d_out more per matrix than LoRA of the same rank (on the 72
matrices of DeBERTaV3-base at r = 8, 82,944 more than LoRA's 1,327,104; docs/differences.md compares that with the
paper's count).

This is Liu et al.'s method, through peft's ``LoraConfig(use_dora=True)``. The paper's Table 1 also cites Mao et
al. 2024 for its "DoRA" row, a different method of the same name (dynamic rank distribution); docs/differences.md
says why the harness runs Liu et al.'s. The merged export folds m and the direction into one weight (peft's
``merge_and_unload``); the peft adapter is peft's own DoRA adapter (``use_dora: true``, m included).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from flexlora_pl.methods.base import register_method
from flexlora_pl.methods.lora import ADAPTER_NAME, LoRA

__all__ = ["DoRA"]


@register_method
class DoRA(LoRA):
    """DoRA through peft's ``LoraConfig(use_dora=True)``: LoRA of rank ``r`` on the direction, a trained magnitude.

    Args:
        target_modules: linear layers to adapt: dotted-name suffixes (``query``) or ``re:<regex>``
            (``None``: the task's defaults).
        r: the rank of every adapted layer (the paper's budget: 8).
        alpha: the low-rank update is scaled by α / r (α / √r with ``rslora``).
        dropout: dropout on the adapter inputs.
        rank_pattern: a fixed rank per module (see :class:`~flexlora_pl.methods.LoRA`).
        loraplus_ratio: LoRA+: train every ``B`` factor at this multiple of the learning rate of the others
            (``A`` and the magnitude); ``None``: off.
        rslora: scale the low-rank update by α / √r (peft's ``use_rslora``).
    """

    name = "dora"
    quantized_base = False  # its merge rescales each column by the magnitude: more than an added ΔW
    peft_variant: ClassVar[dict[str, Any]] = {"use_dora": True, "init_lora_weights": True}

    def layer_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        return [*super().layer_parameters(layer), layer.lora_magnitude_vector[ADAPTER_NAME].weight]

    def parameter_counts(self, model: nn.Module) -> dict[str, int]:
        """LoRA's counts plus every layer's magnitude vector (d_out each), which no rank direction holds."""
        counts = super().parameter_counts(model)
        magnitudes = sum(layer.lora_magnitude_vector[ADAPTER_NAME].weight.numel() for _, layer in self.layers(model))
        return {"active": counts["active"] + magnitudes, "allocated": counts["allocated"] + magnitudes}
