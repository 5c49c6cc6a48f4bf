"""Reading data files: CSV, TSV, JSON/JSONL and Parquet by extension, in a given text encoding.

A file that does not decode in the configured encoding is reported with the file, the split, the bad bytes,
their offset and line, and the fix, before ``datasets`` sees it (its own error names none of these).
"""

from __future__ import annotations

import codecs
import csv
import os
import tempfile
from collections.abc import Sequence
from typing import Any

from datasets import Dataset, load_dataset

__all__ = ["DataFileNotFoundError", "check_encoding", "load_data_files"]

# Text files are checked for decoding errors in chunks of this many bytes.
_DECODE_CHUNK = 1 << 24


# file extension -> (``datasets`` builder, extra builder kwargs)
_FILE_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    # GLUE's own TSVs contain unbalanced quote characters inside sentences, so quotes are not special.
    ".tsv": ("csv", {"sep": "\t", "quoting": csv.QUOTE_NONE}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}


def check_encoding(encoding: str) -> str:
    """Return ``encoding`` if Python can decode text with it, else raise a ``ValueError`` that says what to use.

    Args:
        encoding: a codec name such as ``"utf-8"``, ``"latin-1"`` or ``"cp1252"``.
    """
    try:
        info = codecs.lookup(encoding)
    except (LookupError, TypeError):
        info = None
    # codecs also holds bytes-to-bytes transforms (base64, zlib, ...), which cannot decode a text file.
    if info is None or not getattr(info, "_is_text_encoding", True):
        raise ValueError(f"encoding={encoding!r} is not a known text encoding; set data.init_args.encoding to the "
                         "encoding the data files were saved in, as a Python codec name such as 'utf-8', "
                         "'latin-1', 'cp1252' or 'utf-16'")
    return encoding


def _is_utf8(encoding: str) -> bool:
    return codecs.lookup(encoding).name == "utf-8"


class DataFileNotFoundError(FileNotFoundError, ValueError):
    """A configured data file does not exist (also a ``ValueError``: it is a configuration mistake)."""


def load_data_files(paths: str | Sequence[str], *, split: str | None = None, encoding: str | None = None,
                    file_format: str | None = None) -> Dataset:
    """Load CSV, TSV, JSON/JSONL or Parquet file(s) into one ``Dataset``, choosing the reader by extension.

    Args:
        paths: one file or several files of the same format (rows are concatenated in order).
        split: the split these files are for, named in error messages (optional).
        encoding: text encoding of CSV, TSV and JSON/JSONL files (``None``: UTF-8); Parquet ignores it.
        file_format: read every file as ``"csv"``, ``"tsv"``, ``"json"``, ``"jsonl"`` or ``"parquet"``, whatever
            its extension; ``None``: choose by extension.

    Raises:
        DataFileNotFoundError: a file does not exist.
        ValueError: unknown extension, mixed formats, no files, an unknown encoding, or a file that is not valid
            text in ``encoding`` (the message names the file, the byte offset and line, and the fix).
    """
    files = [paths] if isinstance(paths, str) else list(paths)
    for_split = f" for split '{split}'" if split is not None else ""
    encoding = check_encoding("utf-8" if encoding is None else encoding)
    if not files:
        raise ValueError(f"no data files given{for_split}: pass at least one file path")
    for path in files:
        if not os.path.isfile(path):
            raise DataFileNotFoundError(f"data file{for_split} not found: {path!r}; check the path (relative "
                                        f"paths are resolved from {os.getcwd()!r})")
    extensions = {os.path.splitext(path)[1].lower() for path in files}
    if file_format is not None:  # the format named, not the extensions
        extensions = {"." + str(file_format).lower().lstrip(".")}
        if not extensions <= _FILE_FORMATS.keys():
            raise ValueError(f"file format {file_format!r} is not one of "
                             f"{[name.lstrip('.') for name in _FILE_FORMATS]}")
    unknown = sorted(extensions - _FILE_FORMATS.keys())
    if unknown:
        raise ValueError(f"{files}: unsupported file extension(s) {unknown}; use one of {sorted(_FILE_FORMATS)}")
    if len(extensions) > 1:
        raise ValueError(f"{files}: files of one split must share a format, got {sorted(extensions)}")
    builder, kwargs = _FILE_FORMATS[extensions.pop()]
    if builder != "parquet":
        # Checked up front: `datasets` reports a CSV decoding failure as an opaque DatasetGenerationError with
        # offsets into its read buffers, and loads invalid UTF-8 from JSON Lines without complaint.
        for path in files:
            _check_decodable(path, encoding, for_split)
    if builder == "csv":
        kwargs = {**kwargs, "encoding": encoding}
    try:
        if builder == "json" and not _is_utf8(encoding):
            return _load_json_transcoded(files, encoding)
        return load_dataset(builder, data_files=files, split="train", **kwargs)
    except Exception as err:
        # `datasets` fails on files without rows (zero bytes, or a header only) with unrelated-looking
        # errors; return an empty Dataset so the caller reports an empty split instead.
        if all(os.path.getsize(path) == 0 for path in files) or "corresponds to no data" in str(err):
            return Dataset.from_dict({})
        raise


