"""``flexlora-results``: selection rules, cells with failed / missing runs, mixed metrics, VTAB group means,
commonsense per-set tables, the paper's cells, CSV, and the tables of the real tiny sweep (test_sweep.py)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from flexlora_pl.cli.results import main as results_main
from flexlora_pl.data.commonsense import COMMONSENSE_SETS
from flexlora_pl.experiments.paper import PAPER_TABLES, check_table
from flexlora_pl.experiments.results import MixedMetricsError, collect, load_runs, results_tables


def write_run(root: Path, task: str, method: str, seed: int, *, status: str = "finished", best: float | None = None,
              best_metrics: tuple[str, ...] = ("val/accuracy", "val/score"), test: dict | None = None,
              sweep: str = "s", monitor: str = "val/score", mode: str = "max", test_status: str = "finished",
              data_class: str | None = None, module: str | None = None) -> Path:
    """A run folder with a fabricated metrics.json, laid out as flexlora-sweep writes it.

    ``data_class`` also writes the ``config.yaml`` the ``flexlora`` command saves, with that data class path;
    ``module`` is the task class ``RunRecord`` notes in ``run.module``.
    """
    folder = root / sweep / task / method / f"seed{seed}"
    folder.mkdir(parents=True)
    fit = {"status": status, "global_step": 10, "wall_time_s": 2.0 + seed, "peak_memory_mb": 100.0,
           "peak_memory_kind": "process_peak_rss"}
    if best is not None:
        fit["best"] = {"monitor": monitor, "mode": mode, "value": best, "step": 10,
                       "metrics": {"step": 10, **dict.fromkeys(best_metrics, best)}}
    record = {"run": {"seed": seed, "method": method, **({"module": module} if module else {})}, "fit": fit,
              "parameters": {"trainable": 1000, "active": 500, "allocated": 800}}
    if test is not None:
        record["test"] = {"status": test_status, "metrics": test}
    (folder / "metrics.json").write_text(json.dumps(record))
    if data_class is not None:
        (folder / "config.yaml").write_text(f"data:\n  class_path: {data_class}\n  init_args: {{}}\n")
    return folder


def cells(table) -> dict[str, dict[str, str]]:
    return {row: {column: cell.text(100.0, 1) for column, cell in columns.items()}
            for row, columns in table.rows.items()}


def test_cells_are_mean_and_sample_std_over_seeds(tmp_path):
    for seed, value in enumerate((0.70, 0.72, 0.74)):
        write_run(tmp_path, "glue_rte", "lora", seed, best=value)
    write_run(tmp_path, "glue_cola", "lora", 0, best=0.5)
    write_run(tmp_path, "glue_cola", "lora", 1, best=0.6)
    write_run(tmp_path, "glue_cola", "lora", 2, best=0.7)
    table = results_tables(load_runs(tmp_path))[0]
    # [mean ∓ t_{0.975,2} · std / √3], t_{0.975,2} = 4.302653; Avg. per seed: 60, 66, 72
    assert cells(table)["lora"] == {"glue_rte": "72.0 ± 2.0 [67.0, 77.0] (3)",
                                    "glue_cola": "60.0 ± 10.0 [35.2, 84.8] (3)"}
    assert table.derived_values["lora"]["Avg."] == "66.0 ± 6.0 [51.1, 80.9] (3)"


def test_failed_unfinished_missing_and_metric_less_runs_are_shown_not_dropped(tmp_path):
    write_run(tmp_path, "glue_rte", "lora", 0, best=0.70)
    write_run(tmp_path, "glue_rte", "lora", 1, best=0.60, status="failed")     # crashed
    write_run(tmp_path, "glue_rte", "flexlora", 0, best=0.80)
    write_run(tmp_path, "glue_rte", "flexlora", 1, status="interrupted")      # stopped, never resumed
    write_run(tmp_path, "glue_rte", "flexlora", 2)                            # finished without a validation score
    (tmp_path / "s" / "glue_rte" / "adalora" / "seed0").mkdir(parents=True)   # killed before metrics.json
    write_run(tmp_path, "glue_rte", "lora", 2, best=0.90, sweep="other")     # another sweep: its own table
    tables = results_tables(load_runs(tmp_path))
    table = next(t for t in tables if t.title.startswith("s:"))
    assert cells(table) == {"lora": {"glue_rte": "70.0 ± – [–, –] (1/3, 1 failed, 1 missing)"},
                            "flexlora": {"glue_rte": "80.0 ± – [–, –] (1/3, 1 unfinished, 1 no metric)"},
                            "adalora": {"glue_rte": "– (0/3, 1 unfinished, 2 missing)"}}
    assert table.derived_values["adalora"]["Avg."] == "–"
    other = next(t for t in tables if t.title.startswith("other:"))
    assert cells(other) == {"lora": {"glue_rte": "90.0 ± – [–, –] (1)"}}


def test_runs_of_one_task_with_different_metrics_are_an_error_naming_them(tmp_path):
    write_run(tmp_path, "glue_cola", "lora", 0, best=0.5, best_metrics=("val/mcc", "val/score"))
    odd = write_run(tmp_path, "glue_cola", "flexlora", 0, best=0.9, best_metrics=("val/accuracy", "val/score"))
    with pytest.raises(MixedMetricsError, match=r"task 'glue_cola'.*val/accuracy.*" + str(odd)):
        results_tables(load_runs(tmp_path))
    with pytest.raises(SystemExit) as exit_info:
        results_main([str(tmp_path)])
    assert exit_info.value.code == 2


def test_vtab_takes_the_test_accuracy_and_adds_group_means(tmp_path):
    scores = {"cifar": 0.5, "dtd": 0.7, "eurosat": 0.9, "kitti": 0.3}  # natural ×2, specialized, structured
    for task, value in scores.items():
        for seed in (0, 1):
            write_run(tmp_path, task, "flexlora", seed, best=0.99, test={"test/accuracy": value + 0.01 * seed,
                                                                          "test/loss": 1.0, "test/score": value})
    write_run(tmp_path, "dtd", "lora", 0, best=0.99)  # fit finished, never tested: counted, not dropped
    table = results_tables(load_runs(tmp_path))[0]
    assert "vtab" in table.title
    assert cells(table)["flexlora"]["cifar"] == "50.5 ± 0.7 [44.1, 56.9] (2)"  # t_{0.975,1} = 12.706205
    assert cells(table)["lora"]["dtd"] == "– (0/2, 1 no test yet, 1 missing)"
    derived = table.derived_values["flexlora"]
    assert table.derived == ["Natural", "Specialized", "Structured", "Mean of groups", "Avg."]
    assert (derived["Natural"], derived["Specialized"], derived["Structured"]) == (
        "60.5 ± 0.7 [54.1, 66.9] (2)", "90.5 ± 0.7 [84.1, 96.9] (2)", "30.5 ± 0.7 [24.1, 36.9] (2)")
    assert derived["Mean of groups"] == derived["Avg."] == "60.5 ± 0.7 [54.1, 66.9] (2)"  # seeds: 60.0, 61.0
    assert table.derived_values["lora"]["Natural"] == "–"


def test_commonsense_gets_one_column_per_set_and_rows_per_budget_and_method(tmp_path):
    metrics = {f"test/{name}/accuracy": 0.5 + i / 100 for i, name in enumerate(COMMONSENSE_SETS)}
    metrics["test/accuracy"] = 0.535
    for task in ("llama3_8b_r8", "llama3_8b_r32"):
        write_run(tmp_path, task, "flexlora", 0, best=0.9, test=metrics)
    table = results_tables(load_runs(tmp_path))[0]
    assert table.columns == [*COMMONSENSE_SETS, "mean"]
    assert list(table.rows) == ["llama3_8b_r8 flexlora", "llama3_8b_r32 flexlora"]
    assert cells(table)["llama3_8b_r8 flexlora"]["ARC-Challenge"] == "56.0 ± – [–, –] (1)"
    assert cells(table)["llama3_8b_r8 flexlora"]["mean"] == "53.5 ± – [–, –] (1)"


COMMONSENSE_FIT = {"best_metrics": ("val/loss",), "monitor": "val/loss", "mode": "min"}
"""What the commonsense configs' RunRecord writes: the best checkpoint is the lowest validation loss."""


