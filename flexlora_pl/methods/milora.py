"""MiLoRA (Wang et al., NAACL 2025, https://arxiv.org/abs/2406.09044): LoRA on the minor singular components.

MiLoRA keeps the principal components of each target weight ``W = U diag(σ) Vᵀ`` (k = min(d_out, d_in)
components, σ descending) frozen and starts the factors from the r smallest, on the argument that those carry
the least pretrained knowledge and are the least harmful to overwrite::

    A₀ = diag(√(σ_{k−r+1..k} / s)) V_{k−r+1..k}ᵀ,  B₀ = U_{k−r+1..k} diag(√(σ_{k−r+1..k} / s)),
    W_res = W − s · B₀ A₀,  s = α / r

It is PiSSA's construction at the other end of the spectrum, with PiSSA's scale convention (:mod:`.pissa`).
peft 0.21 has no MiLoRA: peft injects plain LoRA layers and :func:`~flexlora_pl.methods.svd_init.svd_init` sets
them; the adapted model's peft config then records ``init_lora_weights: "milora"`` (a value of this project, never
written to an export), which tells it from LoRA and PiSSA. Resume, the peft export as a plain LoRA adapter of rank
2r on the original base, the merged export and the refused inputs are :mod:`flexlora_pl.methods.svd_init`'s.

A weight whose smallest singular values are zero (a rank-deficient layer) gives zero rows of A₀ and columns of
B₀ there, and such a direction receives no gradient: choose r at most the weight's numerical rank.
"""

from __future__ import annotations

from typing import Any, ClassVar

from flexlora_pl.methods.base import register_method
from flexlora_pl.methods.svd_init import SVDInitLoRA

__all__ = ["MiLoRA"]


@register_method
class MiLoRA(SVDInitLoRA):
    """MiLoRA: LoRA of rank ``r`` initialised from the minor r singular components, the rest frozen.

    Args:
        target_modules: linear layers to adapt (float32 ``nn.Linear`` weights): dotted-name suffixes (``query``) or
            ``re:<regex>`` (``None``: the task's defaults).
        r: the rank of every adapted layer, the number of (smallest) singular components taken.
        alpha: the update is scaled by α / r (α / √r with ``rslora``); the initial product is the same for any α.
        dropout: dropout on the adapter inputs.
        rank_pattern: a fixed rank per module (see :class:`~flexlora_pl.methods.LoRA`).
        loraplus_ratio: LoRA+: train every ``B`` factor at this multiple of ``A``'s learning rate (``None``: off).
        rslora: scale the update by α / √r (peft's ``use_rslora``).
    """

    name = "milora"
    components = "minor"
    init_marker = "milora"
    peft_variant: ClassVar[dict[str, Any]] = {"use_dora": False, "init_lora_weights": "milora"}
