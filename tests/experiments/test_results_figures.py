"""docs/figures/draw.py: the figures of docs/results.md drawn from run folders (here fabricated ones)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from PIL import Image

SCRIPT = Path(__file__).parents[2] / "docs" / "figures" / "draw.py"


def _draw():
    spec = importlib.util.spec_from_file_location("draw_results_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(folder: Path, status: str = "finished", steps=(10, 20), events: int = 3) -> None:
    folder.mkdir(parents=True)
    history = [{"step": step, "val/accuracy": 0.5 + step / 100} for step in steps]
    (folder / "metrics.json").write_text(json.dumps({"fit": {"status": status, "history": history}}))
    names = [f"encoder.layer.{i}.attention.self.query" for i in range(4)]
    record = {"rank_pattern": dict.fromkeys(names, 2), "max_rank": dict.fromkeys(names, 3), "total_rank": 8,
              "events": [{"step": 5 * (k + 1), "ranks": [2, 3, 1, 2]} for k in range(events)]}
    (folder / "rank_pattern.json").write_text(json.dumps(record))


def test_figures_are_drawn_from_run_folders_and_missing_runs_are_named(tmp_path, capsys):
    sweep = tmp_path / "runs" / "offline_longer" / "tweets"
    _run(sweep / "flexlora" / "seed0")
    _run(sweep / "flexlora" / "seed1")
    _run(sweep / "static" / "seed0")
    _run(sweep / "lora" / "seed0", status="failed")  # a failed run has no curve
    out = tmp_path / "figures"
    _draw().main([str(tmp_path / "runs"), "--out", str(out)])
    printed = capsys.readouterr().out
    drawn = sorted(p.name for p in out.iterdir())
    assert drawn == ["offline_longer_flexlora_seed0.png", "offline_longer_validation.png"]
    assert "no finished seeds of 'lora'" in printed and "b0_12/seed0/rank_pattern.json does not exist" in printed
    assert "skipped offline_tuned_sensitivity.png: no selected.json" in printed
    width, height = Image.open(out / "offline_longer_validation.png").size
    assert width >= 700 and height >= 400


def test_the_sensitivity_figure_is_drawn_from_a_tuned_sweep_s_selections(tmp_path):
    lr = "--model.init_args.optimizer.init_args.lr"
    for method, best in (("lora", 0.6), ("flexlora", 0.7)):
        folder = tmp_path / "runs" / "offline_tuned" / "tweets" / method
        folder.mkdir(parents=True)
        (folder / "selected.json").write_text(json.dumps({
            "objective": "val/score", "direction": "maximize", "params": {lr: 1e-2}, "value": best,
            "ranges": {lr: "[0.001, 0.01] (log, 2 values)"}, "curve": [[[1e-3], best - 0.1], [[1e-2], best]]}))
    out = tmp_path / "figures"
    _draw().main([str(tmp_path / "runs"), "--out", str(out)])
    assert Image.open(out / "offline_tuned_sensitivity.png").size[0] >= 500
