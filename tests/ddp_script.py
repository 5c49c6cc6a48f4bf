"""Train a tiny FlexLoRA model with ``devices`` CPU processes (gloo) and dump, per rank, the adapter state
after every allocation event. Run by ``tests/test_ddp.py``: ``python ddp_script.py OUT DEVICES BATCH``."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flexlora_pl import FlexLoRAModule, RankReallocation
from flexlora_pl.data.resumable import ResumableSampler


class Data(L.LightningDataModule):
    def __init__(self, batch_size: int) -> None:
        super().__init__()
        self.batch_size = batch_size
        g = torch.Generator().manual_seed(0)
        x = torch.randn(128, 16, generator=g)
        self.dataset = TensorDataset(x, (x[:, :4].argmax(dim=1) + (x[:, 5] > 1).long()) % 4)

    def train_dataloader(self) -> DataLoader:
        # each process takes its shard of the same seeded permutation, so one step's per-rank batches
        # together are the batch a single process with the global batch size draws
        sampler = ResumableSampler(self.dataset, seed=0, shuffle=True)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler,
                          generator=torch.Generator().manual_seed(0))


class Snapshots(L.Callback):
    """After each event, copy masks, λ, P and Q; at the end, save them with the event history."""

    def __init__(self, realloc: RankReallocation, out: Path) -> None:
        self.realloc, self.out, self.snapshots = realloc, out, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.realloc.history and self.realloc.history[-1]["step"] == trainer.global_step:
            self.snapshots[trainer.global_step] = {
                f"{name}.{key}": getattr(layer, key).detach().clone()
                for name, layer in pl_module.flexlora_layers()
                for key in ("rank_mask", "lora_lambda", "lora_P", "lora_Q")
            }

    def on_fit_end(self, trainer, pl_module):
        torch.save({"history": self.realloc.history, "snapshots": self.snapshots},
                   self.out / f"rank{trainer.global_rank}.pt")


def main(out: Path, devices: int, batch_size: int) -> None:
    L.seed_everything(0)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    module = FlexLoRAModule(backbone, ["0", "2"], init_rank=3, max_rank=6, alpha=6.0, modules_to_save=["4"],
                            optimizer=functools.partial(torch.optim.AdamW, lr=5e-2))
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=2, b_schedule="constant")
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_epochs=3,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[realloc, Snapshots(realloc, out)], deterministic=True,
    )
    trainer.fit(module, Data(batch_size))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]))
