"""LoRA (Hu et al., ICLR 2022, https://arxiv.org/abs/2106.09685): a fixed-rank update trained beside a frozen weight.

Every adapted linear layer ``W`` (d_out × d_in) gets

    ΔW = (α / r) · B A        A: r × d_in (Kaiming-uniform),  B: d_out × r (zeros, so ΔW = 0 at start)

and computes ``y = W x + b + (α / r) · B (A drop(x))``. Ranks never move: there is no allocation event
and no regulariser. The paper's baseline (docs/baselines.md) is peft's ``LoraConfig(r, lora_alpha, lora_dropout,
target_modules)`` with the classifier head trained in full, so the layers here are peft's own.

How peft is plugged in (shared with :class:`~flexlora_pl.methods.AdaLoRA`, see :class:`PeftAdapterMethod`):
peft's tuner injects its layers **in place** (what ``peft.inject_adapter_in_model`` does), so the
backbone stays the model it was: the task calls it as before, it returns what it returned before, and
every state-dict name keeps its path (``bert.encoder.layer.0.attention.self.query.lora_A.default.weight``
next to ``...query.base_layer.weight``; the head keeps ``classifier.weight``). Rank patterns, TensorBoard
tags and checkpoints therefore name the same modules under every method, and no peft forward wrapper
can add anything to the loss. The head is trained in place (``requires_grad``) rather than through
peft's ``modules_to_save`` copies; the peft form of the model (:meth:`PeftAdapterMethod.peft_adapter_state`,
what :func:`flexlora_pl.export.export_peft_adapter` writes) holds it as ``modules_to_save``.
"""

from __future__ import annotations

import copy
import math
import os
import re
import sys
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from flexlora_pl.core.inject import match_target
from flexlora_pl.core.layer import FlexLoRALinear
from flexlora_pl.core.quantized import is_quantized_linear, merge_into_dequantized
from flexlora_pl.methods.base import AdaptationMethod, register_method
from flexlora_pl.methods.loraplus import check_loraplus_ratio, loraplus_groups
from flexlora_pl.methods.rank_pattern import OPTION, load_rank_pattern

__all__ = ["LoRA", "PeftAdapterMethod", "drop_peft_tuner", "pattern_key_clash", "peft_tuner", "peft_tuner_layers"]

#: peft's name for the one adapter a method injects
ADAPTER_NAME = "default"
#: where the tuner that injected the adapters is kept on the adapted model (a plain attribute, not a submodule)
_TUNER_ATTRIBUTE = "_flexlora_peft_tuner"


