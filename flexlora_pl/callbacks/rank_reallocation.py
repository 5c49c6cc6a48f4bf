"""The ``RankReallocation`` callback: runs rank allocation events during ``Trainer.fit``, for every method.

The callback only decides *when* (once per optimizer step, never per micro-batch) and keeps the record: what
an event does is the method's allocation driver (:class:`~flexlora_pl.methods.AllocationDriver`), which for
FlexLoRA runs :class:`~flexlora_pl.core.allocator.FlexLoRAAllocator` (which modules, how a direction is pruned
or added, the scores and the budget b(t)). Events of every driver go through one path: :attr:`history`,
``lambda_spectra.json`` and the loggers.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import fields
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from flexlora_pl.callbacks.event_log import SPECTRA_FILENAME, log_event, log_measurements, write_spectra
from flexlora_pl.callbacks.optimizer_rebuild import rebuild_optimizer
from flexlora_pl.core.allocation import AllocationDecision
from flexlora_pl.core.allocator import AllocationEvent, AllocationSettings, count_dead_ends
from flexlora_pl.core.checks import require_bool, require_int
from flexlora_pl.core.importance import SensitivityTracker
from flexlora_pl.methods.base import AllocationDriver, StepContext
from flexlora_pl.methods.flexlora import FlexLoRAAllocation
from flexlora_pl.runs.consensus import check_same_decision
from flexlora_pl.runs.seeding import resolve_seed
from flexlora_pl.runs.strategy import refuse_sharded_strategy

__all__ = ["SPECTRA_FILENAME", "RankReallocation", "sensitivity_tracker"]


class RankReallocation(Callback):
    """Move rank between FlexLoRA layers during training (paper Algorithm 1).

    After optimizer step ``t`` with ``t_warmup < t < T − t_final`` and ``(t − t_warmup) % delta_t == 0`` (``t``
    counts optimizer steps, so gradient accumulation is handled), the ``b(t)`` least important layers each
    lose their weakest direction and the ``b(t)`` most important each gain a new one. The callback decides
    *when*; what an event does is the method's allocation driver (:meth:`AdaptationMethod.allocation_driver
    <flexlora_pl.methods.AdaptationMethod.allocation_driver>`, built from :class:`~flexlora_pl.core.allocator.
    AllocationSettings`): FlexLoRA's events (also for a module without a ``method``), peft's AdaLoRA masking,
    or none for fixed ranks (LoRA). Every driver's events go through one path: :attr:`history` (saved in
    checkpoints), ``lambda_spectra.json`` (:data:`SPECTRA_FILENAME`: each module's active λ as scored) and
    the loggers (ranks, importance, b(t), total rank, at the event's step).

    Scores come from the LightningModule's ``importance_scores(metric)`` whenever it has one
    (:class:`~flexlora_pl.FlexLoRAModule` does), for every metric, so a subclass that overrides it always
    decides; a stateful metric (``sensitivity``) is fed before every optimizer step by the driver and read
    through :func:`sensitivity_tracker`. Diagnostics: ``flexlora/flip_flops`` counts prunes of a direction
    added at one of the last ``flip_flop_window`` events (eq. 3 divides by ``log r``, so a module's score
    drops when it gains a zero direction); :attr:`dead_ends` are modules pruned to rank 1, where entropy is
    0 and no event expands them again; ``flexlora/new_direction_update_ratio`` is a new direction's first λ
    update over its module's settled ones (≈ 3.2 for zeroed Adam moments; see ``new_direction_moments``).
    Under DDP each event's decision is compared across processes (:mod:`flexlora_pl.runs.consensus`).

    Everything is checked when fitting starts (``on_fit_start``, after the LightningModule's own
    ``setup``, so the number of optimizer steps can depend on data built there), before the first step.

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
        importance: importance metric: ``entropy`` (paper), ``nuclear``, ``frobenius``, ``sensitivity``,
            ``elem_energy_entropy``, ``mat_energy_entropy``, or one registered with ``register_importance``.
        mode: ``prune_and_expand`` (paper; total rank conserved), ``prune_only`` or ``expand_only``.
        init: initialisation of a new direction: ``zero_impact`` (paper), ``orthogonal``, ``small``, ``zero``,
            or one registered with ``register_expansion_init``.
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
        new_direction_moments: Adam second moments of a new direction: ``zero`` (docs/method.md: every moment
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
        try:
            if seed is not None:
                require_int("seed", seed, 0)
            self.settings = AllocationSettings(
                b0=b0, t_warmup=t_warmup, t_final=t_final, delta_t=delta_t, total_steps=total_steps,
                importance=importance, mode=mode, init=init, r_min=r_min, b_schedule=b_schedule,
                seed=resolve_seed(seed), budget_formula=budget_formula, rank_cap=rank_cap, prune_by=prune_by,
                new_direction_std=new_direction_std, new_direction_moments=new_direction_moments,
                expand_cooldown=expand_cooldown, flip_flop_window=flip_flop_window,
                allow_no_events=allow_no_events,
            )
            require_bool("rebuild_optimizer", rebuild_optimizer)
        except ValueError as err:
            raise ValueError(f"RankReallocation: {err}") from None
        for f in fields(self.settings):  # every setting is also an attribute of the callback (resolved values)
            setattr(self, f.name, getattr(self.settings, f.name))
        self.verbose, self.rebuild_optimizer = verbose, rebuild_optimizer
        self.history: list[dict[str, Any]] = []
        # per event: {"step", "spectra": {module: active λ as scored}}; saved with the history
        self.spectra: list[dict[str, Any]] = []
        self.layer_names: list[str] = []
        self._driver: AllocationDriver | None = None
        self._bound = False  # whether the driver (or its absence) is settled for the module being fitted
        self._driver_state: dict[str, Any] | None = None
        self._total: int | None = None
        self._last_step: int | None = None
        # layer names of a restored history, checked against the model's once its layers are known
        self._restored_names: list[str] | None = None

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Only the driver and its layers here, so that ``load_state_dict`` (which Lightning calls after
        # ``setup``) can check a restored history against the model's layers. The rest waits for
        # ``on_fit_start``: Lightning runs this hook before the LightningModule's own ``setup``, where a
        # module may build the data that the number of optimizer steps depends on, or the layers themselves.
        if stage == "fit":
            refuse_sharded_strategy(trainer)
            self._bind(pl_module)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._bind(pl_module)
        if self._restored_names is not None:  # a history restored before the layers were known
            self._check_layer_names(self._restored_names)
            self._restored_names = None
        if self._driver is None:
            method = getattr(pl_module, "method", None)
            rank_pattern = getattr(pl_module, "rank_pattern", None)
            ranked = not callable(rank_pattern) or bool(rank_pattern())  # full fine-tuning, BitFit: no rank at all
            rank_zero_info(f"RankReallocation: method '{getattr(method, 'name', method)}' "
                           f"{'keeps every rank fixed' if ranked else 'adapts no matrix (it has no ranks)'}; "
                           "no allocation event fires in this run")
        else:
            self._total = self.resolve_total_steps(trainer)
            summary = self._driver.start(self._total, self.history)
            if self._driver_state is not None:
                self._driver.load_state_dict(self._driver_state)
                self._driver_state = None
            if summary:
                rank_zero_info(f"RankReallocation: {summary}")
        if self._last_step is None:
            self._last_step = trainer.global_step
        if self.rebuild_optimizer and any(event["budget"] > 0 for event in self.history):
            # a resumed run whose earlier events rebuilt the optimizer: Lightning would reattach the LR schedule
            # to the restored optimizer, which the uninterrupted run no longer had (runs before the restore)
            rebuild_optimizer(trainer)

    def _bind(self, pl_module: LightningModule) -> None:
        """Build the method's driver from :attr:`settings` (once) and let it find its layers."""
        if not self._bound:
            method = getattr(pl_module, "method", None)
            # a module without a method (FlexLoRA layers injected by hand) gets FlexLoRA's events
            self._driver = method.allocation_driver(self.settings) if method is not None \
                else FlexLoRAAllocation(self.settings)
            self._bound = True
        if self._driver is not None:
            self.layer_names = list(self._driver.bind(pl_module))

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
        if self._driver is not None:
            self._driver.before_optimizer_step()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step:  # accumulating micro-batches: no optimizer step happened
            return
        self._last_step = step
        if self._driver is None:
            return
        # after optimizer.step() and before the next zero_grad(), once per optimizer step
        event = self._driver.after_optimizer_step(step, self.step_context(trainer, pl_module))
        if event is not None:
            self._record(trainer, event)

    # ------------------------------------------------------------------ event
    def step_context(self, trainer: Trainer, pl_module: LightningModule) -> StepContext:
        """What the driver may use at this step: optimizers, the history, the module's scores, the DDP check."""
        score_fn = getattr(pl_module, "importance_scores", None)
        check_finite = getattr(pl_module, "check_finite", None)
        device = getattr(pl_module, "device", torch.device("cpu"))

        def agree(step: int, budget: int, prune, expand) -> None:
            # a stand-in trainer without a strategy (the step-time benchmark's) is one process
            check_same_decision(getattr(trainer, "strategy", None), step, budget, prune, expand, device=device)

        return StepContext(optimizers=trainer.optimizers, history=self.history,
                           scores=score_fn if callable(score_fn) else None, agree=agree,
                           check_finite=check_finite if callable(check_finite) else None)

    def scores(self, pl_module: LightningModule) -> torch.Tensor:
        """Importance of every layer, in :attr:`layer_names` order, as a float64 CPU tensor (FlexLoRA's driver).

        Args:
            pl_module: the LightningModule being fitted.
        """
        score_fn = getattr(pl_module, "importance_scores", None)
        context = StepContext(optimizers=(), history=self.history, scores=score_fn if callable(score_fn) else None)
        return self._flexlora_driver("scores").scores(context)

    @torch.no_grad()
    def reallocate(self, trainer: Trainer, pl_module: LightningModule, step: int) -> AllocationDecision:
        """Run one FlexLoRA allocation event at optimizer step ``step``, whatever the schedule; returns what moved."""
        driver = self._flexlora_driver("reallocate")
        if self._total is None:
            self._total = self.resolve_total_steps(trainer)
        if driver.total_steps is None:
            driver.total_steps = self._total
        check_finite = getattr(pl_module, "check_finite", None)
        if callable(check_finite):
            check_finite(f"at the allocation event of step {step}")
        event = driver.run_event(step, self.step_context(trainer, pl_module))
        self._record(trainer, event)
        return event.decision

    def _flexlora_driver(self, what: str) -> FlexLoRAAllocation:
        if not isinstance(self._driver, FlexLoRAAllocation):
            raise TypeError(f"RankReallocation.{what} runs FlexLoRA's events; this run's allocation is "
                            f"{type(self._driver).__name__ if self._driver is not None else 'fixed (no driver)'}")
        return self._driver

    def _record(self, trainer: Trainer, event: AllocationEvent) -> None:
        """The one path of every driver's event: history, spectra file, loggers (and the optional rebuild)."""
        record = event.record
        if self.rebuild_optimizer and record["budget"] > 0:  # the authors' code rebuilds whenever its b is positive
            rebuild_optimizer(trainer)
        self._take_measurements(trainer.loggers)
        self.history.append(record)
        self.spectra.append({"step": record["step"], "spectra": event.spectra})
        write_spectra(trainer, self.spectra)
        log_event(trainer.loggers, record, self.layer_names, self.flip_flop_count, self.verbose)

    def _take_measurements(self, loggers) -> None:
        """Diagnostics the driver measured on the device since the last host sync: into their events and logs."""
        if self._driver is not None:
            log_measurements(self._driver.measurements(), self.history, loggers)

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
        return count_dead_ends(self.history, self.layer_names)

    @property
    def sensitivity(self) -> SensitivityTracker | None:
        """The stateful importance metric's tracker (``importance: sensitivity``), once fitting is set up."""
        return getattr(self._driver, "tracker", None)

    @override
    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._take_measurements(trainer.loggers)

    # ------------------------------------------------------------------ state
    @override
    def state_dict(self) -> dict[str, Any]:
        self._take_measurements(None)  # a checkpoint syncs anyway: its history holds every measurement
        state: dict[str, Any] = {"history": self.history, "last_step": self._last_step,
                                 "layer_names": self.layer_names, "spectra": self.spectra}
        driver = self._driver.state_dict() if self._driver is not None else self._driver_state
        if driver is not None:
            state["driver"] = driver
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
        self._last_step = state_dict.get("last_step")
        self.layer_names = saved_names or self.layer_names
        # checkpoints written before drivers existed keep FlexLoRA's driver state at the top level
        self._driver_state = dict(state_dict.get("driver", state_dict))

    def _check_layer_names(self, saved_names: list[str]) -> None:
        """Refuse a restored history whose layers are not the model's (:attr:`layer_names`)."""
        if saved_names != self.layer_names:
            first = next((a, b) for a, b in itertools.zip_longest(saved_names, self.layer_names) if a != b)
            raise ValueError(
                f"the checkpoint's RankReallocation history covers {len(saved_names)} adapted layers but the model "
                f"has {len(self.layer_names)}; they first differ at {first[0]!r} (checkpoint) vs {first[1]!r} "
                "(model). Resume with the backbone and target_modules the checkpoint was trained with."
            )


def sensitivity_tracker(trainer: Trainer | None, metric: str = "sensitivity") -> SensitivityTracker:
    """The tracker of a stateful importance metric that the Trainer's ``RankReallocation`` callback feeds.

    :meth:`FlexLoRAModule.importance_scores <flexlora_pl.FlexLoRAModule.importance_scores>` reads it for a
    stateful ``metric`` (``sensitivity``): smoothed sensitivities need the gradients of every optimizer step,
    which only the callback's allocation driver sees.

    Args:
        trainer: the Trainer fitting the module, or ``None`` when the module is not attached to one.
        metric: the stateful metric's name.

    Raises:
        ValueError: no ``RankReallocation(importance=metric)`` is attached to ``trainer``.
    """
    for callback in trainer.callbacks if trainer is not None else []:
        tracker = callback.sensitivity if isinstance(callback, RankReallocation) else None
        if tracker is not None and callback.importance == metric:
            return tracker
    owner = "the Trainer" if trainer is not None else "this module (it is not attached to a Trainer)"
    raise ValueError(
        f"importance {metric!r} is gathered from the gradients of every optimizer step by a "
        f"RankReallocation(importance={metric!r}) callback, and none is attached to {owner}. Add one to "
        "trainer.callbacks, or score with a λ-based metric such as 'entropy'."
    )
