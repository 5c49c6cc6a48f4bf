"""Intervals and seed-paired differences (flexlora_pl/experiments/statistics.py) and what ``flexlora-results``
prints of them: the 95 % interval in every cell, per-seed averages, and the difference table of ``--reference``.

The expected numbers are worked out here by hand. The t quantiles are a table's (two-sided 95 %, i.e. the 0.975
quantile): t_{0.975,1} = 12.706205, t_{0.975,2} = 4.302653; t_{0.95,2} = 2.919986 (the 90 % interval). For two
degrees of freedom the t distribution has a closed form, P(T ≤ t) = 1/2 + t / (2 √(2 + t²)), so the paired
test's two-sided p value is 1 − t / √(2 + t²).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from flexlora_pl.cli.results import main as results_main
from flexlora_pl.data.commonsense import COMMONSENSE_SETS
from flexlora_pl.experiments.results import Cell, collect
from flexlora_pl.experiments.statistics import NO_MEASURABLE_DIFFERENCE, paired_difference, summarize

T_975_1, T_975_2, T_95_2 = 12.706205, 4.302653, 2.919986


def _p_two_dof(t: float) -> float:
    """The paired t-test's two-sided p value with two degrees of freedom (three seeds)."""
    return 1.0 - abs(t) / math.sqrt(2.0 + t * t)


def _write_scores(root: Path, task: str, method: str, scores: dict[int, float], sweep: str = "s",
                  test: dict[str, float] | None = None) -> None:
    """One run folder per seed, laid out as flexlora-sweep writes them, whose best validation score is the value
    (``test``: also a finished test stage with these metrics, the same for every seed)."""
    for seed, value in scores.items():
        folder = root / sweep / task / method / f"seed{seed}"
        folder.mkdir(parents=True)
        best = {"monitor": "val/score", "mode": "max", "value": value, "step": 10,
                "metrics": {"step": 10, "val/score": value}}
        record = {"run": {"seed": seed, "method": method}, "fit": {"status": "finished", "best": best}}
        if test is not None:
            record["test"] = {"status": "finished", "metrics": {k: v + value for k, v in test.items()}}
        (folder / "metrics.json").write_text(json.dumps(record))


def _row(printed: str, title: str, row: str) -> str:
    """The Markdown line of ``row`` in the table whose caption contains ``title``."""
    table = printed.split(title, 1)[1].split("\n\n**", 1)[0]
    return next(line for line in table.splitlines() if line.startswith(f"| {row} |"))


# --- summarize ---------------------------------------------------------------------------------------------------

def test_a_summary_is_the_mean_the_sample_std_and_the_t_interval_of_the_mean():
    values = [0.70, 0.72, 0.76]
    mean = (0.70 + 0.72 + 0.76) / 3                                                        # 0.726667
    std = math.sqrt(((0.70 - mean) ** 2 + (0.72 - mean) ** 2 + (0.76 - mean) ** 2) / 2)    # 0.030551, ddof 1
    summary = summarize(values)
    assert summary.n == 3 and summary.confidence == 0.95
    assert summary.mean == pytest.approx(mean) and summary.std == pytest.approx(std)
    half = T_975_2 * std / math.sqrt(3)                                                   # 0.075894
    assert summary.interval == pytest.approx((mean - half, mean + half), rel=1e-6)
    narrower = summarize(values, confidence=0.90)
    assert narrower.interval == pytest.approx((mean - T_95_2 * std / math.sqrt(3), mean + T_95_2 * std / math.sqrt(3)),
                                              rel=1e-6)


def test_one_value_has_no_std_and_no_interval_shown_as_dashes_never_as_zero():
    one = summarize([0.7])
    assert (one.n, one.mean, one.std, one.low, one.high, one.interval) == (1, 0.7, None, None, None, None)
    assert summarize([]).mean is None
    assert Cell([0.7], 1, seeds=[0]).text(100.0, 1) == "70.0 ± – [–, –] (1)"
    with pytest.raises(ValueError, match="confidence=1.5"):
        summarize([0.7, 0.8], confidence=1.5)


def test_two_values_have_the_interval_of_one_degree_of_freedom():
    two = summarize([0.5, 0.6])
    std = math.sqrt(((0.5 - 0.55) ** 2 + (0.6 - 0.55) ** 2) / 1)                          # 0.070711
    half = T_975_1 * std / math.sqrt(2)                                                   # 0.635310
    assert two.std == pytest.approx(std)
    assert two.interval == pytest.approx((0.55 - half, 0.55 + half), rel=1e-6)
    assert Cell([0.5, 0.6], 2, seeds=[0, 1]).text(100.0, 1) == "55.0 ± 7.1 [-8.5, 118.5] (2)"


