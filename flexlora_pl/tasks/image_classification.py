"""Image classification with an adapted timm model: ViT-B/16 on VTAB-1k (paper Table 3).

The backbone is ``timm.create_model(model_name, num_classes=..., drop_path_rate=...)``, with pretrained
weights from the hub or from a file on disk (``pretrained_path``), or random weights (``pretrained:
false``, for tests and the offline demo). The new classification head is trained in full; the adapters
go into ``mlp.fc1`` and ``mlp.fc2`` of every block unless the method names other targets. Top-1 accuracy
comes from torchmetrics: ``val/accuracy`` (and ``val/score``, for checkpoint selection) when the data has
a validation split, ``test/accuracy`` (and ``test/score``) on the test split. The preprocessing the data
module applies (its timm data config) goes into the backbone's ``pretrained_cfg``, so a merged export
tells its users how to prepare images; the class names (``label_names``, linked from the data module) go there too,
as timm keeps them (``pretrained_cfg["label_names"]``, the id order of the head).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from flexlora_pl.core.checks import require_int
from flexlora_pl.methods import AdaptationMethod, build_method
from flexlora_pl.module import FlexLoRAModule
from flexlora_pl.runs.seeding import resolve_seed

__all__ = ["VIT_MLP_TARGETS", "ImageClassifier"]

VIT_MLP_TARGETS = ["mlp.fc1", "mlp.fc2"]
"""The two MLP matrices of every ViT block: 24 in ViT-B/16, where LoRA r = 14 is the paper's 1.29M parameters.
``attn.qkv`` and ``attn.proj`` are the other linear layers of a block."""

# keys of a timm data config that describe the model's input
_DATA_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")


class ImageClassifier(FlexLoRAModule):
    """Image classification with an adapted timm backbone (default: ViT-B/16, ImageNet-21k, as in the paper).

    Batches are ``(images, labels)`` (:class:`~flexlora_pl.data.vtab.VTABDataModule`); the loss is cross-entropy.

    Args:
        model_name: timm model name. The default ``vit_base_patch16_224.orig_in21k`` is the original Google
            ImageNet-21k ViT-B/16 of the VTAB-1k literature (timm's ``vit_base_patch16_224_in21k`` now means
            other, AugReg weights).
        num_classes: number of classes; linked from the data module's ``num_classes``.
        pretrained: load pretrained weights (from ``pretrained_path`` if given, else the Hugging Face hub);
            ``False`` builds random weights, seeded by ``init_seed`` (tests, the offline demo).
        pretrained_path: a weights file on disk (``.safetensors``, ``.bin``, ``.pth``, ``.npz``) to load instead
            of the hub.
        data_config: the timm data config of the images (``input_size``, ``interpolation``, ``mean``, ``std``,
            ``crop_pct``, ``crop_mode``); linked from the data module. Its ``input_size`` sets the model's
            image size (timm resamples the position embeddings of pretrained weights to fit), and the whole
            config goes into the backbone's ``pretrained_cfg``, which exports carry.
        drop_path_rate: stochastic depth rate (0.1 in the VTAB-1k literature).
        label_names: the class names in id order; linked from the data module's ``label_names`` (an image folder's
            class folders). They go into the backbone's ``pretrained_cfg["label_names"]`` (so a merged export's
            ``config.json`` carries them), into ``metrics.json`` and into the predictions. ``None``: classes are ids.
        model_kwargs: further keyword arguments for ``timm.create_model`` (e.g. ``patch_size`` or ``depth`` of
            a small model for tests and the demo).
        method: how the backbone is adapted (:mod:`flexlora_pl.methods`): ``FlexLoRA`` (default), ``LoRA``,
            ``AdaLoRA``, ...; a method that names no ``target_modules`` adapts :data:`VIT_MLP_TARGETS`.
        modules_to_save: modules trained in full; ``None`` trains the new classification head (the model's
            ``pretrained_cfg["classifier"]``, ``head`` for ViTs).
        optimizer: optimizer factory (default AdamW).
        lr_scheduler: LR scheduler factory, stepped every optimizer step.
        init_seed: seed of the initial adapter draws (and of the random weights when ``pretrained`` is off);
            ``None`` follows ``seed_everything``. The hyper-parameters record the seed used.
    """

    def __init__(
        self,
        model_name: str = "vit_base_patch16_224.orig_in21k",
        num_classes: int | None = None,
        pretrained: bool = True,
        pretrained_path: str | None = None,
        data_config: Mapping[str, Any] | None = None,
        drop_path_rate: float = 0.1,
        label_names: Sequence[str] | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        method: AdaptationMethod | None = None,
        modules_to_save: Sequence[str] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        init_seed: int | None = None,
    ) -> None:
        if num_classes is None:
            raise ValueError("num_classes is not set: the `flexlora` command links it from the data module's "
                             "num_classes; with a data module that has none, or in Python, pass num_classes")
        require_int("num_classes", num_classes, 2)
        if label_names is not None and (isinstance(label_names, str) or len(label_names) != num_classes
                                        or len(set(map(str, label_names))) != num_classes):
            raise ValueError(f"label_names must list {num_classes} distinct class names (num_classes), got "
                             f"{label_names!r}; leave it unset to have the `flexlora` command link the data module's")
        if not 0.0 <= drop_path_rate < 1.0:
            raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate}")
        if pretrained_path is not None and not pretrained:
            raise ValueError(f"pretrained_path={pretrained_path!r} is given but pretrained is false; set pretrained: "
                             "true to load it, or drop pretrained_path for random weights")
        # Resolved now, so the hyper-parameters record the seed that drew the random weights (pretrained: false) and
        # a rebuild from the checkpoint in another process draws the same frozen base.
        init_seed = resolve_seed(init_seed)
        backbone = _create_backbone(model_name, num_classes, pretrained, pretrained_path, data_config, drop_path_rate,
                                    dict(model_kwargs or {}), init_seed)
        if label_names is not None:  # timm's place for them: a merged export's config.json keeps them with the head
            backbone.pretrained_cfg = {**backbone.pretrained_cfg, "num_classes": num_classes,
                                       "label_names": tuple(map(str, label_names))}
            backbone.default_cfg = backbone.pretrained_cfg
        head = backbone.pretrained_cfg.get("classifier") or "head"
        head = [head] if isinstance(head, str) else list(head)
        method = build_method(method).with_default_targets(VIT_MLP_TARGETS)
        super().__init__(
            backbone=backbone,
            modules_to_save=head if modules_to_save is None else modules_to_save,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            init_seed=init_seed,
            method=method,
        )
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "method"])
        self.hparams["method"] = self.method.as_config()  # a plain dict, whichever way the method was given
        self.hparams["init_seed"] = init_seed  # the resolved seed (the CLI would record the config's None)
        self.num_classes = num_classes
        #: the class names in id order (``None``: none given); ``metrics.json`` and the predictions use them
        self.label_names = None if label_names is None else [str(name) for name in label_names]
        self.val_accuracy = MulticlassAccuracy(num_classes, top_k=1, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes, top_k=1, average="micro")

    @property
    def data_config(self) -> dict[str, Any]:
        """The backbone's timm data config (input size, interpolation, mean/std, crop): how to prepare images."""
        from timm.data import resolve_model_data_config

        return resolve_model_data_config(self.backbone)

    # ------------------------------------------------------------------ loss
    def logits(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits of a batch of images, shape ``(B, num_classes)``."""
        return self(images)

    @override
    def compute_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        images, labels = batch
        return F.cross_entropy(self.logits(images).float(), labels)

    # ------------------------------------------------------------ evaluation
    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str, metric: MulticlassAccuracy) -> None:
        images, labels = batch
        logits = self.logits(images).float()
        self.log(f"{prefix}/loss", F.cross_entropy(logits, labels), batch_size=labels.shape[0])
        metric.update(logits.argmax(dim=-1), labels)

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_accuracy)

    @property
    @override
    def validation_metric_names(self) -> list[str]:
        return self.validation_metrics_for(None)

    @classmethod
    @override
    def validation_metrics_for(cls, data: Any) -> list[str]:
        return ["val/score", "val/loss", "val/accuracy"]

    @override
    def on_validation_epoch_end(self) -> None:
        accuracy = self.val_accuracy.compute()
        self.val_accuracy.reset()
        self.log("val/accuracy", accuracy, prog_bar=True)
        self.log("val/score", accuracy)

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_accuracy)

    @override
    def on_test_epoch_end(self) -> None:
        accuracy = self.test_accuracy.compute()
        self.test_accuracy.reset()
        self.log("test/accuracy", accuracy)
        self.log("test/score", accuracy)

    @override
    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        """The predicted class id of every image of the batch."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self.logits(images).argmax(dim=-1)


def _create_backbone(name: str, num_classes: int, pretrained: bool, path: str | None,
                     data_config: Mapping[str, Any] | None, drop_path_rate: float, kwargs: dict[str, Any],
                     seed: int) -> nn.Module:
    """``timm.create_model`` with clear errors, random weights seeded, and the data config in ``pretrained_cfg``."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"model_name={name!r} is not a timm model; {_suggest_model_names(name)} (timm.list_models() "
                         "lists all)")
    if data_config is not None:
        unknown = sorted(set(data_config) - set(_DATA_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"data_config has unknown keys {unknown}; expected some of {list(_DATA_CONFIG_KEYS)}")
        if "input_size" in data_config:
            kwargs.setdefault("img_size", tuple(data_config["input_size"])[-2:])
    kwargs.update(num_classes=num_classes, drop_path_rate=drop_path_rate)
    if path is not None:
        if not os.path.isfile(path):
            raise ValueError(f"pretrained_path={path!r} is not a file (relative paths are resolved from "
                             f"{os.getcwd()!r}); give the weights file of {name}, e.g. its model.safetensors")
        kwargs["pretrained_cfg_overlay"] = {"file": os.path.abspath(path)}
    if not pretrained:
        # Random weights drawn from a seed of their own: a checkpoint keeps only what training changes, so the
        # frozen base must come out the same when the model is rebuilt to resume or evaluate.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = timm.create_model(name, pretrained=False, **kwargs)
    elif path is not None:
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except Exception as err:  # each loader fails its own way: SafetensorError, KeyError, UnpicklingError, ...
            raise ValueError(
                f"cannot load pretrained_path={path!r} for {name} ({type(err).__name__}: {_sentence(err)}). Give an "
                f"intact weights file of {name} (.safetensors, .bin, .pth or .npz), e.g. the hub's model.safetensors"
            ) from err
    else:
        try:
            model = timm.create_model(name, pretrained=True, **kwargs)
        except OSError as err:  # offline, unreachable hub, missing cache entry (huggingface_hub's errors are OSErrors)
            offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
            raise ValueError(
                f"cannot download the pretrained weights of {name} from the Hugging Face hub"
                f"{' (HF_HUB_OFFLINE is set)' if offline else ''}: {_sentence(err, first_line=True)}. "
                "Pass model.init_args.pretrained_path=<weights file on disk> (e.g. the hub's model.safetensors), "
                "or go online (unset HF_HUB_OFFLINE), or set pretrained: false for random weights"
            ) from err
    if data_config is not None:
        model.pretrained_cfg = {**model.pretrained_cfg, **_plain_config(data_config)}
        model.default_cfg = model.pretrained_cfg  # timm's older name for the same dict
    return model


def _plain_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A data config with tuples for sequences, as timm keeps them."""
    return {key: tuple(value) if isinstance(value, (list, tuple)) else value for key, value in config.items()}


def _suggest_model_names(name: str) -> str:
    """Names timm knows that are spelled like ``name`` (pretrained tags included when ``name`` has one)."""
    import timm

    known = timm.list_models(pretrained="." in name)
    close = difflib.get_close_matches(name, known, n=5)
    if close:
        return f"close names: {close}"
    # nothing spelled alike: the models that share the name's first word, or the default
    family = timm.list_models(f"*{name.split('.')[0].split('_')[0]}*")[:8]
    return f"e.g. {family or ['vit_base_patch16_224.orig_in21k']}"


def _sentence(err: BaseException, first_line: bool = False) -> str:
    """An error's text (or its first line) without a closing full stop, to go inside a sentence of our own."""
    text = str(err).strip() or type(err).__name__
    if first_line:
        text = text.splitlines()[0]
    return text.rstrip(".")
