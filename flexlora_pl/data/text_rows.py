"""One loaded text split and its rows: the checks every split passes before tokenisation, and the batching.

:func:`check_columns` and :func:`check_text` raise a ``ValueError`` that names the file or split, the column,
the first bad row and the fix; :func:`tokenize_batch` and :class:`PaddingCollator` turn checked rows into
dynamically padded batches (each as wide as its longest row).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import torch
from datasets import Dataset
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

__all__ = ["PaddingCollator", "RawSplit", "check_columns", "check_text", "split_label", "tokenize_batch"]


@dataclass(frozen=True)
class RawSplit:
    """One split as a subclass loaded it, before checks and tokenisation.

    Args:
        data: the rows.
        source: where they came from (file path(s) or hub name), used in error messages.
    """

    data: Dataset
    source: str


def split_label(source: str, split: str) -> str:
    return f"{source} (split '{split}')"


def check_columns(data: Dataset, required: Sequence[str], *, source: str, split: str) -> None:
    """Raise a ``ValueError`` naming the missing columns and the ones found.

    Args:
        data: the rows to check.
        required: column names that must be present.
        source: file path(s) or hub name, for the message.
        split: split name, for the message.
    """
    missing = [name for name in required if name not in data.column_names]
    if missing:
        raise ValueError(
            f"{split_label(source, split)}: missing column(s) {missing}; columns found: {data.column_names}. "
            f"Rename the columns so that the file has {list(required)}."
        )


def check_text(data: Dataset, column: str, *, source: str, split: str) -> None:
    values = data.with_format("arrow")[column]
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        raise ValueError(f"{split_label(source, split)}: column '{column}' must hold text but has type "
                         f"{values.type}; check that the right column is used for '{column}'.")
    if values.null_count:
        row = pc.index(pc.is_null(values), True).as_py()
        raise ValueError(f"{split_label(source, split)}: column '{column}' is empty at row {row} (0-based, header "
                         "excluded); fill in or drop that row.")


def tokenize_batch(batch: dict[str, list[Any]], tokenizer: PreTrainedTokenizerBase, text_columns: list[str],
                    max_length: int) -> dict[str, list[Any]]:
    # No padding here: the collator pads each batch to its own longest row.
    return dict(tokenizer(*(batch[name] for name in text_columns), truncation=True, max_length=max_length))


class PaddingCollator:
    """Pads a list of tokenised rows to the longest one and fixes the label dtype.

    A module-level class (not a closure) so that ``DataLoader`` workers can pickle it.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, label_dtype: torch.dtype) -> None:
        self.pad = DataCollatorWithPadding(tokenizer, padding="longest")
        self.label_dtype = label_dtype

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = dict(self.pad(rows))
        if "labels" in batch:
            batch["labels"] = batch["labels"].to(self.label_dtype)
        return batch
