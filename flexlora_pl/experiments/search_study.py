"""Optuna studies of a tuned comparison: where they live, and how many workers share one without a lost or extra trial.

One study per task × method, named ``<sweep>/<task>/<method>``, in one storage: by default a SQLite file in the
sweep's folder (nothing to start), or a database many machines share (a PostgreSQL/MySQL URL, or Optuna's
journal file on a shared file system: ``journal:PATH``).

Any number of workers (processes, on one machine or many) run trials of a study at once through
:func:`run_trials`. The study's trial budget holds exactly:

- a worker claims a trial only while fewer than ``budget`` trials are finished (complete or pruned) or running;
  two workers that claim at the same moment are ranked by trial number and the one past the budget gives its
  trial back (recorded as failed with ``surplus`` set, never run);
- each running trial carries a heartbeat (a timestamp in its user attributes, refreshed by its worker); a trial
  whose heartbeat is older than the grace period belongs to a worker that died, and the next worker to claim
  marks it failed and queues a retry with the same parameters (``retry_of`` names the failed trial), so a killed
  worker's trial is run again once and never counted twice;
- a worker whose cluster job is requeued (preempted or at its time limit) holds its running trial
  (:func:`hold_trial`: no worker fails it as stale for the lease's length) and, once the job runs again, resumes it
  (:func:`resume_trial`, ``resume=`` of :func:`run_trials`): the same trial number and run folder, never a second
  trial;
- a grid search queues every grid point when the study is created, in an order shuffled by the search's seed
  (as Optuna's own grid sampler does, so that a pruner compares a trial with earlier ones from across the grid, not
  only with its smaller neighbours), and a worker takes only queued points.
"""

from __future__ import annotations

import math
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flexlora_pl.experiments.search_space import SearchError, SearchSpec
from flexlora_pl.runs.study_storage import StudyStorageError, open_study_storage

__all__ = ["claim_trial", "fail_stale_trials", "hold_trial", "open_storage", "prepare_study", "resume_trial",
           "run_trials", "study_name"]

HEARTBEAT_ATTR = "heartbeat"
RETRY_ATTR = "retry_of"
SURPLUS_ATTR = "surplus"
ERROR_ATTR = "error"
HELD_ATTR = "held_until"  # a requeued job's trial: not stale before this time
REQUEUES_ATTR = "requeues"  # how many times the trial's job was requeued: its run resumes from its checkpoint
MAX_RETRIES = 3
_WAIT_S = 1.0  # how often a worker whose study is fully claimed looks whether its running trials ended


def study_name(sweep: str, task: str, method: str) -> str:
    """The study of one task × method: ``<sweep>/<task>/<method>``."""
    return f"{sweep}/{task}/{method}"


def default_storage_url(sweep_folder: str | os.PathLike) -> str:
    """The SQLite file in the sweep's folder that local searches use when no ``--storage`` is given."""
    return f"sqlite:///{Path(sweep_folder).resolve() / 'optuna.db'}"


def open_storage(url: str) -> Any:
    """Open (and create, where it is a file) the study storage named by ``url``
    (:func:`flexlora_pl.runs.study_storage.open_study_storage`).

    Raises:
        SearchError: the storage cannot be opened; the message names the URL, the reason and the fix.
    """
    try:
        return open_study_storage(url)
    except StudyStorageError as err:
        raise SearchError(str(err)) from err


def prepare_study(storage: Any, name: str, spec: SearchSpec, method: str) -> Any:
    """Create (or load) a study; a grid study gets every grid point it does not hold yet queued, in the seed's order.

    A grid widened after a search (the edge warning's advice: one more value past the end, the same spacing) thus
    queues only its new points: the trials already run keep their scores, and the budget is the new grid's size.
    """
    import optuna

    sampler = _sampler(spec)
    study = optuna.create_study(storage=storage, study_name=name, direction=spec.direction, sampler=sampler,
                                load_if_exists=True)
    if spec.sampler == "grid":
        with _claim_lock(study):
            held = [t.params or t.system_attrs.get("fixed_params") or {}
                    for t in study.get_trials(deepcopy=False) if not _spent(t)]
            points = [point for point in spec.grid_points(method) if not any(_same(point, h) for h in held)]
            random.Random(spec.seed + len(held)).shuffle(points)
            for point in points:
                study.enqueue_trial(point)
    return study


def _spent(trial: Any) -> bool:
    """A trial that holds no grid point: given back as surplus, or failed and queued again as a retry."""
    from optuna.trial import TrialState

    return bool(trial.user_attrs.get(SURPLUS_ATTR)) or (
        trial.state == TrialState.FAIL and str(trial.user_attrs.get(ERROR_ATTR, "")).startswith("no heartbeat"))


def _same(point: dict[str, Any], other: dict[str, Any]) -> bool:
    """Whether two grid points are one (floats equal to 1e-6, relative: a widened grid's old values match)."""
    if set(point) != set(other):
        return False
    for key, value in point.items():
        theirs = other[key]
        if isinstance(value, float) and isinstance(theirs, (int, float)) and not isinstance(theirs, bool):
            if not math.isclose(value, float(theirs), rel_tol=1e-6):
                return False
        elif value != theirs:
            return False
    return True


