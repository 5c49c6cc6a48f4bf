"""The ``flexlora`` command: LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

    flexlora fit --config configs/demo.yaml
    flexlora fit --config configs/glue_cola.yaml --trainer.devices 2 --trainer.precision bf16-mixed
    flexlora fit --config configs/glue_rte.yaml --print_config

Model and data are chosen by ``class_path`` (any ``FlexLoRAModule`` subclass and any
``LightningDataModule``), so researchers plug their own classes in from YAML. Values that follow from
the data are linked, not typed twice: the number of labels, the validation split names and the task's
metric set come from the data module; the tokenizer follows the model. The total number of optimizer
steps comes from the Trainer (see ``RankReallocation`` and ``LinearWarmupDecay``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from flexlora_pl.callbacks.interrupt_checkpoint import InterruptCheckpoint, defer_stop_to_optimizer_step
from flexlora_pl.callbacks.prediction_writer import PredictionWriter
from flexlora_pl.callbacks.rank_reallocation import RankReallocation
from flexlora_pl.callbacks.run_record import METRICS_FILENAME, RunRecord, read_metrics
from flexlora_pl.module import FlexLoRAModule
from flexlora_pl.runs.checkpoint_io import AtomicCheckpointIO
from flexlora_pl.runs.run_folder import RunFolder, newest_trained_checkpoint, run_folder_of, version_dirname, versions

__all__ = ["FlexLoRACLI", "RunInterrupted", "build_cli", "main"]


def _task_of(data: LightningDataModule) -> str | None:
    """The metric set for the model: a GLUE task name, else chosen from the number of labels."""
    return getattr(getattr(data, "task", None), "name", None)


class RunInterrupted(SystemExit):
    """A run stopped by SIGTERM or Ctrl-C; the exit status is ``128 + signal`` (143 or 130), never 0."""


class FlexLoRACLI(LightningCLI):
    """LightningCLI with run folders, the reallocation config group and the data → model links.

    Every run writes into its own folder ``<save_dir>/<name>/version_<n>/`` (the logger's), and the
    command says which. ``--ckpt_path last`` resumes the most trained checkpoint of the run named by
    ``--name``/``--version`` (default: the newest run of the config that has one); ``validate``,
    ``test`` and ``predict`` of a checkpoint write into that checkpoint's run folder.
    """

    # model arguments filled in from the data module at instantiation (not set in configs)
    linked_model_args = ("num_labels", "val_split_names", "task", "label_names")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.run_folder: RunFolder | None = None
        self._resuming = False
        self._stop_signal: int | None = None
        super().__init__(*args, **kwargs)

    # ----------------------------------------------------------------- parser
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(RankReallocation, "reallocation")
        parser.add_argument("--name", type=str | None, default=None,
                            help="Run name: the run folder is <save_dir>/<name>/<version> (default: the logger's "
                                 "name in the config).")
        parser.add_argument("--version", type=int | str | None, default=None,
                            help="Run version: 3 means version_3, a string names the folder (default for a new run: "
                                 "the next free version_<n>; with --ckpt_path last: the newest run with a checkpoint).")
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer_name_or_path")
        parser.link_arguments("data.num_labels", "model.init_args.num_labels", apply_on="instantiate")
        parser.link_arguments("data.val_split_names", "model.init_args.val_split_names", apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.task", compute_fn=_task_of, apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.label_names", compute_fn=_label_names_of,
                              apply_on="instantiate")
        # image models (ImageClassifier): the class count and the preprocessing (a timm data config) of the data
        parser.link_arguments("data", "model.init_args.num_classes", apply_on="instantiate",
                              compute_fn=lambda data: getattr(data, "num_classes", None))
        parser.link_arguments("data", "model.init_args.data_config", apply_on="instantiate",
                              compute_fn=lambda data: getattr(data, "data_config", None))

    # -------------------------------------------------------- run resolution
    def _parse_ckpt_path(self) -> None:
        """Resolve the run folder and ``--ckpt_path`` before anything runs, and check them against the config.

        Lightning would merge the checkpoint's hyper-parameters over the config, silently dropping a
        changed ``max_rank`` or ``target_modules``; here every such difference is an error instead.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        _refuse_misplaced_callbacks(config)
        self._resolve_run(subcommand, config)
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in _SPECIAL_CKPT_PATHS and "://" not in str(ckpt_path):
            self._check_checkpoint_matches_config(subcommand, ckpt_path)

    def _resolve_run(self, subcommand: str, config: Any) -> None:
        logger = _logger_args(config)
        ckpt_path = config.get("ckpt_path")
        if logger is None:
            if config.get("name") is not None or config.get("version") is not None or ckpt_path == "last":
                raise ValueError("--name, --version and --ckpt_path last need a logger with a run folder: configure "
                                 "trainer.logger (e.g. lightning.pytorch.loggers.TensorBoardLogger with save_dir and "
                                 "name)")
            return
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
            return
        if ckpt_path in ("last", "best"):
            if ckpt_path == "best" and subcommand == "fit":
                raise ValueError("--ckpt_path best is for validate/test/predict; to resume a fit use --ckpt_path last")
            folder = _locate_run(save_dir, name, logger.version)
            path = _best_checkpoint(folder) if ckpt_path == "best" else _last_checkpoint(folder)
            config.ckpt_path = str(path)
        else:
            folder = run_folder_of(ckpt_path)
            if folder is None:
                return  # a checkpoint outside any run folder: a new run folder starts from it
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
        self.run_folder = folder
        self._resuming = subcommand == "fit"

    def _check_checkpoint_matches_config(self, subcommand: str, ckpt_path: str) -> None:
        checkpoint = read_checkpoint(ckpt_path)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        model_config = self.config[subcommand].get("model")
        if not hparams or model_config is None:
            return
        saved_class = hparams.pop("_class_path", None)
        hparams.pop("_instantiator", None)
        if saved_class and model_config.get("class_path") and saved_class != model_config.class_path:
            raise ValueError(
                f"--ckpt_path {ckpt_path!r} was saved by {saved_class} but the config builds "
                f"{model_config.class_path}; resume with the model class that wrote it"
            )
        init_args = model_config.get("init_args") or {}
        differences = [
            difference for key, saved in hparams.items()
            if key in init_args and key not in self.linked_model_args
            for difference in _differences(key, _plain(init_args[key]), _plain(saved))
        ]
        if differences:
            raise ValueError(
                f"--ckpt_path {ckpt_path!r} does not match the model config: " + "; ".join(differences)
                + ". Resume with the settings the checkpoint was trained with (drop the changed model "
                "arguments), or start a new run without --ckpt_path."
            )

    # --------------------------------------------------------------- trainer
    def before_instantiate_classes(self) -> None:
        subcommand = self.subcommand
        if subcommand is None:
            return
        # A fresh fit saves config.yaml; a resume or an evaluation of the run adds its own file beside it.
        fresh_fit = subcommand == "fit" and not self._resuming
        self.save_config_kwargs["config_filename"] = "config.yaml" if fresh_fit else (
            "config.fit-resume.yaml" if subcommand == "fit" else f"config.{subcommand}.yaml")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default: make writes atomic
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        configured = list(config.get("callbacks") or [])
        if config.get("enable_progress_bar") is False and any(isinstance(cb, ProgressBar) for cb in configured):
            # `--trainer.enable_progress_bar false` over a config that adds a progress bar (the shipped ones add
            # RichProgressBar) means: no bar; Lightning would refuse the pair after the model was built
            configured = [cb for cb in configured if not isinstance(cb, ProgressBar)]
            config["callbacks"] = configured
        extra = [*callbacks]
        record = next((cb for cb in configured if isinstance(cb, RunRecord)), None)
        if record is None:
            record = RunRecord()
            extra.append(record)
        record.config_hash = self._config_hash()
        if self.subcommand == "predict" and not any(isinstance(cb, PredictionWriter) for cb in configured):
            # the task names the writer its predictions need (generations: one JSONL per set)
            extra.append(getattr(self.model, "prediction_writer_class", PredictionWriter)())
        return super()._instantiate_trainer(config, extra)

    def _config_hash(self) -> str | None:
        """A hash of what decides a run's result (model, data, reallocation, training length, precision).

        The seed is left out, so runs that differ only in their seed share the hash.
        """
        config = self.config.get(str(self.subcommand)) if self.subcommand else None
        if config is None:
            return None
        trainer = _plain(config.get("trainer") or {})
        keyed = {
            "model": _plain(config.get("model")),
            "data": _plain(config.get("data")),
            "reallocation": _plain(config.get("reallocation")),
            "trainer": {k: trainer.get(k) for k in _RESULT_TRAINER_KEYS},
        }
        return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------- run
    def _run_subcommand(self, subcommand: str) -> None:
        trainer = self.trainer
        created = _new_output_dirs(trainer)
        if trainer.loggers and trainer.log_dir:
            action = "resumes" if self._resuming else ("evaluates into" if self.run_folder else "writes")
            rank_zero_info(f"flexlora {subcommand}: this run {action} {trainer.log_dir}")
        restore_sigint = self._catch_sigint()
        try:
            super()._run_subcommand(subcommand)
        except BaseException as err:
            trained = subcommand == "fit" and _has_trained(trainer)
            if not trained:
                # Failed before its first optimizer step: nothing of value was written, so leave nothing behind.
                for path in created():
                    shutil.rmtree(path, ignore_errors=True)
            if isinstance(err, SIGTERMException):
                signum = self._stop_signal or signal.SIGTERM
                where = f" at optimizer step {trainer.global_step}" if subcommand == "fit" else ""
                message = f"flexlora {subcommand} stopped by {signal.Signals(signum).name}{where}."
                if trained and trainer.log_dir:
                    message += (f" Everything it wrote is in {trainer.log_dir}. Resume it with the same command plus "
                                f"--ckpt_path last --version {_version_of(trainer)}")
                rank_zero_info(message)
                raise RunInterrupted(128 + signum) from err
            if trained and trainer.log_dir:
                rank_zero_info(f"flexlora {subcommand} failed at optimizer step {trainer.global_step}; its logs and "
                               f"checkpoints are kept in {trainer.log_dir}")
            raise
        finally:
            restore_sigint()

    def _catch_sigint(self) -> Callable[[], None]:
        """First Ctrl-C: stop like SIGTERM, after the next optimizer step (exact resume); the second aborts.

        Both stops wait for the batch that steps the optimizer (:func:`defer_stop_to_optimizer_step`): with
        ``accumulate_grad_batches > 1`` a stop inside an accumulation window is held until the window's end.
        """
        defer_stop_to_optimizer_step(self.trainer)
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            if self._stop_signal is None:
                self._stop_signal = signum
                self.trainer._signal_connector.received_sigterm = True  # what SIGTERM sets; due after a step
                print("\nCtrl-C: stopping after the next optimizer step and writing a resumable checkpoint "
                      "(press Ctrl-C again to abort at once)", file=sys.stderr, flush=True)
                return
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)


