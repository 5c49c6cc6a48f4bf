"""The ``flexlora-sweep`` command: run a grid of tasks × methods × seeds from a sweep file.

    flexlora-sweep configs/sweeps/table1_glue.yaml                      # every run, one after another
    flexlora-sweep configs/sweeps/table1_glue.yaml --list               # each run's state, nothing runs
    flexlora-sweep configs/sweeps/table1_glue.yaml --print > jobs.txt   # one shell line per run (job arrays)
    flexlora-sweep configs/sweeps/demo_comparison.yaml --methods lora,flexlora --seeds 0 -- --trainer.max_epochs 1

Flags after ``--`` are added to every ``flexlora`` command (after the sweep file's, so they win).
Running the same command again continues the sweep: finished runs are skipped, interrupted ones resume.
Exit status: 0 when every run finished, 1 when any failed, 2 for a bad sweep file or option, 130 when
stopped by Ctrl-C.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from flexlora_pl.experiments.sweep_file import SweepError, load_sweep
from flexlora_pl.experiments.sweep_runner import plan_run, print_commands, run_sweep

__all__ = ["main"]


def _names(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _seeds(text: str) -> list[int]:
    try:
        return [int(part) for part in _names(text)]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--seeds takes integers separated by commas, e.g. 0,1,2; got {text!r}") \
            from err


def build_parser() -> argparse.ArgumentParser:
    """The command's options."""
    parser = argparse.ArgumentParser(
        prog="flexlora-sweep",
        description="Run a sweep file's grid of tasks × methods × seeds through `flexlora fit` (and `test`), "
                    "one run after another; finished runs are skipped and interrupted ones resume. Flags after "
                    "`--` are added to every run.",
    )
    parser.add_argument("sweep", help="the sweep file (YAML), e.g. configs/sweeps/table1_glue.yaml")
    parser.add_argument("--tasks", type=_names, default=None, help="only these tasks (comma-separated)")
    parser.add_argument("--methods", type=_names, default=None, help="only these methods (comma-separated)")
    parser.add_argument("--seeds", type=_seeds, default=None, help="only these seeds (comma-separated)")
    parser.add_argument("--save-dir", default=None, help="root of the run folders (default: the file's save_dir)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--print", dest="print_commands", action="store_true",
                      help="print one shell line per run with work left (fit && test) and run nothing")
    mode.add_argument("--list", "--dry-run", dest="list_runs", action="store_true",
                      help="list every run with its folder and state, and run nothing")
    parser.add_argument("--verbose", action="store_true", help="show flexlora's output as well as logging it")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``flexlora-sweep``; returns (and exits with) the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = build_parser()
    options = parser.parse_args(argv)
    try:
        sweep = load_sweep(options.sweep)
        runs = sweep.runs(options.tasks, options.methods, options.seeds, options.save_dir)
    except SweepError as err:
        parser.error(str(err))
    plans = [plan_run(run) for run in runs]
    if options.print_commands:
        print_commands(plans, extra, sys.stdout, sys.stderr)
        return 0
    if options.list_runs:
        for plan in plans:
            print(f"{plan.state:9} {plan.run.folder}" + (f"  ({plan.detail})" if plan.detail else ""))
        return 0
    print(f"sweep {sweep.name}: {len(plans)} run(s) under {runs[0].save_dir if runs else sweep.save_dir}/"
          f"{sweep.name}", flush=True)
    result = run_sweep(plans, extra, verbose=options.verbose)
    summary = f"{result.ran} ran, {result.skipped} skipped, {len(result.failed or [])} failed"
    print(f"sweep {sweep.name}: {summary}")
    for label, where in result.failed or []:
        print(f"  FAILED {label}: {where}")
    if result.interrupted:
        return 130
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
