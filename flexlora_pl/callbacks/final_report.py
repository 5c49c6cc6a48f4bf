"""``FinalMetricsReport``: print the run's final validation metrics, next to the majority-class baseline."""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

__all__ = ["FinalMetricsReport"]


class FinalMetricsReport(Callback):
    """At the end of ``fit``, print every ``val*`` metric of the last validation.

    When the data module offers ``majority_class_share()`` (a classifier that always predicts the most
    frequent class would score that accuracy), it is printed too, with the margin in points.

    Args:
        prefix: only metrics whose name starts with this are printed.
    """

    def __init__(self, prefix: str = "val") -> None:
        super().__init__()
        self.prefix = prefix
        self.summary: dict[str, float] = {}

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.summary = {
            name: float(value) for name, value in sorted(trainer.callback_metrics.items())
            if name.startswith(self.prefix) and value.numel() == 1
        }
        share = getattr(trainer.datamodule, "majority_class_share", None)
        if callable(share):
            self.summary["majority_class_share"] = float(share())
        self._print(trainer)

    @rank_zero_only
    def _print(self, trainer: Trainer) -> None:
        lines = [f"Final validation metrics after {trainer.global_step} optimizer steps:"]
        lines += [f"  {name:<28} {value:.4f}" for name, value in self.summary.items()]
        accuracy = self.summary.get(f"{self.prefix}/accuracy")
        share = self.summary.get("majority_class_share")
        if accuracy is not None and share is not None:
            lines.append(
                f"  accuracy {100 * accuracy:.1f}% vs majority-class share {100 * share:.1f}% "
                f"({100 * (accuracy - share):+.1f} points)"
            )
        print("\n".join(lines), flush=True)