_SPECIAL_CKPT_PATHS = ("last", "best", "hpc", "registry")
_RESULT_TRAINER_KEYS = ("max_epochs", "max_steps", "accumulate_grad_batches", "precision", "gradient_clip_val",
                        "gradient_clip_algorithm", "limit_train_batches", "devices", "num_nodes", "deterministic")


def _label_names_of(data: LightningDataModule) -> list[str] | None:
    names = getattr(data, "label_names", None)
    return list(names) if names else None


def _logger_args(config: Any) -> Any:
    """The init_args of the run's logger (the first one) when it has a run folder, else ``None``."""
    logger = (config.get("trainer") or {}).get("logger")
    if isinstance(logger, list):
        logger = logger[0] if logger else None
    init_args = getattr(logger, "init_args", None) if logger is not None and not isinstance(logger, bool) else None
    if init_args is None or "save_dir" not in init_args or "name" not in init_args:
        return None
    return init_args


def _refuse_misplaced_callbacks(config: Any) -> None:
    """Refuse callbacks whose place is elsewhere: a second RankReallocation, Lightning's OnExceptionCheckpoint."""
    for callback in (config.get("trainer") or {}).get("callbacks") or []:
        class_path = str(getattr(callback, "class_path", ""))
        if class_path.endswith("RankReallocation"):
            raise ValueError(
                "RankReallocation is configured in trainer.callbacks; it has its own top-level group now (and would "
                "run twice). Move its init_args under `reallocation:` in the config (or pass --reallocation.<arg> "
                "flags) and remove it from trainer.callbacks."
            )
        if class_path == "lightning.pytorch.callbacks.OnExceptionCheckpoint" or class_path.endswith(
                "callbacks.on_exception_checkpoint.OnExceptionCheckpoint"):
            raise ValueError(
                "lightning's OnExceptionCheckpoint makes every `fit` silently resume from the newest checkpoint and "
                "writes checkpoints for runs that never trained; use flexlora_pl.InterruptCheckpoint instead (no "
                "arguments needed: it writes into the run folder)."
            )


