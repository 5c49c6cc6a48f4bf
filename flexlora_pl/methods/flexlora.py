"""FlexLoRA (ICLR 2026): ΔW = P·diag(λ ⊙ m)·Q with ranks that move at allocation events.

Every adapted linear layer becomes a :class:`~flexlora_pl.core.layer.FlexLoRALinear` with capacity r_max and
r_init active directions; the masked orthogonality regulariser R = Σ‖PᵀP − I‖² + ‖QQᵀ − I‖² (paper eq. 2,
over active directions) is added to the loss with weight γ. Its allocation driver,
:class:`FlexLoRAAllocation`, runs :class:`~flexlora_pl.core.allocator.FlexLoRAAllocator`'s events on the
``reallocation:`` schedule: directions move between layers by importance (spectral entropy by default)
under the budget b(t).

Exports. The update of a layer with active directions ``S`` (``r = |S|``) is an ordinary rank-``r`` LoRA update::

    ΔW = s · P diag(λ ⊙ m) Q = (α_m / r) · B A      A = diag(λ_S) Q_S  (r, d_in)    B = P_S  (d_out, r)
                                                    α_m = s · r = α · r / r_init

so peft's per-module scale ``α_m / r`` equals FlexLoRA's fixed scale ``s = α / r_init``, and the peft adapter
(:meth:`FlexLoRA.peft_adapter_state`) holds ``r (d_in + d_out)`` numbers per module, λ folded into ``A``. The
ranks differ across modules, so its config carries ``rank_pattern`` / ``alpha_pattern`` keyed by exact module
paths; a module whose update is exactly zero is left out (peft cannot express rank 0; no output changes).
"""

from __future__ import annotations

import copy
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flexlora_pl.core.allocator import AllocationEvent, AllocationSettings, FlexLoRAAllocator
from flexlora_pl.core.first_update import FirstUpdateMonitor
from flexlora_pl.core.importance import STATEFUL_METRICS, importance_scores
from flexlora_pl.core.inject import flexlora_layers, inject_flexlora
from flexlora_pl.core.layer import FlexLoRALinear
from flexlora_pl.core.orthogonality import ORTH_REG_FORMS, FactorBatch, group_by_shape, orthogonality_penalty
from flexlora_pl.core.quantized import is_quantized_linear, merge_into_dequantized
from flexlora_pl.methods.base import AdaptationMethod, AllocationDriver, StepContext, module_tensors, register_method
from flexlora_pl.methods.lora import pattern_key_clash
from flexlora_pl.methods.loraplus import check_loraplus_ratio, loraplus_groups

__all__ = ["FlexLoRA", "FlexLoRAAllocation", "dropout_probability"]

