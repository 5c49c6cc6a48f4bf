"""Slim checkpoints: a checkpoint keeps what training changes, plus what identifies the frozen base.

Adapters, rank masks, ``modules_to_save``, every buffer, the optimizer, schedulers, callbacks and the data
position stay; the frozen backbone weights are dropped on save and rebuilt from the model's own arguments
(``model_name_or_path``) on load, after a fingerprint check that it is the same base. A model whose adapters
were merged into the base keeps its whole state (the base then holds ΔW).

A 4-bit base (bitsandbytes' ``Linear4bit``) writes its quantization statistics beside each packed weight, as
``<weight name>.absmax``, ``.quant_map``, ``.quant_state.bitsandbytes__nf4``, …: they are part of the frozen base,
dropped with its weight and rebuilt with it (quantizing the same weights gives the same statistics).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["base_fingerprint", "check_checkpoint_layout", "drop_frozen_base", "frozen_parameter_names",
           "frozen_state_names", "restore_frozen_base", "trained_state"]

_SAMPLES = 64  # values of each frozen tensor that enter the fingerprint


def frozen_parameter_names(module: nn.Module) -> list[str]:
    """Names (as in ``module.state_dict()``) of the parameters training never changes: the frozen base."""
    # remove_duplicate=False: a tied weight is in the state dict under each of its names
    return [name for name, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad]


def frozen_state_names(module: nn.Module, state: Mapping[str, Any]) -> list[str]:
    """The entries of ``state`` (a state dict of ``module``) that belong to the frozen base: each frozen parameter
    and what a quantized one saves beside it (``<name>.<statistic>``)."""
    frozen = set(frozen_parameter_names(module))
    statistics = _quantization_statistics(state, frozen)
    return [key for key in state if key in frozen or key in statistics]


def _quantization_statistics(state: Mapping[str, Any], frozen: set[str]) -> set[str]:
    """The keys of ``state`` that extend a frozen parameter's name (``...weight.absmax``): a quantized weight's
    statistics, which bitsandbytes saves beside it but does not load back as entries of its own."""
    def extends(key: str) -> bool:
        parts = key.split(".")
        return any(".".join(parts[:i]) in frozen for i in range(len(parts) - 1, 0, -1))

    return {key for key in state if key not in frozen and extends(key)}


def base_fingerprint(module: nn.Module) -> str:
    """A cheap fingerprint of the frozen base: every frozen tensor's name and shape, and 64 of its values.

    Values are compared at bfloat16 precision, so a base loaded in another float precision (a ``bf16-true``
    run exported on a CPU in float32) still matches, while another model does not.
    """
    digest = hashlib.sha256()
    for name, param in module.named_parameters():
        if param.requires_grad:
            continue
        flat = param.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // _SAMPLES)][:_SAMPLES]
        values = sample.to(torch.bfloat16).float().cpu().numpy().tobytes()
        digest.update(f"{name}:{tuple(param.shape)}:".encode() + values)
    return digest.hexdigest()


def drop_frozen_base(module: nn.Module, checkpoint: dict[str, Any], source: str | None) -> None:
    """Remove the frozen base's tensors from ``checkpoint["state_dict"]``, recording ``source`` and the
    fingerprint under ``checkpoint["flexlora_base"]``. Nothing is dropped when nothing is frozen."""
    state = checkpoint.get("state_dict")
    frozen = frozen_state_names(module, state) if state is not None else []
    if not frozen:
        return
    for name in frozen:
        del state[name]
    checkpoint["flexlora_base"] = {"source": source, "fingerprint": base_fingerprint(module),
                                   "frozen_tensors": len(frozen)}


def restore_frozen_base(module: nn.Module, checkpoint: dict[str, Any], source: str | None) -> None:
    """Fill a slim checkpoint's frozen weights from ``module``, after checking it is the same base.

    A full checkpoint (no ``flexlora_base`` entry) is left as it is.
    """
    base = checkpoint.get("flexlora_base")
    if not base:
        return
    if base["fingerprint"] != base_fingerprint(module):
        raise ValueError(
            f"the checkpoint was trained on another base model than the one built now: its frozen weights "
            f"(from {base.get('source')!r}) have another fingerprint than this model's (from {source!r}). Build "
            "the model from the base the checkpoint was trained on (model_name_or_path; flexlora-export "
            "--base-model for a moved folder)."
        )
    state = checkpoint.setdefault("state_dict", {})
    own = module.state_dict()
    for name in frozen_parameter_names(module):  # a quantized weight's statistics are the rebuilt module's own
        state.setdefault(name, own[name])


def trained_state(module: nn.Module) -> dict[str, Any]:
    """``module.state_dict()`` without the statistics a quantized frozen weight saves beside it: the state a
    checkpoint loads (the weights themselves stay; :func:`restore_frozen_base` fills them)."""
    state = module.state_dict()
    statistics = _quantization_statistics(state, set(frozen_parameter_names(module)))
    return {key: value for key, value in state.items() if key not in statistics}


def check_checkpoint_layout(own: Mapping[str, Any], saved: Mapping[str, Any]) -> None:
    """Refuse a checkpoint state ``saved`` whose tensors do not fit the model's state ``own``, in one message."""
    shape = lambda t: list(t.shape) if torch.is_tensor(t) else None  # noqa: E731
    differ = [k for k in saved if k in own and shape(saved[k]) != shape(own[k])]
    missing = [k for k in own if k not in saved]
    extra = [k for k in saved if k not in own]
    if not (differ or missing or extra):
        return
    parts = []
    if differ:
        k = differ[0]
        parts.append(f"{len(differ)} tensors differ in shape, e.g. {k} is {shape(saved[k])} in the checkpoint "
                     f"and {shape(own[k])} in the model")
    if missing:
        parts.append(f"{len(missing)} model tensors are not in the checkpoint, e.g. {missing[0]}")
    if extra:
        parts.append(f"{len(extra)} checkpoint tensors are not in the model, e.g. {extra[0]}")
    raise ValueError(
        "the checkpoint does not fit the model built from this config: " + "; ".join(parts)
        + ". The backbone, target_modules or max_rank differ from the run that wrote it: build the model "
        "the checkpoint was trained with (same model_name_or_path, target_modules, max_rank)."
    )
