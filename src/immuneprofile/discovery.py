"""``immuneprofile discover``: gate, subsample a parent population, embed, cluster, compare with the gates.

The steps are the functions of :mod:`immuneprofile.tl` and :mod:`immuneprofile.pl`;
this module only chains them and writes a run's files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from immuneprofile.exceptions import DiscoveryError

__all__ = ["run_discovery", "OUTPUT_FILES"]

PathLike = str | os.PathLike

#: Every file a run may write; those a run does not write are removed, so the folder holds one run.
OUTPUT_FILES = (
    "clusters.csv", "concordance.csv", "abundance.csv", "discovery.h5ad", "umap_clusters.png", "umap_gates.png",
    "umap_markers.png", "umap_week.png", "cluster_heatmap.png", "populations.csv", "populations.parquet",
    "thresholds.csv", "errors.csv",
)


def _gated_events(files: Sequence[PathLike], template, compensation: str,
                  progress: Callable[[str, str | None], None] | None):
    from immuneprofile.batch import gate_files
    from immuneprofile.stats import to_anndata

    batch = gate_files(files, template, compensation=compensation, jobs=1, progress=progress)
    if not batch.results:
        raise DiscoveryError(f"no file could be gated ({len(batch.errors)} failed): "
                             + "; ".join(batch.errors.values())[:2000])
    return batch, to_anndata(batch.results)


def _plots(sub, out: Path, gates: Sequence[str]) -> dict[str, Path]:
    import matplotlib.pyplot as plt

    from immuneprofile import pl, tl

    files = {}
    plots = {
        "umap_clusters": lambda p: pl.umap(sub, color="cluster", save=p),
        "umap_gates": lambda p: pl.umap(sub, color=list(gates), ncols=4, save=p),
        "umap_markers": lambda p: pl.umap(sub, color=tl.marker_names(sub, sub.uns["immuneprofile"]["markers"]),
                                          ncols=4, save=p),
        "cluster_heatmap": lambda p: pl.cluster_heatmap(sub, save=p),
    }
    if "week" in sub.obs:
        plots["umap_week"] = lambda p: pl.umap(sub, color="week", save=p)
    if not gates:
        del plots["umap_gates"]
    for name, draw in plots.items():
        files[name] = out / f"{name}.png"
        plt.close(draw(files[name]))
    return files


def run_discovery(files: Sequence[PathLike], template, out_dir: PathLike, *, on: str | None = None,
                  method: str = "leiden", n_per_sample: int = 2000, seed: int = 0,
                  markers: Sequence[str] | None = None, samples=None, resolution: float = 0.5,
                  n_clusters: int = 10, compensation: str = "auto",
                  progress: Callable[[str, str | None], None] | None = None) -> dict[str, Any]:
    """Gate ``files``, subsample population ``on``, embed, cluster, and write the results to ``out_dir``.

    Parameters
    ----------
    files
        FCS files of one panel.
    template
        A :class:`~immuneprofile.Template`, a YAML path or a shipped template's name.
    out_dir
        Output folder (created). Files of an earlier run that this run does not
        rewrite are removed.
    on
        Gated population to analyse (e.g. ``"CD3+"``); default all events.
    method
        ``"leiden"`` or ``"flowsom"`` (:func:`immuneprofile.tl.cluster`).
    n_per_sample, seed
        Events drawn per sample, and the seed of the draw, the embedding and the clustering.
    markers
        Markers to embed and cluster on (default: every stained channel).
    samples
        Sample sheet (DataFrame or CSV: ``sample_id, patient, week``) or FCS files whose
        keywords give patient and week; adds them to the events and to ``abundance.csv``.
    resolution, n_clusters
        Leiden resolution; FlowSOM metaclusters.
    compensation
        As for :func:`immuneprofile.gate_files`.
    progress
        Called with ``(path, error or None)`` after each file is gated.

    Returns
    -------
    dict
        ``adata`` (the analysed events), ``concordance``, ``clusters``, ``abundance``
        (DataFrames), ``errors`` (``{file: message}`` of files that failed) and
        ``files`` (``{name: path}`` written).
    """
    from immuneprofile import tl
    from immuneprofile.stats import write_tables
    from immuneprofile.template.model import Template
    from immuneprofile.template.parse import load_template

    template = template if isinstance(template, Template) else load_template(template)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)
    batch, adata = _gated_events(files, template, compensation, progress)
    written = dict(write_tables(out, batch.table, batch.thresholds, batch.errors))
    if samples is not None:
        tl.add_metadata(adata, samples)
    sub = tl.subsample(adata, n_per_sample, population=on, seed=seed)
    tl.embed(sub, markers, seed=seed)
    tl.cluster(sub, method, markers=markers, resolution=resolution, n_clusters=n_clusters, seed=seed)
    conc = tl.concordance(sub)
    clusters = tl.cluster_table(sub)
    by = [c for c in ("patient", "week") if c in sub.obs]
    abund = tl.abundance(sub, by=by)
    for name, df in (("clusters", clusters), ("concordance", conc), ("abundance", abund)):
        written[name] = out / f"{name}.csv"
        df.to_csv(written[name], index=False)
    written.update(_plots(sub, out, list(conc["population"])))
    written["h5ad"] = out / "discovery.h5ad"
    sub.write_h5ad(written["h5ad"])
    return {"adata": sub, "concordance": conc, "clusters": clusters, "abundance": abund,
            "errors": dict(batch.errors), "files": written}

