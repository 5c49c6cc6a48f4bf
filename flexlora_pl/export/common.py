"""What the export formats share: the adapted model's backbone and method, the modules trained in full, and
output folders written atomically (a temporary sibling, then a rename) with the modes the umask gives."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from lightning.pytorch import LightningModule
from torch import nn

from flexlora_pl.core.inject import match_target
from flexlora_pl.methods.base import AdaptationMethod, recognize_method

__all__ = ["adapted", "atomic_output", "backbone_of", "check_output_dir", "saved_module_names"]


def backbone_of(model_or_module: nn.Module) -> nn.Module:
    """The model whose module paths peft and the checkpoints use: a LightningModule's ``backbone``."""
    backbone = getattr(model_or_module, "backbone", None)
    if isinstance(model_or_module, LightningModule) and isinstance(backbone, nn.Module):
        return backbone
    return model_or_module


def adapted(model_or_module: nn.Module) -> tuple[nn.Module, AdaptationMethod]:
    """The backbone and the method that adapted it: the module's ``method``, else the one its adapters show.

    Raises:
        ValueError: no registered method recognises an adapter in the model.
    """
    backbone = backbone_of(model_or_module)
    method = getattr(model_or_module, "method", None)
    return backbone, method if isinstance(method, AdaptationMethod) else recognize_method(backbone)


def saved_module_names(
    model_or_module: nn.Module,
    backbone: nn.Module,
    method: AdaptationMethod,
    modules_to_save: Sequence[str] | None = None,
) -> list[str]:
    """Names (relative to the backbone) of the modules trained in full, outermost only.

    Args:
        model_or_module: what the caller passed; its ``modules_to_save`` is the default.
        backbone: the adapted model.
        method: the method that adapted it.
        modules_to_save: names or patterns as in :func:`~flexlora_pl.inject_flexlora`; default: the module's
            own ``modules_to_save``, or, for a plain model, the modules owning trainable non-adapter parameters.

    Raises:
        ValueError: a pattern matches no module, or a trainable parameter belongs to the model root.
    """
    patterns = modules_to_save if modules_to_save is not None else getattr(model_or_module, "modules_to_save", None)
    if patterns is None:
        names = _trainable_owners(backbone, method)
    else:
        patterns = [patterns] if isinstance(patterns, str) else list(patterns)
        names = [n for n, _ in backbone.named_modules() if n and match_target(n, patterns)]
        unmatched = [p for p in patterns if not any(match_target(n, [p]) for n in names)]
        if unmatched:
            raise ValueError(f"modules_to_save {unmatched} match no module of {type(backbone).__name__}")
    return [n for n in names if not any(n.startswith(other + ".") for other in names)]


def _trainable_owners(backbone: nn.Module, method: AdaptationMethod) -> list[str]:
    """For a plain model: the modules owning trainable parameters besides the method's adapter parameters."""
    adapter = {id(p) for p in method.adapter_parameters(backbone)}
    owners: list[str] = []
    for name, param in backbone.named_parameters():
        if not param.requires_grad or id(param) in adapter:
            continue
        owner = name.rpartition(".")[0]
        if not owner:
            raise ValueError(
                f"parameter {name!r} is trainable and belongs to the model root: pass modules_to_save explicitly"
            )
        if owner not in owners:
            owners.append(owner)
    return owners


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
def atomic_output(out: Path, overwrite: bool) -> Iterator[Path]:
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
