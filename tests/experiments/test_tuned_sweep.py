"""A tuned comparison end to end through ``flexlora-sweep``: 2 methods x a 4-point learning-rate grid, searched by
two workers on one SQLite study each with the validation carved from training, then the selected values at 2 seeds."""

from __future__ import annotations

import json
import re

import optuna
import pytest
import yaml
from optuna.trial import TrialState
from tiny_run import tiny_run_config
from tiny_sweep import REPO, invoke_sweep, task_changes

from flexlora_pl.cli.results import main as results_main

pytestmark = pytest.mark.slow

LR = "--model.init_args.optimizer.init_args.lr"


@pytest.fixture(scope="module")
def tuned(tmp_path_factory, tiny_glue_root):
    root = tmp_path_factory.mktemp("tuned")
    (root / "a.yaml").write_text(tiny_run_config(tiny_glue_root, changes=task_changes(0.01)))
    sweep = root / "tuned.yaml"
    sweep.write_text(yaml.safe_dump({
        "name": "tuned", "save_dir": str(root / "runs"), "seeds": [0, 1], "reference": "lora",
        "tasks": {"a": str(root / "a.yaml")},
        "methods": {"flexlora": [], "lora": str(REPO / "configs" / "methods" / "lora.yaml")},
        "search": {"sampler": "grid", "seed": 5, "objective": "val/score",
                   "holdout": ["--data.init_args.holdout_size", "0.25"],
                   "params": {LR: {"low": 1.0e-3, "high": 1.0e-1, "log": True, "steps": 4}}},
    }))
    code, out = invoke_sweep(str(sweep), "--workers", "2")
    return root, root / "runs" / "tuned", code, out


def test_every_study_runs_its_budget_once_each_trial_a_run_folder_on_carved_data(tuned):
    _, folder, code, out = tuned
    assert code == 0, out
    storage = optuna.storages.RDBStorage(f"sqlite:///{folder.resolve()}/optuna.db")
    for method in ("flexlora", "lora"):
        study = optuna.load_study(study_name=f"tuned/a/{method}", storage=storage)
        trials = study.get_trials()
        assert [t.state for t in trials] == [TrialState.COMPLETE] * 4, [(t.number, t.state) for t in trials]
        grid = [1e-3, 10 ** (-7 / 3), 10 ** (-5 / 3), 1e-1]
        assert sorted(t.params[LR.lstrip("-")] for t in trials) == pytest.approx(grid, rel=1e-4)
        for trial in trials:
            run = folder / "a" / method / "search" / f"trial{trial.number}"
            config = yaml.safe_load((run / "config.yaml").read_text())
            assert config["seed_everything"] == 5
            assert config["data"]["init_args"]["holdout_size"] == 0.25
            lr = config["model"]["init_args"]["optimizer"]["init_args"]["lr"]
            assert lr == pytest.approx(trial.params[LR.lstrip("-")])
            record = json.loads((run / "metrics.json").read_text())
            assert record["fit"]["holdout"]["rows"] == 12, record["fit"].get("holdout")
            history = [entry["val/score"] for entry in record["fit"]["history"]]
            assert trial.value == pytest.approx(max(history))
            assert trial.intermediate_values  # reported at each validation by the trial's own process


def test_the_best_trial_is_selected_and_run_at_every_seed_on_the_full_data(tuned):
    _, folder, code, out = tuned
    assert code == 0, out
    for method in ("flexlora", "lora"):
        selected = json.loads((folder / "a" / method / "selected.json").read_text())
        study = optuna.load_study(study_name=f"tuned/a/{method}",
                                  storage=f"sqlite:///{folder.resolve()}/optuna.db")
        assert selected["trial"] == study.best_trial.number and selected["value"] == study.best_value
        assert selected["budget"] == 4 and selected["trials"] == {"complete": 4, "pruned": 0, "fail": 0}
        assert f"selected a/{method}: lr=" in out
        for seed in (0, 1):
            run = folder / "a" / method / f"seed{seed}"
            config = yaml.safe_load((run / "config.yaml").read_text())
            assert config["seed_everything"] == seed
            assert config["data"]["init_args"].get("holdout_size") is None  # the final runs train on all of train
            assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == pytest.approx(
                selected["params"][LR])
            assert json.loads((run / "metrics.json").read_text())["fit"]["status"] == "finished"


def test_the_results_show_the_search_and_the_differences_from_the_sweep_s_reference(tuned, capsys):
    root, folder, code, out = tuned
    assert code == 0, out
    assert results_main([str(folder), "--sweep", str(root / "tuned.yaml")]) == 0  # no --reference: the file's
    printed = capsys.readouterr().out
    assert "tuned: differences against lora" in printed
    search = printed[printed.index("**tuned: the search (grid sampler, pruner none, 4 trials"):]
    search = search[:search.index("\n\n**")]
    for method in ("flexlora", "lora"):
        selected = json.loads((folder / "a" / method / "selected.json").read_text())
        row = next(line for line in search.splitlines() if line.startswith(f"| {method} |"))
        lr = selected["params"][LR]
        assert f"| lr {lr:.3g} | {selected['value'] * 100:.1f} | 4 / 0 / 0 (4) | lr [0.001, 0.1] (log, 4 values) |" \
            in row, row
        assert " (4 runs) |" in row
        if lr in (1e-3, 1e-1):
            assert f"warning: a / {method} selected lr = {lr:.3g} at an end of its range" in search
    figure = folder / "a" / "sensitivity.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {figure}" in out
    assert f"sensitivity figure (search score against the searched value): {figure}" in search


