"""The notebooks run end to end, so they cannot rot."""

from __future__ import annotations

import nbformat
from nbclient import NotebookClient

from conftest import ROOT


def _execute(name: str) -> tuple[str, list[dict]]:
    """Run ``notebooks/<name>``; fail on any error cell; return its printed text and image outputs."""
    path = ROOT / "notebooks" / name
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(path.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    return text, [o for o in outputs if "image/png" in o.get("data", {})]


def test_case_series_notebook_executes():
    text, images = _execute("case_series.ipynb")
    assert "largest deviation from truth" in text
    assert "cohort too small" in text
    assert len(images) >= 3  # PASI, subset trajectories, heatmap


def test_discovery_notebook_executes():
    """The discovery section (to be spliced into case_series.ipynb): UMAP, clusters vs gates, abundance."""
    text, images = _execute("discovery.ipynb")
    assert "Leiden clusters on" in text and "lowest F1 of the best cluster union" in text
    assert len(images) >= 2  # UMAP panels, cluster heatmap
