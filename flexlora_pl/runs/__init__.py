"""What a run needs around training: run folders, seeds, atomic checkpoint writes, RNG states, the LR schedule."""

from flexlora_pl.runs.checkpoint_io import AtomicCheckpointIO
from flexlora_pl.runs.lr_scheduler import LinearWarmupDecay
from flexlora_pl.runs.run_folder import RunFolder, newest_trained_checkpoint, run_folder_of
from flexlora_pl.runs.seeding import resolve_seed

__all__ = ["AtomicCheckpointIO", "LinearWarmupDecay", "RunFolder", "newest_trained_checkpoint", "resolve_seed",
           "run_folder_of"]