# --- paired_difference -------------------------------------------------------------------------------------------

def test_the_paired_difference_pairs_by_seed_and_reports_the_unpaired_seeds():
    method = {0: 0.80, 1: 0.78, 2: 0.83, 3: 0.90}      # seed 3: the reference has none
    reference = {0: 0.75, 1: 0.76, 2: 0.78, 7: 0.60}   # seed 7: the method has none
    d = paired_difference(method, reference)
    # d = 0.05, 0.02, 0.05: mean 0.04, std √((0.01² + 0.02² + 0.01²) / 2) = 0.017321, standard error 0.01, t = 4
    assert (d.n, d.method_only, d.reference_only, d.unpaired) == (3, (3,), (7,), 2)
    assert d.mean == pytest.approx(0.04) and d.std == pytest.approx(math.sqrt(3e-4))
    assert d.t == pytest.approx(4.0)
    assert d.p == pytest.approx(_p_two_dof(4.0), rel=1e-6)                                # 0.057191
    assert (d.low, d.high) == pytest.approx((0.04 - T_975_2 * 0.01, 0.04 + T_975_2 * 0.01), rel=1e-6)
    assert d.low < 0 < d.high and d.measurable is False and d.verdict == NO_MEASURABLE_DIFFERENCE


def test_a_difference_whose_interval_excludes_zero_is_measurable():
    d = paired_difference({0: 0.75, 1: 0.76, 2: 0.80}, {0: 0.70, 1: 0.72, 2: 0.74})
    # d = 0.05, 0.04, 0.06: mean 0.05, std 0.01, standard error 0.01 / √3, t = 5 √3 = 8.660254
    t = 0.05 / (0.01 / math.sqrt(3))
    assert d.t == pytest.approx(t) and d.p == pytest.approx(_p_two_dof(t), rel=1e-6)      # 0.013072
    half = T_975_2 * 0.01 / math.sqrt(3)
    assert (d.low, d.high) == pytest.approx((0.05 - half, 0.05 + half), rel=1e-6)
    assert d.measurable is True and d.verdict == "measurable difference" and d.unpaired == 0
    assert paired_difference({0: 0.70, 1: 0.72, 2: 0.74}, {0: 0.75, 1: 0.76, 2: 0.80}).t == pytest.approx(-t)


def test_fewer_than_two_common_seeds_leave_the_difference_undefined_in_words():
    one = paired_difference({0: 0.8, 1: 0.7}, {0: 0.7, 2: 0.6})
    assert (one.n, one.mean, one.std, one.t, one.p, one.measurable) == (1, pytest.approx(0.1), None, None, None, None)
    assert one.verdict == "undefined: 1 common seed, a paired interval needs 2" and one.unpaired == 2
    none = paired_difference({1: 0.8}, {2: 0.7})
    assert (none.n, none.mean, none.measurable) == (0, None, None) and "0 common seeds" in none.verdict


def test_equal_scores_on_every_seed_are_no_measurable_difference_and_a_constant_gap_is_one():
    same = paired_difference({0: 0.7, 1: 0.8}, {0: 0.7, 1: 0.8})
    assert (same.mean, same.std, same.low, same.high, same.t, same.p) == (0.0, 0.0, 0.0, 0.0, None, None)
    assert same.verdict == NO_MEASURABLE_DIFFERENCE
    gap = paired_difference({0: 0.75, 1: 0.85}, {0: 0.25, 1: 0.35})  # 0.5 on both seeds, exactly
    assert (gap.std, gap.t, gap.p, gap.measurable) == (0.0, math.inf, 0.0, True)


# --- flexlora-results --------------------------------------------------------------------------------------------

LORA = {0: 0.70, 1: 0.72, 2: 0.74}


def _comparison(root: Path) -> None:
    """Task a: FlexLoRA 5 points above LoRA (measurable), static 4 (not); task b: both equal to LoRA."""
    _write_scores(root, "a", "lora", LORA)
    _write_scores(root, "a", "flexlora", {0: 0.75, 1: 0.76, 2: 0.80})  # d = 0.05, 0.04, 0.06
    _write_scores(root, "a", "static", {0: 0.75, 1: 0.74, 2: 0.79})    # d = 0.05, 0.02, 0.05
    for method in ("lora", "flexlora", "static"):
        _write_scores(root, "b", method, {0: 0.60, 1: 0.60, 2: 0.66})


