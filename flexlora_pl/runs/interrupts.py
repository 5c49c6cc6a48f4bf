"""How a command stops on SIGTERM or Ctrl-C: after an optimizer step, with exit status ``128 + signal``.

SIGTERM (Lightning's own handler) and the first Ctrl-C (:meth:`StopSignal.catch_sigint`) both ask the
Trainer to stop; the stop is held until the batch that steps the optimizer
(:func:`defer_stop_to_optimizer_step`), so a checkpoint written on the way out (``InterruptCheckpoint``)
never drops accumulated gradients and a resume with ``--ckpt_path last`` is exact. A second Ctrl-C aborts
at once. The command then exits with :class:`RunInterrupted` (143 after SIGTERM, 130 after Ctrl-C), never 0.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["RunInterrupted", "StopSignal", "defer_stop_to_optimizer_step"]


class RunInterrupted(SystemExit):
    """A run stopped by SIGTERM or Ctrl-C; the exit status is ``128 + signal`` (143 or 130), never 0."""


class _StepAlignedSignalConnector(_SignalConnector):
    """Lightning's signal connector whose stop request waits for the end of a gradient-accumulation window.

    Lightning's SIGTERM handler (and the ``flexlora`` command's first Ctrl-C) set ``received_sigterm``, and
    the loops read it after every training batch, after every validation batch and at the end of an epoch.
    Here the assignment only records the request; reading it answers ``True`` only while no accumulation
    window is open, that is when the last training batch stepped the optimizer (the window's last
    micro-batch, or the epoch's last batch, which closes a partial window). Outside fitting the request
    is answered at once.
    """

    _pending_stop: bool = False

    @property  # type: ignore[override]
    def received_sigterm(self) -> bool:
        return self._pending_stop and not _inside_accumulation_window(self.trainer)

    @received_sigterm.setter
    def received_sigterm(self, value: bool) -> None:
        self._pending_stop = bool(value)

    def register_signal_handlers(self) -> None:
        pending = self._pending_stop  # a Ctrl-C during setup, before Lightning installs its handlers
        super().register_signal_handlers()
        self._pending_stop = pending

    def teardown(self) -> None:
        super().teardown()
        self._pending_stop = False  # a request that came too late for this run does not stop the next one


def _inside_accumulation_window(trainer: Trainer) -> bool:
    """Whether fitting has trained micro-batches whose gradients no optimizer step has consumed yet."""
    if trainer.state.fn != TrainerFn.FITTING:
        return False
    return trainer.fit_loop.epoch_loop._should_accumulate()


def defer_stop_to_optimizer_step(trainer: Trainer) -> None:
    """Make a SIGTERM (or the ``flexlora`` command's first Ctrl-C) stop ``trainer`` only after an optimizer step.

    Lightning honours a stop after any training batch; with ``accumulate_grad_batches > 1`` a stop inside
    a window would drop the gradients accumulated so far, and the resumed run's next optimizer step would
    see only the remaining micro-batches. After this call the stop is held until the batch that steps the
    optimizer, so a checkpoint written on the way out resumes exactly. Calling it again is harmless.

    Args:
        trainer: the Trainer, before or during ``fit``; its signal connector is switched in place, so a
            handler Lightning has already installed keeps working.

    Raises:
        TypeError: when the trainer's signal connector is not Lightning's ``_SignalConnector``.
    """
    connector = trainer._signal_connector
    if isinstance(connector, _StepAlignedSignalConnector):
        return
    if type(connector) is not _SignalConnector:
        raise TypeError(f"defer_stop_to_optimizer_step: the trainer's signal connector is a "
                        f"{type(connector).__qualname__}, not Lightning's _SignalConnector; use a Trainer whose "
                        f"_signal_connector is Lightning's own, or drop the custom connector")
    pending = bool(connector.__dict__.pop("received_sigterm", False))
    connector.__class__ = _StepAlignedSignalConnector
    connector.received_sigterm = pending


class StopSignal:
    """The signal that stopped a command (``None``: none yet), the first-Ctrl-C handler that records it, and
    the exit that follows."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def catch_sigint(self, trainer: Trainer) -> Callable[[], None]:
        """First Ctrl-C: stop like SIGTERM, after the next optimizer step (exact resume); the second aborts.

        Both stops wait for the batch that steps the optimizer (:func:`defer_stop_to_optimizer_step`): with
        ``accumulate_grad_batches > 1`` a stop inside an accumulation window is held until the window's end.

        Args:
            trainer: the Trainer of the command, before its subcommand runs.

        Returns:
            A call that puts the previous SIGINT handler back (a no-op outside the main thread, where no
            handler is installed).
        """
        defer_stop_to_optimizer_step(trainer)
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            if self.signum is None:
                self.signum = signum
                trainer._signal_connector.received_sigterm = True  # what SIGTERM sets; due after a step
                print("\nCtrl-C: stopping after the next optimizer step and writing a resumable checkpoint "
                      "(press Ctrl-C again to abort at once)", file=sys.stderr, flush=True)
                return
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt

        signal.signal(signal.SIGINT, handler)
        return lambda: signal.signal(signal.SIGINT, previous)

    def interrupted(self, subcommand: str, trainer: Trainer, trained: bool) -> RunInterrupted:
        """Say where the stopped command left its run and how to resume it; returns the exit to raise.

        Args:
            subcommand: ``fit``, ``validate``, ``test`` or ``predict``.
            trainer: the command's Trainer.
            trained: whether the fit took an optimizer step in this process (so its folder is kept).
        """
        signum = self.signum or signal.SIGTERM
        where = f" at optimizer step {trainer.global_step}" if subcommand == "fit" else ""
        message = f"flexlora {subcommand} stopped by {signal.Signals(signum).name}{where}."
        if trained and trainer.log_dir:
            message += (f" Everything it wrote is in {trainer.log_dir}. Resume it with the same command plus "
                        f"--ckpt_path last --version {getattr(trainer.logger, 'version', None)}")
        rank_zero_info(message)
        return RunInterrupted(128 + signum)
