"""Callbacks that test configs load by class path (``run_helpers.X``; the tests put this folder on
PYTHONPATH): slow a run down so a test can interrupt it, and dump the final adapter state."""

from __future__ import annotations

import time

import torch
from lightning.pytorch import Callback


class SlowDown(Callback):
    """Sleep after every training batch, so a test can signal the process mid-run."""

    def __init__(self, seconds: float = 0.1) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


class DumpAdapters(Callback):
    """At the end of fit, save every FlexLoRA tensor and mask of the module to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        state = {}
        for name, layer in pl_module.flexlora_layers():
            for key in ("lora_P", "lora_lambda", "lora_Q", "rank_mask"):
                state[f"{name}.{key}"] = getattr(layer, key).detach().cpu().clone()
        state["global_step"] = torch.tensor(trainer.global_step)
        torch.save(state, self.path)



class CrashAt(Callback):
    """Raise a ``RuntimeError`` after optimizer step ``step`` (a stand-in for any crash mid-run)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError(f"simulated crash at step {self.step}")


class SignalAt(Callback):
    """Send ``signal`` (a name: ``SIGTERM``, ``SIGINT``) to this process at the end of training batch ``batch``.

    ``batch`` counts the run's training batches from 0 across epochs (Lightning's ``total_batch_idx``), so a
    resumed run, which starts after the batch, never sends it again.
    """

    def __init__(self, batch: int, signal: str = "SIGTERM") -> None:
        import signal as signals

        if signal not in signals.Signals.__members__:
            raise ValueError(f"SignalAt: unknown signal {signal!r}; use a name such as 'SIGTERM' or 'SIGINT'")
        self.batch = batch
        self.signum = signals.Signals[signal]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        import os

        if trainer.fit_loop.total_batch_idx == self.batch:
            os.kill(os.getpid(), self.signum)


class DumpTrained(Callback):
    """At the end of fit, save every trainable tensor, every ``rank_mask`` buffer and the allocation history of
    the module to ``path`` (any method: FlexLoRA, LoRA, AdaLoRA)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module):
        state = {name: p.detach().cpu().clone() for name, p in pl_module.named_parameters() if p.requires_grad}
        state.update({name: b.detach().cpu().clone() for name, b in pl_module.named_buffers()
                      if name.endswith("rank_mask")})
        realloc = next((cb for cb in trainer.callbacks if type(cb).__name__ == "RankReallocation"), None)
        torch.save({"tensors": state, "history": list(realloc.history) if realloc is not None else [],
                    "global_step": trainer.global_step}, self.path)
