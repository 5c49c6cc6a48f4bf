"""Sweeps on a SLURM cluster through submitit: a tuned search's workers as one job array, each run as an array task.

    flexlora-sweep configs/sweeps/table1_glue.yaml --executor slurm --slurm-partition gpu --slurm-time 240
    flexlora-sweep configs/sweeps/offline_tuned.yaml --executor slurm --workers 8 --storage journal:/shared/optuna.log

The command submits from a machine of the cluster (where ``sbatch`` is), waits for the jobs and prints progress as
the local executor does; submitit's files (job scripts, pickles, every job's log) go to ``<save_dir>/<sweep>/slurm/``.

- **search**: ``--workers N`` jobs of one array, each a :class:`SearchWorker` running the local workers' code
  (:func:`flexlora_pl.experiments.tuned.work`) on the shared studies.
- **runs** (an ordinary sweep's runs, a tuned sweep's final runs): one array task per run with work left, each a
  :class:`RunJob` through :func:`flexlora_pl.experiments.sweep_runner.run_sweep`.

Requeue. SLURM sends a job submitit's signal (``USR2``) :data:`SIGNAL_DELAY_S` seconds before its time limit, and on
preemption where the cluster is set so; submitit then calls the job's ``checkpoint`` and requeues it. A job's
``flexlora`` child ignores that signal (it would kill it); ``checkpoint`` sends the child SIGTERM instead, so it
stops after its next optimizer step and writes its interrupt checkpoint (``InterruptCheckpoint``). A search worker
then holds its trial (:func:`flexlora_pl.experiments.search_study.hold_trial`: it stays running and no worker fails
it as stale) and, once the job runs again, resumes it: the same trial number and folder, ``--ckpt_path last``. A
run's task resumes through the sweep runner's own resume.

``--executor submitit-local`` runs the same jobs through submitit's ``LocalExecutor`` on this machine: it is there
to test this path without a cluster.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from submitit.core.job_environment import JobEnvironment
from submitit.helpers import Checkpointable, DelayedSubmission

from flexlora_pl.experiments import search_study, tuned
from flexlora_pl.experiments.sweep_file import Run, Sweep
from flexlora_pl.experiments.sweep_runner import (
    BROKEN,
    DONE,
    PROGRAM,
    RunPlan,
    SweepResult,
    log_path,
    plan_run,
    run_sweep,
)

__all__ = ["EXECUTORS", "RunJob", "SearchWorker", "SlurmError", "SlurmOptions", "check_executor", "child_pids",
           "run_plans", "run_search"]

EXECUTORS = ("local", "slurm", "submitit-local")
"""``--executor``: this machine's processes, SLURM jobs, or submitit's local executor (the SLURM path, for tests)."""
SIGNAL_DELAY_S = 180
"""How long before its time limit a job is told to stop: the child's stop, checkpoint and exit must fit in it."""
_STOP_WAIT_S = 150.0  # how long checkpoint() waits for the child before it kills it
_MAX_REQUEUES = 1000  # every requeue resumes from a checkpoint, so the time limit may be reached any number of times


class SlurmError(ValueError):
    """``--executor slurm`` cannot run here or with these options; the message says what to do instead."""


@dataclass(frozen=True)
class SlurmOptions:
    """What every job asks SLURM for; the sweep file's ``slurm:`` section, with ``--slurm-*`` flags over it.

    Args:
        partition: the partition (``None``: the cluster's default).
        time: each job's time limit in minutes.
        gpus: GPUs per job.
        cpus: CPU cores per job (``None``: the cluster's default).
        mem: memory per job in GB (``None``: the cluster's default).
        array_parallelism: how many jobs of an array run at once (``None``: all of them).
        sbatch: more sbatch options, e.g. ``{"account": "myproject"}``.
    """

    partition: str | None = None
    time: int = 240
    gpus: int = 1
    cpus: int | None = None
    mem: float | None = None
    array_parallelism: int | None = None
    sbatch: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def of(cls, sweep: Sweep, **flags: Any) -> SlurmOptions:
        """The sweep's ``slurm:`` section (checked when the file was read) with the flags that are set over it."""
        return cls(**{**sweep.slurm, **{key: value for key, value in flags.items() if value is not None}})


def check_executor(kind: str) -> None:
    """Refuse ``--executor slurm`` where SLURM's commands are missing, before anything is submitted or written.

    Raises:
        SlurmError: ``sbatch`` (or ``srun``, which submitit's jobs use) is not on ``PATH``.
    """
    if kind not in EXECUTORS:
        raise SlurmError(f"--executor {kind!r}: expected one of {', '.join(EXECUTORS)}")
    missing = [command for command in ("sbatch", "srun") if kind == "slurm" and shutil.which(command) is None]
    if missing:
        raise SlurmError(f"--executor slurm: {' and '.join(missing)} not found on PATH, so this machine cannot submit "
                         "SLURM jobs; run the command on a login node of the cluster. Elsewhere use --print (one "
                         "shell line per run, for any scheduler's job array) or --executor local (run here)")


