"""PiSSA (Meng, Wang and Zhang, NeurIPS 2024, https://arxiv.org/abs/2404.02948): LoRA on the principal components.

PiSSA starts the factors from the r largest singular components of each target weight ``W = U diag(σ) Vᵀ``
and freezes the rest::

    A₀ = diag(√(σ_{1..r} / s)) V_{1..r}ᵀ,  B₀ = U_{1..r} diag(√(σ_{1..r} / s)),  W_res = W − s · B₀ A₀,  s = α / r

so that training moves the directions that carry most of ``W`` while the model starts as its base model. It is
the convention of peft's ``LoraConfig(init_lora_weights="pissa")`` (peft 0.21 has it: exact SVD, σ divided by the
scale), computed by :func:`~flexlora_pl.methods.svd_init.svd_init` so that MiLoRA shares it; the adapted model's
peft config records ``init_lora_weights: "pissa"``. Resume, the peft export as a plain LoRA adapter of rank 2r on
the original base, the merged export and the refused inputs are :mod:`flexlora_pl.methods.svd_init`'s.
"""

from __future__ import annotations

from typing import Any, ClassVar

from flexlora_pl.methods.base import register_method
from flexlora_pl.methods.svd_init import SVDInitLoRA

__all__ = ["PiSSA"]


@register_method
class PiSSA(SVDInitLoRA):
    """PiSSA: LoRA of rank ``r`` initialised from the principal r singular components, the residual frozen.

    Args:
        target_modules: linear layers to adapt (float32 ``nn.Linear`` weights): dotted-name suffixes (``query``) or
            ``re:<regex>`` (``None``: the task's defaults).
        r: the rank of every adapted layer, the number of singular components taken.
        alpha: the update is scaled by α / r (α / √r with ``rslora``); the initial product is the same for any α.
        dropout: dropout on the adapter inputs.
        rank_pattern: a fixed rank per module (see :class:`~flexlora_pl.methods.LoRA`).
        loraplus_ratio: LoRA+: train every ``B`` factor at this multiple of ``A``'s learning rate (``None``: off).
        rslora: scale the update by α / √r (peft's ``use_rslora``).
    """

    name = "pissa"
    components = "principal"
    init_marker = "pissa"
    peft_variant: ClassVar[dict[str, Any]] = {"use_dora": False, "init_lora_weights": "pissa"}
