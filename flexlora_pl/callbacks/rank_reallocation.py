"""The ``RankReallocation`` callback: runs FlexLoRA's allocation events during ``Trainer.fit``.

The callback only decides *when*. What an event does lives in :mod:`flexlora_pl.core.allocation` (which
modules, how a direction is pruned or added), :mod:`flexlora_pl.core.importance` (the scores) and
:mod:`flexlora_pl.core.schedule` (the steps and the budget b(t)).
"""

from __future__ import annotations

import inspect
import itertools
import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from typing_extensions import override

from flexlora_pl.callbacks.first_update import FirstUpdateMonitor
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
from flexlora_pl.core.importance import METRIC_NAMES, SensitivityTracker, importance_scores
from flexlora_pl.core.inject import flexlora_layers
from flexlora_pl.core.layer import FlexLoRALinear
from flexlora_pl.core.schedule import BUDGET_FORMULAS, BUDGET_SCHEDULES, budget_at, event_steps, is_event_step
from flexlora_pl.module import refuse_sharded_strategy
from flexlora_pl.runs.consensus import check_same_decision
from flexlora_pl.runs.seeding import resolve_seed

__all__ = ["SPECTRA_FILENAME", "RankReallocation", "sensitivity_tracker"]

SPECTRA_FILENAME = "lambda_spectra.json"
"""Written into the run folder at every event: every module's active λ as scored there (paper Figure 3)."""


