"""Which Lightning strategies a run may use: FSDP and DeepSpeed are refused before any work."""

from __future__ import annotations

from typing import Any

__all__ = ["refuse_sharded_strategy"]


def refuse_sharded_strategy(trainer: Any) -> None:
    """Raise before any work when the Trainer's strategy shards parameters or optimizer state (FSDP, DeepSpeed).

    Rank masks, the optimizer-state surgery of allocation events, importance scores over whole λ vectors
    and the slim checkpoints all assume every process holds whole adapter tensors; on shards they would
    be silently wrong, so these strategies are refused rather than half supported.
    """
    strategy = type(getattr(trainer, "strategy", None)).__name__  # a bare stand-in trainer has none
    if "FSDP" in strategy or "DeepSpeed" in strategy:
        raise ValueError(
            f"strategy {strategy} shards parameters and optimizer state, which flexlora_pl does not support: rank "
            "masks, allocation events and checkpoints need whole adapter tensors on every process. Use "
            "trainer.strategy: ddp (the adapters are small; only the frozen base is replicated) with "
            "trainer.precision: bf16-true or bf16-mixed to fit the base model on each GPU."
        )
