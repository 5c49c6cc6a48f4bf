"""The adapter-only checkpoint: the active part of P, λ, Q, the masks and the ``modules_to_save``
weights, plus a small JSON config; lossless and far smaller than a ``.ckpt``."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from flexlora_pl.core.inject import flexlora_layers, inject_flexlora
from flexlora_pl.core.layer import FlexLoRALinear
from flexlora_pl.export.common import adapted, atomic_output, backbone_of, check_output_dir, saved_module_names
from flexlora_pl.export.formats import ExportFormat, register_format
from flexlora_pl.methods.base import module_tensors
from flexlora_pl.methods.flexlora import dropout_probability

__all__ = ["ADAPTER_CONFIG_NAME", "ADAPTER_WEIGHTS_NAME", "load_adapter_checkpoint", "save_adapter_checkpoint"]

ADAPTER_WEIGHTS_NAME = "flexlora_adapter.safetensors"
ADAPTER_CONFIG_NAME = "flexlora_adapter.json"
ADAPTER_FORMAT = "flexlora_pl-adapter"
ADAPTER_FORMAT_VERSION = 1
_LAYER_TENSORS = ("lora_P", "lora_lambda", "lora_Q", "rank_mask")

def save_adapter_checkpoint(
    model_or_module: nn.Module,
    path: str | Path,
    modules_to_save: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Path:
    """Save only what was trained: a directory with a safetensors file and a small JSON config.

    Per FlexLoRA layer ``<name>``: ``<name>.lora_P`` (d_out, r), ``<name>.lora_lambda`` (r,),
    ``<name>.lora_Q`` (r, d_in) over the active directions and ``<name>.rank_mask`` (r_max,); plus the
    state dict of every module in ``modules_to_save``. Keys are relative to the backbone. The JSON holds
    the rank pattern and what :func:`load_adapter_checkpoint` needs to rebuild the layers
    (target modules, init / max rank, α, dropout, modules_to_save). Optimizer state is not saved: to
    resume training use the Lightning checkpoint.

    Args:
        model_or_module: a :class:`~flexlora_pl.FlexLoRAModule` or any ``nn.Module`` with FlexLoRA layers.
        path: output directory; must not exist or be empty unless ``overwrite``.
        modules_to_save: as in :func:`export_peft_adapter`.
        overwrite: replace an existing non-empty directory.

    Returns:
        The output directory.

    Raises:
        ValueError: the model holds no adapter, or its method's adapters are not FlexLoRA layers.
    """
    out = check_output_dir(path, overwrite)
    backbone, method = adapted(model_or_module)
    layers = method.adapter_checkpoint_layers(backbone)
    saved = saved_module_names(model_or_module, backbone, method, modules_to_save)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors.update(_compact_layer_tensors(name, layer))
    tensors.update(module_tensors(backbone, saved))
    config = _adapter_config(model_or_module, layers, saved)
    with atomic_output(out, overwrite) as tmp:
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return out


@torch.no_grad()
def _compact_layer_tensors(name: str, layer: FlexLoRALinear) -> dict[str, torch.Tensor]:
    active = layer.rank_mask
    parts = {
        "lora_P": layer.lora_P[:, active],  # (d_out, r)
        "lora_lambda": layer.lora_lambda[active],  # (r,)
        "lora_Q": layer.lora_Q[active],  # (r, d_in)
        "rank_mask": layer.rank_mask,  # (r_max,) bool: which slots are active
    }
    return {f"{name}.{key}": t.detach().cpu().contiguous() for key, t in parts.items()}


def _adapter_config(model_or_module: nn.Module, layers: dict[str, FlexLoRALinear], saved: list[str]) -> dict:
    per_layer = {name: _layer_config(layer) for name, layer in layers.items()}

    def uniform(key: str) -> Any:
        values = {cfg[key] for cfg in per_layer.values()}
        return values.pop() if len(values) == 1 else None

    return {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_FORMAT_VERSION,
        "target_modules": list(getattr(model_or_module, "target_modules", None) or layers),
        "modules_to_save": saved,
        "init_rank": uniform("init_rank"),
        "max_rank": uniform("max_rank"),
        "alpha": uniform("alpha"),
        "dropout": uniform("dropout"),
        "rank_pattern": {name: layer.rank for name, layer in layers.items()},
        "layers": per_layer,
    }


def _layer_config(layer: FlexLoRALinear) -> dict[str, Any]:
    return {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "init_rank": layer.init_rank,
        "max_rank": layer.max_rank,
        "alpha": layer.alpha,
        "dropout": dropout_probability(layer),
    }


def load_adapter_checkpoint(model_or_module: nn.Module, path: str | Path) -> nn.Module:
    """Load an adapter checkpoint written by :func:`save_adapter_checkpoint`, in place.

    The model must have the same base as the one saved. When it holds no FlexLoRA layer yet (a plain
    base model), the layers are injected first from the saved config; otherwise its layers must match
    the saved ones exactly. The layout is checked before any weight is written.

    Args:
        model_or_module: a freshly built :class:`~flexlora_pl.FlexLoRAModule`, a model holding FlexLoRA
            layers, or the plain base model.
        path: the directory written by :func:`save_adapter_checkpoint`.

    Returns:
        The backbone, now holding the saved adapter.

    Raises:
        FileNotFoundError: ``path`` lacks the adapter files.
        ValueError: the layout does not match (the message names the first mismatching key).
    """
    config, tensors = _read_adapter_checkpoint(Path(path))
    backbone = backbone_of(model_or_module)
    _check_saved_modules(backbone, config, tensors)
    if not any(True for _ in flexlora_layers(backbone)):
        _check_plain_targets(backbone, config)
        _inject_from_config(backbone, config)
    layers = dict(flexlora_layers(backbone))
    _check_layers(layers, config, tensors)
    with torch.no_grad():
        for name, layer in layers.items():
            _restore_layer(layer, {k: tensors[f"{name}.{k}"] for k in _LAYER_TENSORS})
        for module_name in config["modules_to_save"]:
            prefix = module_name + "."
            state = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            backbone.get_submodule(module_name).load_state_dict(state)
    return backbone


def _read_adapter_checkpoint(directory: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config_path, weights_path = directory / ADAPTER_CONFIG_NAME, directory / ADAPTER_WEIGHTS_NAME
    for file in (config_path, weights_path):
        if not file.is_file():
            raise FileNotFoundError(
                f"{file} not found: is {directory} a directory written by save_adapter_checkpoint?"
            )
    config = json.loads(config_path.read_text())
    if config.get("format") != ADAPTER_FORMAT or config.get("format_version") != ADAPTER_FORMAT_VERSION:
        raise ValueError(
            f"{config_path} is not a flexlora_pl adapter checkpoint of format version {ADAPTER_FORMAT_VERSION} "
            f"(found format={config.get('format')!r}, format_version={config.get('format_version')!r})"
        )
    return config, load_file(str(weights_path))


def _inject_from_config(backbone: nn.Module, config: dict) -> None:
    """Wrap exactly the saved layers of a plain base model (anchored patterns: no suffix surprises)."""
    if None in (config["init_rank"], config["max_rank"], config["alpha"], config["dropout"]):
        raise ValueError(
            "the checkpoint's layers differ in init_rank / max_rank / alpha / dropout; inject FlexLoRA into the "
            "model yourself with the per-layer values in its JSON, then load"
        )
    exact = [f"re:{re.escape(name)}" for name in config["layers"]]
    saved = [f"re:{re.escape(name)}" for name in config["modules_to_save"]]
    inject_flexlora(
        backbone,
        exact,
        init_rank=config["init_rank"],
        max_rank=config["max_rank"],
        alpha=config["alpha"],
        dropout=config["dropout"],
        modules_to_save=saved,
    )


def _check_plain_targets(backbone: nn.Module, config: dict) -> None:
    """Before injecting into a plain model: every saved layer must be an ``nn.Linear`` of the same shape."""
    modules = dict(backbone.named_modules())
    for name, expected in config["layers"].items():
        module = modules.get(name)
        if not isinstance(module, nn.Linear):
            found = "nothing" if module is None else type(module).__name__
            raise ValueError(f"layout mismatch at {name}.lora_P: the checkpoint adapts an nn.Linear {name!r}, "
                             f"the model has {found} there")
        if (module.in_features, module.out_features) != (expected["in_features"], expected["out_features"]):
            raise ValueError(
                f"layout mismatch at {name}.lora_P: the checkpoint's layer is {expected['in_features']} -> "
                f"{expected['out_features']}, the model's {module.in_features} -> {module.out_features}"
            )


def _check_layers(layers: dict[str, FlexLoRALinear], config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Raise a ValueError naming the first key where the checkpoint's layers and the model's disagree."""
    saved_layers: dict[str, dict] = config["layers"]
    for name in saved_layers:
        if name not in layers:
            raise ValueError(
                f"layout mismatch at {name}.lora_P: the checkpoint adapts {name!r}, which is not a FlexLoRA layer "
                f"of this model (it adapts {list(layers)[:3]}...); were the target modules different?"
            )
    for name in layers:
        if name not in saved_layers:
            raise ValueError(
                f"layout mismatch at {name}.lora_P: this model adapts {name!r}, which the checkpoint does not "
                "hold; build the model with the checkpoint's target_modules"
            )
    for name, layer in layers.items():
        expected, actual = saved_layers[name], _layer_config(layer)
        for field in ("in_features", "out_features", "max_rank", "init_rank", "alpha"):
            if expected[field] != actual[field]:
                raise ValueError(
                    f"layout mismatch at {name}.lora_P: {field} is {expected[field]} in the checkpoint "
                    f"but {actual[field]} in the model"
                )
        _check_layer_tensors(name, layer, tensors)


