"""How a backbone gets adapted: the ``AdaptationMethod`` protocol and the registry of methods.

A method is a config object, separate from the task. The task (sequence classification, …) owns the
backbone, the head, the metrics and the data links; the method owns its own settings (rank, α,
dropout, target modules, initialisation, regulariser weight) and does four things to a backbone:

1. :meth:`AdaptationMethod.adapt` adds the adapters and freezes everything else but ``modules_to_save``;
2. :meth:`AdaptationMethod.adapter_parameters` names the parameters of the optimizer's ``adapter`` group;
3. :meth:`AdaptationMethod.regularizer` returns the unweighted regulariser R (``None``: none), which
   ``FlexLoRAModule`` adds to the task loss as ``reg_weight · R`` and logs as ``train/orth_reg``;
4. :meth:`AdaptationMethod.rank_pattern` reports every adapted matrix's active rank (for the heat-map,
   ``rank_pattern.json`` and ``metrics.json``).

Ranks that move are driven by the ``RankReallocation`` callback (the ``reallocation:`` config group):
FlexLoRA's own events, or :meth:`AdaptationMethod.allocation_driver` for a method that allocates its own
way (AdaLoRA). A method whose ranks are fixed (LoRA) returns ``None`` there and no event fires.

Adding a method is one new file in this folder with a subclass decorated by :func:`register_method`, and
its name in ``flexlora_pl/methods/__init__.py``; ``docs/extending.md`` walks through one.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:  # pragma: no cover - typing only
    from flexlora_pl.callbacks.rank_reallocation import RankReallocation

__all__ = ["METHODS", "AdaptationMethod", "build_method", "register_method"]

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
        reg_weight: weight γ of the method's regulariser in the loss (0 switches it off).
    """

    #: registry key, recorded in ``metrics.json`` as the run's method
    name: ClassVar[str] = ""

    def __init__(self, target_modules: Sequence[str] | None = None, alpha: float = 16.0, dropout: float = 0.0,
                 reg_weight: float = 0.0) -> None:
        if isinstance(target_modules, str):
            target_modules = [target_modules]
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, got {alpha}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if reg_weight < 0:
            raise ValueError(f"the regulariser weight must be >= 0, got {reg_weight}")
        self.target_modules = list(target_modules) if target_modules is not None else None
        self.alpha, self.dropout, self.reg_weight = float(alpha), float(dropout), float(reg_weight)

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

    def matrix_shapes(self, model: nn.Module) -> dict[str, int]:
        """Parameters per direction (``d_in + d_out``, plus one for a singular value) of every adapted matrix."""
        raise NotImplementedError(f"{type(self).__name__} does not report its matrix shapes")

    def allocation_driver(self, callback: RankReallocation) -> Any:
        """What moves this method's ranks under the ``reallocation:`` schedule.

        ``None`` (the default): ranks are fixed and no allocation event fires. FlexLoRA is driven by the
        callback itself; AdaLoRA returns an object with ``on_fit_start(trainer, module)``,
        ``after_optimizer_step(trainer, module, step)``, ``state_dict()`` and ``load_state_dict()``.
        """
        return None

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


def public_class_path(cls: type) -> str:
    """``flexlora_pl.methods.<Name>`` for a method exported there (what configs write), else its module path."""
    import flexlora_pl.methods as package

    if getattr(package, cls.__name__, None) is cls:
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
