"""The example notebook runs against a store the test builds, and is committed clean."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from test_labelstore import make_store

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "inspect_labelstore.ipynb"


def test_committed_notebook_has_no_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None


@pytest.mark.slow
def test_notebook_executes_against_a_real_store(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    path = str(tmp_path / "nb.zarr")
    data = make_store(path, n=500, views=2, k=5, classes=30, chunk_rows=128, invalid=(7,))
    monkeypatch.setenv("SSLD_STORE", path)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()
    text = []
    images = 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            assert output.output_type != "error", output
            data_out = output.get("data", {})
            text.append(output.get("text", "") + data_out.get("text/plain", ""))
            images += "image/png" in data_out
    joined = "\n".join(text)
    assert "<LabelStore" in joined and "N=500" in joined
    assert "499 valid rows of 500" in joined
    agreement = (data["indices"][:, 0, 0] == data["labels"])[data["valid"]].mean()
    assert f"{100 * agreement:.2f}%" in joined
    assert images == 1  # the two-panel figure
    assert os.environ["SSLD_STORE"] == path
