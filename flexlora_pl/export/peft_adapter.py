"""The peft adapter: ``adapter_config.json`` + ``adapter_model.safetensors`` that ``peft.PeftModel.from_pretrained``
loads with no flexlora_pl code. What the adapter holds is the method's (``AdaptationMethod.peft_adapter_state``:
FlexLoRA folds λ into a LoRA adapter, LoRA and AdaLoRA give peft's own); this file writes it."""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from torch import nn

from flexlora_pl.export.common import adapted, atomic_output, check_output_dir, saved_module_names
from flexlora_pl.export.formats import ExportFormat, FormatOption, register_format

__all__ = ["PEFT_MIN_VERSION", "PEFT_WEIGHTS_NAME", "export_peft_adapter"]

PEFT_MIN_VERSION = "0.14"  # the oldest peft the project supports (setup.cfg); older releases are untested
PEFT_WEIGHTS_NAME = "adapter_model.safetensors"  # peft's name; its config file is adapter_config.json


def export_peft_adapter(
    model_or_module: nn.Module,
    out_dir: str | Path,
    base_model_name_or_path: str | None = None,
    task_type: str | None = None,
    modules_to_save: Sequence[str] | None = None,
    overwrite: bool = False,
) -> Any:
    """Write a standard peft adapter equal to the adapted model.

    FlexLoRA's update becomes a LoRA adapter with per-module ranks (modules without update left out); a
    model adapted by a peft-based method (:class:`~flexlora_pl.methods.LoRA`, :class:`~flexlora_pl.methods.AdaLoRA`)
    gives peft's own adapter, with the modules trained in full as ``modules_to_save``.

    Load it with ``peft.PeftModel.from_pretrained(base_model, out_dir)`` on the un-adapted base model
    (the backbone as it was before injection). Module paths are relative to the backbone.

    Args:
        model_or_module: a :class:`~flexlora_pl.FlexLoRAModule` (its ``backbone`` is exported) or a model
            adapted by a registered method (FlexLoRA layers, or peft layers a method injected).
        out_dir: output directory; must not exist or be empty unless ``overwrite``.
        base_model_name_or_path: recorded in the adapter config; default: the backbone's
            ``name_or_path`` when it is a transformers model.
        task_type: peft task type (``"SEQ_CLS"``, ``"CAUSAL_LM"``, ...); ``None`` for a generic model (the config
            then records the base model's class, as peft's own ``save_pretrained`` does).
        modules_to_save: modules trained in full, saved whole (names or patterns as in
            :func:`~flexlora_pl.inject_flexlora`); default: the module's own ``modules_to_save``, or, for
            a plain model, the modules owning trainable non-adapter parameters.
        overwrite: replace an existing non-empty ``out_dir``.

    Returns:
        The peft config that was written (``peft.LoraConfig``; ``peft.AdaLoraConfig`` for AdaLoRA).

    Raises:
        ImportError: peft is missing or older than 0.14.
        ValueError: no adapter, a method without a peft form, no module with a non-zero update, module paths
            that peft could not tell apart, or a task type peft does not know.
    """
    peft = _require_peft()
    out = check_output_dir(out_dir, overwrite)
    if task_type is not None and task_type not in list(peft.TaskType):
        raise ValueError(f"task_type {task_type!r} is not a peft task type: use one of {', '.join(peft.TaskType)} "
                         "(CLI: --task-type), or none for a generic model")
    backbone, method = adapted(model_or_module)
    saved = saved_module_names(model_or_module, backbone, method, modules_to_save)
    config, tensors = method.peft_adapter_state(backbone, saved)
    notes = method.peft_adapter_notes(backbone)  # PiSSA, MiLoRA: what their plain LoRA adapter holds
    config.task_type = task_type
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(backbone, "name_or_path", None) or None
    config.base_model_name_or_path = base_model_name_or_path
    config.inference_mode = True
    auto_mapping = None if task_type is not None else {
        "base_model_class": type(backbone).__name__, "parent_library": type(backbone).__module__}
    with atomic_output(out, overwrite) as tmp:
        config.save_pretrained(str(tmp), auto_mapping_dict=auto_mapping)
        save_file(tensors, str(tmp / PEFT_WEIGHTS_NAME), metadata={"format": "pt"})
        if notes:
            (tmp / "README.md").write_text(notes)
    return config


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


register_format(ExportFormat(
    "peft", "adapter_config.json + adapter_model.safetensors for peft.PeftModel.from_pretrained", export_peft_adapter,
    options=(
        FormatOption("--base-model-name-or-path", "base model recorded in adapter_config.json (default: where the "
                     "base was loaded from)"),
        FormatOption("--task-type", "peft task type, e.g. SEQ_CLS or CAUSAL_LM"),
    ),
))
