"""The configured loggers, checked and completed before anything is built: every run keeps its run folder.

A TensorBoard or CSV logger owns the run folder ``<save_dir>/<name>/version_<n>/`` (config.yaml, checkpoints,
``metrics.json``, ``rank_pattern.json``). MLflow and Weights & Biases keep their runs in their own stores, so
when the loggers (``--trainer.logger``) hold neither TensorBoard nor CSV, a ``CSVLogger`` is put first for them:
it owns the run folder, named by the tracker's ``save_dir`` and its run name (W&B ``name``, MLflow
``experiment_name``; ``--name`` still overrides), and the tracker gets the metrics, figures and tables beside it.
A logger whose package is missing (``mlflow``, ``wandb``) is refused here, naming the extra to install, and so is
an MLflow file store that the installed MLflow no longer opens.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["DEFAULT_RUN_ROOT", "check_logger_installed", "prepare_loggers"]

#: where run folders go when the configured tracker names no local folder (the shipped configs' ``save_dir``)
DEFAULT_RUN_ROOT = "runs"

_RUN_FOLDER_LOGGERS = (TensorBoardLogger, CSVLogger)


# Loggers that need a package this project does not install by default: class name → (module, how to install).
_TRACKER_PACKAGES = {
    "MLFlowLogger": ("mlflow", 'the trackers extra: pip install -e ".[trackers]" (or pip install mlflow-skinny)'),
    "WandbLogger": ("wandb", 'the trackers extra: pip install -e ".[trackers]" (or pip install wandb)'),
    "CometLogger": ("comet_ml", "pip install comet-ml"),
    "NeptuneLogger": ("neptune", "pip install neptune"),
}


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a module entry without a spec
        return False


def check_logger_installed(class_path: str, option: str = "trainer.logger") -> None:
    """Refuse a logger whose package is not installed, naming what to install.

    Args:
        class_path: the logger's class path as the config names it (``lightning.pytorch.loggers.MLFlowLogger``).
        option: the config option that names it, for the message.

    Raises:
        ValueError: the logger's package (``mlflow``, ``wandb``, ...) cannot be imported.
    """
    class_name = str(class_path).rsplit(".", 1)[-1]
    if class_name not in _TRACKER_PACKAGES:
        return
    module, install = _TRACKER_PACKAGES[class_name]
    if not _installed(module):
        raise ValueError(f"{option}: {class_name} needs the `{module}` package, which is not installed; install "
                         f"{install}, or choose another logger (lightning.pytorch.loggers.TensorBoardLogger or "
                         "CSVLogger need nothing more)")


def _owns_run_folder(class_path: str) -> bool:
    """Whether the logger class keeps ``<save_dir>/<name>/version_<n>`` (TensorBoard, CSV and their subclasses)."""
    module, _, name = str(class_path).rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(cls, type) and issubclass(cls, _RUN_FOLDER_LOGGERS)


def _run_folder_logger(tracker: Any) -> Namespace:
    """A CSVLogger config that keeps the run folder of a tracker's run."""
    args = getattr(tracker, "init_args", None) or Namespace()
    save_dir = args.get("save_dir") or DEFAULT_RUN_ROOT
    name = args.get("name") or args.get("experiment_name") or "default"
    return Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                     init_args=Namespace(save_dir=str(save_dir), name=str(name), version=None, prefix="",
                                         flush_logs_every_n_steps=100))


def _check_mlflow_store(args: Any) -> None:
    """Refuse an MLflow file store that the installed MLflow will not open (MLflow 3 wants a database)."""
    uri = args.get("tracking_uri") or f"file:{args.get('save_dir') or './mlruns'}"
    if not str(uri).startswith("file:"):
        return
    try:
        from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
    except ImportError:  # an MLflow from before file stores were retired: it opens them
        return
    if not MLFLOW_ALLOW_FILE_STORE.get():
        raise ValueError(f"trainer.logger: MLFlowLogger would keep its runs in the file store {uri!r}, which this "
                         "MLflow refuses; give it a database, e.g. --trainer.logger.init_args.tracking_uri "
                         "sqlite:///runs/mlflow.db (or a tracking server's URL), or set MLFLOW_ALLOW_FILE_STORE=true "
                         "to keep the file store")


def _place_sqlite_artifacts(entry: Any) -> None:
    """An MLflow SQLite store keeps artifacts beside its database, not in ``./mlruns`` of whatever folder the command
    ran in (MLflow's default for a new experiment): ``artifact_location`` defaults to ``<db folder>/mlflow-artifacts``.
    A tracking server decides for itself; an explicit ``artifact_location`` is kept."""
    args = getattr(entry, "init_args", None)
    uri = str(args.get("tracking_uri") or "") if args is not None else ""
    if not uri.startswith("sqlite:///") or args.get("artifact_location"):
        return
    database = Path(uri[len("sqlite:///"):])
    args["artifact_location"] = str((database.parent / "mlflow-artifacts").resolve())


def prepare_loggers(config: Any) -> None:
    """Check the configured loggers and put the one that owns the run folder first (``config`` changed in place).

    Args:
        config: the subcommand's parsed config.

    Raises:
        ValueError: a logger's package is not installed (the message names the extra to install), or an MLflow
            logger names a file store that MLflow refuses.
    """
    trainer = config.get("trainer")
    logger = trainer.get("logger") if trainer is not None else None
    if logger is None or isinstance(logger, bool):
        return
    loggers = list(logger) if isinstance(logger, list) else [logger]
    for entry in loggers:
        check_logger_installed(getattr(entry, "class_path", ""))
        if str(getattr(entry, "class_path", "")).rsplit(".", 1)[-1] == "MLFlowLogger":
            _check_mlflow_store(getattr(entry, "init_args", None) or Namespace())
            _place_sqlite_artifacts(entry)
    if not loggers or _owns_run_folder(getattr(loggers[0], "class_path", "")):
        return
    owner = next((entry for entry in loggers if _owns_run_folder(getattr(entry, "class_path", ""))), None)
    if owner is not None:  # the run folder belongs to the first logger (Lightning's log_dir, the checkpoints)
        loggers.remove(owner)
    else:
        owner = _run_folder_logger(loggers[0])
        rank_zero_info(f"trainer.logger: {str(loggers[0].class_path).rsplit('.', 1)[-1]} keeps its runs in its own "
                       f"store; a CSVLogger keeps the run folder under {owner.init_args.save_dir}/"
                       f"{owner.init_args.name}/ (config.yaml, checkpoints, metrics.json, metrics.csv)")
    trainer.logger = [owner, *loggers]
