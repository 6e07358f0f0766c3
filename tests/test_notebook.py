"""The notebooks run end to end, so they cannot rot; the case series ends in the claim table."""

from __future__ import annotations

import nbformat
from nbclient import NotebookClient

from conftest import ROOT


def _execute(name: str) -> tuple[list, list[dict], str]:
    """Run ``notebooks/<name>`` (committed with its outputs); fail on any error cell.

    Returns the executed code cells, their outputs and their printed text.
    """
    path = ROOT / "notebooks" / name
    committed = nbformat.read(path, as_version=4)
    assert any("image/png" in o.get("data", {}) for c in committed.cells if c.cell_type == "code"
               for o in c.get("outputs", [])), "commit the notebook with its outputs"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    code = [c for c in nb.cells if c.cell_type == "code"]
    outputs = [o for c in code for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    return code, outputs, text


def _images(outputs: list[dict]) -> list[dict]:
    return [o for o in outputs if "image/png" in o.get("data", {})]


def test_case_series_notebook_executes():
    code, outputs, text = _execute("case_series.ipynb")
    assert "largest deviation from truth" in text
    assert "cohort too small" in text
    assert "power for the built-in effects" in text  # the calibration it reports
    assert len(_images(outputs)) >= 3  # PASI, per-patient panels, fold changes
    # it ends in the claim table: claim -> readout -> reproduced, computed in the last cell
    last = code[-1]
    html = "".join(o.get("data", {}).get("text/html", "") for o in last.get("outputs", []))
    assert "claim" in html and "reproduced" in html and "PASI 87" in html
    assert "claims reproduced" in "".join(o.get("text", "") for o in last.get("outputs", []))


def test_discovery_notebook_executes():
    """The discovery section: UMAP of CD3+ cells by visit, clusters against the CLA/CD103 and Treg gates."""
    _, outputs, text = _execute("discovery.ipynb")
    assert "Leiden clusters on" in text and "lowest F1 of the best cluster union" in text
    assert len(_images(outputs)) >= 2  # UMAP panels, cluster heatmap
