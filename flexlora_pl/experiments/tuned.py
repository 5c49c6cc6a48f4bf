"""Tuned comparisons: a search stage per task × method on Optuna, then the selected values at the sweep's seeds.

A sweep file with a ``search:`` section (:mod:`flexlora_pl.experiments.search_space`) runs in two stages:

1. **search**: one Optuna study per task × method (:mod:`flexlora_pl.experiments.search_study`). Each trial is an
   ordinary ``flexlora fit`` into ``<save_dir>/<sweep>/<task>/<method>/search/trial<k>/`` (``config.yaml``,
   ``metrics.json``), at the search's seed, with the search's hold-out flags (its validation split is carved from
   the training data, so the split the tables report is never loaded) and the trial's parameter values. Its score
   is the objective's best (or last) value over the trial's validations. ``--workers N`` runs N trials at once,
   each worker a process with its own devices (one GPU each where there are GPUs; the CPU threads split).
2. **final**: each task × method's best trial's values (written to ``selected.json`` beside its seed folders)
   re-run at the sweep's seeds on the full training data, into the usual ``seed<k>`` folders, scored as every
   sweep is (``flexlora-results``).

Running the same command again continues both stages: a study holds its trials, finished runs are skipped. On a
SLURM cluster (``--executor slurm``) the same workers run as a job array (:mod:`flexlora_pl.experiments.slurm`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TextIO

from flexlora_pl.callbacks.search_trial import PRUNED_FILENAME, SEARCH_TRIAL_ENV
from flexlora_pl.experiments import search_study
from flexlora_pl.experiments.search_space import SearchError, SearchSpec
from flexlora_pl.experiments.sweep_file import Run, Sweep, load_sweep
from flexlora_pl.experiments.sweep_runner import PROGRAM, command_line, log_path, read_record, worker_env
from flexlora_pl.figures.sensitivity import SELECTED_FILENAME, write_sensitivity
from flexlora_pl.runs.run_folder import RunFolder, newest_trained_checkpoint

__all__ = ["SELECTED_FILENAME", "TrialRun", "final_runs", "objective_value", "prepare_search",
           "run_search", "select", "trained_elsewhere", "trial_run", "work", "worker_env"]

_WORKER_SPEC = "search_workers.json"


@dataclass(frozen=True)
class TrialRun(Run):
    """One search trial: a run in ``<save_dir>/<sweep>/<task>/<method>/search/trial<k>``."""

    trial: int = 0

    @property
    def name(self) -> str:
        return f"{self.sweep}/{self.task}/{self.method}/search"

    @property
    def version(self) -> str:
        return f"trial{self.trial}"

    @property
    def label(self) -> str:
        return f"{self.task} / {self.method} / trial {self.trial}"

    @property
    def log_stem(self) -> str:
        return f"{self.task}.{self.method}.search.trial{self.trial}"


def _cells(sweep: Sweep, tasks: Sequence[str] | None, methods: Sequence[str] | None) -> list[tuple[str, str]]:
    runs = sweep.runs(tasks, methods)
    return list(dict.fromkeys((run.task, run.method) for run in runs))


def _search(sweep: Sweep) -> SearchSpec:
    if sweep.search is None:
        raise SearchError(f"{sweep.source}: this sweep has no search: section; it runs with flexlora-sweep as it is")
    return sweep.search


def trial_run(sweep: Sweep, task: str, method: str, number: int, values: Mapping[str, Any],
              save_dir: str | None = None) -> TrialRun:
    """The run of trial ``number`` of a task × method with the parameter values ``values`` (by Optuna name)."""
    spec = _search(sweep)
    cell = sweep.runs([task], [method], save_dir=save_dir)[0]
    return TrialRun(sweep=cell.sweep, task=task, method=method, seed=spec.seed, configs=cell.configs,
                    args=(*cell.args, *spec.holdout.get(task, ()), *spec.trial_args(method, values)), test=None,
                    save_dir=cell.save_dir, trial=number)


def objective_value(record: Mapping[str, Any], spec: SearchSpec, where: str) -> float:
    """A finished trial's score: the best (or last) value of the objective over its validations.

    Raises:
        ValueError: the trial logged no value of the objective; the message lists what it logged.
    """
    history = (record.get("fit") or {}).get("history") or []
    values = [float(entry[spec.objective]) for entry in history if entry.get(spec.objective) is not None]
    if not values:
        logged = sorted({key for entry in history for key in entry if key != "step"})
        raise ValueError(f"{where}: the trial logged no {spec.objective} at its validations (it logged "
                         f"{', '.join(logged) or 'nothing'}); set search.objective to one of those")
    if spec.rule == "last":
        return values[-1]
    return max(values) if spec.direction == "maximize" else min(values)


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to a trial's ``flexlora`` when its worker dies, so no orphan trains on."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _run_trial(run: TrialRun, extra: Sequence[str], env: Mapping[str, str], program: Sequence[str],
               ckpt_path: str | None = None) -> int:
    log = log_path(run)
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("a") as handle:
        handle.write(f"\n$ {command_line(run, 'fit', ckpt_path, extra)}\n")
        handle.flush()
        process = subprocess.Popen([*program, *run.command("fit", extra, ckpt_path)], stdout=handle,
                                   stderr=subprocess.STDOUT,
                                   env=dict(env), preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        return process.wait()


def trial_objective(sweep: Sweep, task: str, method: str, storage_url: str, save_dir: str | None,
                    extra: Sequence[str], program: Sequence[str] = PROGRAM,
                    on_trial: Callable[[str, str, Any], None] | None = None):
    """The function a worker runs for one trial of a task × method: a ``flexlora fit``, then its score.

    A trial whose job was requeued (``search_study.hold_trial``) resumes its fit from its most trained checkpoint
    (``--ckpt_path last``). ``on_trial(task, method, trial)`` is told each trial as it starts (the SLURM worker's
    checkpoint holds it).
    """
    import optuna

    spec = _search(sweep)

    def objective(trial: Any) -> float:
        if on_trial is not None:
            on_trial(task, method, trial)
        run = trial_run(sweep, task, method, trial.number, trial.params, save_dir)
        record = read_record(run.folder)
        if (record.get("fit") or {}).get("status") != "finished":  # else: finished before its worker could tell
            env = {**os.environ, SEARCH_TRIAL_ENV: json.dumps({
                "storage": storage_url, "study": trial.study.study_name, "trial": trial.number,
                "objective": spec.objective, "pruner": spec.pruner_spec})}
            resume = trial.user_attrs.get(search_study.REQUEUES_ATTR) and newest_trained_checkpoint(
                RunFolder(run.save_dir, run.name, run.version)) is not None
            code = _run_trial(run, extra, env, program, "last" if resume else None)
            record = read_record(run.folder)
            if code != 0 or (record.get("fit") or {}).get("status") != "finished":
                raise RuntimeError(f"flexlora fit exited with {code}; see {log_path(run)}")
        trial.set_user_attr("folder", str(run.folder))
        if (run.folder / PRUNED_FILENAME).is_file():
            raise optuna.TrialPruned()
        return objective_value(record, spec, str(run.folder))

    return objective


# ----------------------------------------------------------------------------- the search stage
def prepare_search(sweep: Sweep, storage_url: str | None, workers: int, tasks: Sequence[str] | None,
                   methods: Sequence[str] | None, save_dir: str | None, extra: Sequence[str],
                   out: TextIO) -> tuple[Path, dict[tuple[str, str], Any]]:
    """Create the studies and write the workers' job file (``<sweep>/search_workers.json``); returns both."""
    spec = _search(sweep)
    folder = Path(save_dir or sweep.save_dir) / sweep.name
    folder.mkdir(parents=True, exist_ok=True)
    url = storage_url or search_study.default_storage_url(folder)
    storage = search_study.open_storage(url)
    cells = _cells(sweep, tasks, methods)
    studies = {cell: search_study.prepare_study(storage, search_study.study_name(sweep.name, *cell), spec, cell[1])
               for cell in cells}
    job = {"sweep": str(Path(sweep.source).resolve()), "cwd": os.getcwd(), "storage": url, "save_dir": save_dir,
           "cells": cells, "extra": list(extra)}
    job_file = folder / _WORKER_SPEC
    job_file.write_text(json.dumps(job, indent=1) + "\n")
    print(f"search {sweep.name}: {len(cells)} studies x {sorted(set(spec.trials.values()))} trials "
          f"({spec.sampler}, objective {spec.objective}), {workers} worker(s), storage {url}", file=out, flush=True)
    return job_file, studies


