"""FlexLoRA's allocation event as a plain object: settings in, an event record out, no Trainer (paper Algorithm 1).

After optimizer step ``t`` with ``t_warmup < t < T − t_final`` and ``(t − t_warmup) % ΔT == 0``::

    scores  = I(Λ_k) for every module k                       (importance.py, eq. 3 by default)
    b       = b(t)                                             (schedule.py, eq. 4)
    prune, expand = decide(scores, ranks, r_min, r_max, b)     (allocation.py, pure)
    for k in prune:  switch off k's weakest direction          (λ, P column, Q row, moments zeroed)
    for k in expand: switch on a free slot of k, λ = 0         (zero-impact: the output does not change)

:class:`AllocationSettings` holds every switch of an event (frozen, validated once); :class:`FlexLoRAAllocator`
runs events on a list of named :class:`~flexlora_pl.core.layer.FlexLoRALinear` layers and returns each one's
record: ranks after the event, scores, budget, the modules and slots that moved, flip-flops. It keeps no
history of its own: the caller passes the records so far (for the cool-down and the flip-flop window), so a
restored history is all a resumed run needs. The ``RankReallocation`` callback decides *when*; this decides
*what*.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from flexlora_pl.core.allocation import (
    ALLOCATION_MODES,
    DIRECTION_STDS,
    EXPANSION_INITS,
    NEW_DIRECTION_MOMENTS,
    PRUNE_CRITERIA,
    AllocationDecision,
    decide_allocation,
    event_generator,
    expand_direction,
    prune_direction,
    warm_second_moments,
)
from flexlora_pl.core.checks import require_bool, require_choice, require_int
from flexlora_pl.core.importance import metric_names
from flexlora_pl.core.layer import FlexLoRALinear
from flexlora_pl.core.schedule import BUDGET_FORMULAS, BUDGET_SCHEDULES, budget_at, event_steps, is_event_step

__all__ = ["AllocationEvent", "AllocationSettings", "FlexLoRAAllocator", "count_dead_ends", "count_flip_flops"]


@dataclass(frozen=True)
class AllocationSettings:
    """Every setting of the allocation schedule and of an event (the ``reallocation:`` group), checked once.

    The fields are :class:`~flexlora_pl.RankReallocation`'s arguments of the same names (its docstring says
    what each does). ``flip_flop_window=None`` resolves to ``expand_cooldown + 1``.
    """

    b0: int = 4
    t_warmup: int = 1000
    t_final: int = 1000
    delta_t: int = 200
    total_steps: int | None = None
    importance: str = "entropy"
    mode: str = "prune_and_expand"
    init: str = "zero_impact"
    r_min: int = 1
    b_schedule: str = "cubic"
    seed: int = 0
    budget_formula: str = "paper"
    rank_cap: bool = True
    prune_by: str = "magnitude"
    new_direction_std: str = "scaled"
    new_direction_moments: str = "zero"
    expand_cooldown: int = 0
    flip_flop_window: int | None = None
    allow_no_events: bool = False

    def __post_init__(self) -> None:
        for name, least in (("b0", 0), ("t_warmup", 0), ("t_final", 0), ("delta_t", 1), ("r_min", 0),
                            ("expand_cooldown", 0), ("seed", 0)):
            require_int(name, getattr(self, name), least)
        if self.total_steps is not None:
            require_int("total_steps", self.total_steps, 1)
        if self.flip_flop_window is None:
            object.__setattr__(self, "flip_flop_window", self.expand_cooldown + 1)
        require_int("flip_flop_window", self.flip_flop_window, 1)
        for name, allowed in (("importance", metric_names()), ("mode", ALLOCATION_MODES), ("init", EXPANSION_INITS),
                              ("b_schedule", BUDGET_SCHEDULES), ("budget_formula", BUDGET_FORMULAS),
                              ("prune_by", PRUNE_CRITERIA), ("new_direction_std", DIRECTION_STDS),
                              ("new_direction_moments", NEW_DIRECTION_MOMENTS)):
            require_choice(name, getattr(self, name), allowed)
        require_bool("rank_cap", self.rank_cap)
        require_bool("allow_no_events", self.allow_no_events)

    # ---------------------------------------------------------------- schedule
    def event_steps(self, total_steps: int) -> range:
        """Every step at which an event runs in a run of ``total_steps`` optimizer steps."""
        return event_steps(self.t_warmup, self.t_final, self.delta_t, total_steps)

    def is_event_step(self, step: int, total_steps: int) -> bool:
        """Whether an event runs after optimizer step ``step``."""
        return is_event_step(step, self.t_warmup, self.t_final, self.delta_t, total_steps)

    def budget(self, step: int, total_steps: int) -> int:
        """b(t): how many modules prune (and expand) at ``step``."""
        return budget_at(step, self.b0, self.t_warmup, self.t_final, total_steps, self.b_schedule,
                         self.budget_formula)


@dataclass
class AllocationEvent:
    """What one event did: the history ``record``, the active λ each module was scored on, the decision.

    ``record`` keys: ``step``, ``budget``, ``ranks`` (after the event), ``scores``, ``pruned`` / ``expanded``
    (module names), ``pruned_slots`` / ``expanded_slots`` and ``flip_flops``.
    """

    record: dict[str, Any]
    spectra: dict[str, list[float]]
    decision: AllocationDecision = field(default_factory=AllocationDecision)


Agreement = Callable[[int, int, Sequence[int], Sequence[int]], None]
"""``agree(step, budget, prune, expand)``: raises when the processes of a distributed run decided otherwise."""


class FlexLoRAAllocator:
    """Runs FlexLoRA's allocation events on named FlexLoRA layers.

    Args:
        named_layers: ``(name, layer)`` pairs in model order; the names key the records.
        settings: the schedule and the event's switches.
        tracker: the stateful importance metric's tracker (``sensitivity``), told about every pruned direction.
    """

    def __init__(self, named_layers: Sequence[tuple[str, FlexLoRALinear]], settings: AllocationSettings,
                 tracker: Any = None) -> None:
        self.settings = settings
        self.layer_names = [name for name, _ in named_layers]
        self.layers = [layer for _, layer in named_layers]
        self.tracker = tracker

    def ranks(self) -> list[int]:
        """Every layer's active rank (one host sync)."""
        return torch.stack([layer.rank_mask.sum() for layer in self.layers]).tolist()

    @torch.no_grad()
    def run_event(self, step: int, scores: torch.Tensor, total_steps: int, history: Sequence[dict[str, Any]],
                  optimizers: Iterable[torch.optim.Optimizer] = (), agree: Agreement | None = None,
                  on_expand: Callable[[int, int, int, FlexLoRALinear], None] | None = None) -> AllocationEvent:
        """Prune and expand at optimizer step ``step``; return the event.

        Args:
            step: the optimizer step after which the event runs.
            scores: every layer's importance, shape (num_layers,).
            total_steps: T, the run's optimizer steps (for b(t)).
            history: the records of the events so far (cool-down, flip-flops).
            optimizers: whose moments of a pruned or added direction are zeroed.
            agree: checks, before anything changes, that every process decided alike (DDP).
            on_expand: told ``(layer index, slot, rank before, layer)`` for every added direction.
        """
        s = self.settings
        scores = torch.as_tensor(scores, dtype=torch.float64).detach().cpu()
        if scores.shape != (len(self.layers),):
            raise ValueError(f"importance scores must have shape ({len(self.layers)},), got {tuple(scores.shape)}")
        ranks = self.ranks()
        budget = s.budget(step, total_steps)
        spectra = {name: layer.lora_lambda.detach()[layer.rank_mask].float().cpu().tolist()
                   for name, layer in zip(self.layer_names, self.layers, strict=True)}
        decision = decide_allocation(scores, ranks, s.r_min, [layer.max_rank for layer in self.layers], budget,
                                     s.mode, rank_cap=s.rank_cap, protected=self.cooling_down(history))
        if agree is not None:  # every process must take the same decision before any replica changes
            agree(step, budget, decision.prune, decision.expand)
        optimizers = list(optimizers)
        pruned_slots, expanded_slots = [], []
        for i in decision.prune:
            index = prune_direction(self.layers[i], optimizers, by=s.prune_by)
            pruned_slots.append(index)
            if self.tracker is not None:
                self.tracker.reset_direction(self.layer_names[i], index)
        for i in decision.expand:
            layer = self.layers[i]
            index = expand_direction(layer, optimizers, s.init, event_generator(s.seed, step, i),
                                     std=s.new_direction_std)
            if s.new_direction_moments == "warm":
                warm_second_moments(layer, index, optimizers)
            expanded_slots.append(index)
            if on_expand is not None:
                on_expand(i, index, ranks[i], layer)
        for i in decision.prune:
            ranks[i] -= 1
        for i in decision.expand:
            ranks[i] += 1
        record = {
            "step": step,
            "budget": budget,
            "ranks": ranks,
            "scores": scores.tolist(),  # full precision: sensitivities are often ~1e-10
            "pruned": [self.layer_names[i] for i in decision.prune],
            "expanded": [self.layer_names[i] for i in decision.expand],
            "pruned_slots": pruned_slots,
            "expanded_slots": expanded_slots,
        }
        record["flip_flops"] = count_flip_flops(record, history, s.flip_flop_window)
        return AllocationEvent(record, spectra, decision)

    def cooling_down(self, history: Sequence[dict[str, Any]]) -> set[int]:
        """Modules that gained a direction at one of the last ``expand_cooldown`` events: they may not prune."""
        if self.settings.expand_cooldown == 0:
            return set()
        names = {name for event in history[-self.settings.expand_cooldown:] for name in event["expanded"]}
        return {i for i, name in enumerate(self.layer_names) if name in names}

    # ---------------------------------------------------------------- checks
    def check_r_min(self, resumed: bool) -> str | None:
        """Refuse an ``r_min`` that no layer's rank exceeds; returns a note for a resumed run at the floor."""
        s = self.settings
        if s.mode == "expand_only":  # never prunes: r_min plays no part
            return None
        ranks = [layer.rank for layer in self.layers]
        if any(rank > s.r_min for rank in ranks):
            return None
        if resumed and all(rank == s.r_min for rank in ranks):
            # resumed after earlier events pruned every layer down to the floor (prune_only): as configured
            return f"every layer is at r_min={s.r_min}; later events move nothing"
        initial = _span(layer.init_rank for layer in self.layers)
        now = _span(ranks)
        where = f"initial rank {initial}" + ("" if now == initial else f", now {now}")
        raise ValueError(
            f"r_min={s.r_min} is not below the rank of any FlexLoRA layer ({where}). A layer "
            f"is pruned only while its rank exceeds r_min, so with mode={s.mode!r} no layer could ever be "
            "pruned, no rank would ever move, and the run would be plain LoRA. Lower r_min to "
            f"{max(min(ranks) - 1, 0)} or less, raise init_rank above {s.r_min} (max_rank >= init_rank), "
            "or use mode: expand_only, which never prunes."
        )

    def check_room_to_grow(self, resumed: bool) -> None:
        """Refuse a run in which no layer could ever gain a direction: every one starts at its ``max_rank``."""
        if self.settings.mode == "prune_only" or not self.settings.rank_cap or resumed:
            return
        if any(layer.rank < layer.max_rank for layer in self.layers):
            return
        caps = _span(layer.max_rank for layer in self.layers)
        raise ValueError(
            f"every FlexLoRA layer starts at its max_rank ({caps}), so with mode={self.settings.mode!r} no "
            "layer could ever gain a direction and no rank would move: the run would be a fixed-rank adapter. "
            "Raise max_rank above init_rank (the paper uses max_rank = 1.5 x init_rank), or use mode: prune_only."
        )