_PEFT_PREFIX = "base_model.model."  # where peft's LoRA model keeps the wrapped model in its state dict


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
        loraplus_ratio: LoRA+'s rule (:mod:`flexlora_pl.methods.loraplus`) on the SVD form: the output factor ``P``
            (LoRA's ``B``) at this multiple of the learning rate of ``λ`` and ``Q``; ``None``: one rate for all.
    """

    name = "flexlora"
    quantized_base = True

    def __init__(self, target_modules: Sequence[str] | None = None, init_rank: int = 8, max_rank: int = 12,
                 alpha: float = 16.0, dropout: float = 0.0, orth_reg_weight: float = 0.1,
                 orth_reg_form: str = "squared", loraplus_ratio: float | None = None) -> None:
        super().__init__(target_modules, alpha, dropout, orth_reg_weight=orth_reg_weight)
        self.loraplus_ratio = check_loraplus_ratio(loraplus_ratio, "FlexLoRA")
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

    def optimizer_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        return loraplus_groups(self.adapter_parameters(model), [layer.lora_P for _, layer in flexlora_layers(model)],
                               self.loraplus_ratio)

    def regularizer(self, model: nn.Module) -> torch.Tensor:
        plan = self._plans.get(id(model))
        if plan is None:  # shapes never change: plan the batches once per model
            plan = self._plans[id(model)] = group_by_shape([layer for _, layer in flexlora_layers(model)])
        return orthogonality_penalty(plan, self.orth_reg_form)

    def rank_pattern(self, model: nn.Module) -> dict[str, int]:
        return {name: layer.rank for name, layer in flexlora_layers(model)}

    def allocation_driver(self, settings: AllocationSettings) -> FlexLoRAAllocation:
        return FlexLoRAAllocation(settings)

    def max_ranks(self, model: nn.Module) -> dict[str, int]:
        return {name: layer.max_rank for name, layer in flexlora_layers(model)}

    def matrix_shapes(self, model: nn.Module) -> dict[str, int]:
        # a direction is a P column, a Q row and a λ
        return {name: layer.in_features + layer.out_features + 1 for name, layer in flexlora_layers(model)}

    # ---------------------------------------------------------------- export
    @classmethod
    def recognize(cls, model: nn.Module) -> FlexLoRA | None:
        # the layers carry every setting an export reads, so the method's own defaults do
        return cls() if next(flexlora_layers(model), None) is not None else None

    def adapter_checkpoint_layers(self, model: nn.Module) -> dict[str, FlexLoRALinear]:
        layers = dict(flexlora_layers(model))
        if not layers:
            raise ValueError(f"{type(model).__name__} holds no FlexLoRA layer: nothing to export")
        return layers

    def merge(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with every ΔW merged and every FlexLoRA layer replaced by its ``nn.Linear``.

        On a 4-bit base (QLoRA) every 4-bit layer becomes its dequantized weight with the layer's ΔW added in
        float32, in bfloat16 (:func:`~flexlora_pl.core.quantized.merge_into_dequantized`).
        """
        plain = copy.deepcopy(model)
        if any(is_quantized_linear(layer.base) for _, layer in flexlora_layers(plain)):
            deltas = {name: layer.delta_weight() for name, layer in flexlora_layers(plain)}
            for name, layer in list(flexlora_layers(plain)):
                plain.set_submodule(name, layer.base)
            return merge_into_dequantized(plain, deltas)
        for name, layer in list(flexlora_layers(plain)):
            layer.merge()  # a no-op when the layer is already merged: then the base weight holds ΔW
            if not name:
                return layer.base
            parent_name, _, child = name.rpartition(".")
            setattr(plain.get_submodule(parent_name) if parent_name else plain, child, layer.base)
        return plain

    def peft_adapter_state(self, model: nn.Module, saved_modules: Sequence[str]) -> tuple[Any, dict[str, torch.Tensor]]:
        """A ``peft.LoraConfig`` with exact module paths, per-module ranks and α = s · r, and peft's tensors:
        ``base_model.model.<path>.lora_{A,B}.weight`` (λ folded into ``A``) and the saved modules whole.

        Raises:
            ValueError: no module has a non-zero update, or module paths that peft could not tell apart.
        """
        exported = {name: layer for name, layer in self.adapter_checkpoint_layers(model).items()
                    if bool((layer.masked_lambda() != 0).any())}  # some active direction with λ ≠ 0
        if not exported:
            raise ValueError(
                "no FlexLoRA layer has a non-zero update (every active λ is zero or no direction is active): the "
                "model equals its base model; use export_merged or save_adapter_checkpoint instead"
            )
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in exported.items():
            lora_a, lora_b = _lora_factors(layer)
            tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = lora_a
            tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = lora_b
        tensors.update(module_tensors(model, saved_modules, prefix=_PEFT_PREFIX))
        return _lora_config(model, exported, list(saved_modules)), tensors


class FlexLoRAAllocation(AllocationDriver):
    """FlexLoRA's allocation events on the ``reallocation:`` schedule (paper Algorithm 1).

    At every event step it scores the layers (the LightningModule's ``importance_scores`` when the callback
    passes it, else the built-in metric), and :class:`~flexlora_pl.core.allocator.FlexLoRAAllocator` prunes and
    expands. A stateful metric (``sensitivity``) gets its tracker fed before every optimizer step. At the step
    after an event it measures the new directions' first λ update (:class:`~flexlora_pl.core.first_update.
    FirstUpdateMonitor`) on the device; :meth:`measurements` reads it when the host syncs anyway.

    Args:
        settings: the ``reallocation:`` group's schedule and switches.
    """

    def __init__(self, settings: AllocationSettings) -> None:
        self.settings = settings
        tracker_class = STATEFUL_METRICS.get(settings.importance)
        self.tracker = tracker_class() if tracker_class is not None else None
        self.first_updates = FirstUpdateMonitor()
        self.named: list[tuple[str, Any]] = []
        self.layer_names: list[str] = []
        self.allocator: FlexLoRAAllocator | None = None
        self.total_steps: int | None = None

    def bind(self, module: nn.Module) -> list[str]:
        self.named = list(flexlora_layers(module))
        self.layer_names = [name for name, _ in self.named]
        self.allocator = FlexLoRAAllocator(self.named, self.settings, tracker=self.tracker)
        return self.layer_names

    def start(self, total_steps: int, history: Sequence[dict[str, Any]]) -> str:
        if not self.named:
            raise ValueError("RankReallocation found no FlexLoRA layers in the LightningModule; "
                             "call inject_flexlora (or use FlexLoRAModule) before fitting")
        note = self.allocator.check_r_min(resumed=bool(history))
        self.allocator.check_room_to_grow(resumed=bool(history))
        self.total_steps = total_steps
        s = self.settings
        steps = s.event_steps(total_steps)
        if len(steps) == 0:
            message = (
                f"RankReallocation will never fire: with t_warmup={s.t_warmup}, t_final={s.t_final} and "
                f"delta_t={s.delta_t}, no event step lies in ({s.t_warmup}, {total_steps - s.t_final}) for a run "
                f"of {total_steps} optimizer steps. Lower t_warmup / t_final / delta_t or train longer"
            )
            if not s.allow_no_events:
                raise ValueError(message + " (or set allow_no_events: true to train with fixed ranks).")
            warnings.warn(message + ".", UserWarning, stacklevel=2)
            return "no event fires in this run (allow_no_events: true); ranks stay fixed"
        summary = (f"{len(steps)} events over {total_steps} steps (first at {steps[0]}, last at {steps[-1]}) "
                   f"across {len(self.named)} layers")
        return summary + (f"; {note}" if note else "")

    def before_optimizer_step(self) -> None:
        if self.tracker is not None:
            self.tracker.update(self.named)

    def after_optimizer_step(self, step: int, context: StepContext) -> AllocationEvent | None:
        if self.first_updates.waiting:
            self.first_updates.measure(self.allocator.layers, step, len(context.history) - 1)
        if not self.settings.is_event_step(step, self.total_steps):
            return None
        if context.check_finite is not None:  # a diverged run is reported as such, not as NaN importance scores
            context.check_finite(f"at the allocation event of step {step}")
        return self.run_event(step, context)

    def run_event(self, step: int, context: StepContext) -> AllocationEvent:
        """One event at optimizer step ``step``, whatever the schedule says."""
        return self.allocator.run_event(
            step, self.scores(context), self.total_steps, context.history, context.optimizers,
            agree=context.agree,
            on_expand=lambda i, slot, rank, layer: self.first_updates.watch(i, slot, rank, layer),
        )

    def scores(self, context: StepContext) -> torch.Tensor:
        """Every layer's importance under ``settings.importance``, as a float64 CPU tensor."""
        metric = self.settings.importance
        if context.scores is not None:
            raw = context.scores(metric)
        elif self.tracker is not None:
            raw = self.tracker.scores(self.named)
        else:
            raw = importance_scores(self.allocator.layers, metric)
        return torch.as_tensor(raw, dtype=torch.float64).detach().cpu()

    def measurements(self) -> list[tuple[int, int, dict[str, float]]]:
        return self.first_updates.drain()

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"first_update_pending": self.first_updates.state_dict()}
        if self.tracker is not None:
            state[self.settings.importance] = self.tracker.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.first_updates.load_state_dict(state.get("first_update_pending", []))
        if self.tracker is not None and self.settings.importance in state:
            self.tracker.load_state_dict(state[self.settings.importance])