def run_search(sweep: Sweep, storage_url: str | None = None, workers: int = 1, tasks: Sequence[str] | None = None,
               methods: Sequence[str] | None = None, save_dir: str | None = None, extra: Sequence[str] = (),
               out: TextIO | None = None, poll_s: float = 5.0) -> bool:
    """Create the studies and run ``workers`` worker processes until every study's budget is taken.

    Returns:
        whether every worker finished cleanly.
    """
    out = out or sys.stdout
    spec = _search(sweep)
    job_file, studies = prepare_search(sweep, storage_url, workers, tasks, methods, save_dir, extra, out)
    logs = job_file.parent / "logs"
    logs.mkdir(exist_ok=True)
    processes = []
    for index in range(workers):
        handle = (logs / f"search-worker{index}.log").open("a")
        processes.append(subprocess.Popen([sys.executable, "-m", "flexlora_pl.experiments.tuned", str(job_file)],
                                          stdout=handle, stderr=subprocess.STDOUT, env=worker_env(index, workers)))
    shown = ""
    try:
        while any(p.poll() is None for p in processes):
            time.sleep(poll_s)
            shown = print_progress(studies, spec, out, shown)
    except KeyboardInterrupt:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait()
        raise
    print_progress(studies, spec, out, shown)
    codes = [p.returncode for p in processes]
    if any(codes):
        print(f"search {sweep.name}: worker exit codes {codes}; see {logs}/search-worker<i>.log", file=out, flush=True)
    return not any(codes)


