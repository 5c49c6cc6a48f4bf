"""The ``flexlora-sweep`` command: run a grid of tasks × methods × seeds from a sweep file.

    flexlora-sweep configs/sweeps/table1_glue.yaml                      # every run, one after another
    flexlora-sweep configs/sweeps/table1_glue.yaml --list               # each run's state, nothing runs
    flexlora-sweep configs/sweeps/table1_glue.yaml --print > jobs.txt   # one shell line per run (job arrays)
    flexlora-sweep configs/sweeps/demo_comparison.yaml --methods lora,flexlora --seeds 0 -- --trainer.max_epochs 1
    flexlora-sweep configs/sweeps/offline_tuned.yaml --workers 2             # a tuned comparison: search, then final
    flexlora-sweep configs/sweeps/offline_tuned.yaml --stage search --storage postgresql://host/db   # shared study
    flexlora-sweep configs/sweeps/offline_tuned.yaml --executor slurm --workers 8 --storage journal:/shared/j.log
    flexlora-sweep configs/sweeps/offline_tuned.yaml --print --workers 4 --storage postgresql://host/db  # any scheduler

A sweep file with a ``search:`` section is a tuned comparison (:mod:`flexlora_pl.experiments.tuned`): each task ×
method is searched by an Optuna study on data carved from training, then its best values run at the seeds.
``--executor slurm`` runs the same work as SLURM jobs through submitit (:mod:`flexlora_pl.experiments.slurm`).

Flags after ``--`` are added to every ``flexlora`` command (after the sweep file's, so they win).
Running the same command again continues the sweep: finished runs are skipped, interrupted ones resume.
Exit status: 0 when every run finished, 1 when any failed, 2 for a bad sweep file or option, 130 when
stopped by Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from flexlora_pl.experiments.search_space import SearchError
from flexlora_pl.experiments.sweep_file import SweepError, load_sweep
from flexlora_pl.experiments.sweep_runner import plan_run, print_commands, run_parallel, run_sweep

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
    tuned = parser.add_argument_group("tuned comparisons (sweep files with a search: section)")
    tuned.add_argument("--stage", choices=("all", "search", "final"), default="all",
                       help="search: run the studies and select each one's best (selected.json, sensitivity.png); "
                            "final: select and run the selected values at the seeds; all (default): both")
    tuned.add_argument("--workers", type=_positive, default=1,
                       help="runs at once (any sweep, local executor), each with its own GPU where there are GPUs "
                            "and its share of CPU threads")
    tuned.add_argument("--storage", default=None,
                       help="the Optuna storage many workers share: a database URL (postgresql://..., mysql://..., "
                            "sqlite:///PATH) or journal:PATH for a journal file on a shared file system (default: "
                            "SQLite in the sweep's folder)")
    cluster = parser.add_argument_group("cluster (--executor slurm; the sweep file's slurm: section, which these "
                                        "flags override)")
    cluster.add_argument("--executor", choices=("local", "slurm", "submitit-local"), default="local",
                         help="local (default): processes on this machine; slurm: SLURM jobs through submitit "
                              "(a search's workers as one job array, each run one array task; requeued jobs "
                              "resume); submitit-local: the slurm path through submitit's local executor, for "
                              "testing it without a cluster")
    cluster.add_argument("--slurm-partition", default=None, help="the partition of every job")
    cluster.add_argument("--slurm-time", type=_positive, default=None, help="each job's time limit in minutes "
                         "(default 240); a job at its limit is requeued and resumes")
    cluster.add_argument("--slurm-gpus", type=_count, default=None, help="GPUs per job (default 1)")
    cluster.add_argument("--slurm-cpus", type=_positive, default=None, help="CPU cores per job")
    cluster.add_argument("--slurm-mem", type=_gigabytes, default=None, help="memory per job in GB")
    return parser


def _whole(least: int):
    """An argparse type: a whole number >= ``least``."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {text!r}") from err
        if value < least:
            raise argparse.ArgumentTypeError(f"expected a whole number >= {least}, got {value}")
        return value

    return parse


_positive, _count = _whole(1), _whole(0)


def _gigabytes(text: str) -> float:
    try:
        value = float(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"expected the memory in GB (a number > 0), got {text!r}") from err
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected the memory in GB (a number > 0), got {value:g}")
    return value


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
    slurm_options = None
    if options.executor != "local" and not (options.print_commands or options.list_runs):
        slurm_options = _cluster(sweep, options, parser)
    if sweep.search is not None:
        try:
            return _tuned(sweep, options, extra, parser, slurm_options)
        except SearchError as err:
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
    if slurm_options is not None:
        from flexlora_pl.experiments import slurm

        result = slurm.run_plans(plans, options.executor, slurm_options, extra)
    elif options.workers > 1:
        results = run_parallel(plans, extra, options.workers, verbose=options.verbose)
        failed = [item for r in results for item in (r.failed or [])]
        print(f"sweep {sweep.name}: {sum(r.ran for r in results)} ran, {sum(r.skipped for r in results)} skipped, "
              f"{len(failed)} failed")
        for label, where in failed:
            print(f"  FAILED {label}: {where}")
        return 130 if any(r.interrupted for r in results) else 0 if all(r.ok for r in results) else 1
    else:
        result = run_sweep(plans, extra, verbose=options.verbose)
    summary = f"{result.ran} ran, {result.skipped} skipped, {len(result.failed or [])} failed"
    print(f"sweep {sweep.name}: {summary}")
    for label, where in result.failed or []:
        print(f"  FAILED {label}: {where}")
    if result.interrupted:
        return 130
    return 0 if result.ok else 1


