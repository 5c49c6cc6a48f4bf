"""Matrix-level importance scores for rank allocation (paper §3.2, §5.1 and Appendix G).

The default, spectral entropy (paper eq. 3), scores a module by how evenly its energy spreads over its
active directions::

    s_i = λ_i² / Σ_j λ_j²        I(Λ) = −(1 / log r) · Σ_i s_i · log(s_i + ε),   ε = 1e-8

Low entropy means energy sits in a few directions (redundancy: prune); high entropy means the module
uses all of its rank (expand). λ is an explicit parameter, so no SVD is needed. Every metric takes the
*active* λ of one module as a 1-D tensor and returns a scalar tensor; none returns NaN or inf: r = 1,
r = 0 and an all-zero λ score 0.

``sensitivity`` (AdaLoRA's smoothed |w · ∇w|) needs gradients over time, so it lives in
:class:`SensitivityTracker`, which the allocation driver feeds before every optimizer step.

Both kinds are registries: a new λ-based metric is a function decorated with :func:`register_importance`, a new
stateful one a class decorated with :func:`register_stateful_importance`; ``reallocation.importance`` then
accepts its name (``docs/extending.md``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

__all__ = [
    "IMPORTANCE_METRICS",
    "STATEFUL_METRICS",
    "SensitivityTracker",
    "elem_energy_entropy",
    "frobenius_importance",
    "importance_scores",
    "mat_energy_entropy",
    "metric_names",
    "nuclear_importance",
    "register_importance",
    "register_stateful_importance",
    "spectral_entropy",
]

EPS = 1e-8


def _energy_shares(lam: torch.Tensor) -> torch.Tensor:
    """``s_i = λ_i² / Σλ²`` in float64 (all zeros when Σλ² = 0).

    λ is scaled by its largest magnitude first: the shares do not change, and neither λ² of a huge λ
    (overflow) nor of a tiny one (underflow to an all-zero spectrum) can turn them into NaN.
    """
    lam = lam.double()
    peak = lam.abs().max() if lam.numel() else lam.new_zeros(())
    energy = (lam / peak.clamp_min(torch.finfo(torch.float64).tiny)).pow(2)
    total = energy.sum()
    return torch.where(total > 0, energy / total.clamp_min(torch.finfo(torch.float64).tiny), 0.0)


def _finite32(value: torch.Tensor) -> torch.Tensor:
    """Back to float32, saturating at its largest finite value instead of overflowing to inf."""
    limit = torch.finfo(torch.float32).max
    return value.clamp(-limit, limit).float()


def _neg_entropy_sum(shares: torch.Tensor) -> torch.Tensor:
    return -(shares * torch.log(shares + EPS)).sum()


def spectral_entropy(lam: torch.Tensor) -> torch.Tensor:
    """Normalised spectral entropy of the active λ (paper eq. 3), in [0, 1]; 0 for r ≤ 1 or λ = 0."""
    _check_1d(lam)
    r = lam.numel()
    if r <= 1:
        return lam.new_zeros((), dtype=torch.float32)
    return (_neg_entropy_sum(_energy_shares(lam)) / math.log(r)).clamp(0.0, 1.0).float()


def nuclear_importance(lam: torch.Tensor) -> torch.Tensor:
    """Mean |λ| over the active directions (paper eq. 7, left)."""
    _check_1d(lam)
    return _finite32(lam.double().abs().mean()) if lam.numel() else lam.new_zeros((), dtype=torch.float32)


def frobenius_importance(lam: torch.Tensor) -> torch.Tensor:
    """sqrt(Σ λ²) / n over the active directions (paper eq. 7, right)."""
    _check_1d(lam)
    n = lam.numel()
    return _finite32(lam.double().pow(2).sum().sqrt() / n) if n else lam.new_zeros((), dtype=torch.float32)


def elem_energy_entropy(lam: torch.Tensor) -> torch.Tensor:
    """Element-wise energy entropy (paper eq. 10): −1/(r log r) · Σ |λ_i| s_i log(s_i + ε)."""
    _check_1d(lam)
    r = lam.numel()
    if r <= 1:
        return lam.new_zeros((), dtype=torch.float32)
    shares = _energy_shares(lam)
    return _finite32(-(lam.double().abs() * shares * torch.log(shares + EPS)).sum() / (r * math.log(r)))


def mat_energy_entropy(lam: torch.Tensor) -> torch.Tensor:
    """Matrix-wise energy entropy (paper eq. 11): −1/(r log r) · (Σ |λ_i|) · Σ s_i log(s_i + ε)."""
    _check_1d(lam)
    r = lam.numel()
    if r <= 1:
        return lam.new_zeros((), dtype=torch.float32)
    return _finite32(lam.double().abs().sum() * _neg_entropy_sum(_energy_shares(lam)) / (r * math.log(r)))


IMPORTANCE_METRICS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "entropy": spectral_entropy,
    "nuclear": nuclear_importance,
    "frobenius": frobenius_importance,
    "elem_energy_entropy": elem_energy_entropy,
    "mat_energy_entropy": mat_energy_entropy,
}
"""λ-based metrics by name: a function of a module's 1-D active λ → a 0-d score (:func:`register_importance`)."""

