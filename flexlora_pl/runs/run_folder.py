"""Run folders: one folder per run, ``<save_dir>/<name>/version_<n>/``, holding everything the run writes.

A run's TensorBoard events, ``config.yaml``, checkpoints (``checkpoints/``), ``rank_pattern.json``,
``metrics.json`` and predictions all live in its folder, so two runs never share a file and a resume
can only continue the run it names. This module finds those folders and the newest *trained* state
inside one; the ``flexlora`` command uses it to resolve ``--ckpt_path last`` and ``--version``.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["RunFolder", "newest_trained_checkpoint", "run_folder_of", "versions"]

_VERSION = re.compile(r"^version_(\d+)$")


@dataclass(frozen=True)
class RunFolder:
    """Where one run lives: ``<save_dir>/<name>/<version>``.

    Args:
        save_dir: the logger's root folder (``runs`` in the shipped configs).
        name: the run's name (one per config, e.g. ``demo``, ``glue_cola``).
        version: ``version_<n>`` or a custom version string.
    """

    save_dir: str
    name: str
    version: str

    @property
    def path(self) -> Path:
        return Path(self.save_dir) / self.name / self.version

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    def logger_version(self) -> int | str:
        """The ``version`` argument that makes a TensorBoard or CSV logger write into this folder."""
        match = _VERSION.match(self.version)
        return int(match.group(1)) if match else self.version


def version_dirname(version: int | str) -> str:
    """``3`` → ``version_3``; a string is a folder name as it is (Lightning's loggers do the same)."""
    return f"version_{version}" if isinstance(version, int) else str(version)


def versions(save_dir: str | os.PathLike, name: str) -> list[str]:
    """The run folders of ``name``, oldest first: ``version_<n>`` by number, then custom names by time."""
    root = Path(save_dir) / name
    if not root.is_dir():
        return []
    numbered, custom = [], []
    for child in root.iterdir():
        if not child.is_dir():
            continue
        match = _VERSION.match(child.name)
        if match:
            numbered.append((int(match.group(1)), child.name))
        else:
            custom.append((child.stat().st_mtime, child.name))
    return [n for _, n in sorted(numbered)] + [n for _, n in sorted(custom)]


def run_folder_of(checkpoint: str | os.PathLike) -> RunFolder | None:
    """The run folder a checkpoint lies in (``.../<name>/<version>/checkpoints/x.ckpt``), or ``None``."""
    path = Path(checkpoint).resolve()
    if path.parent.name != "checkpoints" or len(path.parents) < 4:
        return None
    version_dir = path.parent.parent
    return RunFolder(str(version_dir.parent.parent), version_dir.parent.name, version_dir.name)


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The ``global_step`` a Lightning checkpoint was written at, or ``None`` if the file is unreadable."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a truncated or foreign file is simply not a candidate
        return None
    step = checkpoint.get("global_step") if isinstance(checkpoint, dict) else None
    return int(step) if isinstance(step, int) else None


def newest_trained_checkpoint(folder: RunFolder) -> tuple[Path, int] | None:
    """The checkpoint of the run with the most optimizer steps, and that step (``None``: no checkpoint).

    Every ``.ckpt`` of the run's ``checkpoints/`` folder is a candidate (``last``, periodic, best and
    interrupt checkpoints). The most *trained* state wins, not the newest file: an interrupt checkpoint
    written by a run that stopped early never hides a later ``last.ckpt``. Ties go to the newer file.
    """
    candidates = []
    for path in folder.checkpoint_dir.glob("*.ckpt"):
        step = checkpoint_step(path)
        if step is not None:
            candidates.append((step, path.stat().st_mtime, path))
    if not candidates:
        return None
    step, _, path = max(candidates)
    return path, step
