"""``GenerationWriter``: ``flexlora predict`` of a generative task writes one JSONL file per test set.

Each line is one record of the set, in ``test.json`` order::

    {"id": 0, "set": "boolq", "prompt": "...", "generation": "the correct answer is true",
     "prediction": "true", "answer": "true", "correct": true}

``prediction`` is the extracted answer (``null``: the generation matched no answer). Files go to
``<run folder>/predictions/predictions_<set>.jsonl``. Under DDP every process generates for its own
records; the rows are gathered and rank 0 writes them, so the files are the same on any device count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from flexlora_pl.callbacks.prediction_writer import PredictionWriter, _split_name
from flexlora_pl.callbacks.run_record import run_dir
from flexlora_pl.runs.atomic import write_text_atomic

__all__ = ["GenerationWriter"]


class GenerationWriter(PredictionWriter):
    """Collect the scored rows ``predict_step`` returns (a list of dicts per batch) and write one JSONL per set.

    Args:
        folder: sub-folder of the run folder that receives the files.
        include_prompt: write each row's prompt too (the files are several times larger).
    """

    def __init__(self, folder: str = "predictions", include_prompt: bool = True) -> None:
        super().__init__(folder)
        self.include_prompt = include_prompt
        self._rows: dict[int, list[dict[str, Any]]] = {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        pass  # rows carry their record id, so any number of processes writes files in test.json order

    @override
    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows = {}

    @override
    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, list) or not all(isinstance(row, dict) and "id" in row for row in outputs):
            raise TypeError(f"GenerationWriter needs predict_step to return a list of dicts with an 'id', got "
                            f"{type(outputs).__name__}; use PredictionWriter for class predictions")
        keep = [row if self.include_prompt else {k: v for k, v in row.items() if k != "prompt"} for row in outputs]
        self._rows.setdefault(dataloader_idx, []).extend(keep)

    @override
    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows = self._rows
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = {}
            for part in gathered:
                for index, chunk in part.items():
                    rows.setdefault(index, []).extend(chunk)
        self.written = []
        if trainer.global_rank != 0:
            return
        out = Path(run_dir(trainer)) / self.folder
        out.mkdir(parents=True, exist_ok=True)
        for index, chunk in sorted(rows.items()):
            name = _split_name(trainer.datamodule, index)
            chunk = sorted(chunk, key=lambda row: row["id"])
            rows = "".join(json.dumps(row) + "\n" for row in chunk)
            path = write_text_atomic(out / f"predictions_{name}.jsonl", rows)
            self.written.append(path)
            right = sum(bool(row.get("correct")) for row in chunk)
            rank_zero_info(f"Generations for '{name}' ({len(chunk)} records, {right} answered right) written to {path}")
