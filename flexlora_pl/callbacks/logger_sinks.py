"""Where the rank figure and the rank table go for each kind of logger: one small adapter per logger type.

:class:`~flexlora_pl.RankHeatmap` draws the heat-map once (matplotlib, :mod:`flexlora_pl.figures.rank_heatmap`)
and hands the image and the rank table (one ``step, module, rank, importance`` row per module per allocation
event) to the adapter of every logger the Trainer has. Scalars (``flexlora_rank/<module>`` and the rest) need
no adapter: every Lightning logger takes them through ``log_metrics`` (see :mod:`flexlora_pl.callbacks.event_log`).

- TensorBoard: the image (``add_image``) and the table as a text panel (``add_text``);
- MLflow: the PNG as an artifact ``<tag>/step_<step>.png`` and the table as ``<name>.csv``;
- Weights & Biases: the image (``log_image``) and a W&B table (``log_table``);
- CSV: ``<name>.csv`` beside ``metrics.csv``, and the PNG in the run folder (a CSV file takes no image);
- any other logger: the PNG and the CSV in the run folder, and one info line saying where.

The loggers whose Python package is an extra of this project (MLflow, W&B) are checked before a run starts
(:func:`flexlora_pl.runs.logger_config.check_logger_installed`), so a missing package is one clear message,
not an import error mid-run.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info

from flexlora_pl.runs.atomic import write_text_atomic

__all__ = ["TABLE_COLUMNS", "FigureImage", "LoggerSink", "rank_table", "run_folder_of",
           "sink_for", "table_csv"]

#: the rank table's columns: one row per adapted module per allocation event
TABLE_COLUMNS = ("step", "module", "rank", "importance")

def rank_table(history: Sequence[dict[str, Any]], names: Sequence[str]) -> list[tuple[int, str, int, float]]:
    """The rank table of a run's allocation events: ``(step, module, rank, importance)`` rows, event by event.

    Args:
        history: the events' records (``step``, ``ranks`` and ``scores`` in ``names``' order), as
            :attr:`RankReallocation.history` holds them.
        names: the adapted modules' names.
    """
    rows = []
    for event in history:
        scores = event.get("scores") or [float("nan")] * len(names)
        for name, rank, score in zip(names, event["ranks"], scores, strict=True):
            rows.append((int(event["step"]), str(name), int(rank), float(score)))
    return rows


def table_csv(rows: Sequence[Sequence[Any]]) -> str:
    """The rank table as CSV text with a header line."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(TABLE_COLUMNS)
    writer.writerows(rows)
    return buffer.getvalue()


