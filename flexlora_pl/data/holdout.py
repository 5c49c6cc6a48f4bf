"""A validation split carved out of the training rows (a "holdout"), so that a search never sees a reported split.

A hyper-parameter search that scores its trials on the split the results tables report (GLUE dev, the tweet
task's validation draw) selects on that split, and the number reported on it is no longer an honest estimate.
With ``holdout_size`` set, a data module loads its training rows only, carves a seeded split of that size out of
them, trains on the rest and validates on the carve (see ``docs/holdout.md``).

The carve keeps the class mix of the training rows (:func:`stratified_draw`): the rows are shuffled by the seed,
grouped by class (the shuffled order kept inside each class), and the carve takes evenly spaced picks over the
grouped rows, so a class of ``L`` of the ``n`` rows gives ``L * k / n`` of the ``k`` carved rows, rounded up or
down. Regression targets have no classes: every row is in one group, and the carve is a plain seeded random draw.
The same labels, size and seed always carve the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from numbers import Integral, Real

import numpy as np

__all__ = ["HOLDOUT_SPLIT", "carve_holdout", "check_holdout_size", "holdout_count", "stratified_draw"]

#: name of the carved split: the one validation split of a run with ``holdout_size``
HOLDOUT_SPLIT = "holdout"

_FLAG = "data.init_args.holdout_size"


def stratified_draw(labels: np.ndarray, train_size: int, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw disjoint train and validation row indices that keep the class mix of ``labels``.

    Args:
        labels: class id of every row.
        train_size: number of training rows to draw.
        val_size: number of validation rows to draw (``train_size + val_size <= len(labels)``).
        seed: the draw depends on this alone.

    Returns:
        ``(train_rows, val_rows)``, each in random order.
    """
    rng = np.random.default_rng(seed)
    # Shuffle, then group rows by class; the stable sort keeps the shuffled order inside each class.
    order = rng.permutation(len(labels))
    order = order[np.argsort(labels[order], kind="stable")]
    # Evenly spaced picks over class-grouped rows take every class in proportion to its size (±1 row).
    val_picks = np.linspace(0, len(order), val_size, endpoint=False).astype(np.int64)
    rest = np.delete(order, val_picks)
    train_picks = np.linspace(0, len(rest), train_size, endpoint=False).astype(np.int64)
    return rng.permutation(rest[train_picks]), rng.permutation(order[val_picks])


def check_holdout_size(size: int | float | None) -> int | float | None:
    """``size`` if it is ``None``, a count (an integer >= 1) or a fraction in (0, 1); else a ``ValueError``.

    Args:
        size: the ``holdout_size`` option as given.
    """
    if size is None:
        return None
    if isinstance(size, bool) or not isinstance(size, Real):
        raise ValueError(f"holdout_size must be a count of training rows (an integer >= 1) or a fraction of them "
                         f"in (0, 1), got {size!r}; set {_FLAG} to e.g. 0.2, or leave it unset")
    if isinstance(size, Integral):
        if size < 1:
            raise ValueError(f"holdout_size={size} carves no row: give a count of training rows (an integer >= 1) "
                             f"or a fraction in (0, 1), e.g. {_FLAG}=0.2, or leave it unset to validate on the "
                             "task's own validation split")
        return int(size)
    if not 0 < size < 1:  # NaN fails this too
        raise ValueError(f"holdout_size={size!r} is a fraction of the training rows and must lie in (0, 1), e.g. "
                         f"{_FLAG}=0.2; for a number of rows write an integer (e.g. {_FLAG}=200)")
    return float(size)


def holdout_count(size: int | float, rows: int, source: str = "the training split") -> int:
    """The number of rows ``size`` carves out of ``rows``: the count itself, or the fraction of ``rows`` rounded
    to the nearest row (halves up), at least 1.

    Args:
        size: a checked ``holdout_size`` (:func:`check_holdout_size`).
        rows: the number of training rows to carve from.
        source: where the rows came from, for the message.

    Raises:
        ValueError: the carve would leave no training row.
    """
    count = size if isinstance(size, int) else max(1, int(size * rows + 0.5))
    if count >= rows:
        raise ValueError(f"{source}: holdout_size={size!r} carves {count} of its {rows} training rows, which leaves "
                         f"no row to train on; set {_FLAG} to fewer than {rows} rows or to a fraction such as 0.2")
    return count


def carve_holdout(labels: np.ndarray, size: int | float, seed: int, *, stratify: bool = True,
                  source: str = "the training split",
                  label_names: Sequence[str] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Split training rows into the rows that still train and the carved holdout, stratified by class.

    Args:
        labels: the label of every training row (its class id, or its target for regression).
        size: a checked ``holdout_size`` (:func:`check_holdout_size`): a count, or a fraction of the rows.
        seed: the carve depends on this (and on the labels and the size) alone.
        stratify: keep the class mix; ``False`` (regression targets): a plain seeded random draw.
        source: where the rows came from, for the messages.
        label_names: class names in id order, for the messages.

    Returns:
        ``(train_rows, holdout_rows)``: disjoint row indices covering every row, each in ascending order.

    Raises:
        ValueError: the carve leaves no training row, or some class would end up with no row in one of the two
            parts (too few rows to stratify); the message names the class, its rows and the fix.
    """
    rows = len(labels)
    count = holdout_count(size, rows, source)
    # Without classes every row is in one group, and the evenly spaced picks over the shuffled rows are a plain
    # seeded random draw.
    groups = labels if stratify else np.zeros(rows, dtype=np.int64)
    train_rows, holdout_rows = stratified_draw(groups, rows - count, count, seed)
    if stratify:
        _check_both_parts_hold_every_class(labels, holdout_rows, size, source, label_names)
    return np.sort(train_rows), np.sort(holdout_rows)


def _check_both_parts_hold_every_class(labels: np.ndarray, holdout_rows: np.ndarray, size: int | float, source: str,
                                       label_names: Sequence[str] | None) -> None:
    classes, totals = np.unique(labels, return_counts=True)
    carved = np.bincount(np.searchsorted(classes, labels[holdout_rows]), minlength=len(classes))
    rows, count = len(labels), len(holdout_rows)
    for label, total, taken in zip(classes, totals, carved, strict=True):
        if 0 < taken < total:
            continue
        name = f"label {int(label)}" if label_names is None else f"'{label_names[int(label)]}' (label {int(label)})"
        if total < 2:
            fix = "give the class at least 2 training rows (one for each part), or drop its row"
        elif taken == 0:
            # picks spaced rows / count apart land in every run of at least that many grouped rows
            least = -(-rows // int(total))  # ceil(rows / total)
            fix = f"raise {_FLAG} to at least {least} rows so the carve takes one of them"
        else:
            fix = f"lower {_FLAG} so that some of them stay in training"
        raise ValueError(f"{source}: class {name} has {total} of the {rows} training rows, too few to stratify a "
                         f"holdout of {count} rows (holdout_size={size!r}): the carve would take {taken} of them and "
                         f"leave {total - taken} to train on, and each class needs a row in both parts; {fix}")