def peft_tuner_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Yield ``(dotted name, layer)`` for every peft tuner layer of ``model``, in model order."""
    tuners_utils = sys.modules.get("peft.tuners.tuners_utils")
    if tuners_utils is None:  # peft never imported: no layer of it can exist (and importing it takes seconds)
        return
    for name, module in model.named_modules():
        if isinstance(module, tuners_utils.BaseTunerLayer):
            yield name, module


def peft_tuner(model: nn.Module) -> Any:
    """The peft tuner (``LoraModel``, ``AdaLoraModel``) that injected the adapters of ``model``, or ``None``.

    It is kept as a plain attribute of the adapted model so that it travels with it (``deepcopy``, pickling)
    without being a submodule: the tuner's own ``model`` is the adapted model, so registering it would
    make the module tree a cycle.
    """
    return model.__dict__.get(_TUNER_ATTRIBUTE)


def drop_peft_tuner(model: nn.Module) -> None:
    """Forget the tuner kept on ``model`` (once its peft layers are unloaded)."""
    model.__dict__.pop(_TUNER_ATTRIBUTE, None)


class PeftAdapterMethod(AdaptationMethod):
    """Base of the methods whose layers are peft's: targets, freezing, seeding and in-place injection.

    A subclass implements :meth:`peft_config`, :meth:`tuner_class`, :meth:`is_own_layer`,
    :meth:`layer_parameters`, :meth:`layer_rank`, :meth:`layer_capacity` and :meth:`capacity`, and sets
    :attr:`peft_type` and :attr:`peft_fields`. peft is imported only when a model is adapted (importing it
    takes seconds).
    """

    #: parameters per direction besides the ``d_in + d_out`` of a factor pair (AdaLoRA's singular value: 1)
    extra_per_direction: ClassVar[int] = 0
    #: peft's name of the method (``peft_type`` of its config): how :meth:`recognize` tells the methods apart
    peft_type: ClassVar[str] = ""
    #: constructor argument -> the field of the peft config that holds it (rebuilds the method from a model)
    peft_fields: ClassVar[dict[str, str]] = {}
    #: peft config field -> the value that marks this method's models: LoRA and its variants share the peft type
    #: ``LORA`` and differ in ``use_dora``, ``use_rslora`` and ``init_lora_weights`` (what :meth:`recognize` reads)
    peft_variant: ClassVar[dict[str, Any]] = {}

    # ---------------------------------------------------------------- to implement
    def tuner_class(self) -> type:
        """The peft tuner (``LoraModel``, ``AdaLoraModel``) that injects this method's layers."""
        raise NotImplementedError

    def is_own_layer(self, layer: nn.Module) -> bool:
        """Whether a peft tuner ``layer`` is one of this method's."""
        raise NotImplementedError

    def peft_config(self, target_modules: list[str] | str) -> Any:
        """The peft config to inject with, for ``target_modules`` in peft's form (a list, or a regex)."""
        raise NotImplementedError

    def layer_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        """The trained adapter parameters of one injected peft ``layer``."""
        raise NotImplementedError

    def layer_b_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        """The ``B`` factors (d_out × r) among :meth:`layer_parameters`: what LoRA+ trains at its higher rate."""
        return [layer.lora_B[ADAPTER_NAME].weight]

    def layer_rank(self, layer: nn.Module) -> int:
        """The active rank of one injected peft ``layer``."""
        raise NotImplementedError

    def layer_capacity(self, layer: nn.Module) -> int:
        """The rank capacity of one injected peft ``layer``."""
        raise NotImplementedError

    def capacity(self) -> int:
        """The rank every adapted layer is built with (checked against the layers' widths)."""
        raise NotImplementedError

    def module_ranks(self, targets: Sequence[str]) -> dict[str, int]:
        """The rank each of the ``targets`` (exact names) is built with; 0 leaves a layer unadapted.
        Default: :meth:`capacity` everywhere."""
        return dict.fromkeys(targets, self.capacity())

    def apply_module_ranks(self, config: Any, ranks: dict[str, int]) -> None:
        """Put the per-layer ``ranks`` (every adapted layer's, by exact name) into the peft ``config`` in place.
        Default: nothing (the config's one rank is every layer's)."""

    def after_injection(self, model: nn.Module, tuner: Any) -> None:
        """Called once after injection (AdaLoRA adds its rank masks here)."""

    def peft_export_form(self, model: nn.Module, config: Any,
                         tensors: dict[str, torch.Tensor]) -> tuple[Any, dict[str, torch.Tensor]]:
        """The peft config and adapter tensors (by parameter name in ``model``) of a peft export of ``model``.

        Default: the run's config and trained tensors as they are. PiSSA and MiLoRA turn theirs into a plain LoRA
        adapter on the original base (:mod:`flexlora_pl.methods.svd_init`).

        Args:
            model: the adapted backbone (left untouched).
            config: a copy of the run's peft config (may be changed in place).
            tensors: the trained adapter parameters (``.lora_`` in the name), by name in ``model``.
        """
        return config, tensors

    # ---------------------------------------------------------------- adapt
    def adapt(self, backbone: nn.Module, modules_to_save: Sequence[str], seed: int | None) -> nn.Module:
        """Inject peft layers into ``backbone`` in place; freeze all but them and ``modules_to_save``.

        Args:
            backbone: the model to adapt; it is modified in place and returned.
            modules_to_save: modules trained in full (the task head), same matching as ``target_modules``.
            seed: seed of the adapters' initial draws (``None``: the global RNG). The global RNG state is
                left as it was.

        Raises:
            ValueError: no targets, a target or ``modules_to_save`` entry that matches nothing, a target
                that is not an ``nn.Linear``, a module both adapted and saved, a rank wider than a layer,
                or a backbone that already holds adapters.
        """
        if not self.target_modules:
            raise ValueError(f"{type(self).__name__} needs target_modules: name the linear layers to adapt")
        if any(isinstance(m, FlexLoRALinear) for m in backbone.modules()) or next(peft_tuner_layers(backbone), None):
            raise ValueError(f"{type(self).__name__}: the backbone already holds adapters; adapt a fresh model")
        chosen, saved = resolve_targets(backbone, self.target_modules, modules_to_save)
        ranks = {name: rank for name, rank in self.module_ranks(chosen).items() if rank > 0}  # peft has no rank 0
        chosen = list(ranks)
        named = dict(backbone.named_modules())
        narrow = [n for n in chosen if ranks[n] > min(named[n].in_features, named[n].out_features)]
        if narrow:
            narrowest = min(min(named[n].in_features, named[n].out_features) for n in chosen)
            raise ValueError(
                f"{type(self).__name__}: rank {ranks[narrow[0]]} exceeds min(in_features, out_features) of "
                f"{narrow[0]!r} ({len(narrow)} layers in all); a rank above a layer's width adds nothing. "
                f"Use a rank of at most {narrowest}, or leave those layers out of target_modules"
            )
        config = self.peft_config(peft_target_modules(backbone, chosen))
        self.apply_module_ranks(config, ranks)
        if seed is None:
            tuner = self.tuner_class()(backbone, config, ADAPTER_NAME)
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                tuner = self.tuner_class()(backbone, config, ADAPTER_NAME)
        # peft freezes the base itself; freeze again so that nothing it leaves trainable (a ranknum built on
        # the meta device is) reaches the optimizer, and train the adapters and the saved modules only
        backbone.requires_grad_(False)
        for p in self.adapter_parameters(backbone):
            p.requires_grad_(True)
        for name in saved:
            backbone.get_submodule(name).requires_grad_(True)
        backbone.__dict__[_TUNER_ATTRIBUTE] = tuner
        self.after_injection(backbone, tuner)
        return backbone

    # ---------------------------------------------------------------- report
    def layers(self, model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
        """``(name, layer)`` for every peft layer of this method in ``model``, in model order."""
        for name, layer in peft_tuner_layers(model):
            if self.is_own_layer(layer) and ADAPTER_NAME in getattr(layer, "lora_A", {}):
                yield name, layer

    def adapter_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for _, layer in self.layers(model) for p in self.layer_parameters(layer)]

    def optimizer_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """One ``adapter`` group, or with ``loraplus_ratio`` set the two groups of LoRA+ (:mod:`.loraplus`)."""
        b_factors = [p for _, layer in self.layers(model) for p in self.layer_b_parameters(layer)]
        return loraplus_groups(self.adapter_parameters(model), b_factors, getattr(self, "loraplus_ratio", None))

    def rank_pattern(self, model: nn.Module) -> dict[str, int]:
        return {name: self.layer_rank(layer) for name, layer in self.layers(model)}

    def max_ranks(self, model: nn.Module) -> dict[str, int]:
        return {name: self.layer_capacity(layer) for name, layer in self.layers(model)}

    def matrix_shapes(self, model: nn.Module) -> dict[str, int]:
        return {name: layer.in_features + layer.out_features + self.extra_per_direction
                for name, layer in self.layers(model)}

    # ---------------------------------------------------------------- export
    @classmethod
    def recognize(cls, model: nn.Module) -> PeftAdapterMethod | None:
        tuner = peft_tuner(model)
        config = tuner.peft_config.get(ADAPTER_NAME) if tuner is not None else None
        if config is None or config.peft_type != cls.peft_type:
            return None
        if any(getattr(config, field, None) != value for field, value in cls.peft_variant.items()):
            return None  # another variant of the same peft type (DoRA, rsLoRA, PiSSA, MiLoRA under LORA)
        return cls(**{arg: getattr(config, field) for arg, field in cls.peft_fields.items()})

    def adapter_checkpoint_layers(self, model: nn.Module) -> dict[str, FlexLoRALinear]:
        raise self.export_refusal("a FlexLoRA adapter checkpoint", "its layers are peft's, not FlexLoRA layers; "
                                  "the peft adapter (--format peft, export_peft_adapter) holds what it trained")

    def layer_has_update(self, layer: nn.Module) -> bool:
        """Whether a peft export keeps ``layer`` (default: always; AdaLoRA leaves out a matrix pruned to rank 0)."""
        return True

    def finish_export_config(self, model: nn.Module, config: Any) -> None:
        """Complete the config of a peft export of ``model`` in place (AdaLoRA: its rank pattern and γ)."""

    def layer_delta_weight(self, layer: nn.Module) -> torch.Tensor:
        """The update ΔW, ``(out_features, in_features)``, of one injected peft ``layer`` (peft's own formula)."""
        return layer.get_delta_weight(ADAPTER_NAME)

    def merge(self, model: nn.Module) -> nn.Module:
        """peft's ``merge_and_unload`` (with its NaN check) on a copy of ``model``.

        On a 4-bit base (QLoRA) peft would merge into the packed weight and quantize ``W + ΔW`` again, rounding most
        of the update away: the copy is unloaded instead, and every 4-bit layer becomes its dequantized weight with
        the layer's ΔW added in float32, in bfloat16 (:func:`~flexlora_pl.core.quantized.merge_into_dequantized`).
        """
        if not any(is_quantized_linear(layer.get_base_layer()) for _, layer in self.layers(model)):
            return self.unloaded_copy(model, merge=True)
        deltas = {}
        for name, layer in self.layers(model):
            delta = self.layer_delta_weight(layer).detach().float()
            if not bool(torch.isfinite(delta).all()):
                raise ValueError(f"the update of {name!r} is not finite: the model cannot be merged")
            deltas[name] = delta
        return merge_into_dequantized(self.unloaded_copy(model, merge=False), deltas)

    def peft_adapter_state(self, model: nn.Module, saved_modules: Sequence[str]) -> tuple[Any, dict[str, torch.Tensor]]:
        """What ``PeftModel.save_pretrained`` would write for a ``PeftModel`` equal to ``model``.

        The layers were injected in place (no ``PeftModel`` wrapper, the head trained in place), so a copy of
        ``model`` is unloaded to the plain model (trained head included), wrapped by ``peft.get_peft_model``
        with the run's config plus ``modules_to_save``, given the trained adapter tensors (same module paths),
        and read back by peft's ``get_peft_model_state_dict``. The caller's model is left untouched.

        Raises:
            ValueError: no layer has an update, or the copy's adapter tensors do not match the model's.
        """
        import peft

        config = copy.deepcopy(_own_tuner(model).peft_config[ADAPTER_NAME])
        trained = {name: p for name, p in model.named_parameters() if ".lora_" in name or ".ranknum." in name}
        config, trained = self.peft_export_form(model, config, trained)
        plain = self.unloaded_copy(model, merge=False)
        layers = dict(self.layers(model))
        kept = [name for name, layer in layers.items() if self.layer_has_update(layer)]
        if not kept:
            raise ValueError(f"no {type(self).__name__} layer has a non-zero update (every direction is pruned): the "
                             "model equals its base model; use export_merged or keep the checkpoint instead")
        if len(kept) < len(layers):  # a matrix without update is left out, as FlexLoRA's export does
            config.target_modules = peft_target_modules(plain, kept)
        config.modules_to_save = list(saved_modules) or None
        config.inference_mode = True
        config.task_type = None  # a generic PeftModel: a task class would add modules_to_save of its own
        with torch.random.fork_rng(devices=[]):  # the fresh adapter's draws are overwritten: leave the RNG alone
            peft_model = peft.get_peft_model(plain, config, adapter_name=ADAPTER_NAME)
        with torch.no_grad():
            for name, param in peft_model.get_base_model().named_parameters():
                if ".lora_" in name or ".ranknum." in name:
                    if name not in trained:
                        raise ValueError(f"the adapter tensor {name!r} of the export has no counterpart in the model")
                    param.copy_(trained[name])
        saved_config = peft_model.peft_config[ADAPTER_NAME]
        self.finish_export_config(peft_model.get_base_model(), saved_config)
        tensors = peft.get_peft_model_state_dict(peft_model, adapter_name=ADAPTER_NAME, save_embedding_layers=False)
        return saved_config, {key: t.detach().cpu().contiguous().clone() for key, t in tensors.items()}

    def unloaded_copy(self, model: nn.Module, merge: bool) -> nn.Module:
        """A copy of ``model`` without its peft layers (``merge``: with their updates merged into the weights)."""
        duplicate = copy.deepcopy(model)  # the tuner is copied with it and points at the copy
        tuner = _own_tuner(duplicate)
        plain = tuner.merge_and_unload(safe_merge=True) if merge else tuner.unload()
        drop_peft_tuner(plain)
        plain.__dict__.pop("peft_config", None)  # peft removes it; a leftover would make transformers see an adapter
        return plain


