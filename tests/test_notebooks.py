"""Execute the example notebooks top to bottom on a small budget (PYRO_FLOWS_NOTEBOOK_BUDGET=quick).

The committed notebooks hold the outputs of a full-budget run; this test only checks that every cell runs and that
each notebook produces its figures.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "examples" / "notebooks").glob("*.ipynb"))


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_on_a_small_budget(path, monkeypatch):
    monkeypatch.setenv("PYRO_FLOWS_NOTEBOOK_BUDGET", "quick")
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend records the figures
    book = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        book, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute(env=dict(os.environ))
    figures = [
        output
        for cell in book.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if "image/png" in output.get("data", {})
    ]
    assert figures, f"{path.name} produced no figure"