def count_flip_flops(record: dict[str, Any], history: Sequence[dict[str, Any]], window: int) -> int:
    """How many of ``record``'s prunes remove a direction (module and slot) added at one of the last ``window``
    events of ``history`` (a slot pruned now is active, so its latest addition is the one that counts)."""
    added = {(name, slot)
             for event in history[-window:]
             for name, slot in zip(event["expanded"], event.get("expanded_slots", []), strict=False)}
    return sum((name, slot) in added for name, slot in zip(record["pruned"], record["pruned_slots"], strict=True))


def count_dead_ends(history: Sequence[dict[str, Any]], layer_names: Sequence[str]) -> list[str]:
    """Modules that an event pruned to rank 1 and no later event expanded, in ``layer_names`` order.

    Spectral entropy (eq. 3) of a single direction is 0, the lowest score there is, so while any other module
    scores above 0 such a module is never among the b(t) most important and stays at rank 1.
    """
    index = {name: i for i, name in enumerate(layer_names)}
    dead: set[str] = set()
    for event in history:
        for name in event["pruned"]:
            if name in index and event["ranks"][index[name]] == 1:
                dead.add(name)
        dead.difference_update(event["expanded"])
    return [name for name in layer_names if name in dead]


def _span(values: Iterable[int]) -> str:
    """``"8"`` for one distinct value, ``"4 to 8"`` for several."""
    distinct = sorted(set(values))
    return str(distinct[0]) if len(distinct) == 1 else f"{distinct[0]} to {distinct[-1]}"