STATEFUL_METRICS: dict[str, type] = {}
"""Metrics that gather statistics over training (``sensitivity``), by name: a class with ``update(named_layers)``
(called before every optimizer step), ``scores(named_layers)``, ``reset_direction(name, index)``,
``state_dict()`` and ``load_state_dict(state)`` (:func:`register_stateful_importance`)."""


def register_importance(name: str) -> Callable[[Callable], Callable]:
    """Decorator: make a λ-based metric selectable as ``reallocation.importance: <name>``."""
    return _register(IMPORTANCE_METRICS, name)


def register_stateful_importance(name: str) -> Callable[[type], type]:
    """Decorator: make a metric that gathers statistics every optimizer step selectable by ``name``."""
    return _register(STATEFUL_METRICS, name)


def _register(table: dict, name: str) -> Callable:
    if not isinstance(name, str) or not name:
        raise TypeError(f"an importance metric needs a non-empty name, got {name!r}")

    def add(obj):
        taken = IMPORTANCE_METRICS.get(name, STATEFUL_METRICS.get(name))
        if taken is not None and taken is not obj:
            raise ValueError(f"importance metric name {name!r} is taken by {taken.__qualname__}")
        table[name] = obj
        return obj

    return add


def metric_names() -> list[str]:
    """Every registered importance metric, λ-based first, then the stateful ones."""
    return [*IMPORTANCE_METRICS, *STATEFUL_METRICS]


def importance_scores(layers: Sequence, metric: str = "entropy") -> torch.Tensor:
    """Score each FlexLoRA layer with a λ-based metric; returns a float32 CPU tensor of shape (N,)."""
    try:
        fn = IMPORTANCE_METRICS[metric]
    except KeyError:
        raise ValueError(
            f"unknown importance metric {metric!r} for λ-based scoring; choose one of {list(IMPORTANCE_METRICS)} "
            f"(the stateful ones, {list(STATEFUL_METRICS)}, are scored by their tracker)"
        ) from None
    with torch.no_grad():
        scores = [fn(layer.lora_lambda.detach()[layer.rank_mask]) for layer in layers]
    return torch.stack(scores).float().cpu() if scores else torch.zeros(0)