@register_method
class LoRA(PeftAdapterMethod):
    """LoRA through peft's ``LoraConfig``: rank ``r`` in every adapted layer, or the ranks of a rank pattern; fixed.

    With ``rank_pattern`` every adapted layer gets, from the start, the rank a FlexLoRA run ended with in it
    (read from its ``rank_pattern.json``): the arm "LoRA with FlexLoRA's final allocation", which isolates the
    allocation from the moving of ranks (``configs/methods/lora_fixed_pattern.yaml``, docs/baselines.md).

    - **Ranks.** A module of the pattern gets exactly its rank. Every target module must be in the pattern and
      every entry must be a target: a target the pattern lacks is refused rather than given rank ``r``, so the
      run's total rank is always the pattern's (a run with other ``target_modules`` than the pattern's is a
      mistake, not a smaller pattern).
    - **Scale.** Every layer is scaled by α / r, whatever its rank (peft's ``alpha_pattern`` with α_m = α · r_m / r,
      so that α_m / r_m = α / r). FlexLoRA scales every layer by α / r_init however its rank moved, and uniform
      LoRA by α / r: with ``r`` set to FlexLoRA's ``init_rank``, the arm differs from both in the allocation
      alone. peft's default α / r_m would also give low-rank layers a larger update per step and high-rank ones
      a smaller one. It is the peft form of FlexLoRA's own final adapter (its export uses the same α_m). With
      ``rslora`` every layer is scaled by α / √r in the same way (α_m = α · √(r_m / r)).
    - **Rank 0.** A module the pattern gives rank 0 stays unadapted (peft has no rank-0 adapter; its update is
      zero anyway): it is absent from the run's own ranks and parameter counts, and the total is unchanged.

    Args:
        target_modules: linear layers to adapt: dotted-name suffixes (``query``) or ``re:<regex>``, matched
            as for FlexLoRA (``None``: the task's defaults). With ``rank_pattern``: those of the pattern's run.
        r: the rank of every adapted layer (paper: 8 on GLUE and commonsense, 14 on VTAB). With
            ``rank_pattern``: only the scale α / r; set it to the ``init_rank`` of the pattern's FlexLoRA run.
        alpha: LoRA α; the update is scaled by α / r.
        dropout: dropout on the adapter inputs.
        rank_pattern: a fixed rank per module: the path of a ``rank_pattern.json`` (written by ``RankHeatmap``
            at the end of a fit), of a run folder holding one, or a mapping module name -> rank; names as in the
            file (``backbone.<path>``) or relative to the backbone. ``None``: rank ``r`` everywhere. The value
            ``required`` (what ``configs/methods/lora_fixed_pattern.yaml`` sets) is refused, asking for a path.
        loraplus_ratio: LoRA+ (:mod:`flexlora_pl.methods.loraplus`): train every ``B`` factor at this multiple of
            the learning rate of ``A`` (its authors suggest 16); ``None``: one learning rate for both.
        rslora: rank-stabilised LoRA (Kalajdzievski 2023, :class:`~flexlora_pl.methods.RSLoRA`): scale the update by
            α / √r instead of α / r (peft's ``use_rslora``).
    """

    name = "lora"
    quantized_base = True
    extra_per_direction = 0
    peft_type = "LORA"
    peft_fields: ClassVar[dict[str, str]] = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout",
                                             "rslora": "use_rslora"}
    peft_variant: ClassVar[dict[str, Any]] = {"use_dora": False, "use_rslora": False, "init_lora_weights": True}

    def __init__(self, target_modules: Sequence[str] | None = None, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, rank_pattern: str | dict[str, int] | None = None,
                 loraplus_ratio: float | None = None, rslora: bool = False) -> None:
        super().__init__(target_modules, alpha, dropout, orth_reg_weight=0.0)
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{type(self).__name__}: r must be an integer >= 1, got {r!r}")
        if not isinstance(rslora, bool):
            raise ValueError(f"{type(self).__name__}: rslora must be true or false, got {rslora!r}")
        self.r, self.rslora = r, rslora
        self.loraplus_ratio = check_loraplus_ratio(loraplus_ratio, type(self).__name__)
        # the argument as given (what the config and checkpoints record; the name `rank_pattern` is a method's)
        self.pattern_source = dict(rank_pattern) if isinstance(rank_pattern, Mapping) else (
            os.fspath(rank_pattern) if rank_pattern is not None else None)
        self.fixed_pattern = load_rank_pattern(rank_pattern) if rank_pattern is not None else None

    def tuner_class(self) -> type:
        from peft.tuners.lora import LoraModel

        return LoraModel

    def is_own_layer(self, layer: nn.Module) -> bool:
        from peft.tuners.adalora import AdaLoraLayer
        from peft.tuners.lora import LoraLayer

        return isinstance(layer, LoraLayer) and not isinstance(layer, AdaLoraLayer)  # AdaLoRA's subclass LoRA's

    def peft_config(self, target_modules: list[str] | str) -> Any:
        from peft import LoraConfig

        # the variant's own fields (DoRA's use_dora, ...); use_rslora is the switch's, whatever the variant
        variant = {key: value for key, value in self.peft_variant.items() if key != "use_rslora"}
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=target_modules,
                          bias="none", use_rslora=self.rslora, **variant)

    @property
    def scale(self) -> float:
        """The scale of every layer's update: α / r, or α / √r with ``rslora`` (also under a rank pattern)."""
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def pattern_alpha(self, rank: int) -> float:
        """α_m of a layer of rank ``rank`` under a rank pattern, so that its scale is :attr:`scale`."""
        return self.alpha * (math.sqrt(rank / self.r) if self.rslora else rank / self.r)

    def module_ranks(self, targets: Sequence[str]) -> dict[str, int]:
        if self.fixed_pattern is None:
            return super().module_ranks(targets)
        ranks = self.fixed_pattern.assign(targets)
        if sum(ranks.values()) != self.r * len(ranks):  # FlexLoRA's budget keeps r_init per matrix on average
            warnings.warn(
                f"LoRA: the rank pattern of {self.fixed_pattern.source} has a mean rank of "
                f"{sum(ranks.values()) / len(ranks):.2f}, not r = {self.r}; every layer is scaled by "
                f"alpha / {'sqrt(r)' if self.rslora else 'r'} = {self.scale:g}. If the FlexLoRA run that wrote it had "
                "another init_rank, set r to it (--model.init_args.method.init_args.r), so that both arms scale alike",
                stacklevel=2,
            )
        return ranks

    def apply_module_ranks(self, config: Any, ranks: dict[str, int]) -> None:
        if self.fixed_pattern is None:
            return
        alphas = {name: self.pattern_alpha(rank) for name, rank in ranks.items()}  # every layer's scale: self.scale
        clash = pattern_key_clash(ranks, alphas)
        if clash:
            raise ValueError(f"{OPTION}: peft would give {clash[1]!r} the rank of {clash[0]!r} as well (one path is a "
                             "dotted suffix of the other); give both the same rank, or adapt only one of them")
        config.rank_pattern, config.alpha_pattern = dict(ranks), alphas

    def after_injection(self, model: nn.Module, tuner: Any) -> None:
        if self.fixed_pattern is None:
            return
        wanted = tuner.peft_config[ADAPTER_NAME].rank_pattern
        built = {name: (int(layer.r[ADAPTER_NAME]), float(layer.scaling[ADAPTER_NAME]))
                 for name, layer in self.layers(model)}
        wrong = [name for name in wanted if built.get(name, (None, None))[0] != wanted[name]
                 or not math.isclose(built[name][1], self.scale)]
        if wrong or len(built) != len(wanted):
            raise RuntimeError(f"peft built {wrong[:3] or sorted(set(built) - set(wanted))[:3]} with other ranks or "
                               f"scales than the pattern of {self.fixed_pattern.source} gives them")

    def facts(self) -> dict[str, Any]:
        return {**super().facts(), **(self.fixed_pattern.facts() if self.fixed_pattern is not None else {})}

    def as_config(self) -> dict[str, Any]:
        config = super().as_config()
        config["init_args"]["rank_pattern"] = self.pattern_source
        return config

    def layer_parameters(self, layer: nn.Module) -> list[nn.Parameter]:
        return [layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight]

    def layer_rank(self, layer: nn.Module) -> int:
        return int(layer.r[ADAPTER_NAME])

    def layer_capacity(self, layer: nn.Module) -> int:
        return int(layer.r[ADAPTER_NAME])

    def capacity(self) -> int:
        return self.r


