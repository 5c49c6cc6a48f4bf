"""How a backbone gets adapted: the ``AdaptationMethod`` protocol and the registry of methods.

A method is a config object, separate from the task. The task (sequence classification, …) owns the
backbone, the head, the metrics and the data links; the method owns its own settings (rank, α,
dropout, target modules, initialisation, regulariser weight) and does four things to a backbone:

1. :meth:`AdaptationMethod.adapt` adds the adapters and freezes everything else but ``modules_to_save``;
2. :meth:`AdaptationMethod.adapter_parameters` names the parameters of the optimizer's ``adapter`` group;
3. :meth:`AdaptationMethod.regularizer` returns the unweighted regulariser R (``None``: none), which
   ``FlexLoRAModule`` adds to the task loss as ``orth_reg_weight · R`` and logs as ``train/orth_reg``;
4. :meth:`AdaptationMethod.rank_pattern` reports every adapted matrix's active rank (for the heat-map,
   ``rank_pattern.json`` and ``metrics.json``).

A method whose ranks move returns an :class:`AllocationDriver` from :meth:`AdaptationMethod.allocation_driver`,
built from the frozen :class:`~flexlora_pl.core.allocator.AllocationSettings` of the ``reallocation:`` group.
The ``RankReallocation`` callback decides *when* (after every optimizer step) and appends, logs and writes
the events the driver returns; the driver decides *what* (FlexLoRA's entropy events, peft's AdaLoRA masking).
A method whose ranks are fixed (LoRA) returns ``None`` and no event fires.

What an export needs of a method is the method's too: :meth:`AdaptationMethod.peft_adapter_state` (the
peft adapter equal to the model), :meth:`AdaptationMethod.merge` (the plain model with the update merged in),
:meth:`AdaptationMethod.adapter_checkpoint_layers` (what an adapter-only checkpoint stores) and
:meth:`AdaptationMethod.recognize` (the method of a plain model that holds its adapters). The defaults refuse,
naming the method and the reason, so :mod:`flexlora_pl.export` never asks which method it holds.

Adding a method is one new file in this folder with a subclass decorated by :func:`register_method`, and
its name in ``flexlora_pl/methods/__init__.py``; ``docs/extending.md`` walks through one.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from flexlora_pl.core.allocator import AllocationEvent, AllocationSettings
from flexlora_pl.core.layer import FlexLoRALinear

__all__ = ["METHODS", "AdaptationMethod", "AllocationDriver", "StepContext", "build_method", "module_tensors",
           "recognize_method", "register_method"]

#: method name -> class; filled by :func:`register_method`
METHODS: dict[str, type[AdaptationMethod]] = {}


def register_method(cls: type[AdaptationMethod]) -> type[AdaptationMethod]:
    """Class decorator: make ``cls`` selectable by its :attr:`~AdaptationMethod.name`."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} needs a class attribute `name` (a non-empty string) to be registered")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"method name {name!r} is taken by {METHODS[name].__qualname__}")
    METHODS[name] = cls
    return cls


