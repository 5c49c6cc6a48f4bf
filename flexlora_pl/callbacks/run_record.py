"""``RunRecord``: every ``fit``, ``validate`` and ``test`` leaves ``metrics.json`` in its run folder.

The file is what results and cost tables are built from, so it holds everything needed to compare
runs without opening TensorBoard: the final and the best validation scores with their optimizer step
(and the best checkpoint), the test scores, the seed, the method, a hash of the configuration, the git
commit and package versions, wall time, peak memory and the trainable / active adapter parameter
counts. Each stage writes its own section (``fit``, ``validate``, ``test``); a ``test`` of a fitted run
adds its section to the fit's file. A run stopped by a signal or an error records ``status`` so that
a sweep can tell finished runs from interrupted ones.

Layout (keys that do not apply are absent)::

    {"run": {"dir", "name", "version", "seed", "method", "label_names", "method_facts", "config_hash", "git_commit",
             "versions"},
     "parameters": {"trainable", "active", "allocated", "modules_to_save", "frozen"},
     "fit": {"status", "global_step", "epoch", "wall_time_s", "peak_memory_mb",
             "final": {"step", <metric>: value, ...},
             "best": {"monitor", "mode", "value", "step", "checkpoint", "metrics": {...}},
             "history": [{"step", <metric>: value, ...}, ...],
             "allocation": {"events", "moved", "flip_flops", "flip_flop_window", "dead_ends", "dead_end_modules",
                            "new_direction_update_ratio", "final_total_rank"},
             "holdout": {"holdout_size", "rows", "train_rows", "seed", "stratified"},
             "carved_validation": {"val_size", "rows", "train_rows", "seed", "stratified"}},
     "validate": {"status", "ckpt_path", "metrics", "wall_time_s", "peak_memory_mb", "holdout", "carved_validation"},
     "test": {...same as validate...}}
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from flexlora_pl.callbacks.rank_reallocation import RankReallocation
from flexlora_pl.runs.atomic import write_json_atomic
from flexlora_pl.runs.run_folder import checkpoint_step

__all__ = ["METRICS_FILENAME", "RunRecord", "read_metrics"]

METRICS_FILENAME = "metrics.json"
_PACKAGES = ("torch", "lightning", "transformers", "peft", "timm", "torchmetrics", "datasets", "flexlora_pl")


class RunRecord(Callback):
    """Write the run's scores, settings and costs to ``metrics.json`` in the run folder.

    The ``flexlora`` command adds this callback to every run and fills in :attr:`config_hash`.

    Args:
        monitor: the validation metric that ranks checkpoints (the task's headline ``val/score``).
        mode: ``max`` or ``min``: whether a higher ``monitor`` is better.
        filename: name of the file in the run folder.
    """

    def __init__(self, monitor: str = "val/score", mode: str = "max", filename: str = METRICS_FILENAME) -> None:
        super().__init__()
        if mode not in ("max", "min"):
            raise ValueError(f"RunRecord: mode must be 'max' or 'min', got {mode!r}")
        self.monitor, self.mode, self.filename = monitor, mode, filename
        self.config_hash: str | None = None
        self.history: list[dict[str, float]] = []
        self._started = 0.0

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._started = time.perf_counter()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats()

    @override
    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if trainer.state.fn == "validate":
            self._write_eval(trainer, pl_module, "validate", "finished")
        else:
            self.history.append({"step": trainer.global_step, **_scalars(trainer, "val")})

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_fit(trainer, pl_module, "finished")

    @override
    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write_eval(trainer, pl_module, "test", "finished")

    @override
    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        status = "interrupted" if isinstance(exception, (KeyboardInterrupt, SystemExit)) else "failed"
        stage = trainer.state.fn
        if stage == "fit":
            self._write_fit(trainer, pl_module, status, error=exception)
        elif stage in ("validate", "test"):
            self._write_eval(trainer, pl_module, str(stage), status, error=exception)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    # ---------------------------------------------------------------- content
    def _write_fit(self, trainer: Trainer, pl_module: LightningModule, status: str,
                   error: BaseException | None = None) -> None:
        section: dict[str, Any] = {
            "status": status,
            "global_step": trainer.global_step,
            "epoch": trainer.current_epoch,
            **self._costs(),
        }
        if error is not None:
            section["error"] = _describe(error)
        allocation = _allocation_summary(trainer)
        if allocation is not None:
            section["allocation"] = allocation
        if self.history:
            section["final"] = self.history[-1]
            section["best"] = self._best(trainer)
            section["history"] = self.history
        self._write(trainer, pl_module, "fit", section)

    def _write_eval(self, trainer: Trainer, pl_module: LightningModule, stage: str, status: str,
                    error: BaseException | None = None) -> None:
        prefix = "val" if stage == "validate" else stage
        section: dict[str, Any] = {
            "status": status,
            "ckpt_path": _relative(trainer.ckpt_path, trainer),
            "checkpoint_step": checkpoint_step(trainer.ckpt_path) if trainer.ckpt_path else None,
            "metrics": _scalars(trainer, prefix),
            **self._costs(),
        }
        if error is not None:
            section["error"] = _describe(error)
        self._write(trainer, pl_module, stage, section)

    def _best(self, trainer: Trainer) -> dict[str, Any]:
        scored = [entry for entry in self.history if self.monitor in entry]
        if not scored:
            return {"monitor": self.monitor, "mode": self.mode, "value": None}
        pick = max if self.mode == "max" else min
        # ties go to the earliest step, as ModelCheckpoint keeps the first of equal scores
        best = pick(scored, key=lambda entry: entry[self.monitor])
        checkpoint = next((cb.best_model_path for cb in trainer.checkpoint_callbacks
                           if isinstance(cb, ModelCheckpoint) and cb.monitor == self.monitor and cb.best_model_path),
                          None)
        return {"monitor": self.monitor, "mode": self.mode, "value": best[self.monitor], "step": best["step"],
                "checkpoint": _relative(checkpoint, trainer), "metrics": best}

    def _costs(self) -> dict[str, float]:
        costs = {"wall_time_s": round(time.perf_counter() - self._started, 3)}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            costs["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            costs["peak_memory_kind"] = "cuda_max_memory_allocated"
        else:  # Linux reports the peak resident set size in KiB
            costs["peak_memory_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
            costs["peak_memory_kind"] = "process_peak_rss"
        return costs

    def _run_info(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
        logger = trainer.logger
        method = getattr(pl_module, "method", None)
        facts = method.facts() if callable(getattr(method, "facts", None)) else {}
        return {
            "dir": run_dir(trainer),
            "name": getattr(logger, "name", None),
            "version": getattr(logger, "version", None),
            "seed": _seed(),
            "method": getattr(pl_module, "method_name", "flexlora"),
            **({"label_names": list(names)} if (names := getattr(pl_module, "label_names", None)) else {}),
            **({"method_facts": facts} if facts else {}),
            "module": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "config_hash": self.config_hash,
            "git_commit": _git_commit(),
            "versions": _versions(),
            "world_size": trainer.world_size,
            "precision": str(trainer.precision),
        }

    @rank_zero_only
    def _write(self, trainer: Trainer, pl_module: LightningModule, stage: str, section: dict[str, Any]) -> None:
        path = Path(run_dir(trainer)) / self.filename
        record = read_metrics(path) if path.exists() else {}
        record["run"] = {**record.get("run", {}), **self._run_info(trainer, pl_module)}
        counts = getattr(pl_module, "parameter_counts", None)
        record["parameters"] = {
            "trainable": sum(p.numel() for p in pl_module.parameters() if p.requires_grad),
            **(counts() if callable(counts) else {}),
        }
        holdout = getattr(trainer.datamodule, "holdout", None)  # validated on rows carved out of training
        carved = getattr(trainer.datamodule, "carved_validation", None)  # a validation split carved out of training
        record[stage] = {**section, **({"holdout": holdout} if holdout is not None else {}),
                         **({"carved_validation": carved} if carved is not None else {})}
        write_json_atomic(path, record, indent=1)  # never a half-written file


def _allocation_summary(trainer: Trainer) -> dict[str, Any] | None:
    """What FlexLoRA's allocation events did: their number, flip-flops, dead ends, new directions' first updates."""
    realloc = next((cb for cb in trainer.callbacks if isinstance(cb, RankReallocation)), None)
    if realloc is None or not realloc.history:
        return None
    ratios = [event["new_direction_update_ratio"] for event in realloc.history if "new_direction_update_ratio" in event]
    return {
        "events": len(realloc.history),
        "moved": sum(len(event["pruned"]) + len(event["expanded"]) for event in realloc.history),
        "flip_flops": realloc.flip_flop_count,
        "flip_flop_window": realloc.flip_flop_window,
        "dead_ends": len(realloc.dead_ends),
        "dead_end_modules": realloc.dead_ends,
        "new_direction_update_ratio": sum(ratios) / len(ratios) if ratios else None,
        "final_total_rank": sum(realloc.history[-1]["ranks"]),
    }


def run_dir(trainer: Trainer) -> str:
    """The run folder: the first logger's log directory, else ``default_root_dir``."""
    return str(trainer.log_dir if trainer.loggers and trainer.log_dir else trainer.default_root_dir)


def read_metrics(path: str | os.PathLike) -> dict[str, Any]:
    """Read a run's ``metrics.json`` (a folder is taken to be the run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / METRICS_FILENAME
    return json.loads(path.read_text())


def _scalars(trainer: Trainer, prefix: str) -> dict[str, float]:
    return {name: float(value) for name, value in sorted(trainer.callback_metrics.items())
            if name.split("/")[0].startswith(prefix) and getattr(value, "numel", lambda: 1)() == 1}


def _relative(path: str | None, trainer: Trainer) -> str | None:
    """A checkpoint path relative to the run folder when it lies inside it (the folder can move)."""
    if not path:
        return None
    try:
        return os.path.relpath(path, run_dir(trainer)) if Path(path).resolve().is_relative_to(
            Path(run_dir(trainer)).resolve()) else str(path)
    except ValueError:
        return str(path)


def _describe(error: BaseException) -> str:
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _seed() -> int | None:
    value = os.environ.get("PL_GLOBAL_SEED")
    return int(value) if value not in (None, "") else None


def _versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def _git_commit() -> str | None:
    """The commit of the flexlora_pl source tree (``+dirty`` with local changes), if it is a git checkout."""
    source = Path(__file__).resolve().parent
    try:
        head = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(source), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "") if head else None
