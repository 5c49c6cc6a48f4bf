"""Running a sweep: each run's state from its folder, then ``flexlora fit`` (and ``test``) one after another.

A run's folder says what is left to do (:func:`plan_run`): nothing (``metrics.json`` records a finished
fit, and a finished test where the task has one), the test stage only, a resume of an interrupted or
crashed fit from its most trained checkpoint (``--ckpt_path last``), or a fresh fit. Running the same
sweep again therefore continues it. Each stage is a subprocess of the ``flexlora`` command whose
output goes to ``<save_dir>/<sweep>/logs/<task>.<method>.seed<k>.log``; a failed run is reported and
the sweep goes on.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from flexlora_pl.callbacks.run_record import METRICS_FILENAME
from flexlora_pl.experiments.sweep_file import Run
from flexlora_pl.runs.run_folder import RunFolder, newest_trained_checkpoint

__all__ = ["PROGRAM", "RunPlan", "SweepResult", "command_line", "plan_run", "run_parallel", "run_sweep",
           "worker_env"]

PROGRAM = (sys.executable, "-m", "flexlora_pl.cli")
"""How the runner starts ``flexlora``: the same interpreter, so the sweep uses the environment it runs in."""

# what is left to do for a run
NEW, RESUME, TEST, DONE, BROKEN = "new", "resume", "test", "finished", "broken"
_SIGNALLED = (130, 143)  # a stage stopped by Ctrl-C or SIGTERM: the sweep stops too


@dataclass(frozen=True)
class RunPlan:
    """What a run needs next, read from its folder.

    Args:
        run: the run.
        state: ``new``, ``resume``, ``test`` (fit finished, test stage missing), ``finished`` or
            ``broken`` (the folder holds files but neither a finished fit nor a checkpoint to resume).
        detail: why, in words (shown in progress lines and ``--list``).
    """

    run: Run
    state: str
    detail: str = ""

    def stages(self) -> list[tuple[str, str | None]]:
        """The ``(subcommand, ckpt_path)`` pairs still to run."""
        test = [("test", self.run.test)] if self.run.test else []
        if self.state == NEW:
            return [("fit", None), *test]
        if self.state == RESUME:
            return [("fit", "last"), *test]
        if self.state == TEST:
            return test
        return []


@dataclass
class SweepResult:
    """What a sweep did: counts of runs by outcome and the failed runs' labels and logs."""

    ran: int = 0
    skipped: int = 0
    failed: list[tuple[str, str]] | None = None
    interrupted: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted


def read_record(folder: Path) -> dict[str, Any]:
    """A run folder's ``metrics.json`` (empty when absent or unreadable)."""
    try:
        return json.loads((folder / METRICS_FILENAME).read_text())
    except (OSError, ValueError):
        return {}


def plan_run(run: Run) -> RunPlan:
    """Read ``run``'s folder and decide what is left to do (see :class:`RunPlan`)."""
    folder = run.folder
    if not folder.is_dir() or not any(folder.iterdir()):
        return RunPlan(run, NEW)
    record = read_record(folder)
    fit = record.get("fit") or {}
    status = fit.get("status")
    if status == "finished":
        test = record.get("test") or {}
        if run.test is None or test.get("status") == "finished":
            return RunPlan(run, DONE, _score(record))
        return RunPlan(run, TEST, "fit finished, test " + (f"{test['status']}" if test.get("status") else "not run"))
    found = newest_trained_checkpoint(RunFolder(str(Path(run.save_dir)), run.name, run.version))
    why = f"fit {status}" if status else "no metrics.json"
    if found is not None:
        return RunPlan(run, RESUME, f"{why}; resumes from {found[0].name} at step {found[1]}")
    return RunPlan(run, BROKEN, f"{why} and no checkpoint to resume in {folder}; remove the folder to run it again")


def command_line(run: Run, stage: str, ckpt_path: str | None, extra: Sequence[str] = (),
                 program: Sequence[str] = ("flexlora",)) -> str:
    """One stage as a shell command line."""
    return shlex.join([*program, *run.command(stage, extra, ckpt_path)])


def print_commands(plans: Sequence[RunPlan], extra: Sequence[str], out: TextIO, err: TextIO) -> None:
    """Write one shell line per run that has work left (``fit && test``), for a cluster's job array."""
    finished = 0
    for plan in plans:
        if plan.state == BROKEN:
            print(f"# {plan.run.label}: {plan.detail}", file=err)
            continue
        stages = plan.stages()
        if not stages:
            finished += 1
            continue
        print(" && ".join(command_line(plan.run, stage, ckpt, extra) for stage, ckpt in stages), file=out)
    if finished:
        print(f"# {finished} finished run(s) left out", file=err)


def log_path(run: Run) -> Path:
    """Where a run's ``flexlora`` output goes (appended, one block per stage)."""
    return Path(run.save_dir) / run.sweep / "logs" / f"{run.log_stem}.log"