def test_the_reference_flag_prints_the_differences_and_says_where_there_is_none_measurable(tmp_path, capsys):
    _comparison(tmp_path)
    assert results_main([str(tmp_path), "--reference", "lora"]) == 0
    printed = capsys.readouterr().out
    title = "s: differences against lora"
    flex = _row(printed, title, "flexlora")
    # a: +5.0 ∓ 4.302653 · 1.0 / √3 = [+2.5, +7.5], p = 0.0131; b: 0 on every seed; Avg. per seed: d = 2.5, 2.0,
    # 3.0 points, mean 2.5, std 0.5, [2.5 ∓ 4.302653 · 0.5 / √3] = [+1.3, +3.7], t = 8.660254 again
    assert flex == ("| flexlora | +5.0 [+2.5, +7.5], p = 0.0131 (3) | +0.0 [+0.0, +0.0], p = – (3), "
                    f"{NO_MEASURABLE_DIFFERENCE} | +2.5 [+1.3, +3.7], p = 0.0131 (3) |"), printed
    static = _row(printed, title, "static")
    # a: +4.0 ∓ 4.302653 · 1.0 = [-0.3, +8.3], p = 1 − 4 / √18 = 0.0572
    assert static.startswith(f"| static | +4.0 [-0.3, +8.3], p = 0.0572 (3), {NO_MEASURABLE_DIFFERENCE} |"), printed
    assert "| lora |" not in printed.split(title, 1)[1].split("\n\n**", 1)[0]  # the reference has no row
    # the results table's cells carry their interval: 72.0 ∓ 4.302653 · 2.0 / √3
    assert _row(printed, "s: mean ± std [95 % interval]", "lora").startswith("| lora | 72.0 ± 2.0 [67.0, 77.0] (3) |")
    assert results_main([str(tmp_path)]) == 0
    assert "differences against" not in capsys.readouterr().out  # no flag, no difference table


def test_contrasts_print_each_chosen_pair_as_a_row_of_one_table(tmp_path, capsys):
    _comparison(tmp_path)
    assert results_main([str(tmp_path), "--contrast", "flexlora:lora", "--contrast", "flexlora:static"]) == 0
    printed = capsys.readouterr().out
    title = "s: contrasts: mean of the seed-paired differences (method − base)"
    assert _row(printed, title, "flexlora − lora").startswith("| flexlora − lora | +5.0 [+2.5, +7.5], p = 0.0131 (3) |")
    # flexlora − static on a: 0.0, +2.0, +1.0 points: mean 1.0, std 1.0, [1.0 ∓ 4.302653 / √3] = [-1.5, +3.5]
    assert _row(printed, title, "flexlora − static").startswith(
        f"| flexlora − static | +1.0 [-1.5, +3.5], p = 0.225 (3), {NO_MEASURABLE_DIFFERENCE} |"), printed
    assert "minus the base score of the same seed" in printed
    with pytest.raises(SystemExit) as exit_info:
        results_main([str(tmp_path), "--contrast", "dora:lora"])
    assert exit_info.value.code == 2 and "--contrast: no run of dora here" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        results_main([str(tmp_path), "--contrast", "flexlora"])
    assert "write METHOD:BASE" in capsys.readouterr().err