class RankReallocation(Callback):
    """Move rank between FlexLoRA layers during training (paper Algorithm 1).

    After optimizer step ``t`` with ``t_warmup < t < T − t_final`` and ``(t − t_warmup) % delta_t == 0``,
    the ``b(t)`` least important layers each lose their weakest direction and the ``b(t)`` most
    important layers each gain a new one. ``t`` counts optimizer steps, so gradient accumulation is
    handled. Per event the callback writes every layer's rank and importance, b(t) and the total active
    rank to the Trainer's loggers (at the event's step, whatever ``log_every_n_steps`` is), and keeps
    the whole trajectory in :attr:`history`, which is saved in checkpoints.

    Scores come from the LightningModule's ``importance_scores(metric)`` whenever it has one
    (:class:`~flexlora_pl.FlexLoRAModule` does): it is called with ``importance`` at every event, for
    every metric, ``sensitivity`` included, so a subclass that overrides it always decides. A module
    without the method is scored by the built-in metric. For ``sensitivity`` the callback feeds a
    :class:`~flexlora_pl.core.importance.SensitivityTracker` before every optimizer step; the module reads it
    through :func:`sensitivity_tracker`.

    Every event also records, per module, the active λ it was scored on (the run folder's
    ``lambda_spectra.json``, :data:`SPECTRA_FILENAME`), the directions it pruned and added by slot, and
    how many of its prunes removed a direction that one of the last ``flip_flop_window`` events had added
    (a *flip-flop*: eq. 3 divides by ``log r``, so a module's score drops when it gains a zero direction);
    the cumulative count is logged as ``flexlora/flip_flops``. Modules that the events pruned down to
    rank 1 and that no later event expanded are *dead ends* (:attr:`dead_ends`): a single direction has
    entropy 0, so under the entropy metrics such a module scores lowest and is never chosen to grow again.
    At the optimizer step after an event, the size of the new directions' first λ update relative to the
    same step's update of the module's other active λ entries is logged as
    ``flexlora/new_direction_update_ratio`` (≈ 3.2 for zeroed Adam moments and a steady gradient; see
    ``new_direction_moments``).

    Everything is checked when fitting starts (``on_fit_start``, after the LightningModule's own
    ``setup``, so the number of optimizer steps can depend on data built there), before the first step.

    Under DDP every process decides on its own replica; at each event the decisions are compared with one
    small collective (a checksum), and a run whose processes disagree stops with an error naming the event
    (:mod:`flexlora_pl.runs.consensus`) instead of letting DDP's buffer broadcast hide the divergence.

    ``budget_formula``, ``rank_cap``, ``prune_by``, ``new_direction_std`` and ``rebuild_optimizer`` reproduce
    behaviours of the authors' reference code, so that what each costs can be measured
    (``docs/differences.md``; ``configs/ablations/reference_code.yaml`` turns them all on). Their defaults
    keep this implementation's behaviour.

    Args:
        b0: initial budget: modules that prune (and expand) per event at the start of the schedule.
        t_warmup: optimizer steps before the first event may run.
        t_final: the last ``t_final`` optimizer steps run with frozen ranks.
        delta_t: optimizer steps between events.
        total_steps: total optimizer steps ``T``; by default ``trainer.estimated_stepping_batches``.
        importance: importance metric: ``entropy`` (paper), ``nuclear``, ``frobenius``,
            ``sensitivity``, ``elem_energy_entropy`` or ``mat_energy_entropy``.
        mode: ``prune_and_expand`` (paper; total rank conserved), ``prune_only`` or ``expand_only``.
        init: initialisation of a new direction: ``zero_impact`` (paper), ``orthogonal``, ``small``
            or ``zero``.
        r_min: no layer is pruned below this rank. In ``prune_and_expand`` and ``prune_only`` at least
            one layer must start above it, or no rank could ever move; ``expand_only`` ignores it.
        b_schedule: ``cubic`` (paper eq. 4) or ``constant`` (b0 at every event).
        seed: seed of the draws for new directions (combined with the step and the layer index);
            ``None`` follows ``seed_everything`` (the run's ``PL_GLOBAL_SEED``, read when the callback is
            built), an explicit value overrides it.
        verbose: report each event through ``rank_zero_info``.
        allow_no_events: a schedule that can never fire (``t_warmup``, ``t_final`` and ``delta_t``
            leave no event step before ``T − t_final``) is a configuration error by default, raised
            before training starts; ``True`` turns it into a warning (ranks then stay fixed).
        budget_formula: the ``cubic`` schedule's formula: ``paper`` (eq. 4,
            ``round(b0 · (1 − (t − t_warmup)/(T − t_final))³)``) or ``reference`` (the authors' code:
            ``round(b0 · (1 − p³))`` with ``p = (t − t_warmup)/(T − t_final − t_warmup)`` clamped to [0, 1],
            halves rounded to even). No effect with ``b_schedule: constant``.
        rank_cap: ``True``: only layers below their ``max_rank`` compete for expansion and no layer both
            prunes and expands at one event. ``False`` (the authors' code, which has no cap): the ``b(t)``
            most important layers expand whatever their rank, a pruned layer may expand too, and a layer
            still at ``max_rank`` after pruning forfeits its slot (capacity is fixed here; set ``max_rank``
            to ``init_rank`` + the number of events and no slot is ever forfeited).
        prune_by: which direction a pruned layer loses: ``magnitude`` (smallest |λ|) or ``signed``
            (smallest signed λ, the authors' code: the most negative λ, possibly the strongest direction).
        new_direction_std: σ of a ``zero_impact`` direction's P column and Q row: ``scaled`` (1/√d, unit
            expected norm) or ``unit`` (σ = 1, the authors' code). ``orthogonal`` and ``small`` draw unit
            vectors either way; ``zero`` draws nothing.
        rebuild_optimizer: after every event with b(t) > 0, replace the optimizer as the authors' code
            does: a new one of the same class over the same parameters with its constructor defaults
            (the base learning rate) and weight decay 0, so every moment is lost, and the LR scheduler
            keeps stepping the old optimizer, so the learning rate stays at its base value from the
            first event on. Needs a single optimizer and a strategy that does not wrap it (single
            device or DDP). A run resumed after an event does not yet continue exactly
            (``docs/differences.md``, section 4).
        new_direction_moments: Adam second moments of a new direction: ``zero`` (the SPEC: every moment
            of the slot is reset) or ``warm`` (``exp_avg_sq`` starts at the mean of the tensor's active
            entries, so the first updates are not ~3× larger than settled ones; see
            :func:`~flexlora_pl.core.allocation.warm_second_moments`).
        expand_cooldown: events after gaining a direction during which a module may not prune (0: the
            paper). 1 stops a module from losing at the next event the zero direction it just gained.
        flip_flop_window: a prune counts as a flip-flop when the same direction (module and slot) was added
            at one of the last ``flip_flop_window`` events. ``None`` (default): ``expand_cooldown + 1``, so a
            loop that the cool-down only delays (2 → 3 → 3 → 2) is still counted.
    """

    def __init__(
        self,
        b0: int = 4,
        t_warmup: int = 1000,
        t_final: int = 1000,
        delta_t: int = 200,
        total_steps: int | None = None,
        importance: str = "entropy",
        mode: str = "prune_and_expand",
        init: str = "zero_impact",
        r_min: int = 1,
        b_schedule: str = "cubic",
        seed: int | None = None,
        verbose: bool = False,
        allow_no_events: bool = False,
        budget_formula: str = "paper",
        rank_cap: bool = True,
        prune_by: str = "magnitude",
        new_direction_std: str = "scaled",
        rebuild_optimizer: bool = False,
        new_direction_moments: str = "zero",
        expand_cooldown: int = 0,
        flip_flop_window: int | None = None,
    ) -> None:
        super().__init__()
        _require_int("b0", b0, minimum=0)
        _require_int("t_warmup", t_warmup, minimum=0)
        _require_int("t_final", t_final, minimum=0)
        _require_int("delta_t", delta_t, minimum=1)
        _require_int("r_min", r_min, minimum=0)
        _require_int("expand_cooldown", expand_cooldown, minimum=0)
        if seed is not None:
            _require_int("seed", seed, minimum=0)
        if total_steps is not None:
            _require_int("total_steps", total_steps, minimum=1)
        if flip_flop_window is not None:
            _require_int("flip_flop_window", flip_flop_window, minimum=1)
        for name, value, allowed in (
            ("importance", importance, METRIC_NAMES),
            ("mode", mode, ALLOCATION_MODES),
            ("init", init, EXPANSION_INITS),
            ("b_schedule", b_schedule, BUDGET_SCHEDULES),
            ("budget_formula", budget_formula, BUDGET_FORMULAS),
            ("prune_by", prune_by, PRUNE_CRITERIA),
            ("new_direction_std", new_direction_std, DIRECTION_STDS),
            ("new_direction_moments", new_direction_moments, NEW_DIRECTION_MOMENTS),
        ):
            if value not in allowed:
                raise ValueError(f"RankReallocation: {name}={value!r} is not one of {list(allowed)}")
        for name, value in (("rank_cap", rank_cap), ("rebuild_optimizer", rebuild_optimizer)):
            if not isinstance(value, bool):
                raise ValueError(f"RankReallocation: {name} must be true or false, got {value!r}")
        self.b0, self.t_warmup, self.t_final, self.delta_t = b0, t_warmup, t_final, delta_t
        self.total_steps = total_steps
        self.importance, self.mode, self.init, self.r_min = importance, mode, init, r_min
        self.b_schedule, self.seed, self.verbose = b_schedule, resolve_seed(seed), verbose
        self.allow_no_events = allow_no_events
        self.budget_formula, self.rank_cap, self.prune_by = budget_formula, rank_cap, prune_by
        self.new_direction_std, self.rebuild_optimizer = new_direction_std, rebuild_optimizer
        self.new_direction_moments, self.expand_cooldown = new_direction_moments, expand_cooldown
        self.flip_flop_window = expand_cooldown + 1 if flip_flop_window is None else flip_flop_window
        self.sensitivity = SensitivityTracker() if importance == "sensitivity" else None
        self.history: list[dict[str, Any]] = []
        # per event: {"step", "spectra": {module: active λ as scored}}; saved with the history
        self.spectra: list[dict[str, Any]] = []
        self.first_updates = FirstUpdateMonitor()  # new directions' first updates, next to settled ones
        self.layer_names: list[str] = []
        self._layers: list[FlexLoRALinear] = []
        self._named: list[tuple[str, FlexLoRALinear]] = []
        self._total: int | None = None
        self._last_step: int | None = None
        # layer names of a restored history, checked against the model's once its layers are known
        self._restored_names: list[str] | None = None
        # another method's allocation (AdaLoRA), driven on this schedule; ``_idle``: a method with fixed ranks
        self._driver: Any = None
        self._driver_state: dict[str, Any] | None = None
        self._idle = False

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Only layer discovery here, so that ``load_state_dict`` (which Lightning calls after ``setup``)
        # can check a restored history against the model's layers. The rest waits for ``on_fit_start``:
        # Lightning runs this hook before the LightningModule's own ``setup``, where a module may build
        # the data that the number of optimizer steps depends on, or the layers themselves.
        if stage == "fit":
            refuse_sharded_strategy(trainer)
            self._find_layers(pl_module)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        method = getattr(pl_module, "method", None)
        if method is not None and method.name != "flexlora":
            self._start_other_method(trainer, pl_module, method)
            return
        self._find_layers(pl_module)
        if not self._layers:
            raise ValueError(
                "RankReallocation found no FlexLoRA layers in the LightningModule; "
                "call inject_flexlora (or use FlexLoRAModule) before fitting"
            )
        if self._restored_names is not None:  # a history restored before the layers were known
            self._check_layer_names(self._restored_names)
            self._restored_names = None
        self._check_r_min()
        self._check_room_to_grow()
        self._total = self.resolve_total_steps(trainer)
        steps = event_steps(self.t_warmup, self.t_final, self.delta_t, self._total)
        if len(steps) == 0:
            message = (
                f"RankReallocation will never fire: with t_warmup={self.t_warmup}, t_final={self.t_final} and "
                f"delta_t={self.delta_t}, no event step lies in ({self.t_warmup}, {self._total - self.t_final}) "
                f"for a run of {self._total} optimizer steps. Lower t_warmup / t_final / delta_t or train longer"
            )
            if not self.allow_no_events:
                raise ValueError(message + " (or set allow_no_events: true to train with fixed ranks).")
            rank_zero_warn(message + ".")
        else:
            rank_zero_info(
                f"RankReallocation: {len(steps)} events over {self._total} steps "
                f"(first at {steps[0]}, last at {steps[-1]}) across {len(self._layers)} layers"
            )
        if self._last_step is None:
            self._last_step = trainer.global_step
        if self.rebuild_optimizer and any(event["budget"] > 0 for event in self.history):
            # a resumed run whose earlier events rebuilt the optimizer: Lightning would reattach the LR schedule
            # to the restored optimizer, which the uninterrupted run no longer had (runs before the restore)
            self._rebuild_optimizer(trainer)

    def _start_other_method(self, trainer: Trainer, pl_module: LightningModule, method: Any) -> None:
        """Hand the schedule to a method that allocates its own way (AdaLoRA), or stand down (LoRA)."""
        self._total = self.resolve_total_steps(trainer)
        self._driver = method.allocation_driver(self)
        if self._driver is None:
            self._idle = True
            rank_zero_info(f"RankReallocation: method '{method.name}' keeps every rank fixed; no allocation event "
                           "fires in this run")
        else:
            self._driver.on_fit_start(trainer, pl_module)
            if self._driver_state is not None:
                self._driver.load_state_dict(self._driver_state)
                self._driver_state = None
        if self._last_step is None:
            self._last_step = trainer.global_step

    def _find_layers(self, pl_module: LightningModule) -> None:
        named = list(flexlora_layers(pl_module))
        self._named = named
        self.layer_names = [name for name, _ in named]
        self._layers = [layer for _, layer in named]

    def _check_r_min(self) -> None:
        """Refuse an ``r_min`` that no layer's rank exceeds: no layer could be pruned, so nothing would move."""
        if self.mode == "expand_only":  # never prunes: r_min plays no part
            return
        ranks = [layer.rank for layer in self._layers]
        if any(rank > self.r_min for rank in ranks):
            return
        if self.history and all(rank == self.r_min for rank in ranks):
            # resumed after earlier events pruned every layer down to the floor (prune_only): as configured
            rank_zero_info(f"RankReallocation: every layer is at r_min={self.r_min}; later events move nothing")
            return
        initial = _span(layer.init_rank for layer in self._layers)
        now = _span(ranks)
        where = f"initial rank {initial}" + ("" if now == initial else f", now {now}")
        raise ValueError(
            f"RankReallocation: r_min={self.r_min} is not below the rank of any FlexLoRA layer ({where}). A layer "
            f"is pruned only while its rank exceeds r_min, so with mode={self.mode!r} no layer could ever be "
            "pruned, no rank would ever move, and the run would be plain LoRA. Lower r_min to "
            f"{max(min(ranks) - 1, 0)} or less, raise init_rank above {self.r_min} (max_rank >= init_rank), "
            "or use mode: expand_only, which never prunes."
        )

    def _check_room_to_grow(self) -> None:
        """Refuse a run in which no layer could ever gain a direction: every one starts at its ``max_rank``."""
        if self.mode == "prune_only" or not self.rank_cap or self.history:
            return
        if any(layer.rank < layer.max_rank for layer in self._layers):
            return
        caps = _span(layer.max_rank for layer in self._layers)
        raise ValueError(
            f"RankReallocation: every FlexLoRA layer starts at its max_rank ({caps}), so with mode={self.mode!r} no "
            "layer could ever gain a direction and no rank would move: the run would be a fixed-rank adapter. "
            "Raise max_rank above init_rank (the paper uses max_rank = 1.5 x init_rank), or use mode: prune_only."
        )

    def resolve_total_steps(self, trainer: Trainer) -> int:
        """``total_steps`` if given, else the Trainer's estimate of optimizer steps."""
        if self.total_steps is not None:
            return self.total_steps
        estimate = trainer.estimated_stepping_batches
        if not math.isfinite(estimate):
            raise ValueError(
                "RankReallocation cannot derive the total number of optimizer steps (the training data "
                "has no length); set RankReallocation(total_steps=...) or Trainer(max_steps=...)"
            )
        return int(estimate)

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer) -> None:
        if self._idle or self._driver is not None:
            return
        if self.sensitivity is not None:
            self.sensitivity.update(self._named)

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # accumulating micro-batches: no optimizer step happened
            return
        self._last_step = step
        if self._idle:
            return
        if self.first_updates.waiting:
            self.first_updates.measure(self._layers, step, len(self.history) - 1)
        if self._driver is not None:  # after optimizer.step() and before the next zero_grad(), once per step
            self._driver.after_optimizer_step(trainer, pl_module, step)
            return
        if is_event_step(step, self.t_warmup, self.t_final, self.delta_t, self._total):
            self.reallocate(trainer, pl_module, step)

    # ------------------------------------------------------------------ event
    def scores(self, pl_module: LightningModule) -> torch.Tensor:
        """Importance of every layer, in :attr:`layer_names` order, as a float64 CPU tensor.

        The LightningModule's ``importance_scores(metric)`` is the single entry point: when the module
        has one (:class:`~flexlora_pl.FlexLoRAModule` does) it is called with :attr:`importance` for
        every metric, ``sensitivity`` included (the module reads this callback's tracker through
        :func:`sensitivity_tracker`). A module without it gets the built-in score directly.

        Args:
            pl_module: the LightningModule being fitted.
        """
        score_fn = getattr(pl_module, "importance_scores", None)
        if callable(score_fn):
            raw = score_fn(self.importance)
        elif self.sensitivity is not None:
            raw = self.sensitivity.scores(self._named)
        else:
            raw = importance_scores(self._layers, self.importance)
        return torch.as_tensor(raw, dtype=torch.float64).detach().cpu()

    @torch.no_grad()
    def reallocate(self, trainer: Trainer, pl_module: LightningModule, step: int) -> AllocationDecision:
        """Run one allocation event at optimizer step ``step``; returns what moved."""
        check_finite = getattr(pl_module, "check_finite", None)
        if callable(check_finite):  # a diverged run is reported as such, not as NaN importance scores
            check_finite(f"at the allocation event of step {step}")
        self.first_updates.flush(self.history, trainer.loggers)
        scores = self.scores(pl_module)
        if scores.shape != (len(self._layers),):
            raise ValueError(f"importance scores must have shape ({len(self._layers)},), got {tuple(scores.shape)}")
        ranks = torch.stack([layer.rank_mask.sum() for layer in self._layers]).tolist()
        budget = budget_at(
            step, self.b0, self.t_warmup, self.t_final, self._total, self.b_schedule, self.budget_formula
        )
        spectra = {name: layer.lora_lambda.detach()[layer.rank_mask].float().cpu().tolist()
                   for name, layer in zip(self.layer_names, self._layers, strict=True)}
        decision = decide_allocation(
            scores, ranks, self.r_min, [layer.max_rank for layer in self._layers], budget, self.mode,
            rank_cap=self.rank_cap, protected=self._cooling_down(),
        )
        # every process must take the same decision before any replica changes (one collective under DDP)
        check_same_decision(trainer.strategy, step, budget, decision.prune, decision.expand, device=pl_module.device)
        pruned_slots, expanded_slots = [], []
        for i in decision.prune:
            index = prune_direction(self._layers[i], trainer.optimizers, by=self.prune_by)
            pruned_slots.append(index)
            if self.sensitivity is not None:
                self.sensitivity.reset_direction(self.layer_names[i], index)
        for i in decision.expand:
            generator = event_generator(self.seed, step, i)
            layer = self._layers[i]
            index = expand_direction(layer, trainer.optimizers, self.init, generator, std=self.new_direction_std)
            if self.new_direction_moments == "warm":
                warm_second_moments(layer, index, trainer.optimizers)
            expanded_slots.append(index)
            self.first_updates.watch(i, index, ranks[i], layer)
        if self.rebuild_optimizer and budget > 0:  # the authors' code rebuilds whenever its b is positive
            self._rebuild_optimizer(trainer)
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
        record["flip_flops"] = self._flip_flops(record)
        self.history.append(record)
        self.spectra.append({"step": step, "spectra": spectra})
        self._write_spectra(trainer)
        self._log_event(trainer, record)
        return decision

    def _cooling_down(self) -> set[int]:
        """Modules that gained a direction at one of the last ``expand_cooldown`` events: they may not prune."""
        if self.expand_cooldown == 0:
            return set()
        names = {name for event in self.history[-self.expand_cooldown:] for name in event["expanded"]}
        return {i for i, name in enumerate(self.layer_names) if name in names}

    def _flip_flops(self, record: dict[str, Any]) -> int:
        """How many of this event's prunes remove a direction (module and slot) added at one of the last
        :attr:`flip_flop_window` events (a slot pruned now is active, so its latest addition is the one that counts)."""
        added = {(name, slot)
                 for event in self.history[-self.flip_flop_window:]
                 for name, slot in zip(event["expanded"], event.get("expanded_slots", []), strict=False)}
        return sum((name, slot) in added for name, slot in zip(record["pruned"], record["pruned_slots"], strict=True))

    @property
    def flip_flop_count(self) -> int:
        """Directions pruned within :attr:`flip_flop_window` events of being added, over the whole run."""
        return sum(event.get("flip_flops", 0) for event in self.history)

    @property
    def dead_ends(self) -> list[str]:
        """Modules that an event pruned to rank 1 and that no later event expanded, in :attr:`layer_names` order.

        Spectral entropy (eq. 3) of a single direction is 0, the lowest score there is, so while any other
        module scores above 0 such a module is never among the b(t) most important and stays at rank 1.
        """
        dead: set[str] = set()
        index = {name: i for i, name in enumerate(self.layer_names)}
        for event in self.history:
            for name in event["pruned"]:
                if name in index and event["ranks"][index[name]] == 1:
                    dead.add(name)
            dead.difference_update(event["expanded"])
        return [name for name in self.layer_names if name in dead]

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.first_updates.flush(self.history, trainer.loggers)

    @rank_zero_only
    def _write_spectra(self, trainer: Trainer) -> None:
        folder = trainer.log_dir if trainer.loggers and trainer.log_dir else None
        if folder is None:
            return
        path = Path(folder) / SPECTRA_FILENAME
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"events": self.spectra}) + "\n")
        os.replace(tmp, path)

    @staticmethod
    def _rebuild_optimizer(trainer: Trainer) -> None:
        """Replace the optimizer as the authors' code does after an event (``rebuild_optimizer``).

        Their patched HF Trainer builds ``type(opt)(model.parameters(), **opt.defaults)`` and tries to keep
        the state of unchanged parameters, but compares ``id(param)`` with the integer keys of
        ``state_dict()`` and so keeps none; ``defaults`` carries the base learning rate and weight decay 0
        (HF's AdamW default; the decay went into parameter groups that are not rebuilt); the LR scheduler
        still holds the old optimizer. Here the new optimizer keeps the parameter groups (so checkpoints
        keep their layout) with every group's hyper-parameters reset to those defaults, which is the same
        update as one group; the scheduler configs are left untouched, so they step the old optimizer.
        """
        optimizers = trainer.optimizers
        if len(optimizers) != 1:
            raise ValueError(
                f"RankReallocation(rebuild_optimizer=True) rebuilds a single optimizer, as the authors' code does; "
                f"this run has {len(optimizers)}"
            )
        strategy = type(trainer.strategy).__name__
        if "DeepSpeed" in strategy or "FSDP" in strategy:
            raise ValueError(
                f"RankReallocation(rebuild_optimizer=True) cannot replace the optimizer under {strategy}, which "
                "wraps it; use a single device or DDP, or leave rebuild_optimizer off"
            )
        old = optimizers[0]
        accepted = inspect.signature(type(old)).parameters  # ``defaults`` may hold more (AdamW: decoupled_weight_decay)
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
        defaults = {key: value for key, value in old.defaults.items() if takes_any or key in accepted}
        if "weight_decay" in defaults:
            defaults["weight_decay"] = 0.0
        # keep only the parameters and the group names (what LearningRateMonitor labels by); every
        # hyper-parameter, and the scheduler's ``initial_lr``, comes from the defaults again
        groups = [{key: group[key] for key in ("params", "name") if key in group} for group in old.param_groups]
        trainer.optimizers = [type(old)(groups, **defaults)]

    def _log_event(self, trainer: Trainer, record: dict[str, Any]) -> None:
        metrics: dict[str, float] = {
            "flexlora/budget": float(record["budget"]),
            "flexlora/total_rank": float(sum(record["ranks"])),
            "flexlora/flip_flops": float(self.flip_flop_count),
        }
        for name, rank, score in zip(self.layer_names, record["ranks"], record["scores"], strict=True):
            metrics[f"flexlora_rank/{name}"] = float(rank)
            metrics[f"flexlora_importance/{name}"] = float(score)
        # Written straight to the loggers (as LearningRateMonitor does): ``self.log`` from a callback
        # only reaches them on steps that are multiples of ``log_every_n_steps``, and events are not.
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=record["step"])
        if self.verbose:
            rank_zero_info(
                f"[step {record['step']}] b={record['budget']} total_rank={sum(record['ranks'])} "
                f"pruned={record['pruned']} expanded={record['expanded']}"
            )

    # ------------------------------------------------------------------ state
    @property
    def rank_pattern(self) -> dict[str, int]:
        """The current active rank of every layer, by module name."""
        return {name: layer.rank for name, layer in zip(self.layer_names, self._layers, strict=True)}

    @override
    def state_dict(self) -> dict[str, Any]:
        self.first_updates.flush(self.history)  # a checkpoint syncs anyway: its history holds every measurement
        state = {"history": self.history, "last_step": self._last_step, "layer_names": self.layer_names,
                 "spectra": self.spectra, "first_update_pending": self.first_updates.state_dict()}
        if self.sensitivity is not None:
            state["sensitivity"] = self.sensitivity.state_dict()
        if self._driver is not None:
            state["driver"] = self._driver.state_dict()
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks after ``setup``, so the model's layer names are usually known here;
        # they are checked again at fit start, where they always are (layers built in the module's
        # ``setup`` or ``configure_model``, or a strategy that restores after fit start).
        saved_names = list(state_dict.get("layer_names", []))
        if saved_names:
            if self.layer_names:
                self._check_layer_names(saved_names)
            self._restored_names = saved_names
        self.history = list(state_dict.get("history", []))
        self.spectra = list(state_dict.get("spectra", []))
        self.first_updates.load_state_dict(state_dict.get("first_update_pending", []))
        self._last_step = state_dict.get("last_step")
        self.layer_names = saved_names or self.layer_names
        if self.sensitivity is not None and "sensitivity" in state_dict:
            self.sensitivity.load_state_dict(state_dict["sensitivity"])
        if "driver" in state_dict:  # restored before fit start: handed to the driver once it exists
            if self._driver is not None:
                self._driver.load_state_dict(state_dict["driver"])
            else:
                self._driver_state = state_dict["driver"]

    def _check_layer_names(self, saved_names: list[str]) -> None:
        """Refuse a restored history whose layers are not the model's (:attr:`layer_names`)."""
        if saved_names != self.layer_names:
            pairs = itertools.zip_longest(saved_names, self.layer_names)
            first = next((a, b) for a, b in pairs if a != b)
            raise ValueError(
                f"the checkpoint's RankReallocation history covers {len(saved_names)} FlexLoRA layers but the model "
                f"has {len(self.layer_names)}; they first differ at {first[0]!r} (checkpoint) vs {first[1]!r} "
                "(model). Resume with the backbone and target_modules the checkpoint was trained with."
            )


