"""Draw the figures of docs/results.md from the sweeps' run folders.

    python docs/figures/draw.py runs            # runs/<sweep>/tweets/<method>/seed<k>/ -> docs/figures/*.png

Two kinds of figure, both read from what every run leaves in its folder:

- ``<sweep>_<method>_seed<k>.png``: the modules × events rank heat-map of one run (``rank_pattern.json``), drawn
  with :func:`flexlora_pl.figures.heatmap_figure`, as TensorBoard shows it;
- ``<sweep>_validation.png``: validation accuracy against the optimizer step for each method of a sweep, the
  mean over its seeds with the seeds' range shaded (``metrics.json``: ``fit.history``);
- ``<sweep>_sensitivity.png``: a tuned sweep's search score against the learning rate, one line per method
  (``selected.json``), drawn with :func:`flexlora_pl.figures.write_sensitivity`.

A figure whose runs are missing is skipped with a message, so the script can be pointed at a partial sweep.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np

from flexlora_pl.figures import heatmap_figure, write_sensitivity

HERE = Path(__file__).parent
TASK = "tweets"
# (sweep, method, seed) of every heat-map in docs/results.md
HEATMAPS = [
    ("offline_comparison", "flexlora", 0),
    ("offline_comparison", "adalora", 0),
    ("offline_longer", "flexlora", 0),
    ("offline_longer", "b0_12", 0),
    ("offline_longer", "delta_t_5", 0),
    ("offline_longer", "late_window", 0),
]
# sweep -> the methods whose validation curves are drawn, in legend order
CURVES = {"offline_longer": ["lora", "adalora", "static", "flexlora", "flexlora_warm", "b0_12", "delta_t_5",
                             "late_window"]}
# tuned sweeps whose sensitivity figure docs/results.md shows
SENSITIVITY = ["offline_tuned"]


def draw_heatmap(run: Path, out: Path, title: str) -> bool:
    """The rank heat-map of the run folder ``run`` into ``out``; False when the run has no rank_pattern.json."""
    path = run / "rank_pattern.json"
    if not path.is_file():
        print(f"skipped {out.name}: {path} does not exist (the run has not finished)")
        return False
    record = json.loads(path.read_text())
    events = record["events"]
    ranks = np.array([event["ranks"] for event in events]).T  # (modules, events)
    figure = heatmap_figure(ranks, max(record["max_rank"].values()), module_names=list(record["rank_pattern"]),
                            event_steps=[event["step"] for event in events], title=title)
    figure.savefig(out, bbox_inches="tight")
    print(f"wrote {out}")
    return True


def validation_curves(method_dir: Path) -> tuple[list[int], np.ndarray] | None:
    """Steps and a (seeds, validations) array of val/accuracy for every finished seed of one method."""
    curves = []
    for metrics in sorted(method_dir.glob("seed*/metrics.json")):
        fit = json.loads(metrics.read_text()).get("fit") or {}
        if fit.get("status") != "finished":
            continue
        curves.append([(entry["step"], entry["val/accuracy"]) for entry in fit["history"]])
    if not curves or len({tuple(step for step, _ in curve) for curve in curves}) != 1:
        return None
    return [step for step, _ in curves[0]], np.array([[value for _, value in curve] for curve in curves])


def draw_curves(sweep_dir: Path, methods: list[str], out: Path) -> bool:
    """Validation accuracy against step, the mean over seeds and their range, one line per method."""
    figure, axes = plt.subplots(figsize=(8, 4.8), layout="constrained")
    drawn = 0
    for method in methods:
        found = validation_curves(sweep_dir / TASK / method)
        if found is None:
            print(f"{out.name}: no finished seeds of {method!r} under {sweep_dir / TASK}, left out")
            continue
        steps, values = found
        values = 100 * values
        line, = axes.plot(steps, values.mean(axis=0), marker="o", markersize=3, label=f"{method} ({len(values)})")
        axes.fill_between(steps, values.min(axis=0), values.max(axis=0), color=line.get_color(), alpha=0.12)
        drawn += 1
    if not drawn:
        plt.close(figure)
        print(f"skipped {out.name}: no finished runs under {sweep_dir}")
        return False
    axes.set(xlabel="optimizer step", ylabel="validation accuracy (%)",
             title=f"{sweep_dir.name}: mean over seeds (n), range shaded")
    axes.grid(alpha=0.3)
    axes.legend(loc="lower right", fontsize="small")
    figure.savefig(out, dpi=100)
    plt.close(figure)
    print(f"wrote {out}")
    return True


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", type=Path, help="the sweeps' save_dir (the folder holding offline_longer/, …)")
    parser.add_argument("--out", type=Path, default=HERE, help="where the figures go (default: docs/figures)")
    args = parser.parse_args(argv)
    if not args.runs.is_dir():
        parser.error(f"{args.runs} is not a folder; give the save_dir of the offline sweeps (e.g. runs)")
    args.out.mkdir(parents=True, exist_ok=True)
    for sweep, method, seed in HEATMAPS:
        draw_heatmap(args.runs / sweep / TASK / method / f"seed{seed}", args.out / f"{sweep}_{method}_seed{seed}.png",
                     title=f"{method}, {sweep} (seed {seed})")
    for sweep, methods in CURVES.items():
        draw_curves(args.runs / sweep, methods, args.out / f"{sweep}_validation.png")
    for sweep in SENSITIVITY:
        task = args.runs / sweep / TASK
        if not list(task.glob("*/selected.json")):
            print(f"skipped {sweep}_sensitivity.png: no selected.json under {task} (run its search first)")
            continue
        print(f"wrote {write_sensitivity(task, args.out / f'{sweep}_sensitivity.png')}")


if __name__ == "__main__":
    main()
