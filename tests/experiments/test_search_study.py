"""Optuna studies shared by worker processes: the budget holds exactly, a killed worker's trial is failed and
retried once, and every storage kind opens (SQLite file, journal file) or is refused with the fix."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState
from search_worker_script import search

from flexlora_pl.experiments import search_study
from flexlora_pl.experiments.search_space import SearchError

SCRIPT = Path(__file__).parents[1] / "helpers" / "search_worker_script.py"


def _worker(url: str, name: str, sampler: str, sleep: float, grace: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parent) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, str(SCRIPT), url, name, sampler, str(sleep), str(grace)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _study(url: str, sampler: str):
    spec = search(sampler)
    storage = search_study.open_storage(url)
    return search_study.prepare_study(storage, "sweep/task/lora", spec, "lora"), spec


@pytest.mark.parametrize(("kind", "sampler"), [("sqlite", "grid"), ("journal", "tpe")])
def test_two_workers_fill_the_budget_exactly(tmp_path, kind, sampler):
    url = f"sqlite:///{tmp_path}/optuna.db" if kind == "sqlite" else f"journal:{tmp_path}/optuna.journal"
    study, spec = _study(url, sampler)
    workers = [_worker(url, study.study_name, sampler, 0.1, 60) for _ in range(2)]
    outputs = [w.communicate(timeout=120) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in outputs]
    ran = [int(out.strip().splitlines()[-1].split()[1]) for out, _ in outputs]
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == 6 == sum(ran), [(t.number, t.state) for t in trials]
    assert all(t.user_attrs.get(search_study.SURPLUS_ATTR) for t in trials if t.state != TrialState.COMPLETE)
    assert all(t.value == pytest.approx(-math.log10(t.params["lr"])) for t in complete)
    if sampler == "grid":  # every grid point exactly once
        assert sorted(t.params["lr"] for t in complete) == sorted(p["lr"] for p in spec.grid_points("lora"))


def test_a_killed_worker_leaves_its_trial_failed_and_retried_once(tmp_path):
    url = f"sqlite:///{tmp_path}/optuna.db"
    study, _ = _study(url, "grid")
    doomed = _worker(url, study.study_name, "grid", 60, 3)  # its first trial would take a minute
    assert doomed.stdout.readline().strip() == "started 0", doomed.stderr.read()[-2000:]
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(timeout=30)
    survivor = _worker(url, study.study_name, "grid", 0.2, 3)
    _, err = survivor.communicate(timeout=120)
    assert survivor.returncode == 0, err[-2000:]
    trials = study.get_trials()
    failed = [t for t in trials if t.state == TrialState.FAIL]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert [t.number for t in failed] == [0] and "no heartbeat" in failed[0].user_attrs["error"]
    assert len(complete) == 6 and len({t.params["lr"] for t in complete}) == 6
    retry = [t for t in complete if t.user_attrs.get(search_study.RETRY_ATTR) == 0]
    assert len(retry) == 1 and retry[0].params == failed[0].params


def test_a_trial_that_raises_is_failed_not_retried_and_the_study_goes_on(tmp_path):
    study, spec = _study(f"sqlite:///{tmp_path}/optuna.db", "grid")

    def objective(trial):
        if trial.number == 2:
            raise RuntimeError("diverged")
        return 1.0

    assert search_study.run_trials(study, 6, spec, "lora", objective, heartbeat_s=5, grace_s=60) == 6
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.FAIL) == 1 and states.count(TrialState.COMPLETE) == 5
    assert study.get_trials()[2].user_attrs["error"] == "RuntimeError: diverged"


def test_a_trial_ended_elsewhere_while_it_ran_is_not_told_and_the_worker_goes_on(tmp_path, capsys):
    # another worker judged trial 1 stale mid-run: it failed it and queued its retry (the worker itself lives on)
    study, spec = _study(f"sqlite:///{tmp_path}/optuna.db", "grid")

    def objective(trial):
        if trial.number == 1:
            study._storage.set_trial_user_attr(trial._trial_id, "error", "no heartbeat for 200 s: its worker stopped")
            study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
            study.enqueue_trial(dict(trial.params), user_attrs={search_study.RETRY_ATTR: 1})
            trial.set_user_attr("folder", "trial1")  # what the objective does last: the trial has ended
        return 1.0

    assert search_study.run_trials(study, 6, spec, "lora", objective, heartbeat_s=5, grace_s=60) == 7
    trials = study.get_trials()
    assert [t.state for t in trials].count(TrialState.COMPLETE) == 6 and trials[1].state == TrialState.FAIL
    assert trials[6].user_attrs[search_study.RETRY_ATTR] == 1 and trials[6].params == trials[1].params
    assert "trial 1 was ended by another worker while it ran here" in capsys.readouterr().out


def test_claims_of_workers_sharing_a_sqlite_study_wait_for_each_other(tmp_path):
    # SQLite has no row locks: two workers taking a queued trial at once could both start it, so claims take a
    # lock file beside the database; a worker claims only once the lock is free
    import fcntl

    url = f"sqlite:///{tmp_path}/optuna.db"
    study, _ = _study(url, "grid")
    with open(f"{tmp_path}/optuna.db.claims.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        worker = _worker(url, study.study_name, "grid", 0.0, 60)
        with pytest.raises(subprocess.TimeoutExpired):
            worker.wait(timeout=8)  # blocked on the lock: nothing claimed
        assert not [t for t in study.get_trials() if t.state != TrialState.WAITING]
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert worker.wait(timeout=120) == 0
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 6


def test_a_widened_grid_queues_only_its_new_points_and_keeps_the_trials_run(tmp_path):
    from flexlora_pl.experiments.search_space import parse_search

    url = f"sqlite:///{tmp_path}/optuna.db"
    study, spec = _study(url, "grid")  # lr on 6 log-spaced values, 1e-4 .. 1e-2
    assert search_study.run_trials(study, 6, spec, "lora", lambda t: 1.0, heartbeat_s=5, grace_s=60) == 6
    # one more value past each end at the same spacing (10^0.4): 8 values, 6 of them already run
    wider = parse_search({"sampler": "grid", "params": {"--lr": {"low": 10 ** -4.4, "high": 10 ** -1.6, "log": True,
                                                                 "steps": 8}}}, ["lora"], ["task"])
    study = search_study.prepare_study(search_study.open_storage(url), study.study_name, wider, "lora")
    waiting = [t for t in study.get_trials() if t.state == TrialState.WAITING]
    new = sorted(t.system_attrs["fixed_params"]["lr"] for t in waiting)
    assert new == pytest.approx([10 ** -4.4, 10 ** -1.6], rel=1e-5)
    assert search_study.run_trials(study, wider.trials["lora"], wider, "lora", lambda t: 2.0, heartbeat_s=5,
                                   grace_s=60) == 2
    trials = study.get_trials()
    assert [t.value for t in trials] == [1.0] * 6 + [2.0] * 2
    assert sorted(t.params["lr"] for t in trials) == pytest.approx([p["lr"] for p in wider.grid_points("lora")])
    search_study.prepare_study(search_study.open_storage(url), study.study_name, wider, "lora")  # again: nothing new
    assert len(study.get_trials()) == 8


def test_pruned_trials_are_recorded_as_pruned_never_as_scores(tmp_path):
    study, spec = _study(f"sqlite:///{tmp_path}/optuna.db", "grid")

    def objective(trial):
        if trial.params["lr"] > 1e-3:
            raise optuna.TrialPruned()
        return 0.5

    search_study.run_trials(study, 6, spec, "lora", objective, heartbeat_s=5, grace_s=60)
    pruned = [t for t in study.get_trials() if t.state == TrialState.PRUNED]
    assert len(pruned) == 3 and all(t.value is None for t in pruned)


def test_storage_urls_that_cannot_be_opened_are_refused_with_the_fix(tmp_path):
    with pytest.raises(SearchError, match=r"neither a database URL .* nor a journal file"):
        search_study.open_storage("my-study")
    with pytest.raises(SearchError, match=r"cannot be opened .*driver is installed"):
        search_study.open_storage("postgresql://nobody@localhost:1/none")
    assert search_study.default_storage_url(tmp_path) == f"sqlite:///{tmp_path.resolve()}/optuna.db"
