"""A stop request (SIGTERM, or the ``flexlora`` command's first Ctrl-C) during fitting waits for the batch that
steps the optimizer, in process and in a fraction of a second: every micro-batch of full and partial
accumulation windows, the request kept across Lightning's handler setup, and nothing held outside fitting.
The subprocess runs through the ``flexlora`` command are in ``test_crash_resume.py``."""

from __future__ import annotations

import os
import signal

import pytest
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.utilities.exceptions import SIGTERMException

from flexlora_pl import InterruptCheckpoint
from flexlora_pl.callbacks.interrupt_checkpoint import defer_stop_to_optimizer_step

BATCHES = 7  # with 3 micro-batches a window: windows 0-2, 3-5 and the partial window 6


class _StopAt(Callback):
    """Request a stop at the end of training batch ``batch``: a real SIGTERM, or the flag Ctrl-C sets."""

    def __init__(self, batch: int, how: str) -> None:
        self.batch, self.how, self.trained = batch, how, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == self.batch:
            if self.how == "sigterm":
                os.kill(os.getpid(), signal.SIGTERM)
            else:
                trainer._signal_connector.received_sigterm = True
        self.trained = batch_idx + 1


def _trainer(tmp_path, accumulate: int, *callbacks: Callback, epochs: int = 2) -> Trainer:
    return Trainer(default_root_dir=tmp_path, max_epochs=epochs, limit_train_batches=BATCHES, limit_val_batches=1,
                   accumulate_grad_batches=accumulate, callbacks=list(callbacks), logger=False,
                   enable_progress_bar=False, enable_model_summary=False)


@pytest.mark.parametrize("how", ["sigterm", "flag"])
@pytest.mark.parametrize("batch", range(BATCHES))
def test_a_stop_waits_for_the_batch_that_steps_the_optimizer(tmp_path, batch, how):
    stop = _StopAt(batch, how)
    trainer = _trainer(tmp_path, 3, stop, InterruptCheckpoint())
    with pytest.raises(SIGTERMException):
        trainer.fit(BoringModel())
    window_end = min((batch // 3 + 1) * 3, BATCHES)
    assert (stop.trained, trainer.global_step) == (window_end, -(-window_end // 3))


def test_without_accumulation_the_stop_is_after_the_current_batch(tmp_path):
    stop = _StopAt(2, "sigterm")
    trainer = _trainer(tmp_path, 1, stop)
    defer_stop_to_optimizer_step(trainer)
    with pytest.raises(SIGTERMException):
        trainer.fit(BoringModel())
    assert (stop.trained, trainer.global_step) == (3, 3)


def test_a_request_before_fit_is_kept_and_teardown_clears_it(tmp_path):
    trainer = _trainer(tmp_path, 3, epochs=1)
    defer_stop_to_optimizer_step(trainer)
    defer_stop_to_optimizer_step(trainer)  # again: harmless
    trainer._signal_connector.received_sigterm = True  # a Ctrl-C while the model loads
    with pytest.raises(SIGTERMException):
        trainer.fit(BoringModel())
    assert (trainer.global_step, trainer.fit_loop.epoch_loop.batch_idx) == (1, 2)  # after the first window
    assert not trainer.received_sigterm and signal.getsignal(signal.SIGTERM) is not None


def test_outside_fitting_a_request_is_due_at_once(tmp_path):
    trainer = _trainer(tmp_path, 3)
    defer_stop_to_optimizer_step(trainer)
    trainer._signal_connector.received_sigterm = True
    assert trainer.received_sigterm


def test_a_foreign_signal_connector_is_refused_by_name(tmp_path):
    class Custom(_SignalConnector):
        pass

    trainer = _trainer(tmp_path, 3)
    trainer._signal_connector = Custom(trainer)
    with pytest.raises(TypeError, match="Custom, not Lightning's _SignalConnector"):
        defer_stop_to_optimizer_step(trainer)
