"""Where allocation events go once a driver returns them: the loggers and the run folder's spectra file.

Every method's events take this one path (``RankReallocation`` calls it): scalars at the event's own step
(``flexlora/budget``, ``flexlora/total_rank``, ``flexlora/flip_flops``, ``flexlora_rank/<module>``,
``flexlora_importance/<module>``), the driver's deferred measurements (``flexlora/<key>``), and
``lambda_spectra.json`` with every module's active λ at every event.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from flexlora_pl.runs.atomic import write_json_atomic

__all__ = ["SPECTRA_FILENAME", "log_event", "log_measurements", "write_spectra"]

SPECTRA_FILENAME = "lambda_spectra.json"
"""Written into the run folder at every event: every module's active λ as scored there (paper Figure 3)."""


def log_event(loggers: Iterable[Any], record: dict[str, Any], layer_names: Sequence[str], flip_flops: int,
              verbose: bool = False) -> None:
    """Send one event's scalars to every logger at the event's step.

    Written straight to the loggers (as ``LearningRateMonitor`` does): ``self.log`` from a callback only reaches
    them on steps that are multiples of ``log_every_n_steps``, and events are not.

    Args:
        loggers: the Trainer's loggers.
        record: the event's history record (``step``, ``budget``, ``ranks``, ``scores``, ``pruned``, ``expanded``).
        layer_names: the adapted matrices, in the record's order.
        flip_flops: the run's flip-flops so far, this event's included.
        verbose: also report the event through ``rank_zero_info``.
    """
    metrics: dict[str, float] = {
        "flexlora/budget": float(record["budget"]),
        "flexlora/total_rank": float(sum(record["ranks"])),
        "flexlora/flip_flops": float(flip_flops),
    }
    for name, rank, score in zip(layer_names, record["ranks"], record["scores"], strict=True):
        metrics[f"flexlora_rank/{name}"] = float(rank)
        metrics[f"flexlora_importance/{name}"] = float(score)
    for logger in loggers:
        logger.log_metrics(metrics, step=record["step"])
    if verbose:
        rank_zero_info(f"[step {record['step']}] b={record['budget']} total_rank={sum(record['ranks'])} "
                       f"pruned={record['pruned']} expanded={record['expanded']}")


def log_measurements(measurements: Iterable[tuple[int, int, dict[str, float]]], history: list[dict[str, Any]],
                     loggers: Iterable[Any] | None) -> None:
    """Add a driver's deferred measurements to their events' records and log them at their steps.

    Args:
        measurements: ``(step, event index, values)`` as :meth:`AllocationDriver.measurements` returns them.
        history: the run's event records (updated in place).
        loggers: the Trainer's loggers, or ``None`` to update the records only (a checkpoint being written).
    """
    for step, index, values in measurements:
        if 0 <= index < len(history):
            history[index].update(values)
        for logger in loggers or ():
            logger.log_metrics({f"flexlora/{key}": value for key, value in values.items()}, step=step)


@rank_zero_only
def write_spectra(trainer: Trainer, spectra: list[dict[str, Any]]) -> None:
    """Rewrite ``<run folder>/lambda_spectra.json`` with every event's spectra (no file without a logger)."""
    folder = trainer.log_dir if trainer.loggers and trainer.log_dir else None
    if folder is not None:
        write_json_atomic(f"{folder}/{SPECTRA_FILENAME}", {"events": spectra})