@pytest.mark.parametrize("known_by", ["config.yaml", "run.module", "a tested sibling"])
def test_commonsense_runs_without_a_finished_test_show_no_test_yet_not_their_validation_loss(tmp_path, capsys,
                                                                                            known_by):
    # the review's case: fits finished (fit.best = the lowest val/loss), the test stage still running or failed;
    # the task is known from its config, from the task class in metrics.json, or from another run's test
    known = {"config.yaml": {"data_class": "flexlora_pl.data.CommonsenseDataModule"},
             "run.module": {"module": "flexlora_pl.tasks.causal_lm.FlexLoRACausalLM"},
             "a tested sibling": {}}[known_by]
    write_run(tmp_path, "llama3_8b_r8", "lora", 0, best=0.412, **COMMONSENSE_FIT, **known)  # test running
    write_run(tmp_path, "llama3_8b_r8", "flexlora", 0, best=0.398, test={"test/boolq/accuracy": 0.7},
              test_status="failed", **COMMONSENSE_FIT, **known)
    if known_by == "a tested sibling":
        tested = {f"test/{name}/accuracy": 0.6 for name in COMMONSENSE_SETS} | {"test/accuracy": 0.6}
        write_run(tmp_path, "llama3_8b_r8", "adalora", 0, best=0.405, test=tested, **COMMONSENSE_FIT)
    assert results_main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "41.2" not in printed and "39.8" not in printed and "70.0" not in printed, printed
    assert "rule: commonsense" in printed and "rule: best validation" not in printed, printed
    waiting = " | ".join(["– (0/1, 1 no test yet)"] * (len(COMMONSENSE_SETS) + 1))
    assert f"| llama3_8b_r8 lora | {waiting} |" in printed, printed
    assert f"| llama3_8b_r8 flexlora | {waiting} |" in printed, printed
    assert "- no test yet: 2 run(s)" in printed, printed
    if known_by == "a tested sibling":
        assert "| llama3_8b_r8 adalora | 60.0 ± – [–, –] (1) |" in printed, printed