def load_study(storage: Any, name: str, spec: SearchSpec) -> Any:
    """Load an existing study with the search's sampler (each worker builds its own)."""
    import optuna

    return optuna.load_study(study_name=name, storage=storage, sampler=_sampler(spec))


def _sampler(spec: SearchSpec) -> Any:
    import optuna

    if spec.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=spec.seed, constant_liar=True)
    return optuna.samplers.RandomSampler(seed=spec.seed)  # grid: every point is queued, so this never samples


def fail_stale_trials(study: Any, grace_s: float, now: float | None = None) -> list[int]:
    """Mark running trials whose heartbeat is older than ``grace_s`` failed and queue their retries.

    Returns:
        The numbers of the trials this call failed (another worker may fail the same trial first: it is then not
        listed here, and queued once).
    """
    from optuna.trial import TrialState

    now = time.time() if now is None else now
    failed = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = trial.user_attrs.get(HEARTBEAT_ATTR)
        if beat is None:
            beat = trial.datetime_start.timestamp() if trial.datetime_start is not None else now
        beat = max(float(beat), float(trial.user_attrs.get(HELD_ATTR, 0.0)))
        if now - float(beat) <= grace_s:
            continue
        try:
            study._storage.set_trial_user_attr(trial._trial_id, ERROR_ATTR,
                                               f"no heartbeat for {now - float(beat):.0f} s: its worker stopped")
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
        except Exception:  # finished, or failed by another worker, in the meantime
            continue
        failed.append(trial.number)
        if _retries(study, trial) < MAX_RETRIES:
            study.enqueue_trial(dict(trial.params), user_attrs={RETRY_ATTR: trial.number})
    return failed


def _retries(study: Any, trial: Any) -> int:
    """How many times the chain of retries ending at ``trial`` has already been retried."""
    by_number = {t.number: t for t in study.get_trials(deepcopy=False)}
    count, current = 0, trial
    while RETRY_ATTR in current.user_attrs and current.user_attrs[RETRY_ATTR] in by_number:
        count, current = count + 1, by_number[current.user_attrs[RETRY_ATTR]]
    return count


def counted(study: Any) -> list[Any]:
    """The trials the budget counts: finished (complete or pruned) or running."""
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))


def claim_trial(study: Any, budget: int, spec: SearchSpec, method: str, grace_s: float) -> Any | None:
    """Start the next trial of ``study`` for this worker, or ``None`` when the budget is taken.

    Queued trials (grid points, retries) come first; a TPE or random search samples a new one otherwise.
    """
    with _claim_lock(study):
        return _claim(study, budget, spec, method, grace_s)


def _claim(study: Any, budget: int, spec: SearchSpec, method: str, grace_s: float) -> Any | None:
    from optuna.trial import TrialState

    fail_stale_trials(study, grace_s)
    if len(counted(study)) >= budget:
        return None
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    if spec.sampler == "grid" and not waiting:
        return None
    trial = study.ask(_distributions(study, spec, method))
    trial.set_user_attr(HEARTBEAT_ATTR, time.time())
    ranked = sorted(t.number for t in counted(study))
    if trial.number not in ranked[:budget]:
        queued = "fixed_params" in study._storage.get_trial(trial._trial_id).system_attrs
        trial.set_user_attr(SURPLUS_ATTR, True)
        study.tell(trial, state=TrialState.FAIL)
        if queued:  # a grid point or a retry taken from the queue goes back to it
            retry = trial.user_attrs.get(RETRY_ATTR)
            study.enqueue_trial(dict(trial.params), user_attrs=None if retry is None else {RETRY_ATTR: retry})
        return None
    return trial


def _distributions(study: Any, spec: SearchSpec, method: str) -> dict[str, Any]:
    """The distributions a new trial asks with: a grid's ranges (:meth:`Param.distribution`), except where the study's
    trials already hold a parameter as a choice among values (studies made before grids were ranges)."""
    from optuna.distributions import CategoricalDistribution

    held = {name: type(dist) for t in study.get_trials(deepcopy=False) for name, dist in t.distributions.items()}
    return {p.name: p.distribution(spec.sampler == "grid" and held.get(p.name) is not CategoricalDistribution)
            for p in spec.params[method]}