def _check_saved_modules(backbone: nn.Module, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Every saved ``modules_to_save`` tensor must exist in the model with the same shape, and vice versa."""
    state = backbone.state_dict()
    for module_name in config["modules_to_save"]:
        prefix = module_name + "."
        # In the model's order, then keys only the checkpoint has: the first mismatch is the one reported.
        keys = [k for k in state if k.startswith(prefix)] + [k for k in tensors if k.startswith(prefix)]
        for key in dict.fromkeys(keys):
            if key not in state or key not in tensors:
                where = "the model" if key not in state else "the checkpoint"
                raise ValueError(f"layout mismatch at {key}: missing in {where} (modules_to_save {module_name!r})")
            if tensors[key].shape != state[key].shape:
                raise ValueError(
                    f"layout mismatch at {key}: shape {tuple(tensors[key].shape)} in the checkpoint but "
                    f"{tuple(state[key].shape)} in the model"
                )


def _check_layer_tensors(name: str, layer: FlexLoRALinear, tensors: dict[str, torch.Tensor]) -> None:
    for key in _LAYER_TENSORS:
        if f"{name}.{key}" not in tensors:
            raise ValueError(f"layout mismatch at {name}.{key}: missing in the checkpoint")
    mask = tensors[f"{name}.rank_mask"]
    if mask.dtype != torch.bool or mask.shape != (layer.max_rank,):
        raise ValueError(f"layout mismatch at {name}.rank_mask: expected a bool vector of length {layer.max_rank}")
    r = int(mask.sum())
    expected = {"lora_P": (layer.out_features, r), "lora_lambda": (r,), "lora_Q": (r, layer.in_features)}
    for key, shape in expected.items():
        if tuple(tensors[f"{name}.{key}"].shape) != shape:
            raise ValueError(
                f"layout mismatch at {name}.{key}: shape {tuple(tensors[f'{name}.{key}'].shape)} in the "
                f"checkpoint, expected {shape} for rank {r}"
            )


def _restore_layer(layer: FlexLoRALinear, parts: dict[str, torch.Tensor]) -> None:
    """Zero every direction, then write the active ones back into their slots."""
    mask = parts["rank_mask"].to(layer.rank_mask.device)
    for param in (layer.lora_P, layer.lora_lambda, layer.lora_Q):
        param.zero_()
    layer.lora_P[:, mask] = parts["lora_P"].to(layer.lora_P)
    layer.lora_lambda[mask] = parts["lora_lambda"].to(layer.lora_lambda)
    layer.lora_Q[mask] = parts["lora_Q"].to(layer.lora_Q)
    layer.rank_mask.copy_(mask)


register_format(ExportFormat("adapter", "FlexLoRA adapter-only checkpoint (load_adapter_checkpoint)",
                             save_adapter_checkpoint))
