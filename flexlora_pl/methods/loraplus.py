"""LoRA+ (Hayou, Ghosh and Yu, ICML 2024, https://arxiv.org/abs/2402.12354): ``B`` learns faster than ``A``.

In a LoRA update ``ΔW = (α / r) · B A`` the factor ``B`` (d_out × r, zero at start) and the factor ``A``
(r × d_in) play different roles, and for wide layers a single learning rate is far from the best for both:
LoRA+ trains ``B`` at ``ratio`` times ``A``'s learning rate (its authors suggest 16, the default of
``configs/methods/loraplus.yaml``). It changes nothing but the optimizer's parameter groups, so it is an option of
every LoRA-family method (``loraplus_ratio``, off when ``None``) rather than a method of its own:

    --model.init_args.method.init_args.loraplus_ratio 16

The groups are ``adapter`` (every adapter parameter but the ``B`` factors, at the optimizer's rate) and
``adapter_B`` (at ``ratio`` times it, through :meth:`~flexlora_pl.methods.AdaptationMethod.optimizer_groups`'
``lr_scale``); an LR scheduler scales both alike, so the ratio holds at every step. The ratio is recorded in
``config.yaml`` (the method's init args) and in ``metrics.json`` (the method's facts).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from torch import nn

__all__ = ["LORAPLUS_OPTION", "check_loraplus_ratio", "loraplus_groups"]

#: the option's path in a config, for messages
LORAPLUS_OPTION = "model.init_args.method.init_args.loraplus_ratio"


def check_loraplus_ratio(ratio: float | None, method: str) -> float | None:
    """``ratio`` as a float (``None``: LoRA+ off); refuses a ratio that is not a finite number above 0.

    Args:
        ratio: the learning-rate ratio of ``B`` to ``A``.
        method: the method's class name, for the message.
    """
    if ratio is None:
        return None
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not math.isfinite(ratio) or ratio <= 0:
        raise ValueError(f"{method}: {LORAPLUS_OPTION} must be a number above 0 (LoRA+'s authors suggest 16; "
                         f"1 is plain LoRA), or null to switch LoRA+ off; got {ratio!r}")
    return float(ratio)


def loraplus_groups(parameters: Sequence[nn.Parameter], b_parameters: Sequence[nn.Parameter],
                    ratio: float | None) -> list[dict[str, Any]]:
    """The optimizer groups of an adapter whose ``B`` factors are ``b_parameters`` (a subset of ``parameters``).

    ``ratio`` ``None``: one group ``adapter``, as every method without LoRA+. Otherwise ``adapter`` (the rest, at
    the optimizer's rate) and ``adapter_B`` (``lr_scale = ratio``).

    Raises:
        ValueError: a ``B`` factor that is not among ``parameters``, or LoRA+ on an adapter without ``B`` factors.
    """
    if ratio is None:
        return [{"params": list(parameters), "name": "adapter"}]
    chosen = {id(p) for p in b_parameters}
    if not chosen:
        raise ValueError("LoRA+ needs the adapter's B factors, and this adapter has none")
    if not chosen <= {id(p) for p in parameters}:
        raise ValueError("LoRA+: a B factor is not one of the adapter's parameters")
    rest = [p for p in parameters if id(p) not in chosen]
    return [{"params": rest, "name": "adapter"}, {"params": list(b_parameters), "name": "adapter_B", "lr_scale": ratio}]
