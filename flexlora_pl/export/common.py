"""What the export formats share: the backbone of a module, its FlexLoRA layers, the modules trained in full."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from lightning.pytorch import LightningModule
from torch import nn

from flexlora_pl.core.inject import flexlora_layers, match_target
from flexlora_pl.core.layer import FlexLoRALinear


def _backbone(model_or_module: nn.Module) -> nn.Module:
    """The model whose module paths peft and the checkpoints use: a LightningModule's ``backbone``."""
    backbone = getattr(model_or_module, "backbone", None)
    if isinstance(model_or_module, LightningModule) and isinstance(backbone, nn.Module):
        return backbone
    return model_or_module


def _require_layers(backbone: nn.Module) -> dict[str, FlexLoRALinear]:
    layers = dict(flexlora_layers(backbone))
    if not layers:
        raise ValueError(f"{type(backbone).__name__} holds no FlexLoRA layer: nothing to export")
    return layers


def _saved_module_names(
    model_or_module: nn.Module, backbone: nn.Module, modules_to_save: Sequence[str] | None
) -> list[str]:
    """Names (relative to the backbone) of the modules trained in full, outermost only."""
    patterns = modules_to_save if modules_to_save is not None else getattr(model_or_module, "modules_to_save", None)
    if patterns is None:
        names = _trainable_owners(backbone)
    else:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        names = [n for n, _ in backbone.named_modules() if n and match_target(n, patterns)]
        unmatched = [p for p in patterns if not any(match_target(n, [p]) for n in names)]
        if unmatched:
            raise ValueError(f"modules_to_save {unmatched} match no module of {type(backbone).__name__}")
    return [n for n in names if not any(n.startswith(other + ".") for other in names)]


def _trainable_owners(backbone: nn.Module) -> list[str]:
    """For a plain model: the modules owning trainable parameters outside the FlexLoRA layers."""
    adapter = {id(p) for _, layer in flexlora_layers(backbone) for p in layer.parameters()}
    owners: list[str] = []
    for name, param in backbone.named_parameters():
        if not param.requires_grad or id(param) in adapter:
            continue
        owner = name.rpartition(".")[0]
        if not owner:
            raise ValueError(
                f"parameter {name!r} is trainable and belongs to the model root: pass modules_to_save explicitly"
            )
        if owner not in owners:
            owners.append(owner)
    return owners


def _saved_module_tensors(backbone: nn.Module, names: Sequence[str], prefix: str) -> dict[str, torch.Tensor]:
    tensors = {}
    for name in names:
        for key, value in backbone.get_submodule(name).state_dict().items():
            tensors[f"{prefix}{name}.{key}"] = value.detach().cpu().contiguous().clone()
    return tensors
