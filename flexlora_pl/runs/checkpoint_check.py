"""A checkpoint against the config that would resume or evaluate it: every contradiction is an error.

Lightning merges a checkpoint's hyper-parameters over the config, so a changed ``max_rank`` or
``target_modules`` would be dropped without a word and the run would go on with the checkpoint's. Here
the checkpoint is read (its hyper-parameters only) before anything is built, and each model argument
the config sets to another value than the checkpoint holds is named in one error.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Collection
from typing import Any

import torch

__all__ = ["check_checkpoint_matches_config", "plain_config_value", "read_checkpoint", "same_class"]


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a Lightning checkpoint safely (``weights_only=True``), with errors that say what is wrong."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--ckpt_path {path!r} does not exist; give the path of a .ckpt file, or 'last' to resume the most "
            "trained checkpoint of the run named by --name/--version"
        )
    if os.path.isdir(path):
        raise ValueError(f"--ckpt_path {path!r} is a directory; give the path of a .ckpt file inside it")
    size = os.path.getsize(path)
    try:
        # mmap: only the hyper-parameters are read here, not gigabytes of weights
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises EOFError, RuntimeError, UnpicklingError... for damaged files
        raise ValueError(
            f"--ckpt_path {path!r} is not a readable checkpoint ({size} bytes): the file is empty, truncated or "
            f"corrupt ({type(err).__name__}). Resume from another checkpoint of the run (e.g. 'last' or a "
            "periodic one)."
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"--ckpt_path {path!r} is not a Lightning checkpoint (no 'state_dict' entry)")
    return checkpoint


def same_class(recorded: str, configured: str) -> bool:
    """Whether two class paths name one class: ``flexlora_pl.ImageClassifier`` (the public path configs use) and
    ``flexlora_pl.tasks.image_classification.ImageClassifier`` (what older checkpoints recorded) do.

    Paths outside ``flexlora_pl`` are compared as written: importing them would run code the user did not ask for.
    """
    if recorded == configured:
        return True
    if not (recorded.startswith("flexlora_pl.") and configured.startswith("flexlora_pl.")):
        return False
    try:
        return _import(recorded) is _import(configured)
    except (ImportError, AttributeError):
        return False


def _import(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def check_checkpoint_matches_config(ckpt_path: str, model_config: Any, linked_args: Collection[str] = (),
                                    free_args: Collection[str] = ()) -> None:
    """Raise when the checkpoint at ``ckpt_path`` was saved by another model class or with other model arguments.

    Args:
        ckpt_path: the checkpoint file (read with :func:`read_checkpoint`, whose errors it raises).
        model_config: the config's ``model`` entry (``class_path`` and ``init_args``); ``None`` checks nothing.
        linked_args: model arguments filled in from the data at instantiation, so not compared.
        free_args: dotted model arguments that may differ (``method.init_args.eval_rank`` when evaluating).

    Raises:
        ValueError: naming the model class, or every argument that differs, and what to do instead.
    """
    checkpoint = read_checkpoint(ckpt_path)
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if not hparams or model_config is None:
        return
    saved_class = hparams.pop("_class_path", None)
    hparams.pop("_instantiator", None)
    if saved_class and model_config.get("class_path") and not same_class(saved_class, model_config.class_path):
        raise ValueError(
            f"--ckpt_path {ckpt_path!r} was saved by {saved_class} but the config builds "
            f"{model_config.class_path}; resume with the model class that wrote it"
        )
    init_args = model_config.get("init_args") or {}
    differences = [
        difference for key, saved in hparams.items()
        if key in init_args and key not in linked_args
        for difference in _differences(key, plain_config_value(init_args[key]), plain_config_value(saved), free_args)
    ]
    if differences:
        raise ValueError(
            f"--ckpt_path {ckpt_path!r} does not match the model config: " + "; ".join(differences)
            + ". Resume with the settings the checkpoint was trained with (drop the changed model "
            "arguments), or start a new run without --ckpt_path."
        )


def _differences(key: str, configured: Any, saved: Any, free: Collection[str] = ()) -> list[str]:
    """Where a config value contradicts the checkpoint's, as ``key=saved in the checkpoint but key=... in the
    config`` lines. A ``None`` in the config means "the default" and contradicts nothing; a method given as
    ``{class_path, init_args}`` is compared by class name, then argument by argument."""
    if configured is None or configured == saved or key in free:
        return []
    if isinstance(configured, dict) and isinstance(saved, dict):
        if "class_path" in configured and "class_path" in saved:
            if str(configured["class_path"]).rsplit(".", 1)[-1] != str(saved["class_path"]).rsplit(".", 1)[-1]:
                return [f"{key}={saved['class_path']!r} in the checkpoint but {key}={configured['class_path']!r} in "
                        "the config"]
            configured, saved = configured.get("init_args") or {}, saved.get("init_args") or {}
            key = f"{key}.init_args"
        return [line for name in configured if name in saved
                for line in _differences(f"{key}.{name}", configured[name], saved[name], free)]
    return [f"{key}={saved!r} in the checkpoint but {key}={configured!r} in the config"]


def plain_config_value(value: Any) -> Any:
    """Config values in comparable form: tuples and other sequences as lists, namespaces as dicts."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: plain_config_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_config_value(v) for v in value]
    return value
