"""Rank trajectories for people: a modules × events heat-map and a rank table in every logger, the final ranks as JSON.

The drawing lives in :mod:`flexlora_pl.figures.rank_heatmap`; this callback draws it once and hands it, with the
rank table, to the adapter of every logger the Trainer has (:mod:`flexlora_pl.callbacks.logger_sinks`:
TensorBoard, MLflow, Weights & Biases, CSV; any other logger gets the PNG in the run folder), and writes the record.

The image reproduces the paper's Figure 2. Writing r_m(t_e) for the active rank of adapted module m
after the allocation event at optimizer step t_e, the figure shows the matrix R[m, e] = r_m(t_e):

- rows: the adapted modules in model (depth) order, labelled with their names less the prefix they all
  share (``backbone.bert.encoder.layer.0.attention.self.query`` → ``0.attention.self.query``); with more
  rows than fit legibly, every k-th row is labelled;
- columns: the allocation events, labelled with their optimizer step t_e;
- colour: R[m, e] on the perceptually uniform ``viridis`` map (dark purple: rank 0, yellow: r_max), with
  a colour bar "active rank" running over 0..r_max.

In the default ``prune_and_expand`` mode every column sums to the same total rank, so the figure shows
where rank moved, not how much there is. It is drawn with matplotlib's Agg canvas (no ``pyplot``, no
display, no global state) and refreshed at every validation. At the end of fitting,
``rank_pattern.json`` in the run's log directory records every module's final rank, the event steps and
the whole trajectory.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from typing_extensions import override

from flexlora_pl.callbacks.logger_sinks import FigureImage, LoggerSink, rank_table, run_folder_of, sink_for
from flexlora_pl.callbacks.rank_reallocation import RankReallocation
from flexlora_pl.core.checks import require_int
from flexlora_pl.core.inject import flexlora_layers
from flexlora_pl.figures.rank_heatmap import heatmap_figure, render_heatmap, shorten_module_names
from flexlora_pl.runs.atomic import write_json_atomic

__all__ = ["RankHeatmap", "heatmap_figure", "render_heatmap", "shorten_module_names"]


class RankHeatmap(Callback):
    """Log the rank heat-map at each validation and write ``rank_pattern.json`` when fitting ends.

    Needs a :class:`~flexlora_pl.RankReallocation` callback in the same Trainer; the image goes to every
    logger as ``flexlora/rank_heatmap``, with the modules' names on its rows and the events' optimizer steps on
    its columns, and the rank table (``step, module, rank, importance``) as ``rank_history``: TensorBoard's
    images and text, MLflow artifacts, W&B images and tables, ``rank_history.csv`` beside a CSV logger's
    ``metrics.csv``; a logger that takes no image gets the PNG in the run folder (see
    :mod:`flexlora_pl.callbacks.logger_sinks`). A method without ranks (``full``, ``bitfit``: no adapted matrix)
    gets neither image nor file, and one info line at the end of fitting says so.

    Args:
        filename: name of the JSON file written into the Trainer's log directory.
        cell: deprecated and ignored (the pixel size of one cell of the old raw image); use ``dpi``.
        dpi: pixels per inch of the logged image (100 gives roughly 800×800 px for 36 modules × 14 events).
    """

    def __init__(self, filename: str = "rank_pattern.json", cell: int | None = None, dpi: int = 100) -> None:
        super().__init__()
        if not filename.endswith(".json"):
            raise ValueError(f"RankHeatmap: filename must end in .json, got {filename!r}")
        if cell is not None:
            if cell < 1:
                raise ValueError(f"RankHeatmap: cell must be >= 1, got {cell}")
            warnings.warn("RankHeatmap: `cell` is deprecated and ignored; use `dpi` to scale the image",
                          DeprecationWarning, stacklevel=2)
        require_int("dpi", dpi, 1, owner="RankHeatmap")
        self.filename, self.cell, self.dpi = filename, cell, dpi
        self._sinks: dict[int, LoggerSink] = {}  # id(logger) → its adapter, kept so each says "where" once

    @staticmethod
    def _reallocation(trainer: Trainer) -> RankReallocation | None:
        return next((cb for cb in trainer.callbacks if isinstance(cb, RankReallocation)), None)

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self.log_image(trainer, pl_module)

    @rank_zero_only
    def log_image(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Render the heat-map of the events so far and send it, with the rank table, to every logger."""
        realloc = self._reallocation(trainer)
        if realloc is None or not realloc.history:
            return
        if not trainer.loggers:  # rendering costs a fraction of a second: skip it when nobody would see it
            return
        ranks = torch.tensor([event["ranks"] for event in realloc.history]).T  # (modules, events)
        pattern, capacity = _ranks(pl_module)
        # The callback's names are those its history was recorded with (restored from a checkpoint on
        # resume); the module's own are the fallback should they not be set.
        names = realloc.layer_names or list(pattern)
        method = getattr(pl_module, "method", None)
        image = render_heatmap(
            ranks,
            max(capacity.values()),
            module_names=names,
            event_steps=[event["step"] for event in realloc.history],
            title=f"{type(method).__name__ if method is not None else 'FlexLoRA'} rank allocation — step "
                  f"{trainer.global_step}",
            dpi=self.dpi,
        )
        figure, rows = FigureImage(image), rank_table(realloc.history, names)
        run_folder, written = run_folder_of(trainer), set()
        for logger in trainer.loggers:
            sink = self._sinks.get(id(logger))
            if sink is None or sink.logger is not logger:
                sink = self._sinks[id(logger)] = sink_for(logger, run_folder)
            if not sink.takes_images:  # files: once per folder, however many loggers share it
                if sink.folder in written:
                    continue
                written.add(sink.folder)
            sink.log_figure(figure, "flexlora/rank_heatmap", trainer.global_step)
            sink.log_table(rows, "rank_history", trainer.global_step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.log_image(trainer, pl_module)
        self.write_json(trainer, pl_module)

    @rank_zero_only
    def write_json(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Write the final rank pattern, the per-module maxima and every event into the log directory."""
        realloc = self._reallocation(trainer)
        pattern, capacity = _ranks(pl_module)
        if not pattern:  # no adapted matrix: an empty pattern would read as "every matrix at rank 0"
            rank_zero_info(f"RankHeatmap: method '{getattr(pl_module, 'method_name', None)}' adapts no matrix (it has "
                           f"no ranks): no rank heat-map and no {self.filename}")
            return
        record: dict[str, Any] = {
            "global_step": trainer.global_step,
            "method": getattr(pl_module, "method_name", "flexlora"),
            "rank_pattern": pattern,
            "max_rank": capacity,
            "total_rank": sum(pattern.values()),
            "events": realloc.history if realloc is not None else [],
        }
        directory = trainer.log_dir or trainer.default_root_dir
        path = os.path.join(directory, self.filename)
        write_json_atomic(path, record, indent=1)  # never leave a half-written file behind
        rank_zero_info(f"FlexLoRA: final rank pattern written to {path}")


def _ranks(pl_module: LightningModule) -> tuple[dict[str, int], dict[str, int]]:
    """``(active rank, capacity)`` of every adapted matrix: from the module's method, else its FlexLoRA layers."""
    if callable(getattr(pl_module, "rank_pattern", None)) and callable(getattr(pl_module, "max_ranks", None)):
        return pl_module.rank_pattern(), pl_module.max_ranks()
    layers = list(flexlora_layers(pl_module))
    return {name: layer.rank for name, layer in layers}, {name: layer.max_rank for name, layer in layers}