@dataclass(frozen=True)
class FigureImage:
    """A rendered figure in the forms the loggers take.

    Args:
        chw: the image as a (3, H, W) float tensor in [0, 1] (what ``render_heatmap`` returns).
    """

    chw: torch.Tensor

    @cached_property
    def hwc(self) -> np.ndarray:
        """The image as an (H, W, 3) ``uint8`` array."""
        return (self.chw.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)

    @cached_property
    def png(self) -> bytes:
        """The image as PNG bytes."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.fromarray(self.hwc).save(buffer, format="PNG")
        return buffer.getvalue()


class LoggerSink:
    """Send a figure and a table to one logger; this base class writes both into a folder as files.

    Args:
        logger: the Lightning logger.
        folder: where files go (the run folder); ``None``: nowhere, the logger takes everything itself.
    """

    takes_images = False

    def __init__(self, logger: Logger, folder: str | None) -> None:
        self.logger, self.folder = logger, folder
        self._said: set[str] = set()

    def log_figure(self, image: FigureImage, tag: str, step: int) -> None:
        """Send the figure ``tag`` (``flexlora/rank_heatmap``) as it is at optimizer step ``step``."""
        self._write(f"{tag.rsplit('/', 1)[-1]}.png", image.png, "the rank heat-map")

    def log_table(self, rows: Sequence[Sequence[Any]], name: str, step: int) -> None:
        """Send the rank table ``name`` (``rank_history``) of the events up to optimizer step ``step``."""
        self._write(f"{name}.csv", table_csv(rows).encode(), "the rank table")

    def _write(self, filename: str, data: bytes, what: str) -> None:
        if self.folder is None:
            return
        path = os.path.join(self.folder, filename)
        os.makedirs(self.folder, exist_ok=True)
        tmp = path + ".tmp"  # a reader never sees a half-written file
        with open(tmp, "wb") as file:
            file.write(data)
        os.replace(tmp, path)
        if filename not in self._said:  # said once per run, not at every validation
            self._said.add(filename)
            rank_zero_info(f"RankHeatmap: {type(self.logger).__name__} takes no "
                           f"{'image' if filename.endswith('.png') else 'table'}: {what} is written to {path}")


class TensorBoardSink(LoggerSink):
    """TensorBoard: the image as ``add_image`` and the table as a markdown ``add_text`` panel."""

    takes_images = True

    def log_figure(self, image: FigureImage, tag: str, step: int) -> None:
        self.logger.experiment.add_image(tag, image.chw, global_step=step)

    def log_table(self, rows: Sequence[Sequence[Any]], name: str, step: int) -> None:
        lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
        lines += ["| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row) + " |"
                  for row in rows]
        self.logger.experiment.add_text(f"flexlora/{name}", "\n".join(lines), global_step=step)


class CSVSink(LoggerSink):
    """CSV: ``<name>.csv`` beside the logger's ``metrics.csv``; the image as a PNG in the same folder."""

    def log_table(self, rows: Sequence[Sequence[Any]], name: str, step: int) -> None:
        if self.folder is not None:
            write_text_atomic(os.path.join(self.folder, f"{name}.csv"), table_csv(rows))


class MLflowSink(LoggerSink):
    """MLflow: the PNG as the artifact ``<tag>/step_<step>.png`` and the table as the artifact ``<name>.csv``."""

    takes_images = True

    def log_figure(self, image: FigureImage, tag: str, step: int) -> None:
        self.logger.experiment.log_image(self.logger.run_id, image.hwc, artifact_file=f"{tag}/step_{step:07d}.png")

    def log_table(self, rows: Sequence[Sequence[Any]], name: str, step: int) -> None:
        self.logger.experiment.log_text(self.logger.run_id, table_csv(rows), f"flexlora/{name}.csv")


class WandbSink(LoggerSink):
    """Weights & Biases: the image with ``log_image`` and a W&B table with ``log_table``, at the step."""

    takes_images = True

    def log_figure(self, image: FigureImage, tag: str, step: int) -> None:
        self.logger.log_image(key=tag, images=[image.hwc], step=step)

    def log_table(self, rows: Sequence[Sequence[Any]], name: str, step: int) -> None:
        self.logger.log_table(key=f"flexlora/{name}", columns=list(TABLE_COLUMNS), data=[list(r) for r in rows],
                              step=step)


def _class_names(logger: Logger) -> set[str]:
    return {cls.__name__ for cls in type(logger).__mro__}


def run_folder_of(trainer: Trainer) -> str | None:
    """The run folder, as ``trainer.log_dir`` has it, read on this process alone (no broadcast: rank zero calls it)."""
    if not trainer.loggers:
        return None
    first = trainer.loggers[0]
    return first.log_dir if isinstance(first, TensorBoardLogger | CSVLogger) else first.save_dir


def sink_for(logger: Logger, run_folder: str | None) -> LoggerSink:
    """The adapter that sends figures and tables to ``logger``.

    Args:
        logger: one of the Trainer's loggers.
        run_folder: the run's folder (``trainer.log_dir``), where a logger that takes no image gets the PNG.
    """
    if isinstance(logger, TensorBoardLogger):
        return TensorBoardSink(logger, None)
    if isinstance(logger, CSVLogger):
        return CSVSink(logger, logger.log_dir)
    names = _class_names(logger)  # by name: the tracker packages are optional, their loggers imported lazily
    if "MLFlowLogger" in names:
        return MLflowSink(logger, None)
    if "WandbLogger" in names:
        return WandbSink(logger, None)
    return LoggerSink(logger, run_folder)