def test_running_it_again_runs_nothing_new(tuned):
    root, folder, code, _ = tuned
    assert code == 0
    again, out = invoke_sweep(str(root / "tuned.yaml"))
    assert again == 0, out
    assert "final tuned: 0 ran, 4 skipped, 0 failed" in out
    searched, out = invoke_sweep(str(root / "tuned.yaml"), "--stage", "search")  # the studies, then selection
    assert searched == 0 and "selected a/lora: lr=" in out and "final tuned" not in out, out
    study = optuna.load_study(study_name="tuned/a/lora", storage=f"sqlite:///{folder.resolve()}/optuna.db")
    assert len(study.get_trials()) == 4


def test_a_final_run_trained_at_other_values_than_the_selection_stops_the_final_stage(tuned, capsys):
    root, folder, code, _ = tuned
    assert code == 0
    config = folder / "a" / "lora" / "seed1" / "config.yaml"
    text = config.read_text()
    trained = yaml.safe_load(text)
    trained["model"]["init_args"]["optimizer"]["init_args"]["lr"] = 0.5  # as if the search had selected 0.5 before
    config.write_text(yaml.safe_dump(trained))
    try:
        with pytest.raises(SystemExit) as stop:
            invoke_sweep(str(root / "tuned.yaml"), "--stage", "final")
    finally:
        config.write_text(text)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert f"{config.parent}: trained with {LR} = 0.5, selected now" in err and "move those folders away" in err


def test_print_gives_both_stages_for_any_scheduler(tuned, tmp_path, tiny_glue_root):
    root, folder, code, _ = tuned
    assert code == 0
    printed, out = invoke_sweep(str(root / "tuned.yaml"), "--print", "--workers", "2")
    assert printed == 0
    storage = f"sqlite:///{folder.resolve()}/optuna.db"
    assert out.splitlines() == [f"flexlora-sweep {root / 'tuned.yaml'} --storage {storage} --stage search"] * 2
    # a sweep not yet searched: the worker lines, then the line that selects and runs the finals; nothing runs
    fresh = _bad_sweep(tmp_path, tiny_glue_root, {"sampler": "grid",
                                                  "params": {LR: {"low": 1.0e-3, "high": 1.0e-2, "steps": 2}}})
    printed, out = invoke_sweep(fresh, "--print", "--", "--trainer.max_epochs", "1")
    lines = out.splitlines()
    assert printed == 0 and len(lines) == 2 and lines[0].endswith("--stage search -- --trainer.max_epochs 1")
    assert lines[1].endswith("--stage final -- --trainer.max_epochs 1")
    assert not (tmp_path / "runs").exists()


def _bad_sweep(tmp_path, tiny_glue_root, search: dict, **top) -> str:
    (tmp_path / "a.yaml").write_text(tiny_run_config(tiny_glue_root, changes=task_changes(0.01)))
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"name": "bad", "save_dir": str(tmp_path / "runs"), "seeds": [0],
                                    "tasks": {"a": str(tmp_path / "a.yaml")}, "methods": {"flexlora": []},
                                    "search": search, **top}))
    return str(path)


@pytest.mark.parametrize(("search", "args", "message"), [
    ({"sampler": "grid", "params": {LR + "r": {"low": 1.0e-3, "high": 1.0e-2, "log": True, "steps": 2}}}, [],
     r"a search trial of a / flexlora does not parse .*optimizer\.init_args\.lrr"),
    ({"sampler": "grid", "params": {LR: {"low": 1.0e-3, "high": 1.0e-2, "log": True, "steps": 2}}},
     ["--storage", "postgresql://nobody@localhost:1/none"], r"--storage .* cannot be opened"),
    ({"trials": 2, "params": {LR: {"low": 0.0, "high": 1.0e-2, "log": True}}}, [], r"log range needs bounds > 0"),
    ({"sampler": "grid", "objective": "val/f2", "params": {LR: {"low": 1.0e-3, "high": 1.0e-2, "steps": 2}}}, [],
     r"search\.objective 'val/f2' is not logged by task a: FlexLoRASequenceClassifier logs val/score, val/loss, "
     r"val/accuracy, val/f1 at each validation"),
])
def test_bad_tuned_sweeps_stop_before_any_run_folder_exists(tmp_path, tiny_glue_root, capsys, search, args, message):
    with pytest.raises(SystemExit) as stop:
        invoke_sweep(_bad_sweep(tmp_path, tiny_glue_root, search), *args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err[-1500:]
    assert not list((tmp_path / "runs").glob("bad/*/*/search/trial*"))