def _own_tuner(model: nn.Module) -> Any:
    tuner = peft_tuner(model)
    if tuner is None:
        raise ValueError(
            f"{type(model).__name__} holds peft layers but not the tuner that injected them; only models adapted by "
            "flexlora_pl.methods (LoRA, AdaLoRA) are exported here: save a peft.PeftModel with its own save_pretrained"
        )
    return tuner


# ---------------------------------------------------------------------- targets
def resolve_targets(model: nn.Module, target_modules: Sequence[str],
                    modules_to_save: Sequence[str]) -> tuple[list[str], list[str]]:
    """The exact names of the linear layers to adapt and of the modules to train in full.

    Matching is FlexLoRA's (:func:`~flexlora_pl.core.inject.match_target`: dotted-name suffixes or
    ``re:<regex>``), so a config selects the same layers under every method.

    Args:
        model: the backbone, before injection.
        target_modules: the method's targets.
        modules_to_save: the task's modules trained in full.

    Raises:
        ValueError: a pattern that is not a valid regex or matches nothing, a target naming a container
            or a non-linear module, or a module both adapted and saved.
    """
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    saves = [modules_to_save] if isinstance(modules_to_save, str) else list(modules_to_save or [])
    for pattern in targets + saves:
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise ValueError(f"target {pattern!r} is not a valid regular expression: {err}") from err
    named = dict(model.named_modules())
    linear = [n for n, m in named.items() if isinstance(m, nn.Linear)]
    chosen = [n for n in linear if match_target(n, targets)]
    matched = {match_target(n, targets) for n in chosen}
    for name, module in named.items():
        if name and not isinstance(module, nn.Linear) and match_target(name, targets) \
                and not any(c.startswith(name + ".") for c in chosen):
            raise ValueError(f"target_modules entry matches {name!r}, a {type(module).__name__}, not an nn.Linear; "
                             f"name its linear sub-layers instead, e.g. {_examples(linear, name)}")
    missing = [t for t in targets if t not in matched]
    if missing:
        raise ValueError(f"target_modules {missing} match no nn.Linear in {type(model).__name__}. "
                         f"Linear layers look like: {_examples(linear)}")
    saved: list[str] = []
    for pattern in saves:
        hits = [n for n in named if n and match_target(n, [pattern])]
        if not hits:
            raise ValueError(f"modules_to_save entry {pattern!r} matches no module in {type(model).__name__}; "
                             f"top-level modules are: {[n for n, _ in model.named_children()]}")
        saved.extend(h for h in hits if h not in saved)
    overlap = [n for n in chosen if any(n == s or n.startswith(s + ".") for s in saved)]
    if overlap:
        raise ValueError(f"modules {overlap[:5]} are both adapted and in modules_to_save; choose one")
    return chosen, saved


