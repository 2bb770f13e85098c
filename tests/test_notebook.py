"""The example notebook runs as shipped: on a given store, on the quickstart's store it finds,
and with nothing set up (then on a demo store it makes); it is committed clean."""
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


def run_notebook(folder: Path) -> tuple[str, int]:
    """Execute the notebook with ``folder`` as its working directory: (text output, images)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=120, kernel_name="python3",
                            resources={"metadata": {"path": str(folder)}}).execute()
    text, images = [], 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            assert output.output_type != "error", output
            data_out = output.get("data", {})
            text.append(output.get("text", "") + data_out.get("text/plain", ""))
            images += "image/png" in data_out
    return "\n".join(text), images


def check_store_shown(joined: str, data: dict) -> None:
    assert "<LabelStore" in joined and "N=500" in joined
    assert "499 valid rows of 500" in joined
    agreement = (data["indices"][:, 0, 0] == data["labels"])[data["valid"]].mean()
    assert f"{100 * agreement:.2f}%" in joined


@pytest.mark.slow
def test_notebook_executes_against_a_store_given_in_ssld_store(tmp_path, monkeypatch):
    path = str(tmp_path / "nb.zarr")
    data = make_store(path, n=500, views=2, k=5, classes=30, chunk_rows=128, invalid=(7,))
    monkeypatch.setenv("SSLD_STORE", path)
    joined, images = run_notebook(tmp_path)
    check_store_shown(joined, data)
    assert f"opening {path}: SSLD_STORE" in joined
    assert images == 1  # the two-panel figure


@pytest.mark.slow
def test_notebook_finds_the_quickstart_store_from_a_folder_below(tmp_path, monkeypatch):
    path = tmp_path / "ssld-quickstart" / "stores" / "train.zarr"
    path.parent.mkdir(parents=True)
    data = make_store(str(path), n=500, views=2, k=5, classes=30, chunk_rows=128, invalid=(7,))
    monkeypatch.delenv("SSLD_STORE", raising=False)
    (tmp_path / "examples").mkdir()  # opened from examples/, the quickstart ran one level up
    joined, _ = run_notebook(tmp_path / "examples")
    check_store_shown(joined, data)
    assert f"opening {path}: the quickstart's training store" in joined


@pytest.mark.slow
def test_notebook_without_any_store_makes_a_demo_store(tmp_path, monkeypatch):
    monkeypatch.delenv("SSLD_STORE", raising=False)
    joined, images = run_notebook(tmp_path)
    assert "a demo store with random labels" in joined
    assert "<LabelStore" in joined and "N=500" in joined and "500 valid rows of 500" in joined
    assert images == 1
    assert not any(tmp_path.iterdir())  # nothing written where the notebook was opened