def run_sweep(plans: Sequence[RunPlan], extra: Sequence[str] = (), out: TextIO | None = None,
              program: Sequence[str] = PROGRAM, verbose: bool = False,
              env: Mapping[str, str] | None = None, first: int = 1, total: int | None = None) -> SweepResult:
    """Run every plan's stages one after another, with one progress line per run.

    Args:
        plans: the runs and what each needs (from :func:`plan_run`).
        extra: flags appended to every command (they win over the sweep file's).
        out: where progress lines go (default: standard output).
        program: the ``flexlora`` command to start.
        verbose: let ``flexlora``'s output through to the terminal as well as the log.
        env: the environment of every ``flexlora`` process (default: this process's).
        first: the number the first plan's progress line shows (later plans count on from it).
        total: the total the lines show (default: the number of plans).
    """
    out = out or sys.stdout
    result = SweepResult(failed=[])
    total = len(plans) if total is None else total
    for index, plan in enumerate(plans, first):
        run = plan.run
        head = f"[{index}/{total}] {run.label}:"
        if plan.state == DONE:
            result.skipped += 1
            print(f"{head} finished, skipped" + (f" ({plan.detail})" if plan.detail else ""), file=out, flush=True)
            continue
        if plan.state == BROKEN:
            result.failed.append((run.label, str(run.folder)))
            print(f"{head} FAILED: {plan.detail}", file=out, flush=True)
            continue
        print(head, end="", file=out, flush=True)
        result.ran += 1
        for number, (stage, ckpt_path) in enumerate(plan.stages()):
            what = stage if ckpt_path is None or stage == "test" else f"{stage} (resume: {plan.detail})"
            print(("," if number else "") + f" {what} …", end="", file=out, flush=True)
            started = time.perf_counter()
            code = _run_stage(run, stage, ckpt_path, extra, program, verbose, env)
            seconds = time.perf_counter() - started
            record = read_record(run.folder)
            section = record.get(stage) or {}
            if code == 0 and section.get("status") != "finished":
                code = -1  # exited cleanly but the run's record does not say it finished
            if code != 0:
                reason = f"exit {code}" if code >= 0 else f"metrics.json says {section.get('status', 'nothing')}"
                print(f" FAILED ({reason}): see {log_path(run)}", file=out, flush=True)
                result.failed.append((run.label, str(log_path(run))))
                if code in _SIGNALLED:
                    result.interrupted = True
                break
            print(f" done in {seconds:.0f} s" + (f", {_score(record, stage)}" if _score(record, stage) else ""),
                  end="", file=out, flush=True)
        else:
            print(file=out, flush=True)
        if result.interrupted:
            print("sweep stopped by a signal; run the same command again to continue (finished runs are skipped, "
                  "interrupted ones resume)", file=out, flush=True)
            break
    return result


def _run_stage(run: Run, stage: str, ckpt_path: str | None, extra: Sequence[str], program: Sequence[str],
               verbose: bool, env: Mapping[str, str] | None = None) -> int:
    log = log_path(run)
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [*program, *run.command(stage, extra, ckpt_path)]
    with log.open("a") as handle:
        handle.write(f"\n$ {command_line(run, stage, ckpt_path, extra)}\n")
        handle.flush()
        if verbose:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
            assert process.stdout is not None
            for line in process.stdout:
                handle.write(line)
                sys.stdout.write(line)
        else:
            process = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, env=env)
        try:
            return process.wait()
        except KeyboardInterrupt:  # Ctrl-C reaches the child too: it writes a resumable checkpoint and stops
            return process.wait()


def _score(record: dict[str, Any], stage: str = "fit") -> str:
    """The headline score of a stage for progress lines: the best validation score, or the test score."""
    if stage == "fit":
        best = (record.get("fit") or {}).get("best") or {}
        score = f"{best['monitor']} {best['value']:.4g}" if best.get("value") is not None else ""
        test = ((record.get("test") or {}).get("metrics") or {})
        key = next((k for k in ("test/score", "test/accuracy") if k in test), None)
        return ", ".join(filter(None, [score, f"{key} {test[key]:.4g}" if key else ""]))
    metrics = (record.get(stage) or {}).get("metrics") or {}
    key = next((k for k in ("test/score", "test/accuracy") if k in metrics), None)
    return f"{key} {metrics[key]:.4g}" if key else ""


def worker_env(index: int, workers: int, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of worker ``index`` of ``workers``: its own GPU where there are GPUs, its share of CPU threads.

    One worker keeps the machine's settings. With several, worker i sees GPU ``i % gpus`` alone
    (``CUDA_VISIBLE_DEVICES``, taken from the visible list when it is set) and ``cpus // workers`` threads.
    """
    env = dict(os.environ if base is None else base)
    if workers <= 1:
        return env
    threads = str(max(1, (os.cpu_count() or 1) // workers))
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    visible = env.get("CUDA_VISIBLE_DEVICES")
    gpus = [g for g in visible.split(",") if g.strip()] if visible is not None else [str(i) for i in range(_gpus())]
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[index % len(gpus)]
    return env


def _gpus() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # no usable CUDA: CPU workers
        return 0


def run_parallel(plans: Sequence[RunPlan], extra: Sequence[str] = (), workers: int = 1, verbose: bool = False,
                 out: TextIO | None = None) -> list[SweepResult]:
    """Run the plans ``workers`` at once, each run with its own devices and thread share (:func:`worker_env`).

    Each run's progress line is printed whole when the run ends (numbered in the order of ``plans``), so lines of
    runs that end at once do not mix. One worker runs the plans one after another, as :func:`run_sweep` does.
    """
    import io
    import threading
    from concurrent.futures import ThreadPoolExecutor

    out = out or sys.stdout
    if workers <= 1:
        return [run_sweep(plans, extra, out=out, verbose=verbose)]
    slots, lock = list(range(workers)), threading.Lock()

    def one(index: int, plan: RunPlan) -> SweepResult:
        with lock:
            slot = slots.pop()
        buffer = io.StringIO()
        try:
            return run_sweep([plan], extra, out=buffer, env=worker_env(slot, workers), first=index,
                             total=len(plans))
        finally:
            with lock:
                slots.append(slot)
                out.write(buffer.getvalue())
                out.flush()

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(1, len(plans) + 1), plans))
