"""Discovery plots (seaborn / matplotlib), in scanpy's ``pl`` style; also the clinical plots.

``ip.pl.umap(adata, color=...)`` colours the embedding of :func:`immuneprofile.tl.embed`
by a marker, the clusters, a gated population or any ``.obs`` column (``"week"``);
``ip.pl.cluster_heatmap(adata)`` shows marker x cluster median transformed intensity.
The public functions of :mod:`immuneprofile.plotting` (PASI and subset trajectories,
association heatmap) are re-exported here. Every function returns the
:class:`matplotlib.figure.Figure` and saves it with ``save=path``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib.pyplot as plt  # noqa: E402  (after plotting, which picks a headless backend)
import numpy as np
import pandas as pd
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from immuneprofile import plotting as _plotting
from immuneprofile.exceptions import DiscoveryError  # noqa: E402
from immuneprofile.plotting import *  # noqa: F401,F403  (the clinical plots, one namespace)

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = ["umap", "cluster_heatmap", *_plotting.__all__]

PathLike = str | Path
#: Colour of events outside a gated population (a population is drawn on top, in red).
OUTSIDE = "#d0d0d0"


def _values(adata: AnnData, color: str) -> tuple[np.ndarray, str, list]:
    """The values to colour by, their kind (``"gate"``, ``"category"``, ``"continuous"``) and categories."""
    from immuneprofile.tl import marker_names

    if color in adata.obs:
        col = adata.obs[color]
        if col.dtype == bool:
            return col.to_numpy(), "gate", []
        if isinstance(col.dtype, pd.CategoricalDtype):
            return col.to_numpy(), "category", [c for c in col.cat.categories if (col == c).any()]
        if col.dtype == object or col.nunique() <= 12:  # e.g. week: a few visits
            return col.to_numpy(), "category", sorted(col.dropna().unique())
        return col.to_numpy(dtype=float), "continuous", []
    try:
        name = marker_names(adata, [color])[0]
    except Exception as exc:
        raise DiscoveryError(f"cannot colour by {color!r}: neither an .obs column ({list(adata.obs.columns)}) "
                             f"nor a marker ({exc})") from None
    X = adata[:, name].X
    return np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=float).reshape(-1), "continuous", []


def _category_label(v: object) -> str:
    return f"{v:g}" if isinstance(v, (float, np.floating)) else str(v)


def _draw(ax, xy: np.ndarray, values: np.ndarray, kind: str, cats: list, color: str, size: float) -> None:
    if kind == "gate":
        ax.scatter(*xy[~values].T, s=size, c=OUTSIDE, linewidths=0, rasterized=True, label="outside")
        ax.scatter(*xy[values].T, s=size, c="#c0392b", linewidths=0, rasterized=True,
                   label=f"{color} ({values.mean():.1%})")
        ax.legend(loc="best", fontsize="small", markerscale=3, frameon=False)
    elif kind == "category":
        pal = sns.color_palette("tab20" if len(cats) > 10 else "tab10", len(cats))
        for c, rgb in zip(cats, pal):
            m = values == c
            ax.scatter(*xy[m].T, s=size, color=rgb, linewidths=0, rasterized=True, label=_category_label(c))
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small", markerscale=3, frameon=False,
                  title=color)
    else:
        order = np.argsort(values, kind="stable")
        pts = ax.scatter(*xy[order].T, s=size, c=values[order], cmap="viridis", linewidths=0, rasterized=True)
        ax.figure.colorbar(pts, ax=ax, shrink=0.8, label=f"{color} (transformed)")


def umap(adata: AnnData, color: str | Sequence[str] = "cluster", *, size: float | None = None,
         ncols: int = 3, save: PathLike | None = None, dpi: int = 150) -> Figure:
    """The UMAP of the events, coloured by marker, cluster, gated population or visit.

    Parameters
    ----------
    adata
        Embedded events (:func:`immuneprofile.tl.embed`: ``.obsm["X_umap"]``).
    color
        One or several of: a marker (transformed intensity, continuous colours), an
        ``.obs`` column such as ``"cluster"``, ``"week"``, ``"patient"``
        (categories), a gated population (its events in red over the others in grey).
    size
        Point size (default from the number of events).
    ncols
        Panels per row when several colours are given.
    save
        Path to save the figure to (PNG, PDF, SVG ...).
    dpi
        Resolution when saving.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if "X_umap" not in adata.obsm:
        raise DiscoveryError("no UMAP in this AnnData (.obsm['X_umap']); run immuneprofile.tl.embed first")
    colors = [color] if isinstance(color, str) else list(color)
    xy = np.asarray(adata.obsm["X_umap"])
    size = size if size is not None else float(np.clip(12000 / max(adata.n_obs, 1), 0.5, 20))
    ncols = min(ncols, len(colors))
    nrows = -(-len(colors) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 4.2 * nrows), squeeze=False)
    for ax, c in zip(axes.flat, colors):
        values, kind, cats = _values(adata, c)
        _draw(ax, xy, values, kind, cats, c, size)
        ax.set(title=c, xticks=[], yticks=[], xlabel="UMAP 1", ylabel="UMAP 2")
    for ax in list(axes.flat)[len(colors):]:
        ax.set_visible(False)
    fig.tight_layout()
    _plotting._save(fig, save, dpi)
    return fig


def cluster_heatmap(adata: AnnData, *, key: str = "cluster", save: PathLike | None = None,
                    dpi: int = 150) -> Figure:
    """Marker x cluster heatmap of median transformed intensity.

    Columns are labelled with the cluster, its share of the events and the gate that
    names it (:func:`immuneprofile.tl.cluster_table`: the smallest gated population
    holding >= 90 % of the cluster).

    Parameters
    ----------
    adata
        Clustered events (:func:`immuneprofile.tl.cluster`).
    key
        ``.obs`` column of the clusters.
    save, dpi
        Where to save the figure, and its resolution.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from immuneprofile.tl import cluster_table

    table = cluster_table(adata, key=key)
    med = table.filter(like="median_").T
    med.index = [i.removeprefix("median_") for i in med.index]
    med.columns = [f"{r.cluster} ({r.pct_events:.0f}%) {r.gate}" for r in table.itertuples()]
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * med.shape[1], 1.2 + 0.4 * med.shape[0]))
    sns.heatmap(med, cmap="magma", ax=ax, cbar_kws={"label": "median (transformed)"}, annot=med.shape[1] <= 20,
                fmt=".2f", annot_kws={"fontsize": 6})
    ax.set(xlabel=f"{key} (share of events) gate", ylabel="marker")
    ax.tick_params(axis="x", labelrotation=90)
    fig.tight_layout()
    _plotting._save(fig, save, dpi)
    return fig
