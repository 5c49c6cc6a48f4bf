"""Which run folder and which checkpoint a command uses, decided from the parsed config before anything is built.

Every run writes into its own folder ``<save_dir>/<name>/version_<n>/`` (the logger's). A new ``fit`` gets
the next free version and never writes into another run's folder; ``--ckpt_path last`` resumes the most
trained checkpoint of the run named by ``--name``/``--version`` (default: the newest run of the config that
has one); ``--ckpt_path best`` evaluates the checkpoint the run recorded as its best; ``validate``, ``test``
and ``predict`` of a checkpoint write into that checkpoint's run folder.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from flexlora_pl.runs.run_folder import RunFolder, newest_trained_checkpoint, run_folder_of, version_dirname, versions

__all__ = ["SPECIAL_CKPT_PATHS", "RecordedBest", "best_checkpoint", "last_checkpoint", "locate_run", "logger_args",
           "resolve_run"]

#: ``--ckpt_path`` values that name no file: Lightning's and this project's keywords
SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")

#: reads the best checkpoint a run folder records (``metrics.json``'s ``fit.best``; ``{}`` when none)
RecordedBest = Callable[[Path], Mapping[str, Any]]


def logger_args(config: Any) -> Any:
    """The init_args of the run's logger (the first one) when it has a run folder, else ``None``.

    Args:
        config: the subcommand's parsed config.
    """
    logger = (config.get("trainer") or {}).get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    init_args = getattr(logger, "init_args", None) if logger is not None and not isinstance(logger, bool) else None
    if init_args is None or "save_dir" not in init_args or "name" not in init_args:
        return None
    return init_args


def resolve_run(subcommand: str, config: Any, recorded_best: RecordedBest) -> RunFolder | None:
    """Point the logger at the run folder of ``config`` and turn ``--ckpt_path last|best`` into a file.

    ``config`` is changed in place: the logger's ``name``, ``save_dir`` and ``version``, and ``ckpt_path``.

    Args:
        subcommand: ``fit``, ``validate``, ``test`` or ``predict``.
        config: the subcommand's parsed config (with ``name``, ``version`` and ``ckpt_path``).
        recorded_best: reads the best checkpoint a run folder records, for ``--ckpt_path best``.

    Returns:
        The existing run folder the command works in (a ``fit`` from it resumes that run), or ``None`` when
        the command starts a new run folder.

    Raises:
        ValueError: when the flags contradict each other or the run folders (the message says which flag to
            change).
    """
    logger = logger_args(config)
    ckpt_path = config.get("ckpt_path")
    if logger is None:
        if config.get("name") is not None or config.get("version") is not None or ckpt_path == "last":
            raise ValueError("--name, --version and --ckpt_path last need a logger with a run folder: configure "
                             "trainer.logger (e.g. lightning.pytorch.loggers.TensorBoardLogger with save_dir and "
                             "name)")
        return None
    if config.get("name") is not None:
        logger.name = config.name
    if config.get("version") is not None:
        logger.version = config.version
    save_dir, name = str(logger.save_dir), str(logger.name)
    if ckpt_path is None:
        if logger.version is not None:
            folder = RunFolder(save_dir, name, version_dirname(logger.version))
            if folder.path.is_dir() and any(folder.path.iterdir()):
                raise ValueError(
                    f"run folder {folder.path} already exists and holds files; a new run never writes into "
                    f"another run's folder. Resume it with --ckpt_path last --version {logger.version}, or "
                    "choose another --version (or none: the next free version)"
                )
        if subcommand != "fit":
            rank_zero_warn(
                f"`flexlora {subcommand}` without --ckpt_path evaluates the model as built from the config, with "
                "freshly initialised adapters and task head: its scores say nothing about a trained run. Pass "
                "--ckpt_path (a .ckpt file, or 'last' / 'best' with --name/--version) to evaluate a trained run."
            )
        return None
    if ckpt_path in ("last", "best"):
        if ckpt_path == "best" and subcommand == "fit":
            raise ValueError("--ckpt_path best is for validate/test/predict; to resume a fit use --ckpt_path last")
        folder = locate_run(save_dir, name, logger.version)
        path = best_checkpoint(folder, recorded_best) if ckpt_path == "best" else last_checkpoint(folder)
        config.ckpt_path = str(path)
    else:
        folder = run_folder_of(ckpt_path)
        if folder is None:
            return None  # a checkpoint outside any run folder: a new run folder starts from it
        if subcommand == "fit" and (Path(folder.save_dir).resolve() / folder.name) != (
                Path(save_dir).resolve() / name):
            raise ValueError(
                f"--ckpt_path {ckpt_path!r} belongs to run {folder.path}, not to a run of this config "
                f"({Path(save_dir) / name}); resuming it here would mix two runs. Resume with the config of that "
                f"run, or pass --name {folder.name} if it is the same experiment under another name"
            )
        logger.save_dir, logger.name = folder.save_dir, folder.name
    if logger.version is not None and version_dirname(logger.version) != folder.version:
        raise ValueError(f"--ckpt_path {config.ckpt_path!r} lies in run folder {folder.path}, but --version "
                         f"{logger.version} names another run; drop --version or make them agree")
    logger.version = folder.logger_version()
    return folder


def locate_run(save_dir: str, name: str, version: int | str | None) -> RunFolder:
    """The run named by ``version``, or the newest run of ``name`` that holds a checkpoint.

    Args:
        save_dir: the logger's root folder.
        name: the run's name.
        version: ``--version`` (``None``: the newest run with a checkpoint).
    """
    known = versions(save_dir, name)
    if version is not None:
        folder = RunFolder(save_dir, name, version_dirname(version))
        if not folder.path.is_dir():
            raise ValueError(f"no run folder {folder.path}; runs of '{name}' under {save_dir!r}: {known or 'none'}")
        return folder
    for candidate in reversed(known):
        folder = RunFolder(save_dir, name, candidate)
        if newest_trained_checkpoint(folder) is not None:
            return folder
    raise ValueError(
        f"no run of '{name}' under {save_dir!r} holds a checkpoint (runs: {known or 'none'}), so there is nothing to "
        "resume or evaluate; start a new run without --ckpt_path, or name the run with --name/--version"
    )


def last_checkpoint(folder: RunFolder) -> Path:
    """``--ckpt_path last``: the most trained checkpoint of ``folder`` (see :func:`newest_trained_checkpoint`)."""
    found = newest_trained_checkpoint(folder)
    if found is None:
        raise ValueError(f"run folder {folder.path} holds no readable checkpoint in checkpoints/; nothing to resume. "
                         "Start a new run without --ckpt_path.")
    path, step = found
    rank_zero_info(f"--ckpt_path last: {path} (optimizer step {step}, the most trained state of {folder.path})")
    return path


def best_checkpoint(folder: RunFolder, recorded_best: RecordedBest) -> Path:
    """``--ckpt_path best``: the checkpoint ``folder`` records as its best.

    Args:
        folder: the run folder.
        recorded_best: reads the run's best entry (``checkpoint`` relative to the run folder, ``monitor``,
            ``value``, ``step``).
    """
    best = recorded_best(folder.path)
    if not best.get("checkpoint"):
        raise ValueError(f"run {folder.path} records no best checkpoint (metrics.json fit.best.checkpoint); the run "
                         "needs a ModelCheckpoint that monitors val/score. Give a .ckpt path or 'last' instead.")
    path = folder.path / best["checkpoint"]
    if not path.is_file():
        raise ValueError(f"the best checkpoint recorded for run {folder.path}, {path}, does not exist any more")
    rank_zero_info(f"--ckpt_path best: {path} ({best['monitor']}={best['value']} at optimizer step {best['step']})")
    return path