class AdaptationMethod(ABC):
    """One way to adapt a backbone (FlexLoRA, LoRA, AdaLoRA, …). Subclasses set ``name`` and implement ``adapt``.

    Args:
        target_modules: linear layers to adapt: dotted-name suffixes (``query``) or ``re:<regex>``;
            ``None`` uses the task's default targets for its backbone.
        alpha: LoRA α (the update is scaled by α / r).
        dropout: dropout on the adapter inputs.
        orth_reg_weight: weight γ of the method's regulariser in the loss (0 switches it off).
    """

    #: registry key, recorded in ``metrics.json`` as the run's method
    name: ClassVar[str] = ""
    #: init arguments that change only how a trained model is evaluated and exported (DyLoRA's ``eval_rank``):
    #: ``validate``, ``test`` and ``predict`` from a checkpoint may give them other values than it was trained with
    evaluation_options: ClassVar[tuple[str, ...]] = ()
    #: whether the method can adapt a 4-bit base (``quantization: nf4 | fp4`` of the causal-LM task, QLoRA): its
    #: adapters wrap bitsandbytes' ``Linear4bit`` layers and its merge adds their update into the dequantized
    #: weights (:func:`flexlora_pl.core.quantized.merge_into_dequantized`). A method that trains or decomposes
    #: the base weights themselves (full fine-tuning, PiSSA, MiLoRA) or whose merge is more than an added ΔW
    #: (DoRA) cannot
    quantized_base: ClassVar[bool] = False

    def __init__(self, target_modules: Sequence[str] | None = None, alpha: float = 16.0, dropout: float = 0.0,
                 orth_reg_weight: float = 0.0) -> None:
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be >= 0, got {orth_reg_weight}")
        self.target_modules = list(target_modules) if target_modules is not None else None
        self.alpha, self.dropout, self.orth_reg_weight = float(alpha), float(dropout), float(orth_reg_weight)

    # ------------------------------------------------------------------ adapt
    def with_default_targets(self, targets: Sequence[str]) -> AdaptationMethod:
        """Fill in the task's default targets when the method names none (returns ``self``)."""
        if self.target_modules is None:
            self.target_modules = list(targets)
        return self

    @abstractmethod
    def adapt(self, backbone: nn.Module, modules_to_save: Sequence[str], seed: int) -> nn.Module:
        """Add adapters to ``backbone`` and freeze all but them and ``modules_to_save``; return the model to train.

        Args:
            backbone: the model to adapt.
            modules_to_save: modules trained in full (the task head).
            seed: seed of the adapters' initial draws.
        """

    @abstractmethod
    def adapter_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The adapter parameters of the adapted ``model`` (the optimizer's ``adapter`` group)."""

    def optimizer_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """The optimizer's parameter groups of the adapted ``model``'s adapter parameters, in a fixed order.

        Each group is a dict with ``params``, a ``name`` (what ``LearningRateMonitor`` labels by) and optionally
        ``lr_scale``: the group's learning rate is the optimizer's times ``lr_scale`` (LoRA+ trains ``B`` at a
        multiple of ``A``'s rate). Default: one group ``adapter`` with :meth:`adapter_parameters`. The module adds
        the ``modules_to_save`` group after these. Together the groups hold :meth:`adapter_parameters`, each once.
        """
        return [{"params": self.adapter_parameters(model), "name": "adapter"}]

    def before_training_batch(self, model: nn.Module) -> None:
        """Called before every training batch's forward pass, after a resumed run's RNG states are restored.

        Default: nothing. A method that draws something per batch (DyLoRA samples its rank) draws it here from
        the global RNG, which checkpoints restore, so a resumed run draws what the uninterrupted one did.
        """
        return None

    def on_evaluation(self, model: nn.Module) -> None:
        """Called before validation, test and prediction (DyLoRA evaluates at its ``eval_rank``); default nothing."""
        return None

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """The unweighted regulariser R of the adapted ``model`` (``None``: the method has none)."""
        return None

    # ---------------------------------------------------------------- ranks
    @abstractmethod
    def rank_pattern(self, model: nn.Module) -> dict[str, int]:
        """Active rank of every adapted matrix, by module name, in model (depth) order."""

    @abstractmethod
    def max_ranks(self, model: nn.Module) -> dict[str, int]:
        """Rank capacity of every adapted matrix, by module name."""

    def parameter_counts(self, model: nn.Module) -> dict[str, int]:
        """Adapter parameters ``active`` (what the papers count) and ``allocated`` (with spare capacity)."""
        shapes, capacity = self.matrix_shapes(model), self.max_ranks(model)
        active = sum(rank * shapes[name] for name, rank in self.rank_pattern(model).items())
        allocated = sum(capacity[name] * per for name, per in shapes.items())
        return {"active": active, "allocated": allocated}

    def facts(self) -> dict[str, Any]:
        """What ``metrics.json`` records of this method's set-up besides its name and counts (``run.method_facts``;
        default: the LoRA+ ratio when the method has one set). Plain JSON values: LoRA's fixed rank pattern records
        its source file and its ranks."""
        ratio = getattr(self, "loraplus_ratio", None)
        return {"loraplus_ratio": ratio} if ratio is not None else {}

    def matrix_shapes(self, model: nn.Module) -> dict[str, int]:
        """Parameters per direction (``d_in + d_out``, plus one for a singular value) of every adapted matrix."""
        raise NotImplementedError(f"{type(self).__name__} does not report its matrix shapes")

    def allocation_driver(self, settings: AllocationSettings) -> AllocationDriver | None:
        """What moves this method's ranks under the ``reallocation:`` schedule; ``None`` (default): fixed ranks.

        Args:
            settings: the ``reallocation:`` group's schedule and switches.
        """
        return None

    @property
    def moves_ranks(self) -> bool:
        """Whether :meth:`allocation_driver` is overridden, i.e. this method's ranks can move."""
        return type(self).allocation_driver is not AdaptationMethod.allocation_driver

    # ---------------------------------------------------------------- export
    @classmethod
    def recognize(cls, model: nn.Module) -> AdaptationMethod | None:
        """This method, as it adapted ``model``, when ``model`` holds its adapters; ``None`` (default) otherwise.

        Lets an export of a plain model (no LightningModule, no ``method`` around it) find its method.
        """
        return None

    def peft_adapter_state(self, model: nn.Module, saved_modules: Sequence[str]) -> tuple[Any, dict[str, torch.Tensor]]:
        """The peft adapter equal to the adapted ``model``: its peft config and the tensors of its weights file.

        Args:
            model: the adapted backbone (left untouched).
            saved_modules: exact names of the modules trained in full, stored whole (peft's ``modules_to_save``).

        Returns:
            ``(config, tensors)``: ``config.save_pretrained(folder)`` plus the tensors saved as the folder's
            ``adapter_model.safetensors`` make an adapter that ``peft.PeftModel.from_pretrained`` loads.

        Raises:
            ValueError: the method has no peft form (the default), or this model has none.
        """
        raise self.export_refusal("a peft adapter", "it defines no peft form (AdaptationMethod.peft_adapter_state)")

    def peft_adapter_notes(self, model: nn.Module) -> str | None:
        """Markdown that a peft export of ``model`` writes as its folder's ``README.md`` (``None``, the default:
        none), for an adapter that is not what its config alone suggests (PiSSA's is a plain LoRA adapter of
        twice the run's rank)."""
        return None

    def merge(self, model: nn.Module) -> nn.Module:
        """A copy of the adapted ``model`` with the update merged into the base weights and no adapter layer left.

        Args:
            model: the adapted backbone (left untouched).

        Raises:
            ValueError: the method cannot merge its update (the default).
        """
        raise self.export_refusal("a merged model", "it defines no merge of its update (AdaptationMethod.merge)")

    def adapter_checkpoint_layers(self, model: nn.Module) -> dict[str, FlexLoRALinear]:
        """The FlexLoRA layers an adapter-only checkpoint stores, by module name.

        Raises:
            ValueError: the method's adapters are not FlexLoRA layers (the default).
        """
        raise self.export_refusal("a FlexLoRA adapter checkpoint", "its adapters are not FlexLoRA layers (the "
                                  "checkpoint stores their P, λ, Q and rank masks)")

    def export_refusal(self, form: str, reason: str) -> ValueError:
        """The error of an export that makes no sense for this method: it names the method, the form and why."""
        return ValueError(f"method {self.name!r} ({type(self).__name__}) cannot be exported as {form} because "
                          f"{reason}; choose another export format")

    # ---------------------------------------------------------------- config
    def as_config(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}``: how this method is saved in checkpoints and rebuilt."""
        args = {}
        for key in inspect.signature(type(self).__init__).parameters:
            if key != "self" and hasattr(self, key):
                value = getattr(self, key)
                args[key] = list(value) if isinstance(value, tuple) else value
        return {"class_path": public_class_path(type(self)), "init_args": args}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.as_config()["init_args"].items())
        return f"{type(self).__name__}({args})"


@dataclass(frozen=True)
class StepContext:
    """What an :class:`AllocationDriver` may use after one optimizer step; the callback builds it.

    Args:
        optimizers: the Trainer's optimizers (an event zeroes the moments of the directions it moves).
        history: the event records so far (read only: the callback appends what the driver returns).
        scores: ``scores(metric)``: every adapted matrix's importance, from the LightningModule's
            ``importance_scores`` when it has one (``None``: the driver scores by its built-in metric).
        agree: ``agree(step, budget, prune, expand)``: raises when the processes of a distributed run decided
            otherwise (a no-op on one process).
        check_finite: ``check_finite(where)``: raises when the training loss went NaN or inf before the event.
    """

    optimizers: Sequence[torch.optim.Optimizer]
    history: Sequence[dict[str, Any]]
    scores: Callable[[str], torch.Tensor] | None = None
    agree: Callable[[int, int, Sequence[int], Sequence[int]], None] | None = None
    check_finite: Callable[[str], None] | None = None


class AllocationDriver(ABC):
    """Moves an adapted model's ranks on the ``reallocation:`` schedule (made by
    :meth:`AdaptationMethod.allocation_driver`). It holds no Trainer: the ``RankReallocation`` callback calls

    1. :meth:`bind` with the LightningModule when fitting is set up (and again at fit start);
    2. :meth:`start` once the run's number of optimizer steps is known, before the first step;
    3. :meth:`before_optimizer_step` and :meth:`after_optimizer_step` around every optimizer step; the latter
       returns an :class:`~flexlora_pl.core.allocator.AllocationEvent` when ranks moved (the callback appends
       its record to the history, writes its spectra and logs it) and ``None`` otherwise;
    4. :meth:`measurements` whenever the host syncs anyway (events, checkpoints, the end), for diagnostics
       measured on the device since;
    5. :meth:`state_dict` / :meth:`load_state_dict` with checkpoints (the history is the callback's).

    Attributes:
        layer_names: the adapted matrices, named relative to the LightningModule, in model order.
    """

    layer_names: list[str]

    @abstractmethod
    def bind(self, module: nn.Module) -> list[str]:
        """Find the adapted layers in ``module``; return their names (:attr:`layer_names`)."""

    @abstractmethod
    def start(self, total_steps: int, history: Sequence[dict[str, Any]]) -> str:
        """Check the schedule against the layers before the first step (``ValueError`` naming the fix) and
        return a one-line summary of what will happen. ``history`` is a resumed run's."""

    def before_optimizer_step(self) -> None:
        """Called before every optimizer step, while the gradients are the step's."""
        return None

    @abstractmethod
    def after_optimizer_step(self, step: int, context: StepContext) -> AllocationEvent | None:
        """Called once after every optimizer step ``step`` (``trainer.global_step``)."""

    def measurements(self) -> list[tuple[int, int, dict[str, float]]]:
        """``(step, event index, values)`` measured since the last call: added to that event's record and
        logged as ``flexlora/<key>`` at ``step``."""
        return []

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (may come before :meth:`start`: keep it until then)."""
        return None


def public_class_path(cls: type) -> str:
    """``flexlora_pl.methods.<Name>`` for a method that ships in :mod:`flexlora_pl.methods` (what configs write),
    else its module path."""
    if cls.__module__.startswith("flexlora_pl.methods.") and METHODS.get(getattr(cls, "name", "")) is cls:
        return f"flexlora_pl.methods.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def build_method(spec: AdaptationMethod | dict[str, Any] | str | None, default: str = "flexlora") -> AdaptationMethod:
    """A method object from an object, a ``{"class_path", "init_args"}`` dict (a checkpoint's), or a name."""
    if spec is None:
        spec = default
    if isinstance(spec, AdaptationMethod):
        return spec
    if isinstance(spec, str):
        if spec not in METHODS:
            raise ValueError(f"unknown method {spec!r}; registered methods: {sorted(METHODS)}")
        return METHODS[spec]()
    if isinstance(spec, dict) and "class_path" in spec:
        class_path = str(spec["class_path"])
        cls = next((c for c in METHODS.values() if f"{c.__module__}.{c.__qualname__}" == class_path
                    or class_path.endswith("." + c.__qualname__)), None)
        if cls is None:
            raise ValueError(f"method class_path {class_path!r} is not a registered method: {sorted(METHODS)}")
        return cls(**dict(spec.get("init_args") or {}))
    raise TypeError(f"method must be an AdaptationMethod, a name or a class_path dict, got {spec!r}")


def recognize_method(model: nn.Module) -> AdaptationMethod:
    """The registered method whose adapters ``model`` holds (:meth:`AdaptationMethod.recognize`).

    Raises:
        ValueError: no registered method recognises an adapter in ``model``.
    """
    for cls in METHODS.values():
        method = cls.recognize(model)
        if method is not None:
            return method
    raise ValueError(
        f"{type(model).__name__} holds no adapter of a registered method ({', '.join(sorted(METHODS))}): no FlexLoRA "
        "layer and no peft layer that flexlora_pl.methods injected, so nothing to export (a peft.PeftModel saves "
        "itself with save_pretrained)"
    )


def module_tensors(model: nn.Module, names: Sequence[str], prefix: str = "") -> dict[str, torch.Tensor]:
    """The state of the submodules ``names`` of ``model`` as detached CPU copies, keyed ``<prefix><name>.<key>``."""
    tensors = {}
    for name in names:
        for key, value in model.get_submodule(name).state_dict().items():
            tensors[f"{prefix}{name}.{key}"] = value.detach().cpu().contiguous().clone()
    return tensors