def test_an_unknown_reference_is_refused_naming_the_methods(tmp_path, capsys):
    _comparison(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        results_main([str(tmp_path), "--reference", "lorra"])
    assert exit_info.value.code == 2
    assert "--reference 'lorra': no run of that method here; the methods are lora, static, flexlora" in (
        capsys.readouterr().err)


def test_unpaired_seeds_are_counted_in_the_difference_cell_and_the_average_is_over_complete_seeds(tmp_path):
    _write_scores(tmp_path, "a", "lora", LORA)
    _write_scores(tmp_path, "a", "flexlora", {0: 0.75, 1: 0.76, 2: 0.80, 3: 0.99})  # seed 3: LoRA has none
    _write_scores(tmp_path, "b", "lora", {0: 0.60, 1: 0.60, 2: 0.66})
    _write_scores(tmp_path, "b", "flexlora", {0: 0.63, 1: 0.60})                     # seeds 2, 3: not run
    _write_scores(tmp_path, "a", "adalora", {0: 0.70})                                 # no seed has task b
    results, differences = collect(tmp_path, reference="lora")[:2]
    # without a seed that has every task, the average is the mean of the task means there are, marked partial
    assert results.derived_values["adalora"]["Avg."] == "(70.0 over 1/2)"
    assert differences.derived_values["adalora"]["Avg."] == "– (no common seed; 3 unpaired dropped)"
    flex = differences.rows["flexlora"]["a"]
    assert flex.dropped == 1 and flex.text(100.0, 1) == "+5.0 [+2.5, +7.5], p = 0.0131 (3; 1 unpaired dropped)"
    # FlexLoRA's Avg.: only seeds 0 and 1 have both tasks, (75 + 63) / 2 = 69.0 and (76 + 60) / 2 = 68.0;
    # std √(2 · 0.5² / 1) = 0.707, interval 68.5 ∓ 12.706205 · 0.707 / √2 = [62.1, 74.9]
    assert results.derived_values["flexlora"]["Avg."] == "68.5 ± 0.7 [62.1, 74.9] (2/4, 2 incomplete)"
    assert any(note.startswith("incomplete: seeds without a score in every task") for note in results.notes)
    # paired with LoRA's seeds 0, 1 (65.0, 66.0): d = 4.0, 2.0; LoRA's complete seed 2 is dropped
    average = differences.derived_cells["flexlora"]["Avg."]
    assert (average.difference.n, average.difference.reference_only) == (2, (2,))
    assert average.difference.mean == pytest.approx(0.03)
    only_one = {0: 0.7}
    _write_scores(tmp_path / "one", "a", "lora", only_one)
    _write_scores(tmp_path / "one", "a", "flexlora", only_one)
    lone = collect(tmp_path / "one", reference="lora")[1].rows["flexlora"]["a"]
    assert lone.text(100.0, 1) == "+0.0 (1 common seed: no interval, no test)"


def test_a_sweep_without_the_reference_gets_a_note_not_a_silent_gap(tmp_path):
    _comparison(tmp_path)
    _write_scores(tmp_path, "a", "flexlora", LORA, sweep="other")
    tables = collect(tmp_path, reference="lora")
    assert [t.title.split(":")[0] for t in tables if t.reference == "lora"] == ["s"]
    other = next(t for t in tables if t.title.startswith("other:"))
    assert "no differences against lora: the sweep other has no lora runs (its methods: flexlora)" in other.notes


def test_commonsense_rows_are_compared_with_the_reference_of_the_same_budget(tmp_path):
    sets = {f"test/{name}/accuracy": 0.0 for name in COMMONSENSE_SETS} | {"test/accuracy": 0.0}
    _write_scores(tmp_path, "r8", "lora", LORA, test=sets)
    _write_scores(tmp_path, "r8", "flexlora", {0: 0.75, 1: 0.76, 2: 0.80}, test=sets)
    differences = collect(tmp_path, reference="lora")[1]
    assert list(differences.rows) == ["r8 flexlora"] and differences.columns == [*COMMONSENSE_SETS, "mean"]
    assert differences.rows["r8 flexlora"]["mean"].text(100.0, 1) == "+5.0 [+2.5, +7.5], p = 0.0131 (3)"


def test_the_csv_carries_the_intervals_and_the_differences_and_the_paper_rows_only_the_scores(tmp_path, capsys):
    runs = tmp_path / "runs"
    _write_scores(runs, "glue_rte", "lora", LORA)
    _write_scores(runs, "glue_rte", "flexlora", {0: 0.75, 1: 0.76, 2: 0.80})
    out_csv = tmp_path / "t.csv"
    assert results_main([str(runs), "--reference", "lora", "--paper", "table1", "--csv", str(out_csv)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("| flexlora (paper: ") == 1, printed  # under the scores, not under the differences
    rows = {(row["table"].split(":")[1].strip(), row["row"]): row for row in csv.DictReader(out_csv.open())}
    lora = rows[("mean ± std [95 % interval] over seeds (n); rule", "lora")]
    half = T_975_2 * 2.0 / math.sqrt(3)
    assert float(lora["glue_rte low"]) == pytest.approx(72.0 - half, rel=1e-6)
    assert float(lora["glue_rte high"]) == pytest.approx(72.0 + half, rel=1e-6) and lora["glue_rte n"] == "3/3"
    assert float(lora["Avg. low"]) == pytest.approx(72.0 - half, rel=1e-6)
    flex = rows[("differences against lora", "flexlora")]
    t = 5.0 / (1.0 / math.sqrt(3))
    assert float(flex["glue_rte mean"]) == pytest.approx(5.0) and float(flex["glue_rte t"]) == pytest.approx(t)
    assert float(flex["glue_rte p"]) == pytest.approx(_p_two_dof(t), rel=1e-6)
    assert (flex["glue_rte n"], flex["glue_rte unpaired"], flex["glue_rte measurable"]) == ("3", "0", "True")