@register_stateful_importance("sensitivity")
class SensitivityTracker:
    """AdaLoRA's smoothed sensitivity ``Ī · Ū`` of every adapter entry, summed per module.

    Per entry ``w``: ``I = |w · ∂L/∂w|``, ``Ī ← β1 Ī + (1 − β1) I``, ``Ū ← β2 Ū + (1 − β2) |I − Ī|``.
    A direction's score is ``s(λ_j) + mean_i s(P_ij) + mean_k s(Q_jk)`` (as in AdaLoRA), and a module's
    score the sum over its active directions. Call :meth:`update` once per optimizer step, while the
    gradients are the step's gradients; it makes no host sync.

    The statistics live on the device of the parameters they follow, in float32. Restored statistics
    (:meth:`load_state_dict`; Lightning loads checkpoints on the CPU) move to the device of their module's
    parameters the first time :meth:`update` meets it.

    Args:
        beta1: smoothing of the sensitivity ``Ī``, in [0, 1).
        beta2: smoothing of the uncertainty ``Ū``, in [0, 1).
    """

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85) -> None:
        for name, beta in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {beta}")
        self.beta1, self.beta2 = beta1, beta2
        self.avg: dict[str, list[torch.Tensor]] = {}
        self.unc: dict[str, list[torch.Tensor]] = {}
        self._restored: set[str] = set()  # modules whose restored statistics have not met their parameters yet

    @torch.no_grad()
    def update(self, named_layers: Sequence[tuple[str, object]]) -> None:
        """Fold the current gradients into the statistics of every layer that has them.

        Args:
            named_layers: ``(name, FlexLoRA layer)`` pairs, the names keying the statistics.
        """
        for name, layer in named_layers:
            params = (layer.lora_lambda, layer.lora_P, layer.lora_Q)
            if any(p.grad is None for p in params):
                continue
            sens = [(p.detach() * p.grad.detach()).abs().float() for p in params]
            if name not in self.avg:
                self.avg[name] = [torch.zeros_like(s) for s in sens]
                self.unc[name] = [torch.zeros_like(s) for s in sens]
            elif name in self._restored:
                self._restored.discard(name)
                for stats in (self.avg, self.unc):
                    stats[name] = [t.to(device=s.device, dtype=s.dtype) for t, s in zip(stats[name], sens, strict=True)]
            for avg, unc, s in zip(self.avg[name], self.unc[name], sens, strict=True):
                avg.mul_(self.beta1).add_(s, alpha=1 - self.beta1)
                unc.mul_(self.beta2).add_((s - avg).abs(), alpha=1 - self.beta2)

    @torch.no_grad()
    def scores(self, named_layers: Sequence[tuple[str, object]]) -> torch.Tensor:
        """The sensitivity of every layer (0 for one never updated), a float32 CPU tensor of shape (N,).

        Args:
            named_layers: ``(name, FlexLoRA layer)`` pairs; only a layer's active directions count.
        """
        out = []
        for name, layer in named_layers:
            if name not in self.avg:
                out.append(torch.zeros(()))
                continue
            s_lam, s_p, s_q = (a * u for a, u in zip(self.avg[name], self.unc[name], strict=True))
            per_direction = s_lam + s_p.mean(dim=0) + s_q.mean(dim=1)  # (r_max,)
            out.append(per_direction[layer.rank_mask.to(per_direction.device)].sum().cpu())
        return torch.stack(out).float() if out else torch.zeros(0)

    @torch.no_grad()
    def reset_direction(self, name: str, index: int) -> None:
        """Forget the statistics of one direction (called when it is pruned or re-initialised).

        Args:
            name: the module's name.
            index: the direction's slot in ``[0, r_max)``.
        """
        for stats in (self.avg.get(name), self.unc.get(name)):
            if stats:
                stats[0][index] = 0
                stats[1][:, index] = 0
                stats[2][index] = 0

    def state_dict(self) -> dict:
        return {"beta1": self.beta1, "beta2": self.beta2, "avg": self.avg, "unc": self.unc}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output, on whatever device it was loaded to.

        Args:
            state: ``beta1``, ``beta2`` and the ``avg`` / ``unc`` statistics by module name.
        """
        self.beta1, self.beta2 = state["beta1"], state["beta2"]
        self.avg = {name: list(stats) for name, stats in state["avg"].items()}
        self.unc = {name: list(stats) for name, stats in state["unc"].items()}
        self._restored = set(self.avg)


def _check_1d(lam: torch.Tensor) -> None:
    if lam.dim() != 1:
        raise ValueError(f"importance metrics take the 1-D tensor of active λ, got shape {tuple(lam.shape)}")
