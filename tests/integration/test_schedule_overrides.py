"""The schedule overrides of question (c) in docs/results.md (configs/schedules/): each composes over the demo,
changes only what it says, and moves the number of directions its sweep file and docs state."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from flexlora_pl.cli import build_cli
from flexlora_pl.core.schedule import budget_at, event_steps

CONFIGS = Path(__file__).parents[2] / "configs"
DEMO = CONFIGS / "demo.yaml"
# directions pruned (= added) over the demo's 282 steps, as configs/sweeps/offline_longer.yaml and
# docs/results.md state them; the demo itself moves 14
MOVES = {"demo": 14, "b0_12": 42, "delta_t_5": 46, "late_window": 48}


def _reallocation(capsys, *overrides: Path) -> dict:
    args = ["fit", "--config", str(DEMO)]
    for path in overrides:
        args += ["--config", str(path)]
    with pytest.raises(SystemExit) as exit_info:
        build_cli([*args, "--print_config"])
    assert exit_info.value.code == 0
    return yaml.safe_load(capsys.readouterr().out)["reallocation"]


def _demo_steps() -> int:
    demo = yaml.safe_load(DEMO.read_text())
    data = demo["data"]["init_args"]
    return math.ceil(data["train_size"] / data["batch_size"]) * demo["trainer"]["max_epochs"]


def _moves(realloc: dict, total_steps: int) -> int:
    steps = event_steps(realloc["t_warmup"], realloc["t_final"], realloc["delta_t"], total_steps)
    return sum(budget_at(t, realloc["b0"], realloc["t_warmup"], realloc["t_final"], total_steps,
                         realloc["b_schedule"]) for t in steps)


def test_the_shipped_schedule_overrides_are_the_ones_documented():
    assert {path.stem for path in (CONFIGS / "schedules").glob("*.yaml")} == set(MOVES) - {"demo"}


@pytest.mark.parametrize("name", sorted(MOVES))
def test_each_schedule_override_changes_only_its_keys_and_moves_what_the_docs_say(name, capsys):
    base = _reallocation(capsys)
    if name == "demo":
        realloc, wanted = base, {}
    else:
        path = CONFIGS / "schedules" / f"{name}.yaml"
        wanted = yaml.safe_load(path.read_text())["reallocation"]
        assert f"--config configs/schedules/{name}.yaml" in path.read_text()  # says how to use it
        realloc = _reallocation(capsys, path)
    assert {k for k in realloc if realloc[k] != base[k]} == set(wanted)
    assert all(realloc[k] == v for k, v in wanted.items())
    assert _demo_steps() == 282
    assert _moves(realloc, 282) == MOVES[name]
