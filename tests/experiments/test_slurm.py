"""``flexlora-sweep --executor slurm`` through submitit, tested through submitit's local executor (the same jobs,
without a cluster): a tiny tuned sweep end to end, a search job requeued in the middle of a trial that resumes the
trial from its checkpoint, the refusal where SLURM is missing, and the ``slurm:`` section's checks."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from submitit.core.job_environment import JobEnvironment
from tiny_run import tiny_run_config
from tiny_sweep import invoke_sweep, task_changes

from flexlora_pl.experiments import search_study, slurm
from flexlora_pl.experiments.sweep_file import parse_sweep

LR = "--model.init_args.optimizer.init_args.lr"


def _tuned_sweep(root, tiny_glue_root, name: str, **top) -> str:
    """One task, FlexLoRA alone, a 2-point learning-rate grid, one seed."""
    (root / "a.yaml").write_text(tiny_run_config(tiny_glue_root, changes=task_changes(0.01)))
    path = root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "save_dir": str(root / "runs"), "seeds": [0],
        "tasks": {"a": str(root / "a.yaml")}, "methods": {"flexlora": []},
        "search": {"sampler": "grid", "seed": 3, "objective": "val/score",
                   "holdout": ["--data.init_args.holdout_size", "0.25"],
                   "params": {LR: {"low": 1.0e-3, "high": 1.0e-2, "log": True, "steps": 2}}},
        **top}))
    return str(path)


def _study(folder, name: str):
    return optuna.load_study(study_name=f"{name}/a/flexlora", storage=f"sqlite:///{folder.resolve()}/optuna.db")


@pytest.mark.slow
def test_a_tuned_sweep_runs_its_search_and_final_runs_as_submitit_jobs(tmp_path, tiny_glue_root):
    sweep = _tuned_sweep(tmp_path, tiny_glue_root, "viajobs")
    started = time.perf_counter()
    code, out = invoke_sweep(sweep, "--executor", "submitit-local", "--workers", "2", "--slurm-time", "20")
    assert code == 0, out
    folder = tmp_path / "runs" / "viajobs"
    assert "search viajobs: 2 job(s) submitted (submitit-local" in out and "1 run(s) submitted (submitit-local)" in out
    assert "final viajobs: 1 ran, 0 skipped, 0 failed" in out
    trials = _study(folder, "viajobs").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, [(t.number, t.state) for t in trials]
    # the trials ran inside the jobs (each job's log says how many it ran), not in local worker processes
    logs = sorted((folder / "slurm").glob("*_0_log.out"))
    ran = sum(int(line.split()[2]) for log in logs for line in log.read_text().splitlines()
              if line.startswith("a/flexlora: ran "))
    assert ran == 2, [log.read_text()[-800:] for log in logs]
    assert not list((folder / "logs").glob("search-worker*.log"))
    selected = json.loads((folder / "a" / "flexlora" / "selected.json").read_text())
    final = folder / "a" / "flexlora" / "seed0"
    assert json.loads((final / "metrics.json").read_text())["fit"]["status"] == "finished"
    config = yaml.safe_load((final / "config.yaml").read_text())
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == pytest.approx(selected["params"][LR])
    print(f"tuned sweep through submitit-local: {time.perf_counter() - started:.0f} s")


def _worker_task(folder, timeout_s: float = 120.0) -> int:
    """The process of the one search job under ``folder``: a child of submitit's local controller, whose pid is the
    job's id; it is the process SLURM would signal (the controller forwards the signal to it at a time limit)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for pickle in folder.glob("*_submitted.pkl"):
            children = slurm.child_pids(int(pickle.name.split("_")[0]))
            if children:
                return children[0]
        time.sleep(0.1)
    raise AssertionError(f"no running search job under {folder}")


@pytest.mark.slow
def test_a_requeued_search_job_resumes_its_trial_from_the_trials_checkpoint(tmp_path, tiny_glue_root):
    sweep = _tuned_sweep(tmp_path, tiny_glue_root, "requeue")
    folder = tmp_path / "runs" / "requeue"
    said: dict = {}

    def run() -> None:
        said["code"], said["out"] = invoke_sweep(sweep, "--executor", "submitit-local", "--stage", "search", "--",
                                                 "--trainer.max_epochs", "12")

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 180
    while not list(folder.glob("a/flexlora/search/trial*/checkpoints/last.ckpt")):  # an epoch into the first trial
        assert thread.is_alive() and time.monotonic() < deadline, said
        time.sleep(0.05)
    interrupted = next(folder.glob("a/flexlora/search/trial*/checkpoints/last.ckpt")).parents[1]
    os.kill(_worker_task(folder / "slurm"), JobEnvironment._usr_sig())  # the preemption / time-limit signal
    thread.join(timeout=300)
    assert not thread.is_alive() and said["code"] == 0, said.get("out")

    trials = _study(folder, "requeue").get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2, [(t.number, t.state) for t in trials]
    number = int(interrupted.name.removeprefix("trial"))
    assert trials[number].user_attrs[search_study.REQUEUES_ATTR] == 1
    assert (interrupted / "checkpoints" / "on_exception.ckpt").is_file()  # written by the trial's SIGTERM stop
    log = (folder / "logs" / f"a.flexlora.search.trial{number}.log").read_text()
    commands = [line for line in log.splitlines() if line.startswith("$ flexlora fit")]
    assert len(commands) == 2 and "--ckpt_path" not in commands[0] and "--ckpt_path last" in commands[1], commands
    assert "Restored all states from the checkpoint" in log.split(commands[1])[1]
    record = json.loads((interrupted / "metrics.json").read_text())
    other = json.loads((folder / "a" / "flexlora" / "search" / f"trial{1 - number}" / "metrics.json").read_text())
    assert record["fit"]["status"] == "finished"
    assert record["fit"]["history"][-1]["step"] == other["fit"]["history"][-1]["step"]  # the whole 12 epochs, once
    assert trials[number].value == pytest.approx(max(e["val/score"] for e in record["fit"]["history"]))
    job_logs = "".join(log.read_text() for log in (folder / "slurm").glob("*_0_log.err"))
    assert f"Caught signal SIG{JobEnvironment.USR_SIG}" in job_logs, job_logs[-2000:]  # caught by the job, once