def _locate_run(save_dir: str, name: str, version: int | str | None) -> RunFolder:
    """The run named by ``version``, or the newest run of ``name`` that holds a checkpoint."""
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


def _last_checkpoint(folder: RunFolder) -> Path:
    found = newest_trained_checkpoint(folder)
    if found is None:
        raise ValueError(f"run folder {folder.path} holds no readable checkpoint in checkpoints/; nothing to resume. "
                         "Start a new run without --ckpt_path.")
    path, step = found
    rank_zero_info(f"--ckpt_path last: {path} (optimizer step {step}, the most trained state of {folder.path})")
    return path


def _best_checkpoint(folder: RunFolder) -> Path:
    metrics = folder.path / METRICS_FILENAME
    best = read_metrics(metrics).get("fit", {}).get("best", {}) if metrics.is_file() else {}
    if not best.get("checkpoint"):
        raise ValueError(f"run {folder.path} records no best checkpoint (metrics.json fit.best.checkpoint); the run "
                         "needs a ModelCheckpoint that monitors val/score. Give a .ckpt path or 'last' instead.")
    path = folder.path / best["checkpoint"]
    if not path.is_file():
        raise ValueError(f"the best checkpoint recorded for run {folder.path}, {path}, does not exist any more")
    rank_zero_info(f"--ckpt_path best: {path} ({best['monitor']}={best['value']} at optimizer step {best['step']})")
    return path


