"""The case-series notebook runs end to end, so it cannot rot, and it ends in the claim table."""

from __future__ import annotations

import nbformat
from nbclient import NotebookClient

from conftest import ROOT


def test_case_series_notebook_executes():
    path = ROOT / "notebooks" / "case_series.ipynb"
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
    assert "largest deviation from truth" in text
    assert "cohort too small" in text
    assert "power for the built-in effects" in text  # the calibration it reports
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3  # PASI, per-patient panels, fold changes
    # it ends in the claim table: claim -> readout -> reproduced, computed in the last cell
    last = code[-1]
    html = "".join(o.get("data", {}).get("text/html", "") for o in last.get("outputs", []))
    assert "claim" in html and "reproduced" in html and "PASI 87" in html
    assert "claims reproduced" in "".join(o.get("text", "") for o in last.get("outputs", []))
