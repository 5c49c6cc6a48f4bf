"""The step-time benchmark runs end to end in smoke mode and prints well-formed tables, one per registered study.

Timings are never asserted: only that every figure is there, finite and positive, and that the
compiled FlexLoRA graph survived the allocation events without recompiling.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
METHODS = ["full", "lora", "adalora", "flexlora"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict]:
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_time", "--smoke", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def table_rows(stdout: str, header_start: str) -> list[list[str]]:
    """The body rows of the markdown table whose header starts with ``header_start``."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    header = lines[start]
    assert set(lines[start + 1].replace("|", "")) == {"-"}, "second line must be the markdown separator"
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert len(cells) == header.count("|") - 1, line
        rows.append(cells)
    return rows


def test_step_table_is_well_formed(smoke_run: tuple[str, dict]) -> None:
    stdout, result = smoke_run
    rows = table_rows(stdout, "| model | method | step ms | ×LoRA |")
    models = result["settings"]["models"]
    assert len(rows) == len(models) * len(METHODS)
    assert [r[1] for r in rows] == METHODS * len(models)
    for row in rows:
        step_ms, x_lora, peak_mb, peak_x = (float(row[i]) for i in (2, 3, 5, 6))
        assert step_ms > 0 and x_lora > 0 and peak_mb > 0 and peak_x > 0
    assert all(float(r[3]) == 1.0 and float(r[6]) == 1.0 for r in rows if r[1] == "lora")
    assert all(r[4] != "–" for r in rows if r[1] in ("adalora", "flexlora")), "events must be timed"


def test_json_holds_every_figure(smoke_run: tuple[str, dict]) -> None:
    _, result = smoke_run
    steps = result["settings"]["steps"]
    for row in result["results"]:
        assert {"model", "method", "step_ms", "step_x_lora", "event_ms", "peak_bytes", "peak_x_lora"} <= set(row)
        assert math.isfinite(row["step_ms"]) and row["step_ms"] > 0
        assert len(row["step_samples_ms"]) == row["rounds"] >= steps
    for goal in result["goals"]:
        assert {"time_vs_lora", "time_vs_adalora", "memory_budget_bytes", "time_met", "memory_met"} <= set(goal)
    assert result["memory_measure"]
    assert result["settings"]["studies"] == ["step", "scaling", "compile", "methods"]  # every study that ships


def test_the_methods_study_runs_every_registered_method_against_lora(smoke_run: tuple[str, dict]) -> None:
    from flexlora_pl.methods import METHODS

    stdout, result = smoke_run
    ran = [row["method"] for row in result["methods"]]
    refused = [row["method"] for row in result["methods_refused"]]
    assert ran[0] == "lora" and sorted(ran + refused) == sorted(METHODS)  # each method measured or said refused
    for row in result["methods"]:
        assert row["step_x_lora"] > 0 and row["peak_x_lora"] > 0 and row["trainable_params"] > 0
    assert next(r for r in result["methods"] if r["method"] == "lora")["peak_x_lora"] == 1.0
    rows = table_rows(stdout.split("Every registered method against LoRA", 1)[1], "| model | method | trainable")
    assert [r[1] for r in rows] == ran


def test_goals_say_by_how_much(smoke_run: tuple[str, dict]) -> None:
    stdout, result = smoke_run
    goal_lines = [line for line in stdout.splitlines() if line.startswith("- ") and "FlexLoRA/LoRA" in line]
    assert len(goal_lines) == len(result["goals"])
    for line, goal in zip(goal_lines, result["goals"], strict=True):
        assert ("MISSED by" in line) == (not (goal["time_met"] and goal["below_adalora"] and goal["memory_met"]))


def test_scaling_table(smoke_run: tuple[str, dict]) -> None:
    stdout, result = smoke_run
    rows = table_rows(stdout, "| modules |")
    assert len(rows) == len(result["scaling"]) > 0
    modules = [int(r[0]) for r in rows]
    assert modules == sorted(modules)
    assert all(float(r[3]) > 0 and float(r[5]) > 0 for r in rows)


def test_compile_study_sees_no_recompilation(smoke_run: tuple[str, dict]) -> None:
    stdout, result = smoke_run
    rows = table_rows(stdout, "| model | method | backend |")
    assert [r[1] for r in rows] == ["lora", "flexlora"]
    assert all(row["new_graphs_after_warmup"] == 0 for row in result["compile"])