def print_progress(studies: Mapping[tuple[str, str], Any], spec: SearchSpec, out: TextIO, shown: str) -> str:
    """Print each study's finished and running trials when that line differs from ``shown``; returns the line."""
    from optuna.trial import TrialState

    parts = []
    for (task, method), study in studies.items():
        states = [t.state for t in study.get_trials(deepcopy=False)]
        done = states.count(TrialState.COMPLETE) + states.count(TrialState.PRUNED)
        parts.append(f"{task}/{method} {done}/{spec.trials[method]}"
                     + (f" ({states.count(TrialState.RUNNING)} running)" if TrialState.RUNNING in states else ""))
    line = "search: " + ", ".join(parts)
    if line != shown:
        print(line, file=out, flush=True)
    return line


def work(job_file: str, resume: tuple[str, str, int] | None = None,
         on_trial: Callable[[str, str, Any], None] | None = None, program: Sequence[str] = PROGRAM) -> None:
    """A worker: run trials of every study of the job, one study after another.

    Args:
        job_file: the job (:func:`prepare_search`).
        resume: ``(task, method, trial number)`` of a trial this worker held when its job was requeued: resumed first.
        on_trial: told ``(task, method, trial)`` as each trial starts.
        program: the ``flexlora`` command.
    """
    job = json.loads(Path(job_file).read_text())
    os.chdir(job["cwd"])
    sweep = load_sweep(job["sweep"])
    spec = _search(sweep)
    storage = search_study.open_storage(job["storage"])
    for task, method in job["cells"]:
        study = search_study.load_study(storage, search_study.study_name(sweep.name, task, method), spec)
        objective = trial_objective(sweep, task, method, job["storage"], job["save_dir"], job["extra"], program,
                                    on_trial)
        held = resume[2] if resume is not None and tuple(resume[:2]) == (task, method) else None
        ran = search_study.run_trials(study, spec.trials[method], spec, method, objective, resume=held)
        print(f"{task}/{method}: ran {ran} trial(s)", flush=True)


