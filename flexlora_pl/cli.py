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
from collections.abc import Sequence

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from flexlora_pl.module import FlexLoRAModule

__all__ = ["FlexLoRACLI", "build_cli", "main"]


def _task_of(data: LightningDataModule) -> str | None:
    """The metric set for the model: a GLUE task name, else chosen from the number of labels."""
    return getattr(getattr(data, "task", None), "name", None)


class FlexLoRACLI(LightningCLI):
    """LightningCLI with the data → model links that FlexLoRA configs rely on."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("model.init_args.model_name_or_path", "data.init_args.tokenizer_name_or_path")
        parser.link_arguments("data.num_labels", "model.init_args.num_labels", apply_on="instantiate")
        parser.link_arguments("data.val_split_names", "model.init_args.val_split_names", apply_on="instantiate")
        parser.link_arguments("data", "model.init_args.task", compute_fn=_task_of, apply_on="instantiate")


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
