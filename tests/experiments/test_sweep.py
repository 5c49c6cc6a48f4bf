"""``flexlora-sweep`` end to end: a 2-task × 2-method × 2-seed grid of tiny runs through the real ``flexlora``
command (subprocesses), skipping finished runs, resuming an interrupted one, going on after a failed one, and
``--print``; plus the sweep file schema and every shipped sweep file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_sweep import run_tiny_sweep

from flexlora_pl.cli.sweep import main as sweep_main
from flexlora_pl.experiments.results import collect
from flexlora_pl.experiments.sweep_file import SweepError, load_sweep, parse_sweep
from flexlora_pl.experiments.sweep_runner import BROKEN, DONE, NEW, RESUME, TEST, plan_run

REPO = Path(__file__).resolve().parents[2]

@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory, tiny_glue_root):
    return run_tiny_sweep(tmp_path_factory, tiny_glue_root)


def _metrics(folder: Path) -> dict:
    return json.loads((folder / "metrics.json").read_text())


# ------------------------------------------------------------------------------ end to end
def test_a_sweep_runs_every_run_into_its_named_folder(tiny_sweep):
    code, out = tiny_sweep["first"]
    assert code == 0, out
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert len(lines) == 8
    assert lines[0].startswith("[1/8] a / flexlora / seed 0: fit … done in ")
    assert all(" done in " in line and "val/score" in line for line in lines)
    for task in ("a", "b"):
        for method in ("flexlora", "lora"):
            for seed in (0, 1):
                folder = tiny_sweep["runs"] / task / method / f"seed{seed}"
                record = _metrics(folder)
                assert record["run"]["seed"] == seed
                assert record["run"]["name"] == f"grid/{task}/{method}"
                assert record["run"]["method"] == method
                assert (folder / "checkpoints" / "last.ckpt").is_file()
    assert "8 ran, 0 skipped, 0 failed" in out


def test_a_second_sweep_skips_finished_runs(tiny_sweep):
    code, out = tiny_sweep["third"]
    assert code == 0, out
    assert "0 ran, 8 skipped, 0 failed" in out
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert len(lines) == 8 and all("finished, skipped" in line for line in lines)
    assert sorted(int(line[1:line.index("/")]) for line in lines) == list(range(1, 9))  # numbered across workers
    assert all(line.split("]")[0].endswith("/8") for line in lines)


def test_an_interrupted_run_resumes_and_a_failed_run_does_not_stop_the_sweep(tiny_sweep):
    code, out = tiny_sweep["second"]
    assert code == 1, out  # one run failed
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert len(lines) == 3
    assert lines[0].startswith("[1/3] broken / flexlora / seed 1: fit … FAILED (exit 1): see ")
    assert "fit (resume: fit interrupted; resumes from " in lines[1] and " done in " in lines[1]
    assert lines[2].startswith("[3/3] b / flexlora / seed 1: test … done in ") and "test/score" in lines[2]
    assert "FAILED broken / flexlora / seed 1" in out

    resumed = tiny_sweep["runs"] / "a" / "flexlora" / "seed1"
    record = _metrics(resumed)
    assert record["fit"]["status"] == "finished"
    assert record["fit"]["global_step"] == 12  # continued from step 6 to the end of epoch 2
    assert sorted(p.name for p in resumed.parent.iterdir()) == ["seed0", "seed1"]  # no new run folder
    log = (tiny_sweep["runs"] / "logs" / "a.flexlora.seed1.log").read_text()
    assert "--ckpt_path last" in log and "--version seed1" in log

    tested = _metrics(tiny_sweep["runs"] / "b" / "flexlora" / "seed1")
    assert tested["test"]["status"] == "finished" and "test/accuracy" in tested["test"]["metrics"]
    assert tested["test"]["ckpt_path"].endswith("last.ckpt")
    broken = (tiny_sweep["runs"] / "logs" / "broken.flexlora.seed1.log").read_text()
    assert "none.csv" in broken


def test_print_emits_one_command_line_per_run_with_work_left(tiny_sweep):
    code, out = tiny_sweep["print"]
    assert code == 0
    lines = out.strip().splitlines()
    # 4 new runs of the broken task, a's interrupted run resumes, b's 4 finished fits need their test stage
    assert len(lines) == 9
    broken = [line for line in lines if "--name grid/broken/" in line]
    assert len(broken) == 4 and all(" && flexlora test " not in line for line in broken)
    assert broken[0].startswith("flexlora fit --config ") and "--version seed0 --seed_everything 0" in broken[0]
    resume = [line for line in lines if "--name grid/a/flexlora" in line]
    assert resume == [line for line in lines if "--ckpt_path last" in line and line.startswith("flexlora fit")]
    assert len(resume) == 1 and "--version seed1" in resume[0]
    tests = [line for line in lines if "--name grid/b/" in line]
    assert len(tests) == 4 and all(line.startswith("flexlora test ") and "--ckpt_path last" in line for line in tests)


# ------------------------------------------------------------------------------ run states
def test_plan_reads_each_state_from_the_run_folder(tmp_path):
    sweep = parse_sweep({"name": "s", "save_dir": str(tmp_path), "seeds": [0], "tasks": {"t": {"configs": "x.yaml",
                         "test": "best"}}, "methods": {"m": []}})
    run = sweep.runs()[0]
    assert plan_run(run).state == NEW
    run.folder.mkdir(parents=True)
    assert plan_run(run).state == NEW  # an empty folder: a fresh run may use it
    (run.folder / "events.out").write_text("")
    plan = plan_run(run)
    assert plan.state == BROKEN and "remove the folder" in plan.detail
    (run.folder / "metrics.json").write_text(json.dumps({"fit": {"status": "finished"}}))
    assert plan_run(run).state == TEST and plan_run(run).stages() == [("test", "best")]
    (run.folder / "metrics.json").write_text(json.dumps({"fit": {"status": "finished"},
                                                         "test": {"status": "finished"}}))
    assert plan_run(run).state == DONE and plan_run(run).stages() == []
    assert RESUME == "resume"


def test_a_run_command_names_its_folder_and_puts_extra_flags_last():
    sweep = parse_sweep({"name": "s", "seeds": 2, "args": ["--trainer.max_epochs", 3], "configs": ["all.yaml"],
                         "tasks": {"t": ["t1.yaml", "t2.yaml"]}, "methods": {"m": "m.yaml"}})
    runs = sweep.runs()
    assert [r.seed for r in runs] == [0, 1]
    assert runs[1].folder == Path("runs/s/t/m/seed1")
    assert runs[1].command("fit", ["--trainer.max_epochs", "1"], "last") == [
        "fit", "--config", "t1.yaml", "--config", "t2.yaml", "--config", "m.yaml", "--config", "all.yaml",
        "--trainer.logger.init_args.save_dir", "runs", "--name", "s/t/m", "--version", "seed1",
        "--seed_everything", "1", "--ckpt_path", "last", "--trainer.max_epochs", "3", "--trainer.max_epochs", "1"]


# ------------------------------------------------------------------------------ sweep files
@pytest.mark.parametrize(("data", "message"), [
    ({"name": "x", "seeds": [0], "tasks": {"t": "a.yaml"}}, "the key 'methods' is required"),
    ({"name": "a/b", "seeds": [0], "tasks": {"t": "a.yaml"}, "methods": {"m": []}}, "no slashes"),
    ({"name": "x", "seeds": [0, 0], "tasks": {"t": "a.yaml"}, "methods": {"m": []}}, "lists a seed twice"),
    ({"name": "x", "seeds": [0], "tasks": {"t": "a.yaml"}, "methods": {"m": []}, "sedes": 1}, "unknown key"),
    ({"name": "x", "seeds": [0], "tasks": {"t": {"configs": "a.yaml", "test": True}}, "methods": {"m": []}},
     "not one of false, last, best"),
    ({"name": "x", "seeds": [0], "tasks": {"t": "a.yaml", "u": "b.yaml"}, "methods": {"m": {"t": "m.yaml"}}},
     "has no entry for task"),
])
def test_bad_sweep_files_are_refused_with_the_key_and_the_fix(data, message):
    with pytest.raises(SweepError, match=message):
        parse_sweep(data, source="bad.yaml")


def test_missing_config_files_and_unknown_filters_are_refused(tmp_path, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("name: s\nseeds: [0]\ntasks: {t: nowhere.yaml}\nmethods: {m: []}\n")
    with pytest.raises(SweepError, match="config files not found.*nowhere.yaml"):
        load_sweep(path)
    with pytest.raises(SystemExit) as exit_info:
        sweep_main([str(REPO / "configs" / "sweeps" / "table1_glue.yaml"), "--tasks", "glue_xyz"])
    assert exit_info.value.code == 2
    assert "glue_xyz not in" in capsys.readouterr().err


SHIPPED = {"table1_glue": 280, "table2_commonsense": 6, "table2_commonsense_published": 6, "table3_vtab": 285,
           "table4_importance": 160,
           "table5_direction": 120, "table6_init": 160, "table15_energy": 120, "table16_vtab_appendix_h": 171,
           "demo_comparison": 12, "offline_comparison": 24, "offline_ablations": 33,
           "offline_longer": 27, "offline_tuned": 21, "offline_tuned_pruned": 12}


def test_every_sweep_file_is_checked():
    assert {path.stem for path in (REPO / "configs" / "sweeps").glob("*.yaml")} == set(SHIPPED)


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_every_shipped_sweep_parses_and_expands_to_its_runs(name, monkeypatch):
    monkeypatch.chdir(REPO)  # shipped paths are relative to the repository root
    sweep = load_sweep(REPO / "configs" / "sweeps" / f"{name}.yaml")  # also checks every config file exists
    runs = sweep.runs()
    assert sweep.name == name and len(runs) == SHIPPED[name]
    assert len({r.folder for r in runs}) == len(runs)


def test_commonsense_method_overrides_depend_on_the_rank_budget(monkeypatch):
    monkeypatch.chdir(REPO)
    runs = load_sweep("configs/sweeps/table2_commonsense.yaml", check_files=False).runs(methods=["lora"])
    assert {r.task: r.configs[-1] for r in runs} == {
        "llama3_8b_r8": "configs/methods/lora.yaml", "llama3_8b_r32": "configs/commonsense/overrides/lora_r32.yaml"}
    assert all(r.test == "last" for r in runs)


# ------------------------------------------------------------------------------ its results
def test_results_of_the_real_tiny_sweep(tiny_sweep):
    sweep = tiny_sweep
    assert collect(sweep["runs"])[0].columns == ["a", "b"]  # the broken task left no folder
    tables = collect(sweep["runs"], sweep=load_sweep(sweep["grid2"]))  # its sweep file knows it
    table = tables[0]
    assert table.columns == ["a", "b", "broken"] and list(table.rows) == ["lora", "flexlora"]
    texts = {row: {column: cell.text(100.0, 1) for column, cell in columns.items()}
             for row, columns in table.rows.items()}
    for method in ("flexlora", "lora"):
        for task in ("a", "b"):
            assert texts[method][task].endswith(" (2)"), texts
    assert texts["flexlora"]["broken"] == "– (0/2, 2 missing)"  # the broken run left no folder: missing
    cost = next(t for t in tables if t.title.startswith("cost"))
    assert set(cost.derived_values) == {"grid flexlora", "grid lora"}
    assert int(cost.derived_values["grid lora"]["active"].replace(",", "")) > 0
