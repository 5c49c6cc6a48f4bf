"""Entry points: ``flexlora`` (:mod:`flexlora_pl.cli.main`) and ``flexlora-export`` (:mod:`flexlora_pl.cli.export`)."""

from flexlora_pl.cli.main import FlexLoRACLI, RunInterrupted, build_cli, main, read_checkpoint

__all__ = ["FlexLoRACLI", "RunInterrupted", "build_cli", "main", "read_checkpoint"]