def _load_json_transcoded(files: list[str], encoding: str) -> Dataset:
    """Load JSON/JSONL files that are not UTF-8 through UTF-8 copies (already checked to decode).

    The ``datasets`` JSON builder has an ``encoding`` option, but it parses a file that holds one JSON array
    before decoding it, so a non-UTF-8 array fails there. The copies and their Arrow cache live in a
    temporary folder; the rows are returned in memory.
    """
    with tempfile.TemporaryDirectory(prefix="flexlora_json_") as folder:
        copies = []
        for index, path in enumerate(files):
            with open(path, encoding=encoding) as source:
                text = source.read()
            copy = os.path.join(folder, f"{index}{os.path.splitext(path)[1]}")
            with open(copy, "w", encoding="utf-8") as file:
                file.write(text)
            copies.append(copy)
        return load_dataset("json", data_files=copies, split="train", cache_dir=os.path.join(folder, "cache"),
                            keep_in_memory=True)


def _check_decodable(path: str, encoding: str, for_split: str) -> None:
    """Raise a ``ValueError`` at the first byte of ``path`` that ``encoding`` cannot decode."""
    decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
    offset, line = 0, 1  # byte offset and 1-based line number of the start of the next chunk
    with open(path, "rb") as file:
        while True:
            chunk = file.read(_DECODE_CHUNK)
            pending = decoder.getstate()[0]  # bytes of an unfinished character held back from the last chunk
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError as err:
                # The error's positions refer to the held-back bytes followed by this chunk.
                data = bytes(err.object)
                position = offset - len(pending) + err.start
                line_number = line - pending.count(b"\n") + data.count(b"\n", 0, err.start)
                raise _undecodable_error(path, encoding, for_split, position, data[err.start:err.end], err.reason,
                                         line_number) from None
            if not chunk:
                return
            offset += len(chunk)
            line += chunk.count(b"\n")


def _undecodable_error(path: str, encoding: str, for_split: str, position: int, bad: bytes, reason: str,
                       line: int) -> ValueError:
    """Describe the bytes ``bad`` at byte ``position`` (on 1-based ``line``) of ``path`` that do not decode."""
    with open(path, "rb") as file:
        start = file.read(2)
        begin = max(0, position - 40)
        file.seek(begin)
        window = file.read(position - begin + len(bad) + 20)
    at = position - begin
    line_end = window.find(b"\n", at)
    context = window[window.rfind(b"\n", 0, at) + 1:len(window) if line_end < 0 else line_end].rstrip(b"\r")
    near = context.decode(encoding, errors="replace")
    if start in (codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE) and not codecs.lookup(encoding).name.startswith("utf-16"):
        fix = "The file starts with a UTF-16 byte-order mark: set data.init_args.encoding to utf-16."
    else:
        fix = (f"Set data.init_args.encoding to the encoding the file was saved in, e.g. latin-1 (cp1252 for "
               f"files from Windows or Excel), or re-save the file as {encoding}.")
    return ValueError(
        f"data file {path!r}{for_split} is not valid {encoding} text: byte(s) {bad.hex(' ')} at byte offset "
        f"{position} (line {line}, near {near!r}) cannot be decoded ({reason}). {fix}"
    )
