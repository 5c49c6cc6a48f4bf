"""Allocation events: which modules give and take a direction, and how the change is applied.

:func:`decide_allocation` is a pure function of the scores and ranks: the ``b`` least important
modules that can shrink (``r > r_min``) each lose one direction and the ``b`` most important ones that
can grow (``r < r_max``) each gain one. A module never does both in one event, ties break by module
order, and in the default mode the total active rank is conserved. ``rank_cap=False`` selects as the
authors' code does instead (no per-module cap there): the ``b`` most important modules expand whatever
their rank, a module may both prune and expand, and one still at ``r_max`` after pruning forfeits its
slot (capacity is fixed here; the authors' code would grow the tensor).

:func:`prune_direction` switches off the active direction with the smallest |λ| (``by="signed"``: the
smallest signed λ, as the authors' code does) and zeroes its λ, P column, Q row, gradients and optimizer
moments. :func:`expand_direction` switches on the first free slot with the chosen initialisation;
``zero_impact`` (the paper's) sets λ = 0 and draws P and Q from a Gaussian with σ = 1/√d (``std="unit"``:
σ = 1, the authors' code's), so the model output does not change. Draws come from a generator seeded by
``(seed, step, module index)``: every DDP rank, and a resumed run, draws the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

import torch

from flexlora_pl.core.layer import FlexLoRALinear, gaussian_std

__all__ = [
    "ALLOCATION_MODES",
    "DIRECTION_STDS",
    "EXPANSION_INITS",
    "NEW_DIRECTION_MOMENTS",
    "PRUNE_CRITERIA",
    "AllocationDecision",
    "decide_allocation",
    "event_generator",
    "expand_direction",
    "prune_direction",
    "register_expansion_init",
    "warm_second_moments",
]

ALLOCATION_MODES = ("prune_and_expand", "prune_only", "expand_only")
PRUNE_CRITERIA = ("magnitude", "signed")  # which active direction a pruned module loses
DIRECTION_STDS = ("scaled", "unit")  # σ of a zero_impact direction's P column and Q row: 1/√d or 1
NEW_DIRECTION_MOMENTS = ("zero", "warm")  # a new direction's Adam second moments: zero, or the active entries' mean
SMALL_LAMBDA = 1e-3  # λ of a new direction under the ``small`` initialisation


@dataclass(frozen=True)
class AllocationDecision:
    """Module indices that lose (``prune``) and gain (``expand``) one direction at an event."""

    prune: tuple[int, ...] = ()
    expand: tuple[int, ...] = ()


def decide_allocation(
    scores: Sequence[float] | torch.Tensor,
    ranks: Sequence[int] | torch.Tensor,
    r_min: int,
    r_max: int | Sequence[int],
    budget: int,
    mode: str = "prune_and_expand",
    rank_cap: bool = True,
    protected: Collection[int] = (),
) -> AllocationDecision:
    """Choose the modules that prune and expand at one event (paper Algorithm 1, lines 6–9).

    Args:
        scores: importance of each module (higher = more important).
        ranks: active rank of each module.
        r_min: a module never shrinks below this rank.
        r_max: a module never grows above this rank (one value or one per module).
        budget: ``b(t)``, the most modules that prune (and expand).
        mode: ``prune_and_expand`` (conserves total rank), ``prune_only`` or ``expand_only``.
        rank_cap: ``True``: only modules below ``r_max`` compete for expansion and no module both prunes
            and expands. ``False`` (the authors' code): the ``budget`` most important modules expand,
            pruned or not, and those still at ``r_max`` after pruning are skipped, slot unused.
        protected: modules that may not prune at this event (an expansion cool-down); they may still expand.
    """
    if mode not in ALLOCATION_MODES:
        raise ValueError(f"unknown allocation mode {mode!r}; choose one of {list(ALLOCATION_MODES)}")
    scores = [float(s) for s in scores]
    ranks = [int(r) for r in ranks]
    if len(scores) != len(ranks):
        raise ValueError(f"got {len(scores)} scores for {len(ranks)} modules")
    bad = [i for i, s in enumerate(scores) if s != s or s in (float("inf"), float("-inf"))]
    if bad:
        raise ValueError(f"importance scores of modules {bad[:5]} are not finite; refusing to reallocate")
    caps = [int(r_max)] * len(ranks) if isinstance(r_max, int) else [int(c) for c in r_max]
    if budget <= 0 or not ranks:
        return AllocationDecision()

    n = len(ranks)
    shielded = set(protected)
    lowest = sorted((i for i in range(n) if ranks[i] > r_min and i not in shielded), key=lambda i: (scores[i], i))
    if not rank_cap:
        return _uncapped_decision(scores, ranks, caps, lowest, budget, mode)
    highest = sorted((i for i in range(n) if ranks[i] < caps[i]), key=lambda i: (-scores[i], i))
    if mode == "prune_only":
        return AllocationDecision(prune=tuple(lowest[:budget]))
    if mode == "expand_only":
        return AllocationDecision(expand=tuple(highest[:budget]))
    k = min(budget, len(lowest), len(highest))
    while k > 0:
        prune = lowest[:k]
        expand = [i for i in highest if i not in prune][:k]
        if len(expand) == k:
            return AllocationDecision(prune=tuple(prune), expand=tuple(expand))
        k -= 1
    return AllocationDecision()


def _uncapped_decision(
    scores: list[float], ranks: list[int], caps: list[int], lowest: list[int], budget: int, mode: str
) -> AllocationDecision:
    """The authors' selection: prune the ``budget`` lowest above ``r_min``, expand the ``budget`` highest
    of all modules; a pruned module may expand too, and one left at its capacity forfeits its slot."""
    prune = [] if mode == "expand_only" else lowest[:budget]
    if mode == "prune_only":
        return AllocationDecision(prune=tuple(prune))
    top = sorted(range(len(ranks)), key=lambda i: (-scores[i], i))[:budget]
    expand = [i for i in top if ranks[i] - (i in prune) < caps[i]]
    return AllocationDecision(prune=tuple(prune), expand=tuple(expand))


def event_generator(seed: int, step: int, module_index: int) -> torch.Generator:
    """A CPU generator determined by ``(seed, step, module_index)`` alone."""
    mixed = (seed * 0x9E3779B97F4A7C15 + step * 0xBF58476D1CE4E5B9 + module_index * 0x94D049BB133111EB)
    return torch.Generator().manual_seed(mixed % (2**63 - 1))


@torch.no_grad()
def prune_direction(
    layer: FlexLoRALinear, optimizers: Iterable[torch.optim.Optimizer] = (), by: str = "magnitude"
) -> int:
    """Switch off the active direction with the smallest |λ| (lowest index on ties); return its index.

    ``by="signed"`` picks the smallest signed λ instead, as the authors' code does: the most negative
    λ, which may be the module's strongest direction.
    """
    if by not in PRUNE_CRITERIA:
        raise ValueError(f"unknown pruning criterion {by!r}; choose one of {list(PRUNE_CRITERIA)}")
    active = layer.rank_mask.nonzero().flatten()
    if active.numel() == 0:
        raise ValueError("cannot prune a layer with no active direction")
    values = layer.lora_lambda.detach()[active]
    key = values.abs() if by == "magnitude" else values
    index = int(active[int(torch.argmin(key))])  # argmin returns the first minimum
    layer.rank_mask[index] = False
    _reset_direction(layer, index, optimizers)
    return index


ExpansionInit = Callable[[FlexLoRALinear, int, "torch.Generator | None", str], None]
"""Writes a new direction into free slot ``index`` of a layer: ``init(layer, index, generator, std)``.

It is called after the slot's λ, P column, Q row and optimizer moments were zeroed and before the slot is
switched on (so ``layer.rank_mask`` still holds the other active directions). Draw from ``generator`` only:
it is seeded by (seed, step, module), so every DDP process and a resumed run draw the same numbers."""

EXPANSION_INITS: dict[str, ExpansionInit] = {}
"""Initialisation name → function: what ``reallocation.init`` chooses from (:func:`register_expansion_init`)."""


def register_expansion_init(name: str) -> Callable[[ExpansionInit], ExpansionInit]:
    """Decorator: make an :data:`ExpansionInit` selectable as ``reallocation.init: <name>``."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"an expansion init needs a non-empty name, got {name!r}")

    def add(fn: ExpansionInit) -> ExpansionInit:
        if name in EXPANSION_INITS and EXPANSION_INITS[name] is not fn:
            raise ValueError(f"expansion init name {name!r} is taken by {EXPANSION_INITS[name].__qualname__}")
        EXPANSION_INITS[name] = fn
        return fn

    return add


def _gaussian_pair(layer: FlexLoRALinear, generator: torch.Generator | None, std: str) -> tuple[torch.Tensor, ...]:
    """A P column (d_out,) and a Q row (d_in,) ~ N(0, 1), scaled to σ = 1/√d when ``std="scaled"``."""
    kw = {"generator": generator} if generator is not None else {}
    p = torch.randn(layer.out_features, **kw)
    q = torch.randn(layer.in_features, **kw)
    if std == "scaled":
        p, q = p * gaussian_std(layer.out_features), q * gaussian_std(layer.in_features)
    return p, q


@register_expansion_init("zero_impact")
def zero_impact_init(layer: FlexLoRALinear, index: int, generator: torch.Generator | None, std: str) -> None:
    """λ = 0, P column ~ N(0, 1/d_out), Q row ~ N(0, 1/d_in): the output does not change (the paper's)."""
    p, q = _gaussian_pair(layer, generator, std)
    layer.lora_P[:, index] = p.to(layer.lora_P)
    layer.lora_Q[index] = q.to(layer.lora_Q)


@register_expansion_init("orthogonal")
def orthogonal_init(layer: FlexLoRALinear, index: int, generator: torch.Generator | None, std: str) -> None:
    """λ = 0, unit vectors orthogonal to the active P columns / Q rows: the output does not change."""
    p, q = _gaussian_pair(layer, generator, std)
    active = layer.rank_mask
    layer.lora_P[:, index] = _orthonormal_to(p, layer.lora_P.detach()[:, active].float().cpu()).to(layer.lora_P)
    layer.lora_Q[index] = _orthonormal_to(q, layer.lora_Q.detach()[active].float().t().cpu()).to(layer.lora_Q)


@register_expansion_init("small")
def small_init(layer: FlexLoRALinear, index: int, generator: torch.Generator | None, std: str) -> None:
    """As ``orthogonal``, with λ = 1e-3: the output moves slightly."""
    orthogonal_init(layer, index, generator, std)
    layer.lora_lambda[index] = SMALL_LAMBDA


@register_expansion_init("zero")
def zero_init(layer: FlexLoRALinear, index: int, generator: torch.Generator | None, std: str) -> None:
    """λ, P and Q stay zero: the direction receives no gradient and stays frozen."""


@torch.no_grad()
def expand_direction(
    layer: FlexLoRALinear,
    optimizers: Iterable[torch.optim.Optimizer] = (),
    init: str = "zero_impact",
    generator: torch.Generator | None = None,
    std: str = "scaled",
) -> int:
    """Switch on the first free slot, initialised by ``init`` (a name in :data:`EXPANSION_INITS`); return its index.

    ``zero_impact``: λ = 0, P column ~ N(0, 1/d_out), Q row ~ N(0, 1/d_in) — output unchanged.
    ``orthogonal``: λ = 0, unit vectors orthogonal to the active P columns / Q rows — output unchanged.
    ``small``: as ``orthogonal`` but λ = 1e-3 (the output moves slightly).
    ``zero``: λ, P and Q zero: the direction receives no gradient and stays frozen.

    ``std="unit"`` draws the ``zero_impact`` vectors with σ = 1, as the authors' code does (norm ≈ √d);
    ``orthogonal`` and ``small`` normalise their vectors to unit norm whatever ``std`` is.
    """
    if init not in EXPANSION_INITS:
        raise ValueError(f"unknown expansion init {init!r}; choose one of {list(EXPANSION_INITS)}")
    if std not in DIRECTION_STDS:
        raise ValueError(f"unknown new-direction std {std!r}; choose one of {list(DIRECTION_STDS)}")
    free = (~layer.rank_mask).nonzero().flatten()
    if free.numel() == 0:
        raise ValueError(f"cannot expand a layer at full capacity (max_rank={layer.max_rank})")
    index = int(free[0])
    _reset_direction(layer, index, optimizers)
    EXPANSION_INITS[init](layer, index, generator, std)
    layer.rank_mask[index] = True
    return index


@torch.no_grad()
def warm_second_moments(layer: FlexLoRALinear, index: int, optimizers: Iterable[torch.optim.Optimizer] = ()) -> int:
    """Start direction ``index``'s Adam second moments at the mean of the layer's other active entries.

    A direction added with zeroed moments inside a tensor whose step count is large gets no bias
    correction, so under a steady gradient its k-th update is ``(1 − β1^k) / √(1 − β2^k)`` times a
    settled one (≈ 3.2× at k = 1). Seeding ``exp_avg_sq`` (Adam, AdamW) with the mean of the active
    entries of the same tensor (P's active columns, λ's active entries, Q's active rows) makes the first
    updates about the size of the others'. The first moment stays zero. Optimizers without
    ``exp_avg_sq`` are left as they are. Returns how many state tensors were seeded.
    """
    others = layer.rank_mask.clone()
    others[index] = False
    if not bool(others.any()):
        return 0
    seeded = 0
    parts = ((layer.lora_P, lambda t: t[:, others], lambda t, v: t[:, index].fill_(v)),
             (layer.lora_lambda, lambda t: t[others], lambda t, v: t[index].fill_(v)),
             (layer.lora_Q, lambda t: t[others], lambda t, v: t[index].fill_(v)))
    for param, active_of, fill in parts:
        for optimizer in optimizers:
            moment = optimizer.state.get(param, {}).get("exp_avg_sq")
            if torch.is_tensor(moment) and moment.shape == param.shape:
                fill(moment, float(active_of(moment).float().mean()))
                seeded += 1
    return seeded


def _orthonormal_to(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """``v`` minus its projection onto the column space of ``basis`` (d, k), scaled to unit norm."""
    if basis.shape[1] > 0:
        coeffs = torch.linalg.lstsq(basis, v.unsqueeze(1)).solution  # (k, 1)
        residual = v - (basis @ coeffs).squeeze(1)
        if residual.norm() > 1e-6 * v.norm():  # else the active space already spans everything
            v = residual
    return v / v.norm().clamp_min(1e-12)


def _reset_direction(layer: FlexLoRALinear, index: int, optimizers: Iterable[torch.optim.Optimizer]) -> None:
    """Zero direction ``index``: values, gradients and every optimizer state tensor shaped like its param."""
    slices = ((layer.lora_P, (slice(None), index)), (layer.lora_lambda, (index,)), (layer.lora_Q, (index,)))
    for param, where in slices:
        param.data[where] = 0
        if param.grad is not None:
            param.grad[where] = 0
        for optimizer in optimizers:
            state = optimizer.state.get(param, {})
            for value in state.values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value[where] = 0
