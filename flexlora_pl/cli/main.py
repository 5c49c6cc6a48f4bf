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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from flexlora_pl.callbacks.final_checkpoint import FinalCheckpoint
from flexlora_pl.callbacks.interrupt_checkpoint import InterruptCheckpoint
from flexlora_pl.callbacks.prediction_writer import PredictionWriter
from flexlora_pl.callbacks.rank_reallocation import RankReallocation
from flexlora_pl.callbacks.run_record import METRICS_FILENAME, RunRecord, read_metrics
from flexlora_pl.callbacks.search_trial import SearchTrialReport
from flexlora_pl.methods import METHODS
from flexlora_pl.module import FlexLoRAModule
from flexlora_pl.runs.checkpoint_check import check_checkpoint_matches_config, plain_config_value, read_checkpoint
from flexlora_pl.runs.checkpoint_io import AtomicCheckpointIO
from flexlora_pl.runs.interrupts import RunInterrupted, StopSignal
from flexlora_pl.runs.logger_config import prepare_loggers
from flexlora_pl.runs.new_folders import new_output_dirs
from flexlora_pl.runs.resolution import SPECIAL_CKPT_PATHS, resolve_run
from flexlora_pl.runs.run_folder import RunFolder

__all__ = ["FlexLoRACLI", "RunInterrupted", "build_cli", "main", "read_checkpoint"]


def _task_of(data: LightningDataModule) -> str | None:
    """The metric set for the model: a GLUE task name, else chosen from the number of labels."""
    return getattr(getattr(data, "task", None), "name", None)


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
        self._stop = StopSignal()
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
        # image folders (ImageFolderDataModule) preprocess with the timm model's own data config
        parser.link_arguments("model.init_args.model_name", "data.init_args.model_name")
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
        prepare_loggers(config)  # a missing tracker package is refused here; every run keeps its run folder
        self.run_folder = resolve_run(subcommand, config, recorded_best=_recorded_best)
        self._resuming = subcommand == "fit" and self.run_folder is not None
        ckpt_path = config.get("ckpt_path")
        if ckpt_path and ckpt_path not in SPECIAL_CKPT_PATHS and "://" not in str(ckpt_path):
            check_checkpoint_matches_config(ckpt_path, config.get("model"), linked_args=self.linked_model_args,
                                            free_args=_evaluation_options(subcommand, config.get("model")))

    # --------------------------------------------------------------- trainer
    def before_instantiate_classes(self) -> None:
        subcommand = self.subcommand
        if subcommand is None:
            return
        # A fresh fit saves config.yaml; a resume or an evaluation of the run adds its own file beside it.
        fresh_fit = subcommand == "fit" and not self._resuming
        self.save_config_kwargs["config_filename"] = "config.yaml" if fresh_fit else (
            "config.fit-resume.yaml" if subcommand == "fit" else f"config.{subcommand}.yaml")

    def after_instantiate_classes(self) -> None:
        # Settings a data module resolves from the data (TextFilesDataModule's classes, from the training labels)
        # go into the run's config.yaml, which is saved later from this config.
        resolved = getattr(self.datamodule, "resolved_init_args", None)
        data_config = self.config.get(str(self.subcommand), {}).get("data") if self.subcommand else None
        if callable(resolved) and data_config is not None and data_config.get("init_args") is not None:
            for key, value in resolved().items():
                data_config.init_args[key] = value

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
        if self.subcommand == "fit" and not any(isinstance(cb, FinalCheckpoint) for cb in configured):
            extra.append(FinalCheckpoint())  # last.ckpt holds the end of training (Lightning 2.6 may leave it stale)
        report = SearchTrialReport.from_environment()  # a tuned sweep's search trial: scores go to its study
        if report is not None and self.subcommand == "fit":
            extra.append(report)
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
        trainer = plain_config_value(config.get("trainer") or {})
        keyed = {
            "model": plain_config_value(config.get("model")),
            "data": plain_config_value(config.get("data")),
            "reallocation": plain_config_value(config.get("reallocation")),
            "trainer": {k: trainer.get(k) for k in _RESULT_TRAINER_KEYS},
        }
        return hashlib.sha256(json.dumps(keyed, sort_keys=True, default=str).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------- run
    def _run_subcommand(self, subcommand: str) -> None:
        trainer = self.trainer
        created = new_output_dirs(trainer)
        if trainer.loggers and trainer.log_dir:
            action = "resumes" if self._resuming else ("evaluates into" if self.run_folder else "writes")
            rank_zero_info(f"flexlora {subcommand}: this run {action} {trainer.log_dir}")
        restore_sigint = self._stop.catch_sigint(trainer)
        try:
            super()._run_subcommand(subcommand)
        except BaseException as err:
            trained = subcommand == "fit" and _has_trained(trainer)
            if not trained:
                # Failed before its first optimizer step: nothing of value was written, so leave nothing behind.
                for path in created():
                    shutil.rmtree(path, ignore_errors=True)
            if isinstance(err, SIGTERMException):  # SIGTERM or the first Ctrl-C, after an optimizer step
                raise self._stop.interrupted(subcommand, trainer, trained) from err
            if trained and trainer.log_dir:
                rank_zero_info(f"flexlora {subcommand} failed at optimizer step {trainer.global_step}; its logs and "
                               f"checkpoints are kept in {trainer.log_dir}")
            raise
        finally:
            restore_sigint()

_RESULT_TRAINER_KEYS = ("max_epochs", "max_steps", "accumulate_grad_batches", "precision", "gradient_clip_val",
                        "gradient_clip_algorithm", "limit_train_batches", "devices", "num_nodes", "deterministic")


def _label_names_of(data: LightningDataModule) -> list[str] | None:
    names = getattr(data, "label_names", None)
    return list(names) if names else None


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


def _recorded_best(run_dir: Path) -> dict[str, Any]:
    """The best checkpoint a run folder's ``metrics.json`` records (``fit.best``), ``{}`` when none."""
    metrics = run_dir / METRICS_FILENAME
    return read_metrics(metrics).get("fit", {}).get("best", {}) if metrics.is_file() else {}


def _has_trained(trainer: Trainer) -> bool:
    """Whether the fit took at least one optimizer step in this process (a resume counts from its start)."""
    interrupt = next((cb for cb in trainer.callbacks if isinstance(cb, InterruptCheckpoint)), None)
    if interrupt is not None:
        return interrupt.has_trained(trainer)
    return trainer.global_step > 0


def _evaluation_options(subcommand: str, model_config: Any) -> list[str]:
    """The method arguments an evaluation from a checkpoint may change (``AdaptationMethod.evaluation_options``),
    as dotted model arguments; none when fitting."""
    if subcommand == "fit" or model_config is None:
        return []
    method = plain_config_value((model_config.get("init_args") or {}).get("method"))
    if not isinstance(method, dict) or "class_path" not in method:
        return []
    name = str(method["class_path"]).rsplit(".", 1)[-1]
    cls = next((c for c in METHODS.values() if c.__name__ == name), None)
    return [f"method.init_args.{option}" for option in (cls.evaluation_options if cls else ())]


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
