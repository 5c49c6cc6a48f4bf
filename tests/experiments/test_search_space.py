"""The ``search:`` section of a sweep file: grids, budgets and flags, and every bad input refused with the key."""

from __future__ import annotations

import pytest

from flexlora_pl.experiments.search_space import Param, SearchError, parse_search

LR = "--model.init_args.optimizer.init_args.lr"
METHODS, TASKS = ["lora", "flexlora"], ["tweets"]


def _parse(section: dict, methods=METHODS, tasks=TASKS):
    return parse_search(section, methods, tasks, where="sweep.yaml")


def test_a_log_grid_spans_the_range_geometrically_and_every_method_gets_the_same_budget():
    spec = _parse({"sampler": "grid", "params": {LR: {"low": 1.0e-4, "high": 1.0e-2, "log": True, "steps": 5}},
                   "holdout": ["--data.init_args.holdout_size", 0.2]})
    assert spec.trials == {"lora": 5, "flexlora": 5}
    values = [point[LR.lstrip("-")] for point in spec.grid_points("lora")]
    assert values == pytest.approx([1e-4, 10 ** -3.5, 1e-3, 10 ** -2.5, 1e-2], rel=1e-5)
    assert spec.trial_args("lora", {LR.lstrip("-"): 0.001}) == [LR, "0.001"]
    assert spec.holdout == {"tweets": ("--data.init_args.holdout_size", "0.2")}


def test_per_method_parameters_add_to_the_shared_ones_and_a_grid_is_their_product():
    spec = _parse({"sampler": "grid", "params": {LR: {"low": 1.0e-4, "high": 1.0e-2, "log": True, "steps": 3}},
                   "methods": {"flexlora": {"params": {"--x": {"choices": [1, 2]}}}}, "allow_unequal_budgets": True})
    assert spec.trials == {"lora": 3, "flexlora": 6}
    assert [p.flag for p in spec.params["flexlora"]] == [LR, "--x"]


def test_a_pruner_goes_with_its_options_to_the_trials():
    section = {"trials": 4, "params": {LR: {"low": 1.0e-4, "high": 1.0e-2}}}
    assert _parse(section).pruner_spec == {"type": "none"}
    assert _parse({**section, "pruner": "median"}).pruner_spec == {"type": "median"}
    spec = _parse({**section, "pruner": {"type": "median", "startup_trials": 2, "warmup_steps": 0}})
    assert (spec.pruner, spec.pruner_spec) == ("median", {"type": "median", "startup_trials": 2, "warmup_steps": 0})


def test_selected_values_at_the_edge_of_their_range_are_flagged():
    grid = Param(LR, 1e-4, 1e-2, log=True, steps=5)
    assert grid.at_edge(1e-4) and grid.at_edge(1e-2) and not grid.at_edge(1e-3)
    continuous = Param(LR, 1e-4, 1e-2, log=True)
    assert continuous.at_edge(1.1e-4) and not continuous.at_edge(1e-3)
    assert grid.describe() == "[0.0001, 0.01] (log, 5 values)"


@pytest.mark.parametrize(("section", "message"), [
    ({"trials": 4, "params": {LR: {"low": 1.0e-2, "high": 1.0e-4}}}, r"params\.--model.*low \(0\.01\) must be below"),
    ({"trials": 4, "params": {LR: {"low": 0.0, "high": 1.0e-2, "log": True}}}, r"log range needs bounds > 0"),
    ({"trials": 4, "params": {"--x": {"choices": []}}}, r"--x\.choices: a non-empty list"),
    ({"trials": 4, "params": {LR: {"low": 1.0e-4, "high": 1.0e-2}}, "objective": "test/score"},
     r"objective: 'test/score' is a test metric"),
    ({"trials": 4, "params": {LR: {"low": 1.0e-4, "high": 1.0e-2}}, "objective": "accuracy"},
     r"is not a validation metric"),
    ({"trials": 4, "params": {LR: {"low": 1.0e-4, "high": 1.0e-2}}, "methods": {"lora": {"trials": 8}}},
     r"unequal trial budgets \(lora: 8, flexlora: 4\).*allow_unequal_budgets: true"),
    ({"params": {LR: {"low": 1.0e-4, "high": 1.0e-2}}}, r"search\.trials: the number of trials .* is required"),
    ({"sampler": "grid", "params": {LR: {"low": 1.0e-4, "high": 1.0e-2}}}, r"grid needs `steps` or `choices`"),
    ({"sampler": "grid", "trials": 4, "params": {LR: {"low": 1.0e-4, "high": 1.0e-2, "steps": 3}}},
     r"grid has 3 points, not 4"),
    ({"trials": 4, "params": {LR: {"low": 1.0e-4, "high": 1.0e-2}}, "sampler": "bayes"}, r"sampler: 'bayes' is not"),
    ({"trials": 4, "params": {LR: {"low": 1.0e-4, "high": 1.0e-2}}, "prunner": "median"}, r"unknown key\(s\) prunner"),
    ({"trials": 4, "params": {"--seed_everything": {"choices": [1, 2]}}}, r"set by the sweep .* cannot be searched"),
    ({"trials": 4, "params": {LR: {"low": 1.0e-4, "high": 1.0e-2}}, "methods": {"dora": {}}},
     r"dora not among the sweep's methods"),
    ({"trials": 4, "params": {LR: {"low": 1.0e-4, "high": 1.0e-2}}, "holdout": {"glue_rte": []}},
     r"holdout: glue_rte not among the sweep's tasks"),
    ({"trials": 4}, r"method lora searches nothing"),
    ({"trials": 4, "params": {LR: {"low": "1e-4", "high": 1.0e-2}}}, r"low: a finite number.*write 1\.0e-4"),
    ({"trials": 4, "params": {LR: {"low": 1.0e-4, "high": 1.0e-2}}, "pruner": {"type": "hyperband"}},
     r"pruner\.type: 'hyperband' is not one of none, median, successive_halving"),
    ({"trials": 4, "params": {LR: {"low": 1.0e-4, "high": 1.0e-2}},
      "pruner": {"type": "median", "reduction_factor": 3}},
     r"pruner: unknown key\(s\) reduction_factor; it takes type, startup_trials, warmup_steps"),
    ({"trials": 4, "params": {LR: {"low": 1.0e-4, "high": 1.0e-2}},
      "pruner": {"type": "successive_halving", "reduction_factor": 1}},
     r"pruner\.reduction_factor: an integer >= 2, got 1"),
])
def test_bad_search_sections_are_refused_naming_the_key(section, message):
    with pytest.raises(SearchError, match=message):
        _parse(section)