def sensitivity_tracker(trainer: Trainer | None) -> SensitivityTracker:
    """The tracker that the Trainer's ``RankReallocation(importance="sensitivity")`` callback feeds.

    :meth:`FlexLoRAModule.importance_scores <flexlora_pl.FlexLoRAModule.importance_scores>` reads it for
    ``metric="sensitivity"``: smoothed sensitivities need the gradients of every optimizer step, which
    only the callback sees.

    Args:
        trainer: the Trainer fitting the module, or ``None`` when the module is not attached to one.

    Raises:
        ValueError: no ``RankReallocation(importance="sensitivity")`` is attached to ``trainer``.
    """
    for callback in trainer.callbacks if trainer is not None else []:
        if isinstance(callback, RankReallocation) and callback.sensitivity is not None:
            return callback.sensitivity
    owner = "the Trainer" if trainer is not None else "this module (it is not attached to a Trainer)"
    raise ValueError(
        "importance 'sensitivity' is gathered from the gradients of every optimizer step by a "
        f"RankReallocation(importance='sensitivity') callback, and none is attached to {owner}. Add one to "
        "trainer.callbacks, or score with a λ-based metric such as 'entropy'."
    )


def _span(values) -> str:
    """``"8"`` for one distinct value, ``"4 to 8"`` for several."""
    distinct = sorted(set(values))
    return str(distinct[0]) if len(distinct) == 1 else f"{distinct[0]} to {distinct[-1]}"


def _require_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"RankReallocation: {name} must be an integer >= {minimum}, got {value!r}")