# ----------------------------------------------------------------------------- selection and the final stage
def select(sweep: Sweep, storage_url: str | None = None, tasks: Sequence[str] | None = None,
           methods: Sequence[str] | None = None, save_dir: str | None = None,
           out: TextIO | None = None) -> dict[tuple[str, str], dict[str, Any]]:
    """Each task × method's best trial, written to ``<sweep>/<task>/<method>/selected.json``, and each task's
    sensitivity figure (every method's trial scores against the first searched value) to
    ``<sweep>/<task>/sensitivity.png`` (:mod:`flexlora_pl.figures.sensitivity`).

    Raises:
        SearchError: a study has no complete trial (nothing to select).
    """
    from optuna.trial import TrialState

    out = out or sys.stdout
    spec = _search(sweep)
    folder = Path(save_dir or sweep.save_dir) / sweep.name
    storage = search_study.open_storage(storage_url or search_study.default_storage_url(folder))
    chosen = {}
    for task, method in _cells(sweep, tasks, methods):
        name = search_study.study_name(sweep.name, task, method)
        study = search_study.load_study(storage, name, spec)
        trials = study.get_trials(deepcopy=False)
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if not complete:
            raise SearchError(f"study {name} has no complete trial to select from; run the search stage first "
                              f"(flexlora-sweep {sweep.source} --stage search) and see its logs")
        best = complete[0]
        for trial in complete[1:]:
            if spec.better(trial.value, best.value):
                best = trial
        params = {p.flag: best.params[p.name] for p in spec.params[method]}
        edges = [p.flag for p in spec.params[method] if p.at_edge(best.params[p.name])]
        record = {
            "task": task, "method": method, "study": name, "trial": best.number, "objective": spec.objective,
            "direction": spec.direction, "value": best.value, "params": params, "at_edge": edges,
            "budget": spec.trials[method], "sampler": spec.sampler, "pruner": spec.pruner,
            "ranges": {p.flag: p.describe() for p in spec.params[method]},
            "trials": {state: sum(1 for t in trials if t.state.name.lower() == state and
                                  not t.user_attrs.get(search_study.SURPLUS_ATTR))
                       for state in ("complete", "pruned", "fail")},
            "curve": sorted(([t.params[p.name] for p in spec.params[method]], t.value) for t in complete),
        }
        target = folder / task / method / SELECTED_FILENAME
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(record, indent=1) + "\n")
        chosen[(task, method)] = record
        shown = ", ".join(f"{flag.rsplit('.', 1)[-1]}={value:g}" if isinstance(value, float) else
                          f"{flag.rsplit('.', 1)[-1]}={value}" for flag, value in params.items())
        print(f"selected {task}/{method}: {shown} ({spec.objective} {best.value:.4g}, trial {best.number} of "
              f"{record['trials']['complete']} complete, {record['trials']['pruned']} pruned)", file=out, flush=True)
        for flag in edges:
            print(f"  warning: {task}/{method} selected {flag} = {params[flag]} at the edge of its range "
                  f"{record['ranges'][flag]}; widen the range", file=out, flush=True)
    for task in dict.fromkeys(task for task, _ in chosen):
        figure = write_sensitivity(folder / task, methods=[m for t, m in chosen if t == task])
        print(f"wrote {figure}", file=out, flush=True)
    return chosen


def final_runs(sweep: Sweep, chosen: Mapping[tuple[str, str], Mapping[str, Any]], tasks: Sequence[str] | None = None,
               methods: Sequence[str] | None = None, seeds: Sequence[int] | None = None,
               save_dir: str | None = None) -> list[Run]:
    """The sweep's runs at its seeds, each with its task × method's selected values (the flags come last)."""
    spec = _search(sweep)
    runs = []
    for run in sweep.runs(tasks, methods, seeds, save_dir):
        params = chosen[(run.task, run.method)]["params"]
        values = {flag.lstrip("-"): value for flag, value in params.items()}
        runs.append(replace(run, args=(*run.args, *spec.trial_args(run.method, values))))
    return runs


def trained_elsewhere(sweep: Sweep, runs: Sequence[Run]) -> list[str]:
    """The final runs whose folder holds a run trained at other values than the ones now selected (a search widened
    or re-run after its finals): their folders would be skipped or resumed as if they held the new selection.

    Returns:
        One line per such run: its folder, the values it was trained with and the selected ones.
    """
    import yaml

    spec = _search(sweep)
    found = []
    for run in runs:
        config = Path(run.folder) / "config.yaml"
        if not config.is_file():
            continue
        trained = yaml.safe_load(config.read_text()) or {}
        selected = dict(zip(run.args[-2 * len(spec.params[run.method])::2],
                            run.args[-2 * len(spec.params[run.method]) + 1::2], strict=True))
        for flag, value in selected.items():
            node: Any = trained
            for key in flag.lstrip("-").split("."):
                node = node.get(key) if isinstance(node, Mapping) else None
            if not _matches(node, value):
                found.append(f"{run.folder}: trained with {flag} = {node}, selected now {value}")
    return found


def _matches(trained: Any, selected: str) -> bool:
    """Whether a value read from a run's ``config.yaml`` is the flag value ``selected``."""
    if isinstance(trained, bool):
        return str(trained).lower() == selected
    if str(trained) == selected:
        return True
    try:
        return abs(float(trained) - float(selected)) <= 1e-9 * max(1.0, abs(float(selected)))
    except (TypeError, ValueError):
        return False


if __name__ == "__main__":
    work(sys.argv[1])