@pytest.mark.parametrize("tuned", [False, True])
def test_executor_slurm_without_sbatch_is_refused_before_anything_is_written(tmp_path, tiny_glue_root, monkeypatch,
                                                                             capsys, tuned):
    sweep = _tuned_sweep(tmp_path, tiny_glue_root, "nocluster")
    if not tuned:
        data = yaml.safe_load((tmp_path / "nocluster.yaml").read_text())
        del data["search"]
        (tmp_path / "plain.yaml").write_text(yaml.safe_dump(data))
        sweep = str(tmp_path / "plain.yaml")
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(SystemExit) as stop:
        invoke_sweep(sweep, "--executor", "slurm")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "sbatch" in err and "--print" in err and "--executor local" in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("section", "message"), [
    ({"partitoin": "gpu"}, r"slurm: unknown key\(s\) partitoin; the slurm section has partition .*time .*sbatch"),
    ({"time": 0}, r"slurm\.time: expected each job's time limit in minutes as a whole number >= 1, got 0"),
    ({"gpus": "two"}, r"slurm\.gpus: expected GPUs per job as a whole number >= 0, got 'two'"),
    ({"mem": -4}, r"slurm\.mem: expected the memory per job in GB"),
    ({"partition": ""}, r"slurm\.partition: expected a partition name"),
    ({"sbatch": {"array": "0-3"}}, r"slurm\.sbatch\.array: set by flexlora-sweep itself"),
    ({"sbatch": {"account": ["a", "b"]}}, r"slurm\.sbatch\.account: expected one value"),
    ("gpu", r"slurm: expected a mapping with the keys partition"),
])
def test_bad_slurm_sections_are_refused_naming_the_key(tmp_path, tiny_glue_root, capsys, section, message):
    with pytest.raises(SystemExit) as stop:
        invoke_sweep(_tuned_sweep(tmp_path, tiny_glue_root, "bad", slurm=section), "--list")
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err[-1500:]


@pytest.mark.parametrize(("flag", "value"), [("--slurm-time", "0"), ("--slurm-gpus", "-1"), ("--slurm-mem", "x")])
def test_bad_slurm_flags_are_refused_naming_the_flag(tmp_path, tiny_glue_root, capsys, flag, value):
    with pytest.raises(SystemExit) as stop:
        invoke_sweep(_tuned_sweep(tmp_path, tiny_glue_root, "bad"), "--executor", "submitit-local", flag, value)
    assert stop.value.code == 2
    assert f"argument {flag}" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_the_flags_override_the_sweep_files_slurm_section_in_the_job_script(tmp_path, monkeypatch):
    for command in ("sbatch", "srun"):  # submitit builds SlurmExecutor only where srun exists
        (tmp_path / command).write_text("#!/bin/sh\nexit 1\n")
        (tmp_path / command).chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    sweep = parse_sweep({"name": "s", "seeds": [0], "tasks": {"a": "a.yaml"}, "methods": {"m": []},
                         "slurm": {"partition": "gpu", "time": 10, "mem": 32, "array_parallelism": 4,
                                   "sbatch": {"account": "proj"}}})
    slurm.check_executor("slurm")
    options = slurm.SlurmOptions.of(sweep, time=30, gpus=2, cpus=None)
    assert (options.partition, options.time, options.gpus, options.cpus) == ("gpu", 30, 2, None)
    script = slurm._executor("slurm", tmp_path / "jobs", options, "s")._make_submission_file_text("run", "0")
    for line in ("--partition=gpu", "--time=30", "--gpus-per-node=2", "--mem=32768MB", "--account=proj",
                 f"--signal={JobEnvironment.USR_SIG}@{slurm.SIGNAL_DELAY_S}"):
        assert f"#SBATCH {line}" in script, script
    assert "--cpus-per-task" not in script


def test_a_job_stops_its_run_with_sigterm_and_waits_for_it(tmp_path):
    """The checkpoint's stop: the child (which ignores the job's signal, as the job's flexlora does) gets SIGTERM and
    the call returns only once it has exited."""
    marker = tmp_path / "stopped"
    script = ("import signal, sys, time\n"
              f"signal.signal(signal.SIGTERM, lambda *a: (time.sleep(0.5), open({str(marker)!r}, 'w').close(), "
              "sys.exit(143)))\n"
              "print('ready', flush=True)\ntime.sleep(60)\n")
    child = subprocess.Popen([*slurm._program()[:3], sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
        os.kill(child.pid, JobEnvironment._usr_sig())  # ignored by the child
        time.sleep(0.3)
        assert child.poll() is None
        slurm._stop([child.pid], 10.0)
        assert marker.is_file()
        assert child.wait(timeout=5) == 143
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