# ---------------------------------------------------------------------- the peft form of FlexLoRA layers
def dropout_probability(layer: FlexLoRALinear) -> float:
    """The dropout probability on a FlexLoRA layer's input (0 when it has none)."""
    return float(layer.dropout.p) if isinstance(layer.dropout, nn.Dropout) else 0.0


@torch.no_grad()
def _lora_factors(layer: FlexLoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = diag(λ_S) Q_S`` (r, d_in) and ``B = P_S`` (d_out, r) over the active directions ``S``."""
    active = layer.rank_mask
    lam = layer.lora_lambda.float()[active]  # (r,)
    lora_a = (lam[:, None] * layer.lora_Q.float()[active]).to(layer.lora_Q.dtype)  # (r, d_in)
    lora_b = layer.lora_P[:, active]  # (d_out, r)
    return lora_a.detach().cpu().contiguous(), lora_b.detach().cpu().contiguous()


def _lora_config(model: nn.Module, exported: dict[str, FlexLoRALinear], saved: list[str]) -> Any:
    from peft import LoraConfig

    ranks = {name: layer.rank for name, layer in exported.items()}
    alphas = {name: layer.alpha * ranks[name] / layer.init_rank for name, layer in exported.items()}
    order = list(exported)
    _check_pattern_keys(order, ranks, alphas)
    default_rank = Counter(ranks[n] for n in order).most_common(1)[0][0]
    default_alpha = next(alphas[n] for n in order if ranks[n] == default_rank)
    dropout = Counter(dropout_probability(exported[n]) for n in order).most_common(1)[0][0]
    return LoraConfig(
        r=default_rank,
        lora_alpha=default_alpha,
        lora_dropout=dropout,
        target_modules=_target_modules(model, order),
        rank_pattern={n: ranks[n] for n in order},
        alpha_pattern={n: alphas[n] for n in order},
        modules_to_save=saved or None,
        bias="none",
        inference_mode=True,
    )


def _check_pattern_keys(names: Sequence[str], ranks: dict[str, int], alphas: dict[str, float]) -> None:
    """Refuse paths for which peft's ``rank_pattern`` lookup could pick another module's entry
    (:func:`~flexlora_pl.methods.lora.pattern_key_clash`)."""
    clash = pattern_key_clash({n: ranks[n] for n in names}, {n: alphas[n] for n in names})
    if clash:
        key, name = clash
        raise ValueError(
            f"peft could apply the rank of {key!r} (r={ranks[key]}) to {name!r} (r={ranks[name]}): one "
            "path is a suffix of the other. Export this model with export_merged instead"
        )


def _target_modules(model: nn.Module, names: Sequence[str]) -> list[str] | str:
    """The exact list of exported paths, or an anchored regex when the list would select more.

    peft also targets every module whose name ends with ``"." + target``; when such a module exists
    (a nested module with the same tail), a regex that peft full-matches keeps the selection exact.
    Module names are those of the model without FlexLoRA (no ``.base`` / ``.dropout`` children).
    """
    wrappers = [n for n, _ in flexlora_layers(model)]
    exported = set(names)
    others = [n for n, _ in model.named_modules()
              if n and n not in exported and not any(n.startswith(w + ".") for w in wrappers)]
    if any(other.endswith("." + name) for other in others for name in names):
        return "(?:" + "|".join(re.escape(n) for n in names) + ")"
    return list(names)

