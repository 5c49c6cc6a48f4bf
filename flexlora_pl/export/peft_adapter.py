"""The PEFT LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained`` loads with no flexlora_pl code (see :mod:`flexlora_pl.export`)."""

from __future__ import annotations

import copy
import importlib
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from flexlora_pl.core.inject import flexlora_layers
from flexlora_pl.core.layer import FlexLoRALinear
from flexlora_pl.export.common import _backbone, _require_layers, _saved_module_names, _saved_module_tensors
from flexlora_pl.export.files import _atomic_output, check_output_dir
from flexlora_pl.methods.lora import ADAPTER_NAME, drop_peft_tuner, peft_target_modules, peft_tuner, peft_tuner_layers

PEFT_MIN_VERSION = "0.14"  # the oldest peft the project supports (setup.cfg); older releases are untested
_PEFT_PREFIX = "base_model.model."  # where peft's LoRA model keeps the wrapped model in its state dict

def export_peft_adapter(
    model_or_module: nn.Module,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    modules_to_save: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Any:
    """Write a standard PEFT LoRA adapter equivalent to the model's FlexLoRA update (or its peft adapter).

    A model adapted by a peft-based method (:class:`~flexlora_pl.methods.LoRA`,
    :class:`~flexlora_pl.methods.AdaLoRA`) is saved by peft itself: ``save_pretrained`` of a ``PeftModel``
    holding its trained adapters, with the modules trained in full as ``modules_to_save`` (see
    :func:`_export_peft_method`).

    Load it with ``peft.PeftModel.from_pretrained(base_model, out_dir)`` on the un-adapted base model
    (the backbone as it was before injection). Module paths are relative to the backbone.

    Args:
        model_or_module: a :class:`~flexlora_pl.FlexLoRAModule` (its ``backbone`` is exported) or any
            ``nn.Module`` holding FlexLoRA layers.
        out_dir: output directory; must not exist or be empty unless ``overwrite``.
        base_model_name_or_path: recorded in the adapter config; default: the backbone's
            ``name_or_path`` when it is a transformers model.
        task_type: peft task type (``"SEQ_CLS"``, ``"CAUSAL_LM"``, ...); ``None`` for a generic model.
        modules_to_save: modules trained in full, saved whole (names or patterns as in
            :func:`~flexlora_pl.inject_flexlora`); default: the module's own ``modules_to_save``, or, for
            a plain model, the modules owning trainable non-adapter parameters.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        The ``peft.LoraConfig`` (``peft.AdaLoraConfig`` for AdaLoRA) that was written.

    Raises:
        ImportError: peft is missing or older than 0.14.
        ValueError: no FlexLoRA layer, no module with a non-zero update, or module paths that peft
            could not tell apart.
    """
    peft = _require_peft()
    out = check_output_dir(out_dir, overwrite)
    backbone = _backbone(model_or_module)
    if next(peft_tuner_layers(backbone), None) is not None:
        return _export_peft_method(peft, model_or_module, backbone, out, overwrite, base_model_name_or_path,
                                   task_type, modules_to_save)
    layers = _require_layers(backbone)
    exported = {name: layer for name, layer in layers.items() if _has_update(layer)}
    if not exported:
        raise ValueError(
            "no FlexLoRA layer has a non-zero update (every active λ is zero or no direction is active): the "
            "model equals its base model; use export_merged or save_adapter_checkpoint instead"
        )
    saved = _saved_module_names(model_or_module, backbone, modules_to_save)
    tensors = _peft_tensors(backbone, exported, saved)
    config = _lora_config(peft, backbone, exported, saved, base_model_name_or_path, task_type)
    with _atomic_output(out, overwrite) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    return config


def _peft_tensors(
    backbone: nn.Module, exported: dict[str, FlexLoRALinear], saved: list[str]
) -> dict[str, torch.Tensor]:
    """peft's state-dict layout: ``base_model.model.<path>.lora_{A,B}.weight`` and whole saved modules."""
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in exported.items():
        lora_a, lora_b = _lora_factors(layer)
        tensors[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = lora_a
        tensors[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = lora_b
    tensors.update(_saved_module_tensors(backbone, saved, prefix=_PEFT_PREFIX))
    return tensors


@torch.no_grad()
def _lora_factors(layer: FlexLoRALinear) -> tuple[torch.Tensor, torch.Tensor]:
    """``A = diag(λ_S) Q_S`` (r, d_in) and ``B = P_S`` (d_out, r) over the active directions ``S``."""
    active = layer.rank_mask
    lam = layer.lora_lambda.float()[active]  # (r,)
    lora_a = (lam[:, None] * layer.lora_Q.float()[active]).to(layer.lora_Q.dtype)  # (r, d_in)
    lora_b = layer.lora_P[:, active]  # (d_out, r)
    return lora_a.detach().cpu().contiguous(), lora_b.detach().cpu().contiguous()


def _has_update(layer: FlexLoRALinear) -> bool:
    """Whether the layer's ΔW can be non-zero: some active direction with λ ≠ 0."""
    return bool((layer.masked_lambda() != 0).any())


def _lora_config(
    peft: Any,
    backbone: nn.Module,
    exported: dict[str, FlexLoRALinear],
    saved: list[str],
    base_model_name_or_path: str | None,
    task_type: str | None,
) -> Any:
    """A ``peft.LoraConfig`` with exact module paths, per-module ranks and α = s · r."""
    ranks = {name: layer.rank for name, layer in exported.items()}
    alphas = {name: layer.alpha * ranks[name] / layer.init_rank for name, layer in exported.items()}
    order = list(exported)
    _check_pattern_keys(order, ranks, alphas)
    default_rank = Counter(ranks[n] for n in order).most_common(1)[0][0]
    default_alpha = next(alphas[n] for n in order if ranks[n] == default_rank)
    dropout = Counter(_dropout_p(exported[n]) for n in order).most_common(1)[0][0]
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(backbone, "name_or_path", None) or None
    return peft.LoraConfig(
        r=default_rank,
        lora_alpha=default_alpha,
        lora_dropout=dropout,
        target_modules=_target_modules(backbone, order),
        rank_pattern={n: ranks[n] for n in order},
        alpha_pattern={n: alphas[n] for n in order},
        modules_to_save=saved or None,
        bias="none",
        base_model_name_or_path=base_model_name_or_path,
        task_type=task_type,
        inference_mode=True,
    )


def _check_pattern_keys(names: Sequence[str], ranks: dict[str, int], alphas: dict[str, float]) -> None:
    """Refuse paths for which peft's ``rank_pattern`` lookup could pick another module's entry.

    peft matches a key ``k`` against a module name with the regex ``(.*\\.)?(k)$`` and takes the first
    key that matches (the key is a regex: its dots match any character); older releases used
    ``.*\\.k$`` with an exact-name fallback. peft writes the patterns sorted by key, so no order can be
    relied on: when another key also matches a module's path (one path is a dotted suffix of the
    other), the module may get that key's rank, which is harmless only if rank and α are the same.
    """
    for name in names:
        for key in names:
            clash = key != name and re.match(rf"(.*\.)?({key})$", name)
            if clash and (ranks[key], alphas[key]) != (ranks[name], alphas[name]):
                raise ValueError(
                    f"peft could apply the rank of {key!r} (r={ranks[key]}) to {name!r} (r={ranks[name]}): one "
                    "path is a suffix of the other. Export this model with export_merged instead"
                )


def _target_modules(backbone: nn.Module, names: Sequence[str]) -> list[str] | str:
    """The exact list of exported paths, or an anchored regex when the list would select more.

    peft also targets every module whose name ends with ``"." + target``; when such a module exists
    (a nested module with the same tail), a regex that peft full-matches keeps the selection exact.
    """
    exported = set(names)
    others = [n for n in _plain_module_names(backbone) if n not in exported]
    if any(other.endswith("." + name) for other in others for name in names):
        return "(?:" + "|".join(re.escape(n) for n in names) + ")"
    return list(names)


def _plain_module_names(backbone: nn.Module) -> list[str]:
    """Module names of the backbone as it looks without FlexLoRA (no ``.base`` / ``.dropout`` children)."""
    wrappers = [n for n, _ in flexlora_layers(backbone)]
    return [n for n, _ in backbone.named_modules() if n and not any(n.startswith(w + ".") for w in wrappers)]


def _dropout_p(layer: FlexLoRALinear) -> float:
    return float(layer.dropout.p) if isinstance(layer.dropout, nn.Dropout) else 0.0


def _require_peft() -> Any:
    """Import peft and check its version (per-module ``rank_pattern`` / ``alpha_pattern`` as used here)."""
    try:
        peft = importlib.import_module("peft")
    except ImportError as err:
        raise ImportError(
            f"exporting a PEFT adapter needs peft >= {PEFT_MIN_VERSION}: pip install 'peft>=0.14'"
        ) from err
    from packaging.version import Version

    if Version(peft.__version__) < Version(PEFT_MIN_VERSION):
        raise ImportError(
            f"exporting a PEFT adapter needs peft >= {PEFT_MIN_VERSION}, found {peft.__version__}: "
            "pip install -U 'peft>=0.14'"
        )
    return peft


# ---------------------------------------------------------------------- peft-based methods (LoRA, AdaLoRA)
def _export_peft_method(
    peft: Any,
    model_or_module: nn.Module,
    backbone: nn.Module,
    out: Path,
    overwrite: bool,
    base_model_name_or_path: str | None,
    task_type: str | None,
    modules_to_save: Sequence[str] | None,
) -> Any:
    """``save_pretrained`` of a ``PeftModel`` equal to ``backbone``, whose peft layers were injected in place.

    The methods keep peft's layers inside the backbone (no ``PeftModel`` wrapper, the head trained in
    place), so a copy of the backbone is unloaded to the plain model (trained head included), wrapped by
    ``peft.get_peft_model`` with the run's config plus ``modules_to_save``, given the trained adapter
    tensors (same module paths), and saved by peft. For AdaLoRA the config's ``rank_pattern`` keeps every
    direction whose singular value is non-zero, so peft stores only those and the adapter computes exactly
    what the model computes (also mid-run, when peft's soft masks have let pruned values grow back); a
    matrix pruned to rank 0 is left out of the adapter.
    """
    tuner = peft_tuner(backbone)
    if tuner is None:
        raise ValueError(
            f"{type(backbone).__name__} holds peft layers but not the tuner that injected them; export models "
            "adapted by flexlora_pl.methods (LoRA, AdaLoRA), or save a peft.PeftModel with its own save_pretrained"
        )
    config = copy.deepcopy(tuner.peft_config[ADAPTER_NAME])
    adalora = config.peft_type == peft.PeftType.ADALORA
    plain = _unloaded_copy(backbone, merge=False)
    if adalora:  # a matrix pruned to rank 0 has no update: left out, as FlexLoRA's export does
        nonzero = {name: layer.lora_E[ADAPTER_NAME] != 0 for name, layer in peft_tuner_layers(backbone)}
        kept = [name for name, values in nonzero.items() if bool(values.any())]
        if not kept:
            raise ValueError(
                "no AdaLoRA layer has a non-zero update (every singular value is zero): the model equals its base "
                "model; use export_merged or keep the checkpoint instead"
            )
        if len(kept) < len(nonzero):
            config.target_modules = peft_target_modules(plain, kept)
    saved = _saved_module_names(model_or_module, plain, modules_to_save)
    config.modules_to_save = saved or None
    config.inference_mode = True
    config.task_type = None  # a generic PeftModel: a task class would add modules_to_save of its own
    method = getattr(model_or_module, "method", None)
    if adalora and hasattr(method, "orth_reg_weight"):
        config.orth_reg_weight = method.orth_reg_weight  # the run's γ (training kept peft's at 0)
    with torch.random.fork_rng(devices=[]):  # the fresh adapter's draws are overwritten: leave the RNG alone
        peft_model = peft.get_peft_model(plain, config, adapter_name=ADAPTER_NAME)
    trained = dict(backbone.named_parameters())
    with torch.no_grad():
        for name, param in peft_model.get_base_model().named_parameters():
            if ".lora_" in name or ".ranknum." in name:
                if name not in trained:
                    raise ValueError(f"the adapter tensor {name!r} of the export has no counterpart in the model")
                param.copy_(trained[name])
    saved_config = peft_model.peft_config[ADAPTER_NAME]
    if adalora:
        saved_config.rank_pattern = {
            f"{name}.lora_E.{ADAPTER_NAME}": (layer.lora_E[ADAPTER_NAME] != 0).view(-1).tolist()
            for name, layer in peft_tuner_layers(peft_model.get_base_model())
        }
    saved_config.task_type = task_type
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(plain, "name_or_path", None) or None
    saved_config.base_model_name_or_path = base_model_name_or_path
    with _atomic_output(out, overwrite) as tmp:
        peft_model.save_pretrained(str(tmp), save_embedding_layers=False)
    return saved_config


def _unloaded_copy(backbone: nn.Module, merge: bool) -> nn.Module:
    """A copy of ``backbone`` without its peft layers (``merge``: with their updates merged into the weights).

    peft's own ``merge_and_unload`` / ``unload`` on the copy's tuner; the caller's model is left untouched.
    """
    if peft_tuner(backbone) is None:
        raise ValueError(
            f"{type(backbone).__name__} holds peft layers but not the tuner that injected them; only models adapted "
            "by flexlora_pl.methods (LoRA, AdaLoRA) can be unloaded here"
        )
    duplicate = copy.deepcopy(backbone)  # the tuner is copied with it and points at the copy
    tuner = peft_tuner(duplicate)
    plain = tuner.merge_and_unload(safe_merge=True) if merge else tuner.unload()
    drop_peft_tuner(plain)
    plain.__dict__.pop("peft_config", None)  # peft removes it; a leftover would make transformers see an adapter
    return plain
