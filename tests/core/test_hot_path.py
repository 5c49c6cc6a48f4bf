"""The training hot path makes no host-device sync.

Reading a tensor's value on the host (``.item()``, ``bool()``, ``float()``, ``int()``, ``.tolist()``,
``.numpy()``, a copy to the CPU) makes the host wait for the accelerator to finish all queued work; once
per step that costs a few percent of a GPU step. A FlexLoRA training step (forward, task loss,
orthogonality term, logging, backward, gradient clipping, optimizer and LR scheduler, the callbacks'
per-step work) must read nothing, except at the logging cadence (the loggers, the progress bar's copy of
the loss, the non-finite guard) and at allocation events.

On CPU every tensor lives on the host, so the test counts every such read made during a step and leaves
out only those of tensors that a GPU run keeps on the host on purpose: AdamW's step counters and the
progress bar's host copy of the loss, taken at the logging cadence.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections import defaultdict

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import (
    Callback,
    LearningRateMonitor,
    ModelCheckpoint,
    RichProgressBar,
    TQDMProgressBar,
)
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from flexlora_pl import FlexLoRAModule, LinearWarmupDecay, RankReallocation

READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "cpu")
LOG_EVERY = 5
MAX_STEPS = 15
EVENTS = {6, 10}  # t_warmup=2, delta_t=4, t_final=2 over 15 steps: 6 and 10 (10 is also a logging step)


def _is_cpu_target(args, kwargs) -> bool:
    targets = [kwargs.get("device"), *(a for a in args if isinstance(a, (str, torch.device)))]
    return any(t is not None and torch.device(t).type == "cpu" for t in targets)


class SyncCounter(Callback):
    """Counts host reads of tensors step by step, while patched into ``torch.Tensor``.

    A step's window runs from its ``on_train_batch_start`` to the next one, so it holds the training step,
    backward, optimizer, every ``on_train_batch_end`` and Lightning's own end-of-batch metric handling.
    """

    def __init__(self) -> None:
        self.reads: dict[int, list[str]] = defaultdict(list)
        self.step: int | None = None
        self.trainer: L.Trainer | None = None
        self.bar_copy: torch.Tensor | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.step = None
        self.trainer = trainer
        # the progress bar's copy of the loss, as the previous logging step left it (taken with the
        # counter off: reading callback_metrics converts the progress-bar metrics itself)
        self.bar_copy = trainer.callback_metrics.get("loss")
        self.step = trainer.global_step + 1

    def on_train_end(self, trainer, pl_module):
        self.step = None

    def _kept_on_host(self, tensor: torch.Tensor) -> bool:
        if self.bar_copy is not None and tensor.untyped_storage().data_ptr() == \
                self.bar_copy.untyped_storage().data_ptr():
            return True
        states = (s for opt in self.trainer.optimizers for s in opt.state.values())
        return any(tensor is state.get("step") for state in states)

    def record(self, name: str, tensor: torch.Tensor) -> None:
        if self.step is None or self._kept_on_host(tensor):
            return
        frames = [f for f in traceback.extract_stack(limit=12)[:-2] if not f.filename.endswith("apply_func.py")]
        where = " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno}" for f in reversed(frames[-4:]))
        self.reads[self.step].append(f"{name} at {where}")

    def patched(self, monkeypatch) -> None:
        for name in READS:
            original = getattr(torch.Tensor, name)

            def read(tensor, *args, _name=name, _original=original, **kwargs):
                self.record(_name, tensor)
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, functools.wraps(original)(read))
        original_to = torch.Tensor.to

        def to(tensor, *args, **kwargs):
            # On CPU, ``.to("cpu")`` also is how Lightning moves batches and metric states to the
            # accelerator; a copy to the host is one that FlexLoRA's own code asks for.
            if _is_cpu_target(args, kwargs) and "flexlora_pl" in sys._getframe(1).f_code.co_filename:
                self.record("to(cpu)", tensor)
            return original_to(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, "to", functools.wraps(original_to)(to))


def _backbone() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


BARS = {"no_bar": None, "tqdm": TQDMProgressBar, "rich": RichProgressBar}


def _fit(tmp_path, monkeypatch, bar: str) -> tuple[SyncCounter, RankReallocation, L.Trainer]:
    L.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(80, 16, generator=g)
    y = x[:, :4].argmax(dim=1)
    loader = DataLoader(TensorDataset(x, y), batch_size=4, generator=torch.Generator())
    module = FlexLoRAModule(
        _backbone, ["0", "2"], init_rank=2, max_rank=4, alpha=4.0, modules_to_save=["4"], dropout=0.1,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        lr_scheduler=functools.partial(LinearWarmupDecay, warmup_ratio=0.2),
    )
    realloc = RankReallocation(b0=1, t_warmup=2, t_final=2, delta_t=4, importance="sensitivity",
                               b_schedule="constant")
    counter = SyncCounter()
    # the callbacks of the shipped configs: LR monitor, periodic checkpoints, a progress bar
    callbacks = [counter, realloc, LearningRateMonitor(logging_interval="step"),
                 ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=LOG_EVERY, save_last=True)]
    if BARS[bar] is not None:
        callbacks.append(BARS[bar]())
    trainer = L.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, max_steps=MAX_STEPS,
        log_every_n_steps=LOG_EVERY, logger=CSVLogger(tmp_path), enable_progress_bar=BARS[bar] is not None,
        enable_model_summary=False, gradient_clip_val=1.0, callbacks=callbacks,
    )
    counter.patched(monkeypatch)
    trainer.fit(module, loader)
    monkeypatch.undo()
    return counter, realloc, trainer


@pytest.mark.parametrize("bar", sorted(BARS))
def test_training_steps_make_no_host_sync_between_logging_steps_and_events(tmp_path, monkeypatch, bar):
    counter, realloc, trainer = _fit(tmp_path, monkeypatch, bar)
    assert trainer.global_step == MAX_STEPS
    assert {e["step"] for e in realloc.history} == EVENTS
    special = EVENTS | {s for s in range(1, MAX_STEPS + 1) if s % LOG_EVERY == 0}
    plain = [s for s in range(1, MAX_STEPS) if s not in special]  # the last step's window never closes
    syncs = {s: counter.reads[s] for s in plain if counter.reads[s]}
    assert not syncs, "host syncs in plain training steps:\n" + "\n".join(
        f"step {s}: {len(r)} per step, e.g. {r[:3]}" for s, r in syncs.items())
    # the counter does see reads: the loggers and the non-finite guard read at the logging cadence
    assert counter.reads[LOG_EVERY], "no read counted at the logging step: the patches are not effective"
    # train/loss still reaches the loggers (at the cadence) and, with a bar, the bar
    assert "train/loss" in trainer.logged_metrics
    assert ("loss" in trainer.progress_bar_metrics) == (BARS[bar] is not None)
