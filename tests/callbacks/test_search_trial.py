"""A search trial through the real ``flexlora fit``: its validations reach its Optuna trial, and the study's pruner
(the one the search section names, with its options) stops a trial that is behind, recorded in the run folder."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from conftest import tiny_run_folder
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from flexlora_pl.callbacks.search_trial import PRUNED_FILENAME, SEARCH_TRIAL_ENV, SearchTrialReport, build_pruner
from flexlora_pl.cli import build_cli

# 48 training rows at batch 8: 6 steps an epoch, 2 epochs, a validation every 3 steps (at steps 3, 6, 9, 12).
CHANGES = {"trainer": {"max_epochs": 2, "val_check_interval": 0.5}}
STEPS = (3, 6, 9, 12)


def _study(tmp_path: Path, earlier: float) -> tuple[str, optuna.Study, int]:
    """A study with one finished trial whose value was ``earlier`` at every validation, and a new running trial."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    study = optuna.create_study(study_name="s/a/flexlora", storage=url, direction="maximize")
    lr = FloatDistribution(1e-3, 1e-1, log=True)
    study.add_trial(create_trial(params={"lr": 1e-2}, distributions={"lr": lr}, value=earlier,
                                 intermediate_values=dict.fromkeys(STEPS, earlier)))
    trial = study.ask({"lr": lr})
    return url, study, trial.number


@pytest.mark.parametrize(("earlier", "pruned"), [(2.0, True), (-1.0, False)], ids=["behind", "ahead"])
def test_the_median_pruner_stops_a_trial_that_is_behind_at_its_first_validation(tmp_path, tiny_glue_root,
                                                                                  monkeypatch, earlier, pruned):
    url, study, number = _study(tmp_path, earlier)
    monkeypatch.setenv(SEARCH_TRIAL_ENV, json.dumps({
        "storage": url, "study": study.study_name, "trial": number, "objective": "val/score",
        "pruner": {"type": "median", "startup_trials": 1}}))
    folder = tiny_run_folder(tmp_path, tiny_glue_root, CHANGES)
    cli = build_cli(["fit", "--config", str(folder / "run.yaml")])

    reports = [c for c in cli.trainer.callbacks if isinstance(c, SearchTrialReport)]
    assert len(reports) == 1 and reports[0].pruner == {"type": "median", "startup_trials": 1}
    trial = optuna.load_study(study_name=study.study_name, storage=url).trials[number]
    record = json.loads((Path(cli.trainer.log_dir) / "metrics.json").read_text())
    assert record["fit"]["status"] == "finished"  # a pruned trial ends like a run, and the file tells it apart
    marker = Path(cli.trainer.log_dir, PRUNED_FILENAME)
    if pruned:
        assert cli.trainer.global_step == STEPS[0]
        assert sorted(trial.intermediate_values) == [STEPS[0]]
        assert json.loads(marker.read_text())["step"] == STEPS[0]
    else:
        assert cli.trainer.global_step == STEPS[-1] and not marker.exists()
        assert sorted(trial.intermediate_values) == list(STEPS)
    history = {entry["step"]: entry["val/score"] for entry in record["fit"]["history"]}
    assert {step: pytest.approx(value) for step, value in trial.intermediate_values.items()} == \
        {step: history[step] for step in trial.intermediate_values}
    assert trial.state == TrialState.RUNNING  # the worker tells the study, not the run
    # what a search may select on is what a validation logs (the sweep checks the objective against it)
    logged = {name for name in cli.trainer.callback_metrics if name.startswith("val")}
    assert set(cli.model.validation_metric_names) == logged, logged
    assert type(cli.model).validation_metrics_for(cli.datamodule) == cli.model.validation_metric_names


def test_outside_a_search_no_trial_callback_is_added(tmp_path, tiny_glue_root, monkeypatch):
    monkeypatch.delenv(SEARCH_TRIAL_ENV, raising=False)
    folder = tiny_run_folder(tmp_path, tiny_glue_root, {})
    cli = build_cli(["--config", str(folder / "run.yaml")], run=False)
    assert not any(isinstance(c, SearchTrialReport) for c in cli.trainer.callbacks)


def test_the_pruner_is_the_one_the_search_names(monkeypatch):
    assert isinstance(build_pruner({"type": "none"}), optuna.pruners.NopPruner)
    median = build_pruner({"type": "median", "startup_trials": 2, "warmup_steps": 10})
    assert isinstance(median, optuna.pruners.MedianPruner)
    assert (median._n_startup_trials, median._n_warmup_steps) == (2, 10)
    halving = build_pruner({"type": "successive_halving", "reduction_factor": 3, "min_resource": 20})
    assert isinstance(halving, optuna.pruners.SuccessiveHalvingPruner)
    assert (halving._reduction_factor, halving._min_resource) == (3, 20)
    with pytest.raises(ValueError, match="the type is none, median or successive_halving"):
        build_pruner({"type": "hyperband"})
    with pytest.raises(ValueError, match="startup_trials"):
        build_pruner({"type": "median", "reduction_factor": 3})
    monkeypatch.setenv(SEARCH_TRIAL_ENV, json.dumps({"trial": 0}))
    with pytest.raises(ValueError, match=f"{SEARCH_TRIAL_ENV} must be a JSON object"):
        SearchTrialReport.from_environment()