@contextmanager
def _claim_lock(study: Any) -> Iterator[None]:
    """Serialise claims of workers that share a SQLite study: SQLite has no row locks, so two workers that take a
    queued trial at the same moment could both start it (a database server locks the row; a journal file orders
    its writes). The lock is a file beside the database, for the processes of one machine (SQLite's only safe use).
    """
    backend = getattr(study._storage, "_backend", study._storage)
    url = str(getattr(backend, "url", ""))
    if not url.startswith("sqlite:///") or sys.platform == "win32":
        yield
        return
    import fcntl

    with open(url[len("sqlite:///"):] + ".claims.lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _running(study: Any, trial: Any) -> bool:
    """Whether ``trial`` still runs (``False`` once it was finished, e.g. failed as stale by another worker)."""
    from optuna.trial import TrialState

    try:
        return study._storage.get_trial(trial._trial_id).state == TrialState.RUNNING
    except Exception:  # the storage cannot be read just now: treat the trial as running, as before
        return True


def hold_trial(trial: Any, lease_s: float) -> bool:
    """Keep ``trial`` running while its worker's job is requeued: no worker fails it as stale for ``lease_s``
    seconds, and its requeue count grows (its run then resumes from its checkpoint, see ``tuned.trial_objective``).

    Returns:
        whether the trial was held (``False``: it had ended already, e.g. finished just before the requeue).
    """
    from optuna.trial import TrialState

    frozen = trial.study._storage.get_trial(trial._trial_id)
    if frozen.state != TrialState.RUNNING:
        return False
    try:
        trial.set_user_attr(HELD_ATTR, time.time() + lease_s)
        trial.set_user_attr(REQUEUES_ATTR, int(frozen.user_attrs.get(REQUEUES_ATTR, 0)) + 1)
    except Exception:  # failed as stale by another worker in the meantime
        return False
    return True


def resume_trial(study: Any, number: int) -> Any | None:
    """Trial ``number`` (held by :func:`hold_trial`) as this worker's running trial again, its heartbeat fresh and
    its lease over; ``None`` when it ended meanwhile (a lease that ran out: another worker failed and retried it)."""
    import optuna
    from optuna.trial import TrialState

    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    if study._storage.get_trial(trial_id).state != TrialState.RUNNING:
        return None
    trial = optuna.trial.Trial(study, trial_id)
    try:
        trial.set_user_attr(HEARTBEAT_ATTR, time.time())
        trial.set_user_attr(HELD_ATTR, 0.0)
    except Exception:  # failed as stale between the two reads
        return None
    return trial


@contextmanager
def heartbeat(trial: Any, interval_s: float) -> Iterator[None]:
    """Refresh ``trial``'s heartbeat every ``interval_s`` seconds while the block runs."""
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(interval_s):
            try:
                trial.set_user_attr(HEARTBEAT_ATTR, time.time())
            except Exception:  # finished meanwhile (failed as stale by another worker), or the storage was busy
                if not _running(trial.study, trial):
                    return

    thread = threading.Thread(target=beat, name="search-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def run_trials(study: Any, budget: int, spec: SearchSpec, method: str, objective: Callable[[Any], float],
               heartbeat_s: float = 30.0, grace_s: float = 120.0, resume: int | None = None) -> int:
    """Run trials of ``study`` until its budget is taken and no trial runs; returns how many this worker ran.

    A worker whose claim finds the budget taken while trials still run waits for them: if one's worker has died,
    its retry is queued once its heartbeat is older than ``grace_s``, and a waiting worker runs it.

    Args:
        study: the study (from :func:`load_study`).
        budget: the number of trials the study holds.
        spec: the search.
        method: the method whose parameters the trials take.
        objective: runs one trial and returns its score; raises ``optuna.TrialPruned`` for a pruned trial. Any
            other error fails the trial (recorded in its ``error`` attribute) and is not retried.
        heartbeat_s: how often a running trial's heartbeat is refreshed.
        grace_s: a running trial without a heartbeat for this long belongs to a dead worker.
        resume: the number of a trial this worker held when its job was requeued (:func:`hold_trial`): it runs
            first, where it still runs, before any new claim.
    """
    import optuna
    from optuna.trial import TrialState

    ran = 0
    held = resume_trial(study, resume) if resume is not None else None
    while True:
        trial, held = held or claim_trial(study, budget, spec, method, grace_s), None
        if trial is None:
            if not study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
                return ran
            # other workers' trials still run: wait for them, since one whose worker died is retried here
            time.sleep(min(_WAIT_S, grace_s / 4))
            continue
        ran += 1
        with heartbeat(trial, heartbeat_s):
            try:
                value = objective(trial)
            except optuna.TrialPruned:
                study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
                continue
            except Exception as err:
                if not _running(study, trial):  # another worker ended it (stale): its retry runs, not this result
                    print(f"{study.study_name}: trial {trial.number} was ended by another worker while it ran here; "
                          "its result is not told", flush=True)
                    continue
                trial.set_user_attr(ERROR_ATTR, f"{type(err).__name__}: {err}"[:2000])
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                if _errors(study) >= budget:
                    raise SearchError(f"study {study.study_name}: {_errors(study)} trials failed with errors (the "
                                      f"last: {type(err).__name__}: {err}); fix the cause and run the sweep again") \
                        from err
                continue
        if not _running(study, trial):
            print(f"{study.study_name}: trial {trial.number} was ended by another worker while it ran here; its "
                  "result is not told", flush=True)
            continue
        study.tell(trial, value, skip_if_finished=True)


def _errors(study: Any) -> int:
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
               if not t.user_attrs.get(SURPLUS_ATTR) and HEARTBEAT_ATTR in t.user_attrs
               and not str(t.user_attrs.get(ERROR_ATTR, "")).startswith("no heartbeat"))
