"""DyLoRA (Valipour, Rezagholizadeh, Kobyzev and Ghodsi, 2022, https://arxiv.org/abs/2210.07558): LoRA at every rank.

Every adapted linear layer becomes a :class:`~flexlora_pl.core.dylora_layer.DyLoRALinear` holding LoRA's factors
``A`` (r × d_in) and ``B`` (d_out × r, zeros). Before every training batch one rank ``b`` is drawn for all layers,
uniformly from 1..r (the paper's distribution p_B), and the batch trains the adapter truncated to ``b``::

    ΔW_b = (α / b) · B[:, :b] A[:b]

(the paper's Section 3: the truncated pair is scaled by α over the sampled rank b). Which directions learn is the
``update`` rule of the paper's Section 3: ``frozen``, the paper's rule and the default, updates only the ``b``-th
row of ``A`` and ``b``-th column of ``B`` (directions ``1..b-1`` are used but held fixed); ``all`` updates
directions ``1..b`` (the paper's non-frozen variant). Ranks are sampled, never reallocated: the method has no
allocation driver and no regulariser.

Randomness and resume. ``b`` is drawn in :meth:`DyLoRA.before_training_batch` from a generator seeded by the
adapters' seed and the number of batches drawn so far, not from the global RNG: every DDP process draws the same b
(their dropout masks differ), and a run resumed from a checkpoint draws the ranks the uninterrupted run drew. Every
layer counts the training batches it ran at each rank in a persistent
buffer (``lora_rank_counts``), so the counts survive resume; ``metrics.json`` records them under
``run.method_facts.sampled_ranks``.

Evaluation and exports. Validation, test and prediction run at ``eval_rank`` (default r; in eval mode the layers
compute at it, and :meth:`DyLoRA.on_evaluation` sets it); so do the reports (``rank_pattern`` is ``eval_rank`` in
every layer, the ``active`` parameter count ``eval_rank · (d_in + d_out)`` per layer, ``allocated`` ``r · (d_in +
d_out)``) and the exports: the merged model holds ``W + ΔW_k`` at ``k = eval_rank``, and the peft adapter is a
plain LoRA adapter of rank ``k`` whose ``lora_alpha`` is α, so that peft's scale ``lora_alpha / k`` is DyLoRA's.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from flexlora_pl.core.checks import require_int
from flexlora_pl.core.dylora_layer import UPDATE_RULES, DyLoRALinear, dylora_layers
from flexlora_pl.core.layer import FlexLoRALinear
from flexlora_pl.methods.base import AdaptationMethod, module_tensors, register_method
from flexlora_pl.methods.lora import peft_tuner_layers, resolve_targets
from flexlora_pl.methods.loraplus import check_loraplus_ratio, loraplus_groups

__all__ = ["DyLoRA"]

#: where the method's options sit in a config, for messages
OPTION = "model.init_args.method.init_args"
_PEFT_PREFIX = "base_model.model."  # where peft's LoRA model keeps the wrapped model in its state dict


@register_method
class DyLoRA(AdaptationMethod):
    """DyLoRA: LoRA factors of rank ``r`` trained at a rank sampled uniformly from 1..r per batch, evaluated at
    ``eval_rank``; the update at rank ``b`` is scaled by α / b.

    Args:
        target_modules: linear layers to adapt: dotted-name suffixes (``query``) or ``re:<regex>``, matched as for
            the other methods (``None``: the task's defaults).
        r: the largest rank, the directions allocated per layer (the paper's Table 1 row: 8).
        alpha: LoRA α; the update at rank ``b`` is scaled by α / b.
        dropout: dropout on the adapter inputs.
        eval_rank: the rank that validation, test, prediction, the reports and the exports use, 1..r
            (``None``: ``r``).
        update: which directions of the truncated adapter learn from a batch: ``frozen`` (the paper's rule: only
            the ``b``-th row of ``A`` and column of ``B``) or ``all`` (directions ``1..b``).
        loraplus_ratio: LoRA+ (:mod:`flexlora_pl.methods.loraplus`): train every ``B`` column at this multiple of
            the learning rate of ``A``; ``None``: one learning rate for both.
    """

    name = "dylora"
    evaluation_options = ("eval_rank",)

    def __init__(self, target_modules: Sequence[str] | None = None, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, eval_rank: int | None = None, update: str = "frozen",
                 loraplus_ratio: float | None = None) -> None:
        super().__init__(target_modules, alpha, dropout, orth_reg_weight=0.0)
        self.r = require_int(f"{OPTION}.r", r, 1, owner="DyLoRA", hint="the largest rank; the paper uses 8")
        if eval_rank is not None:
            require_int(f"{OPTION}.eval_rank", eval_rank, 1, owner="DyLoRA",
                        hint=f"a rank in 1..r = 1..{r}, or null for r")
            if eval_rank > r:
                raise ValueError(f"DyLoRA: {OPTION}.eval_rank={eval_rank} exceeds r={r}: the adapter is trained at "
                                 f"ranks 1..{r} only. Choose eval_rank in 1..{r}, or raise r")
        self.eval_rank = eval_rank
        if update not in UPDATE_RULES:
            raise ValueError(f"DyLoRA: {OPTION}.update={update!r} is not one of {list(UPDATE_RULES)}: 'frozen' (the "
                             "paper's rule: only the sampled rank's direction learns) or 'all' (every direction up to "
                             "it learns)")
        self.update = update
        self.loraplus_ratio = check_loraplus_ratio(loraplus_ratio, "DyLoRA")
        self._counted: DyLoRALinear | None = None  # the layer whose rank counts facts() reports

    @property
    def evaluation_rank(self) -> int:
        """The rank evaluation and exports use: ``eval_rank``, or ``r`` when it is ``None``."""
        return self.eval_rank if self.eval_rank is not None else self.r

    # ------------------------------------------------------------------ adapt
    def adapt(self, backbone: nn.Module, modules_to_save: Sequence[str], seed: int | None) -> nn.Module:
        """Replace every target ``nn.Linear`` of ``backbone`` by a :class:`DyLoRALinear`, in place; freeze the rest
        but ``modules_to_save``.

        Args:
            backbone: the model to adapt; it is modified in place and returned.
            modules_to_save: modules trained in full (the task head), same matching as ``target_modules``.
            seed: seed of the initial ``A`` draws (``None``: the global RNG).

        Raises:
            ValueError: no targets, a target that matches nothing or is not an ``nn.Linear``, a module both adapted
                and saved, ``r`` above a target's ``min(in_features, out_features)``, or a backbone that already
                holds adapters.
        """
        if not self.target_modules:
            raise ValueError(f"DyLoRA needs target_modules ({OPTION}.target_modules): name the linear layers to adapt")
        if any(isinstance(m, DyLoRALinear | FlexLoRALinear) for m in backbone.modules()) \
                or next(peft_tuner_layers(backbone), None) is not None:
            raise ValueError("DyLoRA: the backbone already holds adapters; adapt a fresh model")
        chosen, saved = resolve_targets(backbone, self.target_modules, modules_to_save)
        named = dict(backbone.named_modules())
        narrow = [n for n in chosen if self.r > min(named[n].in_features, named[n].out_features)]
        if narrow:
            widest = min(min(named[n].in_features, named[n].out_features) for n in chosen)
            raise ValueError(f"DyLoRA: {OPTION}.r={self.r} exceeds min(in_features, out_features) of {narrow[0]!r} "
                             f"({len(narrow)} layers in all); use r <= {widest}, or leave those layers out of "
                             "target_modules")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        # the rank draws: a function of this seed and of the number of batches drawn so far (kept in the layers'
        # counts), so every DDP process draws the same b and a resumed run draws what the uninterrupted one did,
        # whatever else consumed random numbers (dropout masks differ per process)
        self._draw_seed = int(seed) if seed is not None else int(torch.initial_seed())
        self._drawn: int | None = None  # batches drawn so far, read from the layers' counts at the first draw
        backbone.requires_grad_(False)
        for name in chosen:
            layer = DyLoRALinear(named[name], self.r, self.alpha, self.dropout, self.evaluation_rank, self.update,
                                 generator=generator)
            parent_name, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent_name) if parent_name else backbone, child, layer)
            layer.lora_A.requires_grad_(True)
            layer.lora_B.requires_grad_(True)
        for name in saved:
            backbone.get_submodule(name).requires_grad_(True)
        self._counted = next((layer for _, layer in dylora_layers(backbone)), None)
        return backbone

    def adapter_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for _, layer in dylora_layers(model) for p in (*layer.lora_A, *layer.lora_B)]

    def optimizer_groups(self, model: nn.Module) -> list[dict[str, Any]]:
        """One ``adapter`` group, or with ``loraplus_ratio`` set LoRA+'s two (the ``B`` columns in ``adapter_B``)."""
        b_columns = [p for _, layer in dylora_layers(model) for p in layer.lora_B]
        return loraplus_groups(self.adapter_parameters(model), b_columns, self.loraplus_ratio)

    # ------------------------------------------------------------- per batch
    def before_training_batch(self, model: nn.Module) -> None:
        """Draw this batch's rank b ~ U{1, …, r} and set it in every layer.

        The draw is seeded by the adapters' seed and the number of batches drawn so far (the layers' counts, which
        checkpoints hold), not by the global RNG: every DDP process draws the same b, and a resumed run the same
        sequence as the uninterrupted one.
        """
        layers = [layer for _, layer in dylora_layers(model)]
        if not layers:
            return
        if self._drawn is None:  # once per fit: the counts restored from a checkpoint (one small device copy)
            self._drawn = int(layers[0].lora_rank_counts.sum())
        generator = torch.Generator().manual_seed(self._draw_seed * 1_000_003 + self._drawn)
        self._drawn += 1
        rank = int(torch.randint(1, self.r + 1, (1,), generator=generator).item())  # a CPU draw: no device sync
        for layer in layers:
            layer.rank = rank
            layer.lora_rank_counts[rank - 1] += 1

    def on_evaluation(self, model: nn.Module) -> None:
        """Evaluate at ``eval_rank``: every layer computes at it in eval mode."""
        for _, layer in dylora_layers(model):
            layer.eval_rank = layer.check_rank(self.evaluation_rank)

    # ---------------------------------------------------------------- report
    def rank_pattern(self, model: nn.Module) -> dict[str, int]:
        return {name: self.evaluation_rank for name, _ in dylora_layers(model)}

    def max_ranks(self, model: nn.Module) -> dict[str, int]:
        return {name: layer.r for name, layer in dylora_layers(model)}

    def matrix_shapes(self, model: nn.Module) -> dict[str, int]:
        return {name: layer.in_features + layer.out_features for name, layer in dylora_layers(model)}

    def facts(self) -> dict[str, Any]:
        """The LoRA+ ratio when set, ``eval_rank``, the update rule, and how many training batches ran at each rank
        (``sampled_ranks``: rank -> batches, once a model is adapted)."""
        facts: dict[str, Any] = {**super().facts(), "eval_rank": self.evaluation_rank, "update": self.update}
        if self._counted is not None:
            counts = self._counted.lora_rank_counts.tolist()
            facts["sampled_ranks"] = {rank: int(n) for rank, n in enumerate(counts, start=1)}
        return facts

    # ---------------------------------------------------------------- export
    @classmethod
    def recognize(cls, model: nn.Module) -> DyLoRA | None:
        layer = next((layer for _, layer in dylora_layers(model)), None)
        if layer is None:
            return None
        dropout = float(layer.dropout.p) if isinstance(layer.dropout, nn.Dropout) else 0.0
        return cls(r=layer.r, alpha=layer.alpha, dropout=dropout, eval_rank=layer.eval_rank, update=layer.update)

    def _exported_layers(self, model: nn.Module) -> dict[str, DyLoRALinear]:
        layers = dict(dylora_layers(model))
        if not layers:
            raise ValueError(f"{type(model).__name__} holds no DyLoRA layer: nothing to export")
        for layer in layers.values():
            layer.check_rank(self.evaluation_rank)
        return layers

    def merge(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with every layer's update at ``eval_rank`` merged and its ``nn.Linear`` put back."""
        self._exported_layers(model)
        plain = copy.deepcopy(model)
        with torch.no_grad():
            for name, layer in list(dylora_layers(plain)):
                weight = layer.base.weight
                weight.copy_((weight.float() + layer.delta_weight(self.evaluation_rank)).to(weight.dtype))
                if not name:
                    return layer.base
                parent_name, _, child = name.rpartition(".")
                setattr(plain.get_submodule(parent_name) if parent_name else plain, child, layer.base)
        return plain

    def peft_adapter_state(self, model: nn.Module, saved_modules: Sequence[str]) -> tuple[Any, dict[str, torch.Tensor]]:
        """A ``peft.LoraConfig`` of rank ``k = eval_rank`` and ``lora_alpha = α`` (peft's scale α / k is DyLoRA's at
        rank k), and peft's tensors: ``base_model.model.<path>.lora_{A,B}.weight`` (the leading k directions) and
        the saved modules whole."""
        from peft import LoraConfig

        layers = self._exported_layers(model)
        rank = self.evaluation_rank
        tensors: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, layer in layers.items():
                lora_a, lora_b = layer.factors(rank)  # (k, d_in), (d_out, k)
                tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = lora_a.detach().cpu().contiguous().clone()
                tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = lora_b.detach().cpu().contiguous().clone()
        tensors.update(module_tensors(model, saved_modules, prefix=_PEFT_PREFIX))
        first = next(iter(layers.values()))
        dropout = float(first.dropout.p) if isinstance(first.dropout, nn.Dropout) else 0.0
        config = LoraConfig(r=rank, lora_alpha=first.alpha, lora_dropout=dropout,
                            target_modules=_peft_targets(model, list(layers)),
                            modules_to_save=list(saved_modules) or None, bias="none", inference_mode=True)
        return config, tensors

    def adapter_checkpoint_layers(self, model: nn.Module) -> dict[str, FlexLoRALinear]:
        raise self.export_refusal("a FlexLoRA adapter checkpoint", "its layers are DyLoRA's factor pairs, not FlexLoRA "
                                  "layers (P, λ, Q and rank masks); the peft adapter (--format peft) holds the adapter "
                                  "at eval_rank and the merged model (--format merged) the trained model")


def _peft_targets(model: nn.Module, names: Sequence[str]) -> list[str] | str:
    """The exported paths as peft's ``target_modules``: the exact list, or an anchored regex where peft's suffix
    matching would select more (another module of the plain model whose name ends with ``"." + path``)."""
    wrappers, exported = list(names), set(names)
    others = [n for n, _ in model.named_modules()
              if n and n not in exported and not any(n.startswith(w + ".") for w in wrappers)]
    if any(other.endswith("." + name) for other in others for name in names):
        return "(?:" + "|".join(re.escape(n) for n in names) + ")"
    return list(names)
