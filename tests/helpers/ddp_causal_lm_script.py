"""Fit the tiny causal LM with FlexLoRA on 2 CPU processes (gloo), then test the 8 commonsense sets in the same
processes, and dump per rank: the allocation history, the adapters, the test records each rank scored and the
logged test metrics. Run by ``tests/tasks/test_commonsense.py``:

    python ddp_causal_lm_script.py ROOT OUT

``ROOT`` holds the tiny model (``model/``) and data written by ``commonsense_helpers``."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import lightning as L
import torch

from flexlora_pl import RankReallocation
from flexlora_pl.data.commonsense import CommonsenseDataModule
from flexlora_pl.methods import FlexLoRA
from flexlora_pl.tasks.causal_lm import FlexLoRACausalLM


class Record(L.Callback):
    """Note the record ids each rank scores; at the end of test, save everything for the test to compare."""

    def __init__(self, realloc: RankReallocation, out: Path) -> None:
        self.realloc, self.out, self.seen = realloc, out, {}

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        name = trainer.datamodule.test_set_names[dataloader_idx]
        self.seen.setdefault(name, []).extend(int(i) for i in batch["index"])

    def on_test_end(self, trainer, pl_module):
        adapters = {name: p.detach().clone() for name, p in pl_module.named_parameters() if p.requires_grad}
        adapters.update({name: b.clone() for name, b in pl_module.named_buffers() if name.endswith("rank_mask")})
        metrics = {name: float(value) for name, value in trainer.callback_metrics.items() if name.startswith("test/")}
        torch.save({"history": self.realloc.history, "adapters": adapters, "seen": self.seen, "metrics": metrics},
                   self.out / f"rank{trainer.global_rank}.pt")


def main(root: Path, out: Path) -> None:
    L.seed_everything(0)
    module = FlexLoRACausalLM(str(root / "model"), init_seed=0,
                              method=FlexLoRA(init_rank=4, max_rank=6, alpha=8.0, dropout=0.05),
                              optimizer=functools.partial(torch.optim.AdamW, lr=5e-2), max_new_tokens=4)
    data = CommonsenseDataModule(str(root / "model"), train_file=str(root / "commonsense_170k.json"),
                                 test_dir=str(root / "dataset"), val_size=0, batch_size=4, eval_batch_size=2)
    realloc = RankReallocation(b0=2, t_warmup=2, t_final=2, delta_t=2, b_schedule="constant")
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[realloc, Record(realloc, out)])
    trainer.fit(module, data)  # 72 records / (4 x 2 processes) = 9 optimizer steps: events at 4 and 6
    trainer.test(module, datamodule=data)


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
