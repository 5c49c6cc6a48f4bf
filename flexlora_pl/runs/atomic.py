"""Atomic file writes: a reader (or a crash) never sees a half-written file.

The text goes to ``<name>.tmp`` beside the target first and replaces the target with one ``os.replace``,
which is atomic on POSIX and Windows when both live in one folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["write_json_atomic", "write_text_atomic"]


def write_text_atomic(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (its folder is created); returns the path.

    Args:
        path: the file to write.
        text: its whole content.
        encoding: the text's encoding.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding=encoding)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | os.PathLike, value: Any, indent: int | None = None) -> Path:
    """Write ``value`` as JSON (one trailing newline) to ``path`` atomically; values JSON lacks become strings."""
    return write_text_atomic(path, json.dumps(value, indent=indent, default=str) + "\n")
