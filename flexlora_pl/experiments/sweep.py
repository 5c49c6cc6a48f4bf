"""The sweep runner's old home: everything is in :mod:`flexlora_pl.experiments.sweep_runner`, re-exported here
so ``from flexlora_pl.experiments.sweep import …`` keeps working."""

from flexlora_pl.experiments.sweep_runner import (
    BROKEN,
    DONE,
    NEW,
    PROGRAM,
    RESUME,
    TEST,
    RunPlan,
    SweepResult,
    command_line,
    log_path,
    plan_run,
    print_commands,
    read_record,
    run_sweep,
)

__all__ = ["BROKEN", "DONE", "NEW", "PROGRAM", "RESUME", "TEST", "RunPlan", "SweepResult", "command_line",
           "log_path", "plan_run", "print_commands", "read_record", "run_sweep"]
