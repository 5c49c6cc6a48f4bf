"""AdaLoRA (Zhang et al., ICLR 2023, https://arxiv.org/abs/2303.10512): SVD-form updates pruned to a rank budget.

Every adapted linear layer ``W`` (d_out × d_in) gets an update in SVD form with ``r_init`` directions::

    ΔW = P · diag(λ) · Q · (α / r_init)        P: d_out × r_init (peft's lora_B), λ: r_init (lora_E),
                                               Q: r_init × d_in (lora_A); P, Q ~ N(0, 0.02²), λ = 0

Each direction i (a triplet P_{:,i}, λ_i, Q_{i,:}) is scored after every optimizer step by smoothed
sensitivity times uncertainty, per entry w::

    Ī(w) ← β1 Ī(w) + (1 − β1) |w · ∂L/∂w|        Ū(w) ← β2 Ū(w) + (1 − β2) |Ī(w)_now − Ī(w)|
    S_i = Ī(λ_i)Ū(λ_i) + mean_j Ī(P_ji)Ū(P_ji) + mean_j Ī(Q_ij)Ū(Q_ij)

The total rank budget falls from b_init = r_init · n (n adapted matrices) to b_T = r_target · n on a
cubic: b(t) = b_T + (b_init − b_T) · (1 − (t − t_i) / (T − t_f − t_i))³ for t_i < t ≤ T − t_f. At steps
with ``t % ΔT == 0`` the λ of every triplet outside the b(t) best is set to zero (a *soft* mask: it
keeps training and may grow back until the next mask); at ``t = T − t_f`` the budget b_T is fixed and
re-applied after every later step. The loss carries the orthogonality term

    R = mean over the 2n factors of ‖P^T P − I‖_F and ‖Q Q^T − I‖_F         (plain Frobenius norms)

with weight γ. The harness runs peft's own implementation (``docs/differences.md``: ``AdaLoraConfig(init_r=r_max,
target_r=r, tinit=T_warmup, tfinal=T_final, deltaT=ΔT, total_step=T, orth_reg_weight=γ,
beta1=beta2=0.85)``), injected in place like :class:`~flexlora_pl.methods.LoRA`, and drives it the way
peft's pitfalls demand:

* ``update_and_allocate(t)`` runs exactly once per optimizer step, after ``optimizer.step()`` and before
  the next ``zero_grad()``, with ``t`` = ``trainer.global_step`` (optimizer steps, 1 after the first), by
  :class:`AdaLoRAAllocation`, the allocation driver that the ``RankReallocation`` callback calls;
* ``total_step``, ``tinit``, ``tfinal`` and ``deltaT`` are the ``reallocation:`` group's ``total_steps``
  (the Trainer's optimizer steps by default), ``t_warmup``, ``t_final`` and ``delta_t``, set at fit start
  (peft needs a ``total_step`` when the layers are built; a placeholder stands in until then);
* R is added to the loss by the LightningModule through :meth:`AdaLoRA.regularizer`. peft only adds its
  own when the model it wraps returns ``outputs.loss``; here its tuner is not in the forward path at all
  and its config carries ``orth_reg_weight=0``, so R is counted once.

Each masking is an allocation event: the ranks, the budget b(t), each matrix's mean triplet score and
the matrices that lost or regained rank go to the callback's history and loggers as FlexLoRA's events
do. The mask of every layer is a persistent boolean buffer ``rank_mask`` next to peft's parameters, so
checkpoints hold it; the allocator's EMAs travel in the callback's state.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from flexlora_pl.core.allocator import AllocationEvent, AllocationSettings
from flexlora_pl.core.checks import require_int
from flexlora_pl.methods.base import AllocationDriver, StepContext, register_method
from flexlora_pl.methods.lora import ADAPTER_NAME, PeftAdapterMethod, peft_tuner
from flexlora_pl.methods.loraplus import check_loraplus_ratio

__all__ = ["AdaLoRA", "AdaLoRAAllocation"]

#: ``total_step`` of the peft config until the fit sets the real one (peft refuses to build without one)
PLACEHOLDER_TOTAL_STEP = 1
_ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")


@register_method
class AdaLoRA(PeftAdapterMethod):
    """AdaLoRA through peft's ``AdaLoraConfig``: ``init_rank`` directions per matrix pruned to ``target_rank``.

    The average rank falls from ``init_rank`` to ``target_rank`` on the ``reallocation:`` schedule.

    Args:
        target_modules: linear layers to adapt: dotted-name suffixes (``query``) or ``re:<regex>``, matched
            as for FlexLoRA (``None``: the task's defaults).
        init_rank: directions per matrix at start, peft's ``init_r`` (paper: r_max = 1.5 · r).
        target_rank: average rank per matrix at the end, peft's ``target_r`` (paper: r).
        alpha: LoRA α; the update is scaled by α / init_rank (fixed when ranks fall).
        dropout: dropout on the adapter inputs.
        orth_reg_weight: γ, the weight of the orthogonality regulariser in the loss (paper: 0.1).
        beta1: EMA coefficient of the sensitivity Ī (peft's ``beta1``).
        beta2: EMA coefficient of the uncertainty Ū (peft's ``beta2``).
        loraplus_ratio: LoRA+'s rule (:mod:`flexlora_pl.methods.loraplus`) on the SVD form: the output factor ``P``
            (peft's ``lora_B``) at this multiple of the learning rate of ``λ`` and ``Q``; ``None``: one rate.
    """

    name = "adalora"
    quantized_base = True
    extra_per_direction = 1  # a singular value λ per direction
    peft_type = "ADALORA"
    peft_fields: ClassVar[dict[str, str]] = {
        "init_rank": "init_r", "target_rank": "target_r", "alpha": "lora_alpha", "dropout": "lora_dropout",
        "orth_reg_weight": "orth_reg_weight", "beta1": "beta1", "beta2": "beta2"}

    def __init__(self, target_modules: Sequence[str] | None = None, init_rank: int = 12, target_rank: int = 8,
                 alpha: float = 16.0, dropout: float = 0.0, orth_reg_weight: float = 0.1, beta1: float = 0.85,
                 beta2: float = 0.85, loraplus_ratio: float | None = None) -> None:
        super().__init__(target_modules, alpha, dropout, orth_reg_weight=orth_reg_weight)
        self.loraplus_ratio = check_loraplus_ratio(loraplus_ratio, "AdaLoRA")
        require_int("init_rank", init_rank, 1, owner="AdaLoRA")
        require_int("target_rank", target_rank, 1, owner="AdaLoRA")
        if target_rank >= init_rank:
            raise ValueError(
                f"AdaLoRA: target_rank ({target_rank}) must be below init_rank ({init_rank}): AdaLoRA prunes from "
                "init_rank down to an average of target_rank (paper: init_rank = 1.5 · target_rank). For ranks "
                "that never move use flexlora_pl.methods.LoRA"
            )
        for key, value in (("beta1", beta1), ("beta2", beta2)):
            if not 0.0 < value < 1.0:
                raise ValueError(f"AdaLoRA: {key} must lie strictly between 0 and 1, got {value!r} (paper: 0.85)")
        self.init_rank, self.target_rank = init_rank, target_rank
        self.orth_reg_weight, self.beta1, self.beta2 = float(orth_reg_weight), float(beta1), float(beta2)
        self._plans: dict[int, tuple[weakref.ref, list[tuple[str, list[nn.Parameter]]]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_plans"] = {}  # weak references do not pickle; plans are rebuilt on first use
        return state

    # ---------------------------------------------------------------- peft
    def tuner_class(self) -> type:
        from peft.tuners.adalora import AdaLoraModel

        return AdaLoraModel

    def is_own_layer(self, layer: nn.Module) -> bool:
        from peft.tuners.adalora import AdaLoraLayer

        return isinstance(layer, AdaLoraLayer)

    def peft_config(self, target_modules: list[str] | str) -> Any:
        from peft import AdaLoraConfig

        # orth_reg_weight=0: R enters the loss through ``regularizer`` only (see the module docstring).
        # The schedule is a placeholder until ``configure_schedule`` runs at fit start.
        return AdaLoraConfig(
            init_r=self.init_rank, target_r=self.target_rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
            target_modules=target_modules, beta1=self.beta1, beta2=self.beta2, orth_reg_weight=0.0,
            total_step=PLACEHOLDER_TOTAL_STEP, tinit=0, tfinal=0, deltaT=1, bias="none",
        )

    def after_injection(self, model: nn.Module, tuner: Any) -> None:
        for _, layer in self.layers(model):
            lam = layer.lora_E[ADAPTER_NAME]
            device = lam.device if lam.device.type != "meta" else torch.device("cpu")  # counted on meta, still
            layer.register_buffer("rank_mask", torch.ones(lam.shape[0], dtype=torch.bool, device=device))

    def capacity(self) -> int:
        return self.init_rank

    def layer_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        return [layer.lora_A[ADAPTER_NAME], layer.lora_E[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]]

    def layer_b_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        return [layer.lora_B[ADAPTER_NAME]]

    def layer_delta_weight(self, layer: nn.Module) -> torch.Tensor:
        """ΔW = B (A ⊙ E) · α / (r + 1e-5), what peft's AdaLoRA layers add (its 4-bit ``SVDLinear4bit`` applies it
        in the forward pass but defines no delta of its own)."""
        a, e, b = layer.lora_A[ADAPTER_NAME], layer.lora_E[ADAPTER_NAME], layer.lora_B[ADAPTER_NAME]
        return (b @ (a * e)) * layer.scaling[ADAPTER_NAME] / (layer.ranknum[ADAPTER_NAME] + 1e-5)

    def layer_rank(self, layer: nn.Module) -> int:
        return int(layer.rank_mask.sum())

    def layer_capacity(self, layer: nn.Module) -> int:
        return int(layer.r[ADAPTER_NAME])

    # ---------------------------------------------------------------- export
    def layer_has_update(self, layer: nn.Module) -> bool:
        return bool(layer.lora_E[ADAPTER_NAME].any())  # a matrix pruned to rank 0 is left out of a peft export

    def finish_export_config(self, model: nn.Module, config: Any) -> None:
        """The run's γ (training kept peft's at 0), and a rank pattern keeping every direction whose singular value
        is non-zero: peft stores only those, so the adapter computes exactly what the model computes (also
        mid-run, when peft's soft masks have let pruned values grow back)."""
        config.orth_reg_weight = self.orth_reg_weight
        config.rank_pattern = {f"{name}.lora_E.{ADAPTER_NAME}": (layer.lora_E[ADAPTER_NAME] != 0).view(-1).tolist()
                               for name, layer in self.layers(model)}

    # ---------------------------------------------------------------- schedule
    def configure_schedule(self, model: nn.Module, total_step: int, tinit: int, tfinal: int, delta_t: int) -> Any:
        """Set peft's schedule on the adapted ``model``'s config (which its rank allocator reads); returns it.

        The driver calls this at fit start; call it yourself before the first ``update_and_allocate`` when
        training without the ``RankReallocation`` callback.

        Args:
            model: the model :meth:`adapt` returned.
            total_step: T, the run's number of optimizer steps.
            tinit: optimizer steps before the budget starts to fall (``reallocation.t_warmup``).
            tfinal: the last steps, trained at the final budget (``reallocation.t_final``).
            delta_t: optimizer steps between maskings (``reallocation.delta_t``).

        Raises:
            ValueError: a value that is not a non-negative integer, or a schedule without a budgeting phase.
        """
        for key, value, least in (("total_step", total_step, 1), ("t_warmup", tinit, 0), ("t_final", tfinal, 0),
                                  ("delta_t", delta_t, 1)):
            require_int(key, value, least, owner="AdaLoRA")
        if tinit >= total_step - tfinal:
            raise ValueError(
                f"AdaLoRA: with t_warmup={tinit} and t_final={tfinal}, a run of {total_step} optimizer steps has no "
                f"budgeting phase (peft needs t_warmup < T - t_final = {total_step - tfinal}). Lower "
                "reallocation.t_warmup / reallocation.t_final, or train longer"
            )
        config = _tuner(model).peft_config[ADAPTER_NAME]
        config.total_step, config.tinit, config.tfinal, config.deltaT = total_step, tinit, tfinal, delta_t
        return config

    def allocation_driver(self, settings: AllocationSettings) -> AdaLoRAAllocation:
        return AdaLoRAAllocation(self, settings)

    # ---------------------------------------------------------------- regulariser
    def regularizer(self, model: nn.Module) -> torch.Tensor:
        """R = mean over every P and Q of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F (peft's term, over all directions).

        Factors of one shape are stacked and handled in one batched product, so the cost is a few kernels
        per distinct shape rather than a Python loop over the parameters.
        """
        total: torch.Tensor | None = None
        count = 0
        for kind, params in self._plan(model):
            stacked = torch.stack(params)
            gram = stacked @ stacked.mT if kind == "A" else stacked.mT @ stacked  # (n, r, r)
            eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
            part = torch.linalg.matrix_norm(gram - eye).sum()
            total = part if total is None else total + part
            count += len(params)
        if total is None:
            raise ValueError("AdaLoRA.regularizer: the model holds no AdaLoRA layer; adapt it first")
        return total / count

    def _plan(self, model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
        """The factors grouped by kind and shape, built once per model (shapes never change)."""
        entry = self._plans.get(id(model))
        if entry is not None and entry[0]() is model:
            return entry[1]
        groups: dict[tuple[str, tuple[int, ...]], list[nn.Parameter]] = {}
        for _, layer in self.layers(model):
            for kind, param in (("A", layer.lora_A[ADAPTER_NAME]), ("B", layer.lora_B[ADAPTER_NAME])):
                groups.setdefault((kind, tuple(param.shape)), []).append(param)
        plan = [(kind, params) for (kind, _), params in groups.items()]
        self._plans[id(model)] = (weakref.ref(model), plan)
        return plan


class AdaLoRAAllocation(AllocationDriver):
    """Runs peft's AdaLoRA allocation on the ``reallocation:`` schedule (an allocation driver).

    Made by :meth:`AdaLoRA.allocation_driver`. peft's ``update_and_allocate`` runs once after every optimizer
    step; each masking is returned as an event (ranks, budget, mean triplet scores, the matrices that lost or
    regained rank), which the ``RankReallocation`` callback records and logs like FlexLoRA's.

    Args:
        method: the AdaLoRA method that adapted the model.
        settings: the ``reallocation:`` group; its ``t_warmup``, ``t_final`` and ``delta_t`` become peft's
            ``tinit``, ``tfinal`` and ``deltaT`` (its other switches are FlexLoRA's and do not apply).
    """

    def __init__(self, method: AdaLoRA, settings: AllocationSettings) -> None:
        self.method, self.settings = method, settings
        self._tuner: Any = None
        self._model: nn.Module | None = None
        self._pending: dict[str, Any] | None = None
        self.layer_names: list[str] = []

    # ------------------------------------------------------------------ hooks
    def bind(self, module: nn.Module) -> list[str]:
        """Find the adapted model in ``module`` and name its AdaLoRA layers relative to ``module``."""
        prefix, model = _adapted_model(module)
        self._model, self._tuner = model, _tuner(model)
        self.layer_names = [f"{prefix}{name}" for name, _ in self.method.layers(model)]
        return self.layer_names

    def start(self, total_steps: int, history: Sequence[dict[str, Any]]) -> str:
        """Set peft's schedule (T = ``total_steps``) and restore a checkpoint's allocator state."""
        s = self.settings
        config = self.method.configure_schedule(self._model, total_steps, s.t_warmup, s.t_final, s.delta_t)
        if self._pending is not None:
            state, self._pending = self._pending, None
            self.load_state_dict(state)
        allocator = self._tuner.rankallocator
        final = total_steps - config.tfinal
        masks = sum(1 for t in range(config.tinit + 1, final) if t % config.deltaT == 0) + 1
        return (
            f"AdaLoRA (peft): total rank {allocator.init_bgt} -> {allocator.target_bgt} over {len(self.layer_names)} "
            f"matrices; {masks} maskings (every step t with t % {config.deltaT} == 0 in ({config.tinit}, {final}), "
            f"and the final budget at step {final}) in {total_steps} optimizer steps. RankReallocation's b0, "
            "importance, mode, init, r_min and b_schedule are FlexLoRA's and do not apply"
        )

    def after_optimizer_step(self, step: int, context: StepContext) -> AllocationEvent | None:
        """Call peft's ``update_and_allocate(step)`` once; return an event when it masked to the budget.

        Args:
            step: ``trainer.global_step``, the number of optimizer steps taken.
            context: unused but for the protocol (peft scores and masks by itself).
        """
        tuner = self._tuner
        config = tuner.peft_config[ADAPTER_NAME]
        # At T - t_final peft masks with the EMAs of the previous step and then clears them: score first.
        scores = self._scores() if step == config.total_step - config.tfinal else None
        before = config.rank_pattern
        tuner.update_and_allocate(step)
        if config.rank_pattern is None or config.rank_pattern is before:
            return None  # no masking at this step (peft assigns a new pattern whenever it masks)
        if scores is None:
            scores = self._scores()
        layers = list(self.method.layers(self._model))
        old = [self.method.layer_rank(layer) for _, layer in layers]
        # the λ (peft's lora_E) each matrix held when peft scored it, active entries only, as FlexLoRA records them
        spectra = {name: layer.lora_E[ADAPTER_NAME].detach().view(-1)[layer.rank_mask].float().cpu().tolist()
                   for name, (_, layer) in zip(self.layer_names, layers, strict=True)}
        self._store_masks(config.rank_pattern)
        ranks = [self.method.layer_rank(layer) for _, layer in layers]
        names = self.layer_names
        record = {
            "step": step,
            "budget": int(tuner.rankallocator.budget_schedule(step)[0]),
            "ranks": ranks,
            "scores": scores,
            "pruned": [n for n, a, b in zip(names, old, ranks, strict=True) if b < a],
            "expanded": [n for n, a, b in zip(names, old, ranks, strict=True) if b > a],
        }
        return AllocationEvent(record, spectra)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """The allocator's sensitivity EMAs (tensors by parameter name) and whether peft has masked yet.

        The masks themselves are the layers' ``rank_mask`` buffers (and the zeroed λ), in the model's
        state dict.
        """
        if self._tuner is None:
            return dict(self._pending or {})
        allocator = self._tuner.rankallocator
        state: dict[str, Any] = {key: dict(getattr(allocator, key)) for key in _ALLOCATOR_STATE}
        state["masked"] = self._tuner.peft_config[ADAPTER_NAME].rank_pattern is not None
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (kept until :meth:`on_fit_start` has found the model)."""
        if self._tuner is None:
            self._pending = dict(state)
            return
        allocator = self._tuner.rankallocator
        params = dict(self._model.named_parameters())
        for key in _ALLOCATOR_STATE:
            saved = state.get(key, {})
            unknown = [name for name in saved if name not in params]
            if unknown:
                raise ValueError(
                    f"the checkpoint's AdaLoRA allocator state names {unknown[0]!r}, which is not a parameter of the "
                    "model: resume with the backbone and target_modules the checkpoint was trained with"
                )
            setattr(allocator, key, {name: t.to(params[name].device) for name, t in saved.items()})
        if state.get("masked"):
            pattern = {f"{name}.lora_E.{ADAPTER_NAME}": layer.rank_mask.tolist()
                       for name, layer in self.method.layers(self._model)}
            self._tuner.peft_config[ADAPTER_NAME].rank_pattern = pattern

    # ------------------------------------------------------------------ helpers
    def _store_masks(self, pattern: dict[str, Any]) -> None:
        for name, layer in self.method.layers(self._model):
            values = pattern.get(f"{name}.lora_E.{ADAPTER_NAME}", pattern.get(f"{name}.lora_E"))
            if values is None:
                raise ValueError(f"peft's AdaLoRA rank pattern has no entry for {name!r}")
            mask = torch.as_tensor(values, dtype=torch.bool, device=layer.rank_mask.device).view(-1)
            layer.rank_mask.copy_(mask)

    @torch.no_grad()
    def _scores(self) -> list[float]:
        """Each matrix's mean triplet score S_i (peft's ranking of directions), in layer order; 0 before any."""
        allocator = self._tuner.rankallocator
        scores = []
        for name, _ in self.method.layers(self._model):
            keys = [f"{name}.{part}.{ADAPTER_NAME}" for part in ("lora_A", "lora_E", "lora_B")]
            if not all(key in allocator.exp_avg_ipt for key in keys):
                scores.append(0.0)
                continue
            a, e, b = (allocator.exp_avg_ipt[k] * allocator.exp_avg_unc[k] for k in keys)
            triplet = e.view(-1) + a.mean(dim=1) + b.mean(dim=0)
            scores.append(float(triplet.double().mean()))
        return scores


def _tuner(model: nn.Module) -> Any:
    tuner = peft_tuner(model)
    if tuner is None or not hasattr(tuner, "rankallocator"):
        raise ValueError(
            f"{type(model).__name__} was not adapted by flexlora_pl.methods.AdaLoRA (no peft AdaLoRA tuner with a "
            "rank allocator is attached to it); build it with AdaLoRA().adapt(...)"
        )
    return tuner


def _adapted_model(pl_module: nn.Module) -> tuple[str, nn.Module]:
    """``(name prefix, model)`` of the AdaLoRA-adapted model inside ``pl_module`` (its ``backbone``)."""
    for name, module in pl_module.named_modules():
        tuner = peft_tuner(module)
        if tuner is not None and hasattr(tuner, "rankallocator"):
            return (f"{name}." if name else ""), module
    raise ValueError(
        f"{type(pl_module).__name__} holds no model adapted by flexlora_pl.methods.AdaLoRA: the AdaLoRA allocation "
        "needs the module's backbone built with AdaLoRA().adapt(...) (FlexLoRAModule(method=AdaLoRA(...)) does it)"
    )
