"""Checkpoint writes that a crash cannot truncate.

Lightning's default checkpoint IO opens the final path and writes into it: a process killed
mid-write leaves a truncated ``last.ckpt`` behind, and the run's last good state is gone.
:class:`AtomicCheckpointIO` writes to a temporary file in the same directory, flushes it to disk and
renames it over the final path, so the path always holds either the old or the new checkpoint. The
``flexlora`` CLI installs it whenever a run uses Lightning's default checkpoint IO.
"""

from __future__ import annotations

import io
import os
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

__all__ = ["AtomicCheckpointIO"]


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` whose local writes are atomic (temporary file, fsync, rename)."""

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO does not take storage_options, got {storage_options!r}")
        path = str(path)
        if "://" in path and not path.startswith("file://"):
            super().save_checkpoint(checkpoint, path)  # remote filesystems keep their own semantics
            return
        path = path.removeprefix("file://")
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        tmp = os.path.join(directory, f".{os.path.basename(path)}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
