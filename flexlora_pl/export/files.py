"""Output folders written atomically (temporary sibling, then rename) with the modes the umask gives."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_output_dir(out_dir: str | Path, overwrite: bool = False) -> Path:
    """Validate an output directory before any work: absent, empty, or replaceable with ``overwrite``.

    Args:
        out_dir: the directory an export will create.
        overwrite: whether an existing non-empty directory may be replaced.

    Returns:
        ``out_dir`` as a ``Path``.

    Raises:
        FileExistsError: ``out_dir`` is a file, or a non-empty directory and ``overwrite`` is false.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output path {out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} exists and is not empty: choose another or pass overwrite")
    return out


@contextlib.contextmanager
def _atomic_output(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``out``, on failure it is removed.

    The output gets the modes of any file the user creates (``0o666``/``0o777`` less the umask), not
    the private ones of temporary files: ``tempfile.mkdtemp`` makes ``0o700`` directories, and
    safetensors (>= 0.7) writes each file through a ``0o600`` temporary file that it renames.
    """
    check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    # A sibling, so that the final rename stays on one file system and is atomic.
    tmp = _make_sibling_dir(out, "tmp")
    try:
        yield tmp
        _follow_umask(tmp, dir_mode=tmp.stat().st_mode & 0o777)
        _replace_dir(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _make_sibling_dir(out: Path, kind: str) -> Path:
    """Create a new hidden directory next to ``out`` with the umask's mode (``mkdtemp`` would make it 0o700)."""
    for _ in range(100):
        candidate = out.parent / f".{out.name}.{kind}-{secrets.token_hex(4)}"
        try:
            candidate.mkdir(mode=0o777)  # the mode is reduced by the umask, as for any new directory
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"could not create a temporary directory next to {out}: clean up {out.parent}")


def _follow_umask(root: Path, dir_mode: int) -> None:
    """Give every directory under ``root`` ``dir_mode`` and every file ``dir_mode`` less the execute bits.

    ``dir_mode`` is the mode of a directory just created with ``0o777``, i.e. ``0o777 & ~umask``; reading
    the umask this way needs no ``os.umask`` call, which would change it for every thread for a moment.
    """
    file_mode = dir_mode & 0o666
    for path, dirs, files in os.walk(root):
        for name, mode in [(d, dir_mode) for d in dirs] + [(f, file_mode) for f in files]:
            entry = os.path.join(path, name)
            if not os.path.islink(entry):  # chmod would change the link's target, maybe outside the output
                os.chmod(entry, mode)


def _replace_dir(new: Path, out: Path) -> None:
    """Rename ``new`` to ``out``; an existing ``out`` is moved aside first and restored if that fails."""
    if not out.exists():
        new.rename(out)
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    out.rename(aside / out.name)
    try:
        new.rename(out)
    except OSError:
        (aside / out.name).rename(out)
        raise
    finally:
        shutil.rmtree(aside, ignore_errors=True)
