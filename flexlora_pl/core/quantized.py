"""4-bit base weights (QLoRA): recognising bitsandbytes' quantized linear layers and merging an update into them.

A base model loaded in 4 bits (``BitsAndBytesConfig(load_in_4bit=True)``) holds ``bitsandbytes.nn.Linear4bit``
layers: an ``nn.Linear`` subclass whose weight is packed ``uint8`` with its quantization statistics beside it.
Adapters wrap them as they wrap any ``nn.Linear`` (the base's forward dequantizes on the fly), but an update can
never be added into such a weight in place: re-quantizing ``W + ΔW`` would round most of a small ΔW away. A
merged model of a 4-bit base is therefore the dequantized base with the update added in float32, saved in a
float dtype (:func:`merge_into_dequantized`).

``bitsandbytes`` is imported only when a quantized layer is met; nothing here needs it otherwise.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Mapping

import torch
from torch import nn

__all__ = ["QUANTIZATIONS", "dequantized_weight", "is_quantized_linear", "merge_into_dequantized", "quantized_linears"]

QUANTIZATIONS = ("nf4", "fp4")
"""The 4-bit data types a base can be loaded in: NormalFloat4 (QLoRA's) and plain 4-bit float."""


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit linear layer (``bitsandbytes.nn.Linear4bit`` or a subclass)."""
    bnb = sys.modules.get("bitsandbytes")  # not imported: no module can be one of its layers
    return bnb is not None and isinstance(module, bnb.nn.Linear4bit)


def quantized_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(dotted name, layer)`` of every 4-bit linear layer of ``model``, in model order."""
    for name, module in model.named_modules():
        if is_quantized_linear(module):
            yield name, module


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The float32 weight, ``(out_features, in_features)``, that a 4-bit layer's packed weight stands for."""
    import bitsandbytes as bnb

    # On a CPU with AVX512-BF16, an evaluation forward repacks the weight in a CPU layout; bitsandbytes' own save
    # path packs it back into the standard layout that dequantize_4bit reads (a no-op otherwise).
    layer.state_dict()
    weight = layer.weight
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state).float()


@torch.no_grad()
def merge_into_dequantized(model: nn.Module, deltas: Mapping[str, torch.Tensor],
                           dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace, in place, every 4-bit linear layer of ``model`` by an ``nn.Linear`` holding its dequantized weight
    plus ``deltas[name]`` (added in float32), and cast the whole model to ``dtype``.

    A transformers model also loses its quantization config (``config.json`` then describes a plain model that
    ``from_pretrained`` loads without bitsandbytes).

    Args:
        model: a model without adapter layers (the adapters' updates are in ``deltas``).
        deltas: the update ΔW of each adapted layer, ``(out_features, in_features)``, by its dotted name in
            ``model``; every name must be a 4-bit layer.
        dtype: the dtype the merged model is saved in (bfloat16: the compute dtype of the 4-bit layers).

    Returns:
        ``model``.

    Raises:
        ValueError: a delta names no 4-bit layer of ``model``, or its shape is not the layer's.
    """
    layers = dict(quantized_linears(model))
    stray = [name for name in deltas if name not in layers]
    if stray:
        raise ValueError(f"updates for {stray[:3]} name no 4-bit linear layer of {type(model).__name__}; the "
                         f"4-bit layers are e.g. {list(layers)[:3]}")
    for name, layer in layers.items():
        weight = dequantized_weight(layer)
        if name in deltas:
            delta = deltas[name].to(device=weight.device, dtype=torch.float32)
            if delta.shape != weight.shape:
                raise ValueError(f"the update of {name!r} is {tuple(delta.shape)}, its weight "
                                 f"{tuple(weight.shape)}")
            weight = weight + delta
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                          device=weight.device, dtype=dtype)
        plain.weight.copy_(weight.to(dtype))
        if layer.bias is not None:
            plain.bias.copy_(layer.bias.detach().to(dtype))
        plain.requires_grad_(False)
        model.set_submodule(name, plain)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:  # transformers: drop quantization_config, is_quantized and the quantizer
        quantizer.remove_quantization_config(model)
    model.to(dtype)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "dtype"):
        config.dtype = dtype
    return model
