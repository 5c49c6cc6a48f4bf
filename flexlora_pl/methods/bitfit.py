"""BitFit (Ben Zaken, Ravfogel and Goldberg, ACL 2022, https://arxiv.org/abs/2106.10199): train the bias terms only.

Every weight of the backbone stays frozen; each selected layer ``y = W x + b`` trains its ``b`` alone, so the
update is a shift of the layer's output, ``Δy = Δb``, with no rank and no regulariser. The task head is trained
in full (``modules_to_save``), as under every other method.

Which biases (``target_modules``):

- ``"all"`` (the default, and ``configs/methods/bitfit.yaml``): every bias term of the backbone outside the head:
  the linear layers' and the LayerNorms' (and a convolution's, ``nn.MultiheadAttention``'s ``in_proj_bias``).
  This is BitFit as its paper defines and runs it ("all the bias terms"), and what the paper's 0.1M on
  DeBERTaV3-base counts. ``"all"`` alone has this meaning; it is no module name.
- ``None``: the task's default targets, the linear layers the other methods adapt (DeBERTaV3: query, key, value,
  attention output, intermediate, output); their biases only, LayerNorms left frozen. This is the variant that
  trains the same layers as LoRA.
- a list of dotted-name suffixes or ``re:<regex>``, matched as for the other methods against every module (not
  only linear layers: ``LayerNorm`` selects the LayerNorms); each matched module contributes its own bias.

A selection without any bias term is refused before training, naming the modules and the fix: LLaMA's linear
layers and RMSNorms have no bias, so BitFit cannot train a LLaMA. Everything else (empty ranks, counts, the
merged export, the refused peft export) is :class:`~flexlora_pl.methods.full.WeightTuningMethod`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import nn

from flexlora_pl.core.inject import match_target
from flexlora_pl.methods.base import register_method
from flexlora_pl.methods.full import WeightTuningMethod, in_saved_module

__all__ = ["ALL_BIASES", "BitFit", "bias_parameters"]

#: the ``target_modules`` value that selects every bias term of the backbone
ALL_BIASES = "all"
#: the option's path in a config, for messages
OPTION = "--model.init_args.method.init_args.target_modules"


def bias_parameters(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The bias terms ``module`` owns itself (not its children's): ``bias`` and ``*_bias`` parameters."""
    return [(name, param) for name, param in module.named_parameters(recurse=False)
            if name == "bias" or name.endswith("_bias")]


@register_method
class BitFit(WeightTuningMethod):
    """BitFit: only bias terms of the backbone trained, plus the task head.

    Args:
        target_modules: whose biases are trained: ``"all"`` (default): every bias term of the backbone, as in
            the BitFit paper; ``None``: those of the task's default target layers; or dotted-name suffixes /
            ``re:<regex>`` of modules (linear layers, LayerNorms, …), each of which must own a bias.
    """

    name = "bitfit"
    peft_reason = ("peft has no adapter type that holds bias terms alone; the merged model (--format merged) is the "
                   "trained model, biases included")

    def __init__(self, target_modules: Sequence[str] | str | None = ALL_BIASES) -> None:
        super().__init__(target_modules)

    @property
    def all_biases(self) -> bool:
        """Whether every bias term of the backbone is trained (``target_modules`` is ``"all"``)."""
        return self.target_modules == [ALL_BIASES]

    def as_config(self) -> dict[str, Any]:
        config = super().as_config()
        if self.all_biases:  # as a config writes it, so that a checkpoint's and its config's values compare equal
            config["init_args"]["target_modules"] = ALL_BIASES
        return config

    def trained_parameters(self, model: nn.Module, saved: Sequence[str]) -> list[tuple[str, nn.Parameter]]:
        """The selected modules' bias terms outside ``saved``, in model order.

        Raises:
            ValueError: no ``target_modules``, a pattern that matches no module or only modules without a bias,
                a selected module inside ``modules_to_save``, or a selection without any bias term.
        """
        if not self.target_modules:
            raise ValueError(f"BitFit needs target_modules: {ALL_BIASES!r} for every bias term, or the modules "
                             f"whose biases to train ({OPTION})")
        named = [(name, module) for name, module in model.named_modules()]
        if self.all_biases:
            chosen = [(name, module) for name, module in named if not in_saved_module(name, saved)]
        else:
            chosen = self._matched(model, named, saved)
        trained: list[tuple[str, nn.Parameter]] = []
        seen: set[int] = set()
        for name, module in chosen:
            for key, param in bias_parameters(module):
                if id(param) not in seen:  # a bias shared by two modules is trained once
                    seen.add(id(param))
                    trained.append((f"{name}.{key}" if name else key, param))
        if not trained:
            raise ValueError(
                f"BitFit: {type(model).__name__} has no bias term outside modules_to_save {list(saved)} "
                f"(target_modules {self.target_modules}): its layers are bias-free (as LLaMA's linear layers and "
                "RMSNorms are), so BitFit would train nothing but the head. Use another method for this backbone "
                "(lora, full), or name modules that own a bias"
            )
        return trained

    def _matched(self, model: nn.Module, named: list[tuple[str, nn.Module]],
                 saved: Sequence[str]) -> list[tuple[str, nn.Module]]:
        """The modules the patterns of ``target_modules`` select, each checked to own a bias."""
        targets = list(self.target_modules or [])
        chosen = [(name, module) for name, module in named if name and match_target(name, targets)]
        missing = [t for t in targets if not any(match_target(name, [t]) for name, _ in chosen)]
        if missing:
            raise ValueError(f"BitFit: target_modules {missing} match no module in {type(model).__name__} ({OPTION})")
        inside = [name for name, _ in chosen if in_saved_module(name, saved)]
        if inside:
            raise ValueError(f"BitFit: modules {inside[:5]} are both targets and in modules_to_save (trained in "
                             "full); leave them out of target_modules")
        for target in targets:
            hits = [name for name, module in chosen if match_target(name, [target]) and bias_parameters(module)]
            if not hits:
                bare = [name for name, _ in chosen if match_target(name, [target])]
                raise ValueError(
                    f"BitFit: target_modules entry {target!r} selects only modules without a bias term "
                    f"({bare[:4]}{', …' if len(bare) > 4 else ''}): they have nothing for BitFit to train. Name "
                    f"modules that own a bias, or give {ALL_BIASES!r} for every bias term of the model ({OPTION})"
                )
        return chosen
