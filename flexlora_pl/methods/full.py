"""Full fine-tuning: every weight of the backbone trained in place, no adapter (paper Tables 1-3, "Full FT").

The update is the whole ΔW of every parameter, so there is no rank, no allocation event and no regulariser:
``rank_pattern`` and ``max_ranks`` are empty, and what the method counts as ``active`` (and ``allocated``) is
every backbone parameter it trains. The task head stays in the ``modules_to_save`` optimizer group as under
every other method, so the groups are ``adapter`` (here: the backbone's own weights) and ``modules_to_save``,
and a per-group learning rate or a search space applies alike to all methods.

:class:`WeightTuningMethod` is what full fine-tuning shares with :class:`~flexlora_pl.methods.BitFit` (which
trains the backbone's bias terms only): methods that train some of the model's own parameters instead of adding
layers. For them

- the merged export is the trained model itself (a copy; :meth:`~WeightTuningMethod.merge`);
- a peft adapter and a FlexLoRA adapter checkpoint are refused: there is no adapter to write;
- :meth:`~WeightTuningMethod.recognize` claims nothing. A plain model trained this way holds nothing that tells
  it from its base model or from a model any other way fine-tuned (every model "is" fully fine-tuned from
  something), so a plain model is never taken for one of these methods; an export from a checkpoint knows
  its method from the checkpoint's hyper-parameters.

Checkpoints: a slim checkpoint leaves out the frozen base (:mod:`flexlora_pl.runs.slim_checkpoint`). Under full
fine-tuning nothing is frozen, so every checkpoint holds the whole model (and AdamW's two moments of every
weight); a resumed run reads all of it back and rebuilds nothing from ``model_name_or_path``. ``metrics.json``
says so under ``run.method_facts``: ``{"checkpoint": "whole model (nothing frozen)"}``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from torch import nn

from flexlora_pl.core.inject import match_target
from flexlora_pl.core.layer import FlexLoRALinear
from flexlora_pl.methods.base import AdaptationMethod, register_method
from flexlora_pl.methods.lora import peft_tuner_layers

__all__ = ["WHOLE_MODEL_CHECKPOINT", "FullFineTuning", "WeightTuningMethod", "in_saved_module", "resolve_saved_modules"]

#: what ``metrics.json`` records of a full fine-tuning run's checkpoints
WHOLE_MODEL_CHECKPOINT = "whole model (nothing frozen)"


def resolve_saved_modules(model: nn.Module, modules_to_save: Sequence[str]) -> list[str]:
    """The exact names of the modules ``modules_to_save`` selects (dotted suffixes or ``re:<regex>``).

    Raises:
        ValueError: an entry that matches no module of ``model``.
    """
    patterns = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save or [])
    names = [name for name, _ in model.named_modules() if name]
    saved: list[str] = []
    for pattern in patterns:
        hits = [name for name in names if match_target(name, [pattern])]
        if not hits:
            raise ValueError(f"modules_to_save entry {pattern!r} matches no module in {type(model).__name__}; "
                             f"top-level modules are: {[n for n, _ in model.named_children()]}")
        saved.extend(hit for hit in hits if hit not in saved)
    return saved


def in_saved_module(name: str, saved: Sequence[str]) -> bool:
    """Whether the parameter or module ``name`` lies in (or is) one of the ``saved`` modules."""
    return any(name == s or name.startswith(s + ".") for s in saved)


class WeightTuningMethod(AdaptationMethod):
    """Base of the methods that train some of the backbone's own parameters in place and add no layer.

    A subclass implements :meth:`trained_parameters` (which parameters, by name, outside ``modules_to_save``)
    and may check the selection in :meth:`check_selection`; the rest is here: freezing, the optimizer's
    ``adapter`` group, empty ranks, counts, the merged export and the refusals of the adapter exports.
    """

    #: why a peft adapter cannot hold what the method trained (the end of the refusal's sentence)
    peft_reason: str = ""

    def __init__(self, target_modules: Sequence[str] | None = None) -> None:
        super().__init__(target_modules, orth_reg_weight=0.0)

    # ---------------------------------------------------------------- to implement
    def trained_parameters(self, model: nn.Module, saved: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
        """``(name, parameter)`` of every parameter of ``model`` the method trains, outside the ``saved`` modules,
        in model order, each once."""
        raise NotImplementedError

    # ---------------------------------------------------------------- adapt
    def adapt(self, backbone: nn.Module, modules_to_save: Sequence[str], seed: int | None) -> nn.Module:
        """Freeze ``backbone`` but the parameters the method trains and ``modules_to_save``; return it (in place).

        Args:
            backbone: the model to train; modified in place (``requires_grad``) and returned.
            modules_to_save: modules trained in full (the task head), dotted-name suffixes or ``re:<regex>``.
            seed: unused: nothing is drawn.

        Raises:
            ValueError: a ``modules_to_save`` entry that matches nothing, a backbone that already holds adapters,
                or a selection the method refuses (BitFit: no bias term).
        """
        if any(isinstance(m, FlexLoRALinear) for m in backbone.modules()) or next(peft_tuner_layers(backbone), None):
            raise ValueError(f"{type(self).__name__}: the backbone already holds adapters; train a fresh model")
        saved = resolve_saved_modules(backbone, modules_to_save)
        trained = self.trained_parameters(backbone, saved)
        backbone.requires_grad_(False)
        for _, param in trained:
            param.requires_grad_(True)
        for name in saved:
            backbone.get_submodule(name).requires_grad_(True)
        self.saved_modules = list(saved)  # what adapter_parameters leaves to the modules_to_save group
        return backbone

    def adapter_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """The parameters the method trains outside ``modules_to_save`` (the optimizer's ``adapter`` group)."""
        return [param for _, param in self.trained_parameters(model, getattr(self, "saved_modules", []))]

    # ---------------------------------------------------------------- ranks and counts
    def rank_pattern(self, model: nn.Module) -> dict[str, int]:
        """Empty: no adapted matrix, so no rank (no heat-map and no ``rank_pattern.json`` either)."""
        return {}

    def max_ranks(self, model: nn.Module) -> dict[str, int]:
        """Empty: no adapted matrix."""
        return {}

    def parameter_counts(self, model: nn.Module) -> dict[str, int]:
        """The trained parameters outside ``modules_to_save`` as both ``active`` and ``allocated``: there is no
        spare capacity, every trained parameter counts (the paper's "Params." column for these rows)."""
        trained = sum(param.numel() for param in self.adapter_parameters(model))
        return {"active": trained, "allocated": trained}

    # ---------------------------------------------------------------- export
    def merge(self, model: nn.Module) -> nn.Module:
        """A copy of ``model``: the trained weights are the model's own, nothing is left to merge."""
        return copy.deepcopy(model)

    def peft_adapter_state(self, model: nn.Module, saved_modules: Sequence[str]) -> tuple[Any, dict[str, Any]]:
        """Refused: the method adds no adapter that peft could load.

        Raises:
            ValueError: always, naming the method and the merged export to use instead.
        """
        raise self.export_refusal("a peft adapter", self.peft_reason)

    def adapter_checkpoint_layers(self, model: nn.Module) -> dict[str, FlexLoRALinear]:
        """Refused: there is no FlexLoRA layer.

        Raises:
            ValueError: always, naming the method and the merged export to use instead.
        """
        raise self.export_refusal("a FlexLoRA adapter checkpoint", "it adds no FlexLoRA layer (it trains the "
                                  "model's own parameters); the merged model (--format merged) is the trained model")


@register_method
class FullFineTuning(WeightTuningMethod):
    """Full fine-tuning: every parameter of the backbone trained, the task head in its own optimizer group.

    Takes no option: ``target_modules``, ``alpha``, ``dropout`` and the regulariser do not apply (the task's
    default targets are ignored). Full fine-tuning usually wants a learning rate about 10 times below LoRA's
    (``configs/methods/full.yaml``).
    """

    name = "full"
    peft_reason = ("it trains every weight of the model and has no adapter; the merged model (--format merged) is "
                   "the fine-tuned model itself")

    def __init__(self) -> None:
        super().__init__(None)

    def with_default_targets(self, targets: Sequence[str]) -> FullFineTuning:
        """Returns ``self`` unchanged: full fine-tuning trains every module, whatever the task's targets."""
        return self

    def trained_parameters(self, model: nn.Module, saved: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
        return [(name, param) for name, param in model.named_parameters() if not in_saved_module(name, saved)]

    def facts(self) -> dict[str, Any]:
        return {"checkpoint": WHOLE_MODEL_CHECKPOINT}