def _has_trained(trainer: Trainer) -> bool:
    """Whether the fit took at least one optimizer step in this process (a resume counts from its start)."""
    interrupt = next((cb for cb in trainer.callbacks if isinstance(cb, InterruptCheckpoint)), None)
    if interrupt is not None:
        return interrupt.has_trained(trainer)
    return trainer.global_step > 0


def _version_of(trainer: Trainer) -> int | str | None:
    return getattr(trainer.logger, "version", None)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a Lightning checkpoint safely (``weights_only=True``), with errors that say what is wrong."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--ckpt_path {path!r} does not exist; give the path of a .ckpt file, or 'last' to resume the most "
            "trained checkpoint of the run named by --name/--version"
        )
    if os.path.isdir(path):
        raise ValueError(f"--ckpt_path {path!r} is a directory; give the path of a .ckpt file inside it")
    size = os.path.getsize(path)
    try:
        # mmap: only the hyper-parameters are read here, not gigabytes of weights
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises EOFError, RuntimeError, UnpicklingError... for damaged files
        raise ValueError(
            f"--ckpt_path {path!r} is not a readable checkpoint ({size} bytes): the file is empty, truncated or "
            f"corrupt ({type(err).__name__}). Resume from another checkpoint of the run (e.g. 'last' or a "
            "periodic one)."
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(f"--ckpt_path {path!r} is not a Lightning checkpoint (no 'state_dict' entry)")
    return checkpoint


def _differences(key: str, configured: Any, saved: Any) -> list[str]:
    """Where a config value contradicts the checkpoint's, as ``key=saved in the checkpoint but key=... in the
    config`` lines. A ``None`` in the config means "the default" and contradicts nothing; a method given as
    ``{class_path, init_args}`` is compared by class name, then argument by argument."""
    if configured is None or configured == saved:
        return []
    if isinstance(configured, dict) and isinstance(saved, dict):
        if "class_path" in configured and "class_path" in saved:
            if str(configured["class_path"]).rsplit(".", 1)[-1] != str(saved["class_path"]).rsplit(".", 1)[-1]:
                return [f"{key}={saved['class_path']!r} in the checkpoint but {key}={configured['class_path']!r} in "
                        "the config"]
            configured, saved = configured.get("init_args") or {}, saved.get("init_args") or {}
            key = f"{key}.init_args"
        return [line for name in configured if name in saved
                for line in _differences(f"{key}.{name}", configured[name], saved[name])]
    return [f"{key}={saved!r} in the checkpoint but {key}={configured!r} in the config"]


def _plain(value: Any) -> Any:
    """Config values in comparable form: tuples and other sequences as lists, namespaces as dicts."""
    if hasattr(value, "as_dict"):
        value = value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _new_output_dirs(trainer: Trainer) -> Callable[[], list[str]]:
    """Note which of the run's output directories exist now; the returned call lists those created since.

    Candidates are the loggers' log directories (the version is fixed when first read) and explicit
    checkpoint ``dirpath``s; a checkpoint callback without one writes inside the logger's directory.
    """
    candidates = []
    for logger in trainer.loggers:
        log_dir, save_dir = getattr(logger, "log_dir", None), getattr(logger, "save_dir", None)
        if log_dir and save_dir:  # the run folder and the parents it brings (<save_dir>/<name>), outermost first
            parents = [p for p in Path(log_dir).parents if p == Path(save_dir) or Path(save_dir) in p.parents]
            candidates += [str(p) for p in reversed(parents)]
        candidates.append(log_dir)
    candidates += [getattr(cb, "dirpath", None) for cb in trainer.checkpoint_callbacks]
    fresh = [path for path in dict.fromkeys(candidates) if path and not os.path.exists(path)]
    # only the outermost new folder of each chain needs removing
    roots = [p for p in fresh if not any(p != q and Path(q) in Path(p).parents for q in fresh)]
    return lambda: [path for path in roots if os.path.exists(path)]


def build_cli(args: Sequence[str] | None = None, run: bool = True) -> FlexLoRACLI:
    """Parse ``args`` (default: the command line), instantiate, and run the subcommand unless ``run=False``."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return FlexLoRACLI(
        FlexLoRAModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``flexlora`` console script.

    Exit status: 0 when the subcommand finished, 1 on an error, 143 after SIGTERM and 130 after Ctrl-C
    (the run stopped at a batch boundary with a resumable checkpoint).
    """
    build_cli(args)


if __name__ == "__main__":
    main()