def peft_target_modules(model: nn.Module, chosen: Sequence[str]) -> list[str] | str:
    """``chosen`` as peft's ``target_modules``: the exact list, or an anchored regex where the list would
    select more (peft also adapts every module whose name ends with ``"." + entry``)."""
    chosen_set = set(chosen)
    others = [n for n, _ in model.named_modules() if n and n not in chosen_set]
    if any(other.endswith("." + name) for other in others for name in chosen):
        return "(?:" + "|".join(re.escape(n) for n in chosen) + ")"
    return list(chosen)


def pattern_key_clash(ranks: dict[str, int], alphas: dict[str, float]) -> tuple[str, str] | None:
    """``(key, name)`` when peft could build module ``name`` with the rank and α of another entry ``key``.

    peft matches a ``rank_pattern`` / ``alpha_pattern`` key ``k`` against a module name with the regex
    ``(.*\\.)?(k)$`` and takes the first key that matches (the key is a regex: its dots match any character);
    older releases used ``.*\\.k$`` with an exact-name fallback. peft writes the patterns sorted by key, so no
    order can be relied on: when another key also matches a module's path (one path is a dotted suffix of
    the other), the module may get that key's entry, which is harmless only if rank and α are the same.
    ``None`` when no module can be built otherwise than its own entry says.
    """
    for name in ranks:
        for key in ranks:
            clash = key != name and re.match(rf"(.*\.)?({key})$", name)
            if clash and (ranks[key], alphas[key]) != (ranks[name], alphas[name]):
                return key, name
    return None


def _examples(names: Sequence[str], near: str | None = None, k: int = 6) -> list[str]:
    pool = [n for n in names if near and n.startswith(near + ".")] or list(names)
    seen: dict[str, str] = {}
    for n in pool:
        seen.setdefault(re.sub(r"\.\d+\.", ".N.", n), n)
    return list(seen.values())[:k]
