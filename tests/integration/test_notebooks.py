"""The notebooks in ``notebooks/`` run top to bottom in a Jupyter kernel, offline, at their tiny default size.

Each notebook is executed with nbclient in a fresh ``python3`` kernel, in a temporary folder (its tiny runs
and exports go to ``FLEXLORA_NOTEBOOK_DIR``), and must finish without an error. A check cell appended to
the executed copy then reports what the notebook produced: every ``fig_*`` figure with its titles and axis
labels, and the values the notebook computed, so the tests assert on the results rather than on the absence
of an exception. Committed notebooks carry no outputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOK_DIR = Path(__file__).parents[2] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))

# Appended to the executed notebook: prints one JSON line describing every figure the notebook kept in a
# ``fig_*`` variable, plus the facts named in FACTS (a dict of expressions evaluated in the notebook).
CHECK_CELL = '''
import json as _json
def _describe(figure):
    axes = [ax for ax in figure.axes if ax.get_visible()]
    plotted = [ax for ax in axes if ax.get_label() != "<colorbar>" and (ax.lines or ax.patches or ax.images)]
    suptitle = figure._suptitle.get_text() if figure._suptitle is not None else ""
    return {"title": suptitle or next((ax.get_title() for ax in axes if ax.get_title()), ""),
            "axes": [{"title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
                      "legend": ax.get_legend() is not None, "images": len(ax.images)} for ax in plotted],
            "colorbar": any(ax.get_label() == "<colorbar>" for ax in figure.axes)}
_figures = {name: (None if value is None else _describe(value)) for name, value in sorted(globals().items())
            if name.startswith("fig_")}
print(_json.dumps({"figures": _figures, "facts": {key: eval(expr) for key, expr in FACTS.items()}}))
'''

FACTS = {
    "rank_trajectories.ipynb": {
        "events": "len(run['events'])",
        "ranks_moved": "bool((ranks != ranks[:, :1]).any())",
        "movers": "len(movers)",
        "spectra_events": "len(spectra or [])",
        "spectrum_lengths_match_ranks": "all(len(spectra[-1]['spectra'][n]) == r for n, r in "
                                        "zip(names, ranks[:, len(spectra) - 1].tolist()))",
        "compared_tasks": "compared",
        "module_types": "present",
    },
    "quickstart.ipynb": {
        "methods": "{label: module.method_name for label, module in modules.items()}",
        "events": "len(reallocation.history)",
        "flexlora_total_rank": "sum(flexlora.rank_pattern().values())",
        "flexlora_ranks": "sorted(set(flexlora.rank_pattern().values()))",
        "peft_max_difference": "max_difference",
        "adapter_files": "sorted(p.name for p in adapter_dir.iterdir())",
    },
}


def execute(path: Path, workdir: Path) -> dict:
    """Run the notebook in a fresh kernel in ``workdir``; return what the check cell reports."""
    notebook = nbformat.read(path, as_version=4)
    check = f"FACTS = {FACTS[path.name]!r}\n{CHECK_CELL}"
    notebook.cells.append(nbformat.v4.new_code_cell(check))
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(workdir)}}).execute()
    images = sum("image/png" in output.get("data", {}) for cell in notebook.cells if cell.cell_type == "code"
                 for output in cell.outputs)
    stdout = "".join(output.get("text", "") for output in notebook.cells[-1].outputs if output.get("name") == "stdout")
    return {**json.loads(stdout.strip().splitlines()[-1]), "images": images}


def assert_readable(name: str, figure: dict | None) -> None:
    """A figure a reader understands without the code: a title, and labelled axes on every plotted panel."""
    assert figure is not None, f"{name} was not drawn"
    assert figure["title"], f"{name} has no title"
    assert figure["axes"], f"{name} plots nothing"
    for ax in figure["axes"]:
        assert ax["xlabel"] and ax["ylabel"], f"{name}: a panel lacks an axis label: {ax}"
        if ax["images"]:
            assert figure["colorbar"], f"{name}: a colour-coded panel without a colour bar"


def test_both_notebooks_exist_and_are_committed_without_outputs():
    assert {p.name for p in NOTEBOOKS} >= {"rank_trajectories.ipynb", "quickstart.ipynb"}
    for path in NOTEBOOKS:
        notebook = nbformat.read(path, as_version=4)
        nbformat.validate(notebook)
        for cell in notebook.cells:
            if cell.cell_type == "code":
                assert not cell.outputs and cell.execution_count is None, f"{path.name} is committed with outputs"


@pytest.mark.slow
def test_rank_trajectories_draws_every_figure_from_its_tiny_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXLORA_NOTEBOOK_DIR", str(tmp_path / "runs"))
    for variable in ("FLEXLORA_RUN_DIR", "FLEXLORA_SWEEP_DIR"):
        monkeypatch.delenv(variable, raising=False)
    report = execute(NOTEBOOK_DIR / "rank_trajectories.ipynb", tmp_path)
    facts, figures = report["facts"], report["figures"]
    assert set(figures) == {"fig_heatmap", "fig_final", "fig_importance", "fig_spectra", "fig_sweep"}
    for name, figure in figures.items():
        assert_readable(name, figure)
    assert report["images"] >= 5  # every figure is shown in the notebook
    assert facts["events"] > 0 and facts["ranks_moved"] and facts["movers"] > 0
    assert facts["spectra_events"] == facts["events"]  # one λ record per allocation event
    assert facts["spectrum_lengths_match_ranks"]  # the active λ of each module: as many as its rank
    assert facts["compared_tasks"] == ["toy"]  # the tiny sweep's FlexLoRA and AdaLoRA runs, side by side
    assert set(facts["module_types"]) == {"query", "key", "value", "attention output", "FFN in", "FFN out"}
    assert (tmp_path / "runs" / "sweeps" / "tiny_sweep" / "toy" / "adalora" / "seed0" / "rank_pattern.json").is_file()


@pytest.mark.slow
def test_quickstart_trains_switches_methods_and_exports_to_peft(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXLORA_NOTEBOOK_DIR", str(tmp_path / "runs"))
    report = execute(NOTEBOOK_DIR / "quickstart.ipynb", tmp_path)
    facts = report["facts"]
    assert_readable("fig_methods", report["figures"]["fig_methods"])
    assert report["figures"]["fig_methods"]["axes"][0]["legend"]
    assert facts["methods"] == {"FlexLoRA": "flexlora", "LoRA": "lora", "AdaLoRA": "adalora"}
    assert facts["events"] > 0
    assert facts["flexlora_total_rank"] == 12 * 4  # prune_and_expand conserves the total rank ...
    assert len(facts["flexlora_ranks"]) > 1  # ... and moved it
    assert facts["peft_max_difference"] < 1e-5  # plain peft computes what the FlexLoRA model computes
    assert facts["adapter_files"] == ["adapter_config.json", "adapter_model.safetensors"]