def test_the_best_validation_rule_refuses_a_best_checkpoint_not_ranked_by_val_score(tmp_path, capsys):
    for seed in (0, 1):
        write_run(tmp_path, "tweets", "lora", seed, best=0.41 + seed / 100, **COMMONSENSE_FIT)  # lowest val/loss
        write_run(tmp_path, "tweets", "flexlora", seed, best=0.8, mode="min")  # val/score, but its minimum
        write_run(tmp_path, "tweets", "static", seed, best=0.7 + seed / 100)
    assert results_main([str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| lora | – (0/2, 2 other monitor) | – |" in printed, printed
    assert "| flexlora | – (0/2, 2 other monitor) | – |" in printed, printed
    assert "| static | 70.5 ± 0.7 [64.1, 76.9] (2) | 70.5 ± 0.7 [64.1, 76.9] (2) |" in printed, printed
    assert "- other monitor: 4 run(s)" in printed and "val/loss (min): s/tweets/lora/seed0" in printed, printed
    assert "val/score (min): s/tweets/flexlora/seed0" in printed, printed


def test_the_paper_tables_recompute_their_averages_and_flag_what_does_not_add_up():
    table1 = check_table(PAPER_TABLES["table1"])
    average, notes = table1["lora"]
    assert round(average, 1) == 87.6 and "81.7" in notes[0]
    assert table1["flexlora"][1] == [] and round(table1["flexlora"][0], 1) == 89.1
    table2 = check_table(PAPER_TABLES["table2"])
    assert any("swapped" in note for note in table2["llama3_8b_r8 lora"][1])
    assert table2["chatgpt"][1] == []
    assert len(PAPER_TABLES["table3"].columns) == 19


def test_paper_cells_are_printed_under_the_measured_rows_and_the_csv_is_written(tmp_path, capsys):
    runs = tmp_path / "runs"
    for seed in (0, 1):
        write_run(runs, "glue_rte", "lora", seed, best=0.8 + 0.02 * seed)
    out_csv = tmp_path / "t.csv"
    assert results_main([str(runs), "--paper", "table1", "--csv", str(out_csv)]) == 0
    printed = capsys.readouterr().out
    assert "| lora | 81.0 ± 1.4 [68.3, 93.7] (2) | 81.0 ± 1.4 [68.3, 93.7] (2) |" in printed
    assert "| lora (paper: LoRA r=8) | 84.8 | 81.7 (cells: 87.6) |" in printed
    assert "printed Avg. 81.7 ≠ mean of its cells 87.6" in printed
    assert "| fit wall time (s) |" in printed.replace("| runs | fit", "| fit")
    rows = list(csv.DictReader(out_csv.open()))
    assert rows[0]["row"] == "lora" and float(rows[0]["glue_rte mean"]) == pytest.approx(81.0)
    assert rows[0]["glue_rte n"] == "2/2"


def _allocation(folder: Path, **summary) -> None:
    record = json.loads((folder / "metrics.json").read_text())
    record["fit"]["allocation"] = summary
    (folder / "metrics.json").write_text(json.dumps(record))


def test_the_allocation_table_averages_what_the_events_did(tmp_path):
    for seed, (flips, dead, ratio) in enumerate(((2, 1, 3.0), (4, 2, 2.0))):
        folder = write_run(tmp_path, "tweets", "flexlora", seed, best=0.7)
        _allocation(folder, events=7, moved=20, flip_flops=flips, flip_flop_window=1, dead_ends=dead,
                    dead_end_modules=[f"layer.{i}" for i in range(dead)], new_direction_update_ratio=ratio,
                    final_total_rank=288)
    write_run(tmp_path, "tweets", "lora", 0, best=0.6)  # no events: no row
    tables = collect(tmp_path)
    allocation = next(t for t in tables if t.title.startswith("allocation"))
    assert allocation.derived_values == {"s flexlora": {
        "runs": "2", "events": "7.0", "directions moved": "20.0", "flip-flops": "3.0", "dead ends": "1.5",
        "first-update ratio": "2.50", "final total rank": "288.0"}}
    text = allocation.markdown()
    assert "| runs | events | directions moved | flip-flops | dead ends | first-update ratio |" in text, text
    assert "| s flexlora | 2 | 7.0 | 20.0 | 3.0 | 1.5 | 2.50 | 288.0 |" in text, text
    assert "- dead ends: modules an event pruned to rank 1" in text and "dead_end_modules" in text, text
    only_lora = tmp_path / "only_lora"
    write_run(only_lora, "tweets", "lora", 0, best=0.6)
    assert not any(t.title.startswith("allocation") for t in collect(only_lora))


def test_a_run_recorded_before_dead_ends_were_counted_shows_a_dash_not_zero(tmp_path):
    _allocation(write_run(tmp_path, "tweets", "flexlora", 0, best=0.7), events=3, moved=6, flip_flops=1,
                new_direction_update_ratio=3.0, final_total_rank=24)
    allocation = next(t for t in collect(tmp_path) if t.title.startswith("allocation"))
    assert allocation.derived_values["s flexlora"]["dead ends"] == "–"
    assert allocation.derived_values["s flexlora"]["flip-flops"] == "1.0"


def test_the_former_module_names_still_import_the_same_objects():
    from flexlora_pl.experiments import collection, costs, grid, results, selection, sweep, sweep_file, sweep_runner
    from flexlora_pl.experiments import tables as tables_module

    assert grid.load_sweep is sweep_file.load_sweep and grid.Sweep is sweep_file.Sweep
    assert sweep.plan_run is sweep_runner.plan_run and sweep.BROKEN == sweep_runner.BROKEN
    homes = {"RunResult": collection, "load_runs": collection, "add_expected": collection, "STATUSES": collection,
             "SELECTION_RULES": selection, "MixedMetricsError": selection, "score_runs": selection,
             "vtab_name": selection, "Cell": tables_module, "Table": tables_module, "results_tables": tables_module,
             "add_paper": tables_module, "paper_markdown": tables_module, "write_csv": tables_module,
             "cost_table": costs, "allocation_table": costs}
    for name, home in homes.items():
        assert getattr(results, name) is getattr(home, name), name
    assert set(homes) <= set(results.__all__)
    for module in (grid, sweep, results):
        assert all(hasattr(module, name) for name in module.__all__), module.__name__
