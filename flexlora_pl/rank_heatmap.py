"""Rank trajectories for people: a modules × events heat-map in TensorBoard and the final pattern as JSON.

The image reproduces the paper's Figure 2: one row per adapted module in model (depth) order, one
column per allocation event, colour = active rank (dark: low, bright: high). It is refreshed at every
validation. At the end of fitting, ``rank_pattern.json`` in the run's log directory records every
module's final rank, the event steps and the whole trajectory.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from typing_extensions import override

from flexlora_pl.callback import RankReallocation

__all__ = ["RankHeatmap", "render_heatmap"]

# A perceptually ordered dark-blue → teal → yellow ramp (viridis-like anchors), RGB in [0, 1].
_RAMP = torch.tensor([[0.27, 0.00, 0.33], [0.23, 0.32, 0.55], [0.13, 0.57, 0.55], [0.37, 0.79, 0.38],
                      [0.99, 0.91, 0.14]])


def render_heatmap(ranks: torch.Tensor, r_max: int, cell: int = 6) -> torch.Tensor:
    """Render a (modules, events) integer rank matrix as a (3, H, W) float image in [0, 1].

    Args:
        ranks: active rank of each module (rows) after each event (columns).
        r_max: rank that maps to the brightest colour.
        cell: pixels per cell side.
    """
    if ranks.dim() != 2 or ranks.numel() == 0:
        raise ValueError(f"ranks must be a non-empty (modules, events) matrix, got shape {tuple(ranks.shape)}")
    x = (ranks.float() / max(r_max, 1)).clamp(0, 1) * (len(_RAMP) - 1)  # position on the ramp
    low = x.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (x - low).unsqueeze(-1)
    rgb = _RAMP[low] * (1 - frac) + _RAMP[low + 1] * frac  # (M, E, 3)
    rgb = rgb.repeat_interleave(cell, dim=0).repeat_interleave(cell, dim=1)  # (M·cell, E·cell, 3)
    return rgb.permute(2, 0, 1).contiguous()


class RankHeatmap(Callback):
    """Log the rank heat-map at each validation and write ``rank_pattern.json`` when fitting ends.

    Needs a :class:`~flexlora_pl.RankReallocation` callback in the same Trainer; the image goes to every
    TensorBoard logger.

    Args:
        filename: name of the JSON file written into the Trainer's log directory.
        cell: pixels per heat-map cell.
    """

    def __init__(self, filename: str = "rank_pattern.json", cell: int = 6) -> None:
        super().__init__()
        if not filename.endswith(".json"):
            raise ValueError(f"RankHeatmap: filename must end in .json, got {filename!r}")
        if cell < 1:
            raise ValueError(f"RankHeatmap: cell must be >= 1, got {cell}")
        self.filename, self.cell = filename, cell

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
        realloc = self._reallocation(trainer)
        if realloc is None or not realloc.history:
            return
        ranks = torch.tensor([event["ranks"] for event in realloc.history]).T  # (modules, events)
        r_max = max(layer.max_rank for _, layer in pl_module.flexlora_layers())
        image = render_heatmap(ranks, r_max, self.cell)
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("flexlora/rank_heatmap", image, global_step=trainer.global_step)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.log_image(trainer, pl_module)
        self.write_json(trainer, pl_module)

    @rank_zero_only
    def write_json(self, trainer: Trainer, pl_module: LightningModule) -> None:
        realloc = self._reallocation(trainer)
        layers = list(pl_module.flexlora_layers())
        record: dict[str, Any] = {
            "global_step": trainer.global_step,
            "rank_pattern": {name: layer.rank for name, layer in layers},
            "max_rank": {name: layer.max_rank for name, layer in layers},
            "total_rank": sum(layer.rank for _, layer in layers),
            "events": realloc.history if realloc is not None else [],
        }
        directory = trainer.log_dir or trainer.default_root_dir
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, self.filename)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, path)  # never leave a half-written file behind
        rank_zero_info(f"FlexLoRA: final rank pattern written to {path}")