# ----------------------------------------------------------------------------- the jobs
class SearchWorker(Checkpointable):
    """One job of the search array: :func:`tuned.work` on the workers' job file, resumed across requeues.

    Args:
        job_file: the workers' job (:func:`tuned.prepare_search`).
        lease_s: how long the trial of a requeued job is held for it; a job that has not run again by then is taken
            for lost, and another worker fails its trial and runs it again.
        env: environment variables the job sets before it works (submitit-local: each worker's threads and GPU).
    """

    def __init__(self, job_file: str, lease_s: float, env: Mapping[str, str] | None = None) -> None:
        self.job_file, self.lease_s, self.env = job_file, lease_s, dict(env or {})
        self.resume: tuple[str, str, int] | None = None  # (task, method, trial number) held at the last requeue
        self._current: tuple[str, str, Any] | None = None

    def __call__(self) -> None:
        _job_environment(self.env)
        tuned.work(self.job_file, self.resume, self._started, _program())

    def _started(self, task: str, method: str, trial: Any) -> None:
        self._current = (task, method, trial)

    def checkpoint(self) -> DelayedSubmission:
        """Stop the running trial's ``flexlora`` (it writes its checkpoint), hold the trial, requeue this worker."""
        _stop_children(_STOP_WAIT_S)
        self.resume = None
        if self._current is not None:
            task, method, trial = self._current
            if search_study.hold_trial(trial, self.lease_s):
                self.resume = (task, method, trial.number)
        return DelayedSubmission(self)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_current": None}  # the Optuna trial stays behind; the resume names it


class RunJob(Checkpointable):
    """One task of a runs array: a run's stages through :func:`run_sweep`, which resumes an interrupted fit."""

    def __init__(self, run: Run, extra: Sequence[str] = ()) -> None:
        self.run, self.extra, self.cwd = run, list(extra), os.getcwd()  # config paths are relative to it

    def __call__(self) -> SweepResult:
        os.chdir(self.cwd)
        _job_environment({})
        return run_sweep([plan_run(self.run)], self.extra, program=_program())

    def checkpoint(self) -> DelayedSubmission:
        """Stop the run's ``flexlora`` (it writes its checkpoint) and requeue this task: the run then resumes."""
        _stop_children(_STOP_WAIT_S)
        return DelayedSubmission(self)


def _program() -> tuple[str, ...]:
    """``flexlora`` with submitit's signal ignored: SLURM signals every process of the job, and the signal's default
    action would kill the run before its checkpoint; the job's own ``checkpoint`` stops it with SIGTERM."""
    return ("sh", "-c", f'trap "" {JobEnvironment.USR_SIG} && exec "$0" "$@"', *PROGRAM)


def _job_environment(env: Mapping[str, str]) -> None:
    os.environ.update(env)
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:  # torch would count the node's cores, not the job's
        os.environ.update(OMP_NUM_THREADS=cpus, MKL_NUM_THREADS=cpus)


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (read from ``/proc``; Linux)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()  # after the command's name: state, ppid, ...
        except OSError:
            continue
        if fields and int(fields[1]) == parent:
            found.append(int(stat.parent.name))
    return found


def _stop_children(wait_s: float) -> None:
    """SIGTERM this process's children (a ``flexlora`` stops after its next optimizer step and writes a checkpoint)
    and wait until they exit, SIGKILL after ``wait_s``."""
    _stop(child_pids(os.getpid()), wait_s)


def _stop(children: Sequence[int], wait_s: float) -> None:
    """SIGTERM the child processes ``children``, wait until they exit, SIGKILL after ``wait_s``. They are not reaped:
    the ``Popen`` that started each still owns it."""
    for pid in children:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + wait_s
    while any(not _exited(pid) for pid in children):
        if time.monotonic() > deadline:
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _exited(pid: int) -> bool:
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already
        return True


# ----------------------------------------------------------------------------- submitting and waiting
def _executor(kind: str, folder: Path, options: SlurmOptions, name: str) -> Any:
    import submitit

    if kind == "slurm":
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=_MAX_REQUEUES)
        mem = None if options.mem is None else f"{round(options.mem * 1024)}MB"
        wanted = dict(partition=options.partition, gpus_per_node=options.gpus or None,
                      cpus_per_task=options.cpus, mem=mem, array_parallelism=options.array_parallelism)
        executor.update_parameters(job_name=name, time=options.time, signal_delay_s=SIGNAL_DELAY_S,
                                   additional_parameters=dict(options.sbatch),
                                   **{key: value for key, value in wanted.items() if value is not None})
        return executor
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=_MAX_REQUEUES)
    executor.update_parameters(timeout_min=options.time, gpus_per_node=options.gpus, signal_delay_s=SIGNAL_DELAY_S)
    return executor


