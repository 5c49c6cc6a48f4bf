"""The sensitivity figure of a tuned comparison, from selected.json records: one line per method through its
trials' search scores against the searched value, the best over other parameters, the selected trial ringed."""

from __future__ import annotations

import json

import pytest

from flexlora_pl.figures.sensitivity import read_selections, sensitivity_figure, write_sensitivity

LR = "--model.init_args.optimizer.init_args.lr"
DROPOUT = "--model.init_args.method.init_args.dropout"


def _record(curve, params, value, ranges):
    return {"objective": "val/score", "direction": "maximize", "params": params, "value": value,
            "ranges": ranges, "curve": curve}


def test_each_method_is_a_line_through_the_best_score_per_value_with_the_selection_ringed(tmp_path):
    lora = _record([[[1e-3, 0.0], 0.5], [[1e-3, 0.1], 0.6], [[1e-2, 0.0], 0.7], [[1e-2, 0.1], 0.65]],
                   {LR: 1e-2, DROPOUT: 0.0}, 0.7, {LR: "[0.001, 0.01] (log, 2 values)", DROPOUT: "{0.0, 0.1}"})
    flex = _record([[[1e-3], 0.4], [[1e-2], 0.8]], {LR: 1e-2}, 0.8, {LR: "[0.001, 0.01] (log, 2 values)"})
    figure = sensitivity_figure({"lora": lora, "flexlora": flex}, "tweets")
    axes = figure.axes[0]
    assert axes.get_xscale() == "log"
    lines = axes.get_lines()  # per method: its curve, then its ringed selection
    assert [line.get_label() for line in lines[::2]] == ["lora (4 trials)", "flexlora (2 trials)"]
    assert list(lines[0].get_xdata()) == [1e-3, 1e-2]
    assert list(lines[0].get_ydata()) == pytest.approx([60.0, 70.0])  # the best over dropout at each lr
    assert list(lines[1].get_xdata()) == [1e-2] and list(lines[1].get_ydata()) == pytest.approx([70.0])
    assert list(lines[2].get_ydata()) == pytest.approx([40.0, 80.0])


def test_a_method_that_did_not_search_the_parameter_is_named(tmp_path):
    other = _record([[[0.1], 0.5]], {DROPOUT: 0.1}, 0.5, {DROPOUT: "{0.0, 0.1}"})
    lora = _record([[[1e-3], 0.5]], {LR: 1e-3}, 0.5, {LR: "[0.001, 0.01] (log)"})
    with pytest.raises(ValueError, match=r"method other did not search .*lr \(it searched .*dropout\)"):
        sensitivity_figure({"lora": lora, "other": other}, "tweets")
    with pytest.raises(ValueError, match="no selected.json to draw"):
        sensitivity_figure({}, "tweets")


def test_write_reads_the_task_folder_and_writes_a_png(tmp_path):
    for method, score in (("lora", 0.6), ("flexlora", 0.7)):
        (tmp_path / "tweets" / method).mkdir(parents=True)
        (tmp_path / "tweets" / method / "selected.json").write_text(json.dumps(
            _record([[[1e-3], score - 0.1], [[1e-2], score]], {LR: 1e-2}, score, {LR: "[0.001, 0.01] (log)"})))
    assert list(read_selections(tmp_path / "tweets")) == ["flexlora", "lora"]
    path = write_sensitivity(tmp_path / "tweets", methods=["lora"])
    assert path == tmp_path / "tweets" / "sensitivity.png"
    assert path.read_bytes()[:4] == b"\x89PNG"
