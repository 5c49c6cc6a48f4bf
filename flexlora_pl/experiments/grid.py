"""The sweep files' old home: everything is in :mod:`flexlora_pl.experiments.sweep_file`, re-exported here so
``from flexlora_pl.experiments.grid import …`` keeps working."""

from flexlora_pl.experiments.sweep_file import TEST_CHOICES, Run, Sweep, SweepError, Task, load_sweep, parse_sweep

__all__ = ["TEST_CHOICES", "Run", "Sweep", "SweepError", "Task", "load_sweep", "parse_sweep"]