def _await(jobs: Sequence[Any], poll_s: float, tick: Any) -> None:
    """Call ``tick()`` every ``poll_s`` seconds until every job is done; Ctrl-C cancels the jobs."""
    try:
        while not all(job.done() for job in jobs):
            time.sleep(poll_s)
            tick()
    except KeyboardInterrupt:
        for job in jobs:
            with contextlib.suppress(Exception):
                job.cancel(check=False)
        raise


def _outcome(job: Any) -> tuple[Any, str | None]:
    """A finished job's result, or why it failed (the last line of submitit's error)."""
    try:
        return job.result(), None
    except Exception as err:
        lines = [line for line in str(err).splitlines() if line.strip()]
        return None, lines[-1] if lines else type(err).__name__


def run_search(sweep: Sweep, kind: str, options: SlurmOptions, storage_url: str | None = None, workers: int = 1,
               tasks: Sequence[str] | None = None, methods: Sequence[str] | None = None,
               save_dir: str | None = None, extra: Sequence[str] = (), out: TextIO | None = None,
               poll_s: float = 5.0) -> bool:
    """The search stage as a job array of ``workers`` :class:`SearchWorker` jobs; waits for them.

    Returns:
        whether every job finished cleanly.
    """
    out = out or sys.stdout
    job_file, studies = tuned.prepare_search(sweep, storage_url, workers, tasks, methods, save_dir, extra, out)
    folder = job_file.parent / "slurm"
    executor = _executor(kind, folder, options, f"{sweep.name}-search")
    keep = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")
    envs = [{key: value for key, value in tuned.worker_env(index, workers).items() if key in keep}
            if kind == "submitit-local" else {} for index in range(workers)]
    jobs = executor.submit_array([SearchWorker(str(job_file), options.time * 60.0, env) for env in envs])
    print(f"search {sweep.name}: {len(jobs)} job(s) submitted ({kind}: {', '.join(j.job_id for j in jobs)}); "
          f"their logs are in {folder}", file=out, flush=True)
    shown = [""]

    def tick() -> None:
        shown[0] = tuned.print_progress(studies, sweep.search, out, shown[0])

    _await(jobs, poll_s, tick)
    tick()
    errors = [(job, _outcome(job)[1]) for job in jobs]
    for job, error in errors:
        if error is not None:
            print(f"search {sweep.name}: job {job.job_id} failed ({error}); see {job.paths.stderr}", file=out,
                  flush=True)
    return all(error is None for _, error in errors)


def run_plans(plans: Sequence[RunPlan], kind: str, options: SlurmOptions, extra: Sequence[str] = (),
              out: TextIO | None = None, poll_s: float = 5.0) -> SweepResult:
    """Submit every plan with work left as one task of a job array (:class:`RunJob`), with one progress line per run
    as its task ends; finished runs are skipped and broken ones reported, as :func:`run_sweep` does."""
    out = out or sys.stdout
    result = SweepResult(failed=[])
    heads = {id(plan): f"[{index}/{len(plans)}] {plan.run.label}:" for index, plan in enumerate(plans, 1)}
    todo = []
    for plan in plans:
        if plan.state == DONE:
            result.skipped += 1
            print(f"{heads[id(plan)]} finished, skipped" + (f" ({plan.detail})" if plan.detail else ""), file=out,
                  flush=True)
        elif plan.state == BROKEN:
            result.failed.append((plan.run.label, str(plan.run.folder)))
            print(f"{heads[id(plan)]} FAILED: {plan.detail}", file=out, flush=True)
        else:
            todo.append(plan)
    if not todo:
        return result
    folder = Path(todo[0].run.save_dir) / todo[0].run.sweep / "slurm"
    executor = _executor(kind, folder, options, todo[0].run.sweep)
    jobs = executor.submit_array([RunJob(plan.run, extra) for plan in todo])
    print(f"{len(jobs)} run(s) submitted ({kind}); their logs are in {folder}", file=out, flush=True)
    waiting = {job.job_id: (job, plan) for job, plan in zip(jobs, todo, strict=True)}

    def tick() -> None:
        for job_id, (job, plan) in list(waiting.items()):
            if not job.done():
                continue
            del waiting[job_id]
            result.ran += 1
            outcome, error = _outcome(job)
            if error is not None or not outcome.ok:
                result.failed.append((plan.run.label, str(log_path(plan.run))))
                print(f"{heads[id(plan)]} FAILED ({error or 'its run failed'}): see {log_path(plan.run)} and "
                      f"{job.paths.stderr}", file=out, flush=True)
            else:
                print(f"{heads[id(plan)]} done (job {job_id})", file=out, flush=True)

    _await(jobs, poll_s, tick)
    tick()
    return result
