"""``PredictionWriter``: ``flexlora predict`` writes one predictions file per split into the run folder.

GLUE tasks get the file the GLUE benchmark server takes (``CoLA.tsv``, ``MNLI-m.tsv``, …: a header
``index<TAB>prediction``, one row per test example, label names where the server expects them); any
other data gets ``predictions_<split>.jsonl`` with the row index, the predicted id and its label name.
Files go to ``<run folder>/predictions/``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from flexlora_pl.callbacks.run_record import run_dir
from flexlora_pl.runs.atomic import write_text_atomic

__all__ = ["GLUE_SUBMISSION_FILES", "PredictionWriter"]

# task -> (submission file, whether the server expects label names rather than ids)
GLUE_SUBMISSION_FILES: dict[str, tuple[str, bool]] = {
    "cola": ("CoLA.tsv", False),
    "sst2": ("SST-2.tsv", False),
    "mrpc": ("MRPC.tsv", False),
    "qqp": ("QQP.tsv", False),
    "stsb": ("STS-B.tsv", False),
    "mnli": ("MNLI-m.tsv", True),
    "qnli": ("QNLI.tsv", True),
    "rte": ("RTE.tsv", True),
}


class PredictionWriter(Callback):
    """Collect ``predict_step`` outputs and write them, in data order, into the run folder.

    ``predict_step`` must return one prediction per row (a tensor of class ids, or of scores for
    regression). The ``flexlora`` command adds this callback to every ``predict``.

    Args:
        folder: sub-folder of the run folder that receives the files.
    """

    def __init__(self, folder: str = "predictions") -> None:
        super().__init__()
        self.folder = folder
        self.written: list[Path] = []
        self._outputs: dict[int, list[torch.Tensor]] = {}

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "predict" and trainer.world_size > 1:
            raise ValueError(
                f"predict runs on {trainer.world_size} processes, and a distributed sampler pads and interleaves "
                "rows, so the file would not follow the data order. Predict on one device (--trainer.devices 1)."
            )

    @override
    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._outputs = {}

    @override
    def on_predict_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                             batch_idx: int, dataloader_idx: int = 0) -> None:
        if not torch.is_tensor(outputs):
            raise TypeError(f"PredictionWriter needs predict_step to return a tensor of predictions, got "
                            f"{type(outputs).__name__}")
        self._outputs.setdefault(dataloader_idx, []).append(outputs.detach().float().cpu().reshape(-1))

    @override
    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        data = trainer.datamodule
        task = getattr(getattr(data, "task", None), "name", None)
        names = getattr(pl_module, "label_names", None) or getattr(data, "label_names", None)
        out = Path(run_dir(trainer)) / self.folder
        out.mkdir(parents=True, exist_ok=True)
        self.written = []
        for index, chunks in sorted(self._outputs.items()):
            values = torch.cat(chunks).tolist()
            split = _split_name(data, index)
            if task in GLUE_SUBMISSION_FILES:
                path = self._write_glue(out, task, values, names)
            else:
                path = self._write_jsonl(out / f"predictions_{split}.jsonl", values, names)
            self.written.append(path)
            rank_zero_info(f"Predictions for split '{split}' ({len(values)} rows) written to {path}")

    @staticmethod
    def _write_glue(out: Path, task: str, values: list[float], names: list[str] | None) -> Path:
        filename, use_names = GLUE_SUBMISSION_FILES[task]
        if task == "stsb":
            cells = [f"{min(max(v, 0.0), 5.0):.3f}" for v in values]  # the server takes scores in [0, 5]
        elif use_names and names:
            cells = [names[int(v)] for v in values]
        else:
            cells = [str(int(v)) for v in values]
        return write_text_atomic(out / filename, "index\tprediction\n" + "".join(
            f"{i}\t{cell}\n" for i, cell in enumerate(cells)))

    @staticmethod
    def _write_jsonl(path: Path, values: list[float], names: list[str] | None) -> Path:
        lines = []
        for i, value in enumerate(values):
            row: dict[str, Any] = {"index": i}
            if names:
                row["prediction"] = int(value)
                row["label"] = names[int(value)]
            else:
                row["prediction"] = value
            lines.append(json.dumps(row))
        return write_text_atomic(path, "\n".join(lines) + "\n")


def _split_name(data: Any, index: int) -> str:
    splits = getattr(data, "predict_split_names", None) or ["test"]
    return splits[index] if index < len(splits) else f"dataloader{index}"
