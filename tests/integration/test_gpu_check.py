"""The prepared GPU check (``benchmarks/gpu_check.py``) in its CPU dry run: one table with rows for every section
and a JSON file with every figure; the 4-bit row says what this machine lacks, and the crashed-and-resumed fit ends
bitwise where the uninterrupted one does. Timings are never asserted, only that every figure is there."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ["step_memory", "host_syncs", "recompiles", "four_bit", "resume"]
METHODS = ["lora", "adalora", "flexlora"]
HEADER = "| check | model | method | result | detail |"
# the first words of each section's rows in the check column
CHECKS = {"step_memory": "step time, peak memory ×LoRA", "host_syncs": "host syncs per step",
          "recompiles": "graphs recompiled across events", "four_bit": "4-bit base step", "resume": "exact resume"}


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--dry-run", "--device", "cpu",
                           "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def table(stdout: str) -> list[list[str]]:
    """The body rows of the check's one markdown table."""
    lines = stdout.splitlines()
    assert lines.count(HEADER) == 1, "one table"
    start = lines.index(HEADER)
    assert set(lines[start + 1].replace("|", "")) == {"-"}, "second line must be the markdown separator"
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split(" | ")]
        assert len(cells) == 5, line
        rows.append(cells)
    return rows


def section_rows(stdout: str, section: str) -> list[list[str]]:
    return [row for row in table(stdout) if row[0].startswith(CHECKS[section])]


def test_every_section_is_in_the_table_and_the_json(dry_run: tuple[str, dict]) -> None:
    stdout, result = dry_run
    assert result["errors"] == {} and "FAILED" not in stdout
    assert list(result["sections"]) == SECTIONS and result["dry_run"] is True
    assert sorted(result["seconds"]) == sorted(["step_memory+host_syncs", "recompiles", "four_bit", "resume"])
    rows = table(stdout)
    assert all(any(row[0].startswith(CHECKS[s]) for s in SECTIONS) for row in rows), "a row of no section"
    counts = {s: len(section_rows(stdout, s)) for s in SECTIONS}
    assert counts == {"step_memory": 6, "host_syncs": 6, "recompiles": 1, "four_bit": 1, "resume": 1}


def test_step_time_and_memory_are_ratios_to_lora_on_both_models(dry_run: tuple[str, dict]) -> None:
    stdout, result = dry_run
    figures = result["sections"]["step_memory"]
    models = result["plan"]["models"]
    assert [(r["model"], r["method"]) for r in figures] == [(m, x) for m in models for x in METHODS]
    assert {r["precision"] for r in figures} == {"bf16"}
    for row in figures:
        assert math.isfinite(row["step_x_lora"]) and row["step_x_lora"] > 0 and row["peak_bytes"] > 0
        assert (row["step_x_lora"], row["peak_x_lora"]) == (1.0, 1.0) or row["method"] != "lora"
        assert (row["event_ms"] > 0) == (row["method"] != "lora")  # the rank methods' events are timed
        assert (row["goals"] is not None) == (row["method"] == "flexlora")
    rows = section_rows(stdout, "step_memory")
    assert [(r[1], r[2]) for r in rows] == [(r["model"], r["method"]) for r in figures]
    assert all(r[3] == "time 1.000× · peak 1.000×" for r in rows if r[2] == "lora")


def test_host_syncs_take_their_steps_and_say_cpu_cannot_count(dry_run: tuple[str, dict]) -> None:
    stdout, result = dry_run
    figures = result["sections"]["host_syncs"]
    assert [(r["model"], r["method"]) for r in figures] == [(m, x) for m in result["plan"]["models"] for x in METHODS]
    assert all(r["steps"] >= 1 and r["syncs_per_step"] is None for r in figures)
    assert all(row[3] == "n/a on CPU" for row in section_rows(stdout, "host_syncs"))


def test_no_graph_is_recompiled_across_events(dry_run: tuple[str, dict]) -> None:
    stdout, result = dry_run
    figures = result["sections"]["recompiles"]
    assert [r["method"] for r in figures] == ["lora", "flexlora"]
    assert all(r["new_graphs_after_warmup"] == 0 and r["events"] >= 2 for r in figures)
    [row] = section_rows(stdout, "recompiles")
    assert row[2:4] == ["flexlora", "0"]


def test_the_four_bit_row_says_what_this_machine_lacks(dry_run: tuple[str, dict]) -> None:
    stdout, result = dry_run
    four = result["sections"]["four_bit"]
    [row] = section_rows(stdout, "four_bit")
    assert four["ran"] is False and row[3] == "not run"  # a CPU dry run never has bitsandbytes' CUDA kernels
    assert "needs a CUDA GPU" in row[4]
    assert ("pip install bitsandbytes" in row[4]) == (importlib.util.find_spec("bitsandbytes") is None)
    assert len(four["missing"]) == 1 + (importlib.util.find_spec("bitsandbytes") is None)


def test_the_resumed_fit_is_bitwise_the_uninterrupted_one(dry_run: tuple[str, dict]) -> None:
    stdout, result = dry_run
    resume = result["sections"]["resume"]
    assert resume["equal"] is True and resume["differing"] == [] and resume["max_abs_diff"] == 0.0
    assert resume["tensors"] > 0 and resume["global_steps"] == [12, 12]
    assert resume["resumed_from"] == "on_exception.ckpt"  # the crash's checkpoint, mid-epoch
    assert resume["events_whole"] == resume["events_resumed"]
    assert max(resume["events_whole"]) > resume["crash_step"]  # an event after the resume, reproduced
    [row] = section_rows(stdout, "resume")
    assert row[3] == "bitwise equal"


def test_without_a_gpu_the_full_check_says_what_it_needs(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import gpu_check

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv, needed in (([], "add --dry-run"), (["--device", "cuda"], "no CUDA device is available")):
        with pytest.raises(SystemExit) as stop:
            gpu_check.parse_args(argv)
        assert stop.value.code == 2
        err = capsys.readouterr().err
        assert needed in err and "needs a CUDA GPU" in err
    assert gpu_check.parse_args(["--dry-run"]).device == "cpu"


def test_a_failing_section_is_a_failed_row_and_exit_status_1(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import gpu_check

    def broken(settings, plan):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(gpu_check, "four_bit_step", broken)
    assert gpu_check.main(["--dry-run", "--device", "cpu", "--sections", "four_bit"]) == 1
    rows = table(capsys.readouterr().out)
    assert rows == [["four_bit", "–", "–", "FAILED", "RuntimeError: no kernel for this"]]
