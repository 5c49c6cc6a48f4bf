"""Every notebook in notebooks/ runs top to bottom (its code cells, in order, in one namespace)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


def test_there_is_a_notebook():
    assert NOTEBOOKS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no run next to it: the notebook trains its tiny model
    cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
    namespace: dict = {}
    for cell in cells:
        source = "".join(cell["source"])
        exec(compile(source, f"{path.name}", "exec"), namespace)
    assert namespace["run"]["events"], "the notebook's run has no allocation events"
    assert namespace["image"].shape[0] == 3
