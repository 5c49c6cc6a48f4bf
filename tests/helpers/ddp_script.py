"""Train a tiny FlexLoRA model with ``devices`` CPU processes (gloo) and dump, per rank, the adapter state
after every allocation event and at the end. Run by ``tests/integration/test_ddp.py``:

    python ddp_script.py OUT DEVICES BATCH [DROPOUT [RESUME_CKPT]] [--diverge-at STEP] [--method NAME]

With a dropout, a checkpoint is written at the end of every epoch into ``OUT/ckpt``. ``--diverge-at STEP``
makes rank 1 score its modules in reverse order at the event of step ``STEP`` (a forced divergence of the
replicas' decisions, which the run must refuse). ``--method NAME`` trains another registered method with its
defaults on the same targets (r = 3 for LoRA-shaped ones), each process with its own RNG stream."""

from __future__ import annotations

import functools
import inspect
import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flexlora_pl import FlexLoRAModule, RankReallocation
from flexlora_pl.data.resumable import ResumableSampler
from flexlora_pl.methods import METHODS


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


class DivergingModule(FlexLoRAModule):
    """Rank 1 reverses its importance scores at one event: the processes then decide differently."""

    def __init__(self, *args, diverge_at: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.diverge_at = diverge_at

    def importance_scores(self, metric):
        scores = super().importance_scores(metric)
        if self.trainer.global_rank == 1 and self.trainer.global_step == self.diverge_at:
            return scores.flip(0)
        return scores


class PerRankSeed(L.Callback):
    """Give each process its own RNG stream (seed_everything gives all ranks the same one)."""

    def on_train_start(self, trainer, pl_module):
        torch.manual_seed(100 + trainer.global_rank)


class Snapshots(L.Callback):
    """After each event, copy masks, λ, P and Q; at the end, save them with the event history."""

    def __init__(self, realloc: RankReallocation, out: Path) -> None:
        self.realloc, self.out, self.snapshots, self.drawn = realloc, out, {}, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sampled = [m.rank for m in pl_module.modules() if hasattr(m, "lora_rank_counts")]  # DyLoRA's b
        if sampled:
            self.drawn.append(sampled[0])
        if self.realloc.history and self.realloc.history[-1]["step"] == trainer.global_step:
            self.snapshots[trainer.global_step] = {
                f"{name}.{key}": getattr(layer, key).detach().clone()
                for name, layer in pl_module.flexlora_layers()
                for key in ("rank_mask", "lora_lambda", "lora_P", "lora_Q")
            }

    def on_fit_end(self, trainer, pl_module):
        final = {name: p.detach().clone() for name, p in pl_module.named_parameters() if p.requires_grad}
        torch.save({"history": self.realloc.history, "snapshots": self.snapshots, "final": final, "drawn": self.drawn},
                   self.out / f"rank{trainer.global_rank}.pt")


def main(out: Path, devices: int, batch_size: int, dropout: float = 0.0, resume: str | None = None,
         diverge_at: int | None = None, method: str | None = None) -> None:
    L.seed_everything(0)
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    kwargs = dict(init_rank=3, max_rank=6, alpha=6.0, modules_to_save=["4"], dropout=dropout,
                  optimizer=functools.partial(torch.optim.AdamW, lr=5e-2))
    strategy = "ddp"
    if method is not None:
        accepted = inspect.signature(METHODS[method]).parameters
        options = {k: v for k, v in {"target_modules": ["0", "2"], "r": 3}.items() if k in accepted}
        module = FlexLoRAModule(backbone, method=METHODS[method](**options), modules_to_save=["4"],
                                optimizer=kwargs["optimizer"])
        strategy = "ddp_find_unused_parameters_true"  # DyLoRA's directions outside b have no gradient
    elif diverge_at is None:
        module = FlexLoRAModule(backbone, ["0", "2"], **kwargs)
    else:
        module = DivergingModule(backbone, ["0", "2"], diverge_at=diverge_at, **kwargs)
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=2, b_schedule="constant")
    callbacks = [realloc, Snapshots(realloc, out)]
    if dropout or method is not None:
        callbacks.append(PerRankSeed())
    if dropout:
        callbacks.append(ModelCheckpoint(dirpath=out / "ckpt", every_n_epochs=1, save_top_k=-1, filename="{epoch}"))
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy if devices > 1 else "auto", max_epochs=3,
        logger=False, enable_checkpointing=bool(dropout), enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, deterministic=True,
    )
    trainer.fit(module, Data(batch_size), ckpt_path=resume)


if __name__ == "__main__":
    args = sys.argv[1:]
    diverge, name = None, None
    if "--method" in args:
        at = args.index("--method")
        name = args[at + 1]
        del args[at:at + 2]
    if "--diverge-at" in args:
        at = args.index("--diverge-at")
        diverge = int(args[at + 1])
        del args[at:at + 2]
    main(Path(args[0]), int(args[1]), int(args[2]), float(args[3]) if len(args) > 3 else 0.0,
         args[4] if len(args) > 4 else None, diverge_at=diverge, method=name)
