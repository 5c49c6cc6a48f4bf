"""Checks a tuned sweep makes before its first trial: every trial command parses, and the search's objective is a
metric each task's validation logs.

Each task × method's first trial command is parsed with ``--print_config`` (nothing is built), so a searched flag
the configs do not have stops the sweep with the parser's own words. For each task, the data module is built from
that parsed config (cheap: no data is read, no model is loaded) and the model class says what a validation on it logs
(:meth:`flexlora_pl.FlexLoRAModule.validation_metrics_for`). An objective outside that list stops the sweep with
the list, before any trial folder exists, instead of failing every trial once it has trained.
"""

from __future__ import annotations

import contextlib
import importlib
import io
from collections.abc import Sequence
from typing import Any

import yaml

from flexlora_pl.experiments.search_space import SearchError

__all__ = ["check_objective", "check_trial_flags", "logged_validation_metrics"]


def _class(path: str) -> Any:
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def logged_validation_metrics(args: Sequence[str]) -> tuple[str, list[str]]:
    """The model class name and the metrics a validation of the ``flexlora fit`` run ``args`` logs.

    Raises:
        SearchError: the command does not parse (the parser's words are in the message).
    """
    from flexlora_pl.cli.main import build_cli

    printed, errors = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
            build_cli([*args, "--print_config"])
    except SystemExit as stop:
        if stop.code not in (0, None):
            said = " ".join(errors.getvalue().split()[-60:])
            raise SearchError(f"the trial command does not parse: {said}") from None
    config = yaml.safe_load(printed.getvalue())
    data_spec, model_spec = config["data"], config["model"]
    data = _class(data_spec["class_path"])(**(data_spec.get("init_args") or {}))
    model_class = _class(model_spec["class_path"])
    return model_class.__name__, list(model_class.validation_metrics_for(data))


def check_trial_flags(sweep: Any, tasks: Sequence[str] | None, methods: Sequence[str] | None,
                      save_dir: str | None, extra: Sequence[str]) -> None:
    """Parse one trial's command of every task × method (``--print_config``: nothing is built), so that a searched
    flag the configs do not have stops the sweep before any run starts, with the parser's own words."""
    from flexlora_pl.cli.main import build_cli

    for run in sweep.runs(tasks, methods, save_dir=save_dir):
        if run.seed != sweep.seeds[0]:
            continue
        trial = _first_trial(sweep, run, save_dir)
        printed, errors = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
                build_cli([*trial.command("fit", extra), "--print_config"])
        except SystemExit as stop:
            if stop.code in (0, None):
                continue
            said = " ".join(" ".join(line for line in errors.getvalue().splitlines()[-3:] if line.strip()).split())
            raise SearchError(f"{sweep.source}: a search trial of {run.task} / {run.method} does not parse "
                              f"(the parser says: {said or 'exit ' + str(stop.code)}). Check the flags under "
                              "search.params (and search.holdout) against `flexlora fit --config ... --print_config`"
                              ) from None


def _first_trial(sweep: Any, run: Any, save_dir: str | None) -> Any:
    """A trial of ``run``'s task × method at the lowest value (first choice) of each searched parameter."""
    from flexlora_pl.experiments import tuned

    values = {p.name: (p.choices[0] if p.choices else (int(p.low) if p.integer else p.low))
              for p in sweep.search.params[run.method]}
    return tuned.trial_run(sweep, run.task, run.method, 0, values, save_dir)


def check_objective(sweep: Any, tasks: Sequence[str] | None, methods: Sequence[str] | None,
                    save_dir: str | None, extra: Sequence[str]) -> None:
    """Refuse a ``search.objective`` that some task's validation does not log, naming what it logs.

    One trial command per task is checked (the first method's): the metrics depend on the task, not the method.
    """
    spec = sweep.search
    checked: set[str] = set()
    for run in sweep.runs(tasks, methods, save_dir=save_dir):
        if run.task in checked:
            continue
        checked.add(run.task)
        trial = _first_trial(sweep, run, save_dir)
        model, logged = logged_validation_metrics(trial.command("fit", extra))
        if spec.objective not in logged:
            raise SearchError(f"{sweep.source}: search.objective {spec.objective!r} is not logged by task "
                              f"{run.task}: {model} logs {', '.join(logged)} at each validation (with the search's "
                              "hold-out flags); set search.objective to one of them")
