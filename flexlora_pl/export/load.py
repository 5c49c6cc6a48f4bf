"""Rebuild a LightningModule from a ``.ckpt`` (weights-only by default), optionally on a moved base model."""

from __future__ import annotations

import importlib
import os
import pickle
import sys
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule

from flexlora_pl.sources import looks_local


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
        if isinstance(recorded, str) and looks_local(recorded) and not os.path.isdir(os.path.expanduser(recorded)):
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
    local = isinstance(base_model, Path) or looks_local(base_model)
    if local and not os.path.isdir(os.path.expanduser(base_model)):
        raise FileNotFoundError(
            f"base model {str(base_model)!r} (base_model, CLI: --base-model) is not an existing folder: give the "
            "folder that holds the base model's config.json and weights"
        )


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