def _cluster(sweep, options: argparse.Namespace, parser: argparse.ArgumentParser):
    """The jobs' options, once ``--executor slurm`` is known to work here (refused before anything is written)."""
    from flexlora_pl.experiments import slurm

    try:
        slurm.check_executor(options.executor)
    except slurm.SlurmError as err:
        parser.error(str(err))
    if sweep.search is not None and options.storage is None and options.executor == "slurm":
        print("warning: the studies' default storage is SQLite in the sweep's folder, which is unsafe on a network "
              "file system shared by jobs on many nodes; give --storage a PostgreSQL URL or journal:PATH",
              flush=True)
    return slurm.SlurmOptions.of(sweep, partition=options.slurm_partition, time=options.slurm_time,
                                 gpus=options.slurm_gpus, cpus=options.slurm_cpus, mem=options.slurm_mem)


def _tuned(sweep, options: argparse.Namespace, extra: list[str], parser: argparse.ArgumentParser,
           slurm_options=None) -> int:
    """A sweep with a search: section: the search stage, the selection, then the final runs at the seeds."""
    from flexlora_pl.cli import search_checks
    from flexlora_pl.experiments import slurm, tuned

    if options.list_runs:
        parser.error("--list is for sweeps without a search: section; a tuned sweep's trials are in its studies "
                     "(flexlora-results shows them once selected), and --print gives the commands of both stages")
    if options.print_commands:
        return _print_tuned(sweep, options, extra)
    where = dict(tasks=options.tasks, methods=options.methods, save_dir=options.save_dir)
    if options.stage in ("all", "search"):
        search_checks.check_trial_flags(sweep, options.tasks, options.methods, options.save_dir, extra)
        search_checks.check_objective(sweep, options.tasks, options.methods, options.save_dir, extra)
        if slurm_options is not None:
            searched = slurm.run_search(sweep, options.executor, slurm_options, options.storage, options.workers,
                                        extra=extra, **where)
        else:
            searched = tuned.run_search(sweep, options.storage, options.workers, extra=extra, **where)
        if not searched:
            return 1
    chosen = tuned.select(sweep, options.storage, **where)
    if options.stage == "search":
        return 0
    runs = tuned.final_runs(sweep, chosen, options.tasks, options.methods, options.seeds, options.save_dir)
    stale = tuned.trained_elsewhere(sweep, runs)
    if stale:
        raise SearchError("final runs trained at other values than the ones now selected (the search changed "
                          "since):\n  " + "\n  ".join(stale)
                          + "\nmove those folders away (nothing is deleted for you), then run the final stage again")
    plans = [plan_run(run) for run in runs]
    print(f"final {sweep.name}: {len(plans)} run(s) at the selected values", flush=True)
    if slurm_options is not None:
        results = [slurm.run_plans(plans, options.executor, slurm_options, extra)]
    else:
        results = run_parallel(plans, extra, options.workers, verbose=options.verbose)
    failed = [item for result in results for item in (result.failed or [])]
    print(f"final {sweep.name}: {sum(r.ran for r in results)} ran, {sum(r.skipped for r in results)} skipped, "
          f"{len(failed)} failed")
    for label, where_ in failed:
        print(f"  FAILED {label}: {where_}")
    if any(r.interrupted for r in results):
        return 130
    return 0 if not failed else 1


def _print_tuned(sweep, options: argparse.Namespace, extra: list[str]) -> int:
    """``--print`` of a tuned sweep, for any scheduler: the search stage as ``--workers`` identical worker lines that
    share the studies through the storage, then the final stage: its runs' lines once every study is selected
    (``selected.json``), else the line that selects and runs them."""
    import shlex
    from pathlib import Path

    from flexlora_pl.experiments import search_study, tuned

    folder = Path(options.save_dir or sweep.save_dir) / sweep.name
    url = options.storage or search_study.default_storage_url(folder)
    where = [flag for name, value in (("--tasks", options.tasks), ("--methods", options.methods),
                                      ("--save-dir", options.save_dir)) if value
             for flag in (name, ",".join(value) if isinstance(value, list) else str(value))]
    base = ["flexlora-sweep", sweep.source, *where, "--storage", url]
    tail = ["--", *extra] if extra else []
    print(f"# search: {options.workers} worker line(s); run them at once, anywhere the storage is reachable "
          "(SQLite only on one machine)", file=sys.stderr)
    for _ in range(options.workers):
        print(shlex.join([*base, "--stage", "search", *tail]))
    cells = {(run.task, run.method) for run in sweep.runs(options.tasks, options.methods, save_dir=options.save_dir)}
    chosen = {cell: json.loads(path.read_text()) for cell in cells
              if (path := folder / cell[0] / cell[1] / tuned.SELECTED_FILENAME).is_file()}
    print("# final: after every search line has ended", file=sys.stderr)
    if len(chosen) < len(cells):
        print(shlex.join([*base, "--stage", "final", *tail]))
        return 0
    runs = tuned.final_runs(sweep, chosen, options.tasks, options.methods, options.seeds, options.save_dir)
    print_commands([plan_run(run) for run in runs], extra, sys.stdout, sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
