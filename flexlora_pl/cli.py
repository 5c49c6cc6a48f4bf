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

import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import TorchCheckpointIO

from flexlora_pl.checkpoint_io import AtomicCheckpointIO
from flexlora_pl.module import FlexLoRAModule

__all__ = ["FlexLoRACLI", "build_cli", "main"]


def _task_of(data: LightningDataModule) -> str | None:
    """The metric set for the model: a GLUE task name, else chosen from the number of labels."""
    return getattr(getattr(data, "task", None), "name", None)


class FlexLoRACLI(LightningCLI):
    """LightningCLI with the data → model links that FlexLoRA configs rely on."""

    # model arguments filled in from the data module at instantiation (not set in configs)
    linked_model_args = ("num_labels", "val_split_names", "task")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:  # the default: make writes atomic
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        return trainer

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` before anything runs, and refuse a config that contradicts it.

        Lightning would merge the checkpoint's hyper-parameters over the config, silently dropping a
        changed ``max_rank`` or ``target_modules``; here every such difference is an error instead.
        """
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or ckpt_path in ("last", "best", "hpc", "registry") or "://" in str(ckpt_path):
            return
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
            f"{key}={_plain(saved)!r} in the checkpoint but {key}={_plain(init_args[key])!r} in the config"
            for key, saved in hparams.items()
            if key in init_args and key not in self.linked_model_args and _plain(init_args[key]) != _plain(saved)
        ]
        if differences:
            raise ValueError(
                f"--ckpt_path {ckpt_path!r} does not match the model config: " + "; ".join(differences)
                + ". Resume with the settings the checkpoint was trained with (drop the changed model "
                "arguments), or start a new run without --ckpt_path."
            )

    def _run_subcommand(self, subcommand: str) -> None:
        # A failed run must not leave a half-written run directory behind: remove what this run created,
        # unless it already holds a checkpoint (work that a resume can use is never deleted).
        created = _new_output_dirs(self.trainer)
        try:
            super()._run_subcommand(subcommand)
        except BaseException:
            for path in created():
                if os.path.isdir(path) and not any(p.endswith(".ckpt") for _, _, fs in os.walk(path) for p in fs):
                    shutil.rmtree(path, ignore_errors=True)
            raise

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer_name_or_path")
        parser.link_arguments("data.num_labels", "model.init_args.num_labels", apply_on="instantiate")
        parser.link_arguments("data.val_split_names", "model.init_args.val_split_names", apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.task", compute_fn=_task_of, apply_on="instantiate")


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a Lightning checkpoint safely (``weights_only=True``), with errors that say what is wrong."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"--ckpt_path {path!r} does not exist; give the path of a .ckpt file, or 'last' to resume from the "
            "newest last.ckpt / on_exception.ckpt of the run's checkpoint directory"
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
    candidates = [getattr(logger, "log_dir", None) for logger in trainer.loggers]
    candidates += [getattr(cb, "dirpath", None) for cb in trainer.checkpoint_callbacks]
    fresh = [path for path in dict.fromkeys(candidates) if path and not os.path.exists(path)]
    return lambda: [path for path in fresh if os.path.exists(path)]


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
    """Entry point of the ``flexlora`` console script (returns ``None``, so the exit status is 0)."""
    build_cli(args)


if __name__ == "__main__":
    main()
