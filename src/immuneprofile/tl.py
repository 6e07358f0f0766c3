"""Discovery beside the gates: subsampling, embeddings, clusters and their agreement with the gates.

Functions in scanpy's style on the :class:`anndata.AnnData` that
:func:`immuneprofile.to_anndata` gives (``.X`` transformed intensities, ``.var``
``channel``/``marker``, ``.obs`` ``sample_id`` and one boolean column per gated
population)::

    import immuneprofile as ip
    adata = ip.to_anndata(results)                   # gated events
    ip.tl.add_metadata(adata, "samples.csv")         # patient, week from a sample sheet
    sub = ip.tl.subsample(adata, 2000, population="CD3+", seed=0)
    ip.tl.embed(sub, seed=0)                         # scanpy neighbors + UMAP (umap-learn)
    ip.tl.cluster(sub, method="leiden", seed=0)      # or method="flowsom" (FlowSOM metaclusters)
    ip.tl.concordance(sub)                           # each gate's best cluster union: F1, precision, recall
    ip.tl.abundance(sub, by=["patient", "week"])     # cluster frequencies, shaped like the population table

Results go where scanpy puts them: ``.obsm["X_umap"]``, ``.obs["cluster"]``,
``.uns["immuneprofile"]`` (the markers used, the method and its parameters).
scanpy, igraph/leidenalg and flowsom are imported only when a function needs them.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from immuneprofile.exceptions import DiscoveryError

if TYPE_CHECKING:  # pragma: no cover
    from anndata import AnnData

__all__ = [
    "add_metadata",
    "subsample",
    "marker_names",
    "embed",
    "cluster",
    "concordance",
    "cluster_table",
    "abundance",
]

#: Where this module records what it did, in ``adata.uns``.
UNS_KEY = "immuneprofile"
#: ``.obsm`` key of the marker matrix the neighbour graph and FlowSOM are computed on.
REP_KEY = "X_markers"


def _uns(adata: AnnData) -> dict:
    return adata.uns.setdefault(UNS_KEY, {})


def _population_columns(adata: AnnData) -> list[str]:
    return [c for c in adata.obs.columns if adata.obs[c].dtype == bool]


# --------------------------------------------------------------------------- samples


def add_metadata(adata: AnnData, samples) -> AnnData:
    """Add ``patient``, ``week`` (and ``panel``) to ``adata.obs`` from sample metadata.

    Parameters
    ----------
    adata
        Events from :func:`immuneprofile.to_anndata` (``.obs["sample_id"]``).
    samples
        A sample sheet (``sample_id, patient, week[, panel]``) as a DataFrame or CSV
        path, or FCS file(s)/a directory whose ``PATIENT``/``WEEK`` keywords are read
        (as :func:`immuneprofile.study.clinical.join_clinical` accepts).

    Returns
    -------
    AnnData
        ``adata``, changed in place.

    Raises
    ------
    ClinicalDataError
        The sample metadata is invalid, or lacks some of the samples in ``adata``.
    """
    from immuneprofile.study.clinical import ClinicalDataError, _as_samples, _source_name

    meta = _as_samples(samples).drop_duplicates("sample_id").set_index("sample_id")
    ids = adata.obs["sample_id"].astype(str)
    missing = sorted(set(ids) - set(meta.index))
    if missing:
        raise ClinicalDataError(f"{_source_name(samples)}: no patient/week for sample_id(s) {missing[:20]}")
    for col in ("patient", "week", "panel"):
        if col in meta.columns:
            values = ids.map(meta[col])
            adata.obs[col] = pd.Categorical(values) if col != "week" else values.astype(float).to_numpy()
    return adata


def subsample(adata: AnnData, n_per_sample: int, *, population: str | None = None, seed: int = 0,
              sample_key: str = "sample_id") -> AnnData:
    """Equal numbers of events per sample (all of a sample's events if it has fewer), reproducibly.

    Parameters
    ----------
    adata
        Events (:func:`immuneprofile.to_anndata`).
    n_per_sample
        Events drawn, without replacement, from each sample.
    population
        Draw only from this gated population (an ``.obs`` boolean column), e.g. ``"CD3+"``.
    seed
        Seed of the draw: the same seed gives the same events.
    sample_key
        ``.obs`` column identifying the sample.

    Returns
    -------
    AnnData
        A new AnnData with the drawn events in their original order;
        ``.uns["immuneprofile"]`` records ``on`` (the population) and ``n_per_sample``.
    """
    if n_per_sample < 1:
        raise DiscoveryError(f"n_per_sample must be >= 1, not {n_per_sample}")
    if sample_key not in adata.obs:
        raise DiscoveryError(f"AnnData has no .obs[{sample_key!r}] column to subsample by")
    keep = np.ones(adata.n_obs, dtype=bool)
    if population is not None:
        pops = _population_columns(adata)
        if population not in pops:
            raise DiscoveryError(f"population {population!r} is not a gated population of this AnnData; "
                                 f"it has {pops}")
        keep = adata.obs[population].to_numpy(dtype=bool)
    rng = np.random.default_rng(seed)
    codes = pd.Categorical(adata.obs[sample_key]).codes
    chosen = []
    for code in np.unique(codes):
        idx = np.flatnonzero((codes == code) & keep)
        if idx.size > n_per_sample:
            idx = np.sort(rng.choice(idx, n_per_sample, replace=False))
        chosen.append(idx)
    idx = np.sort(np.concatenate(chosen)) if chosen else np.empty(0, dtype=np.int64)
    if idx.size == 0:
        raise DiscoveryError(f"no events to subsample{f' in population {population!r}' if population else ''}")
    out = adata[idx].copy()
    for key in ("neighbors", "umap", UNS_KEY):  # a graph or embedding of other events does not apply
        out.uns.pop(key, None)
    out.uns[UNS_KEY] = {"on": population or "all events", "n_per_sample": int(n_per_sample), "seed": int(seed)}
    return out


# --------------------------------------------------------------------------- markers


def marker_names(adata: AnnData, markers: Iterable[str] | None = None) -> list[str]:
    """``.var_names`` of the markers to analyse.

    Parameters
    ----------
    adata
        Events (:func:`immuneprofile.to_anndata`).
    markers
        Marker or channel names, matched as templates match them (``"CD4"`` finds
        ``"CD4 BV605"``, aliases included). Default: every stained (fluorescence)
        channel, i.e. every channel whose marker label differs from its channel name.

    Raises
    ------
    MarkerError
        A marker matches no channel, or several.
    """
    from immuneprofile.io.fcs import FCSData

    chans = [str(c) for c in adata.var["channel"]] if "channel" in adata.var else list(map(str, adata.var_names))
    labels = list(map(str, adata.var_names))
    if markers is None:
        names = [lab for lab, ch in zip(labels, chans) if lab != ch]
        if not names:
            raise DiscoveryError("no stained channels in this AnnData (every marker label equals its channel); "
                                 "name the markers to use")
        return names
    scatter = [i for i, (lab, ch) in enumerate(zip(labels, chans)) if lab == ch]
    lookup = FCSData(path="<AnnData>", sample_id="", channels=chans, markers=labels, events=np.empty((0, len(chans))),
                     compensation=None, spill_matrix=None, compensated=[], scatter=scatter, metadata={})
    return [labels[lookup.find_channel(m, context="discovery markers")] for m in markers]


def _marker_matrix(adata: AnnData, markers: Iterable[str] | None) -> tuple[np.ndarray, list[str]]:
    """Transformed intensities of ``markers``; by default those of the last embedding/clustering, else all stained."""
    names = marker_names(adata, markers) if markers is not None else _uns(adata).get("markers") or marker_names(adata)
    X = adata[:, names].X
    X = np.asarray(X.toarray() if hasattr(X, "toarray") else X, dtype=np.float32)
    if not np.isfinite(X).all():
        raise DiscoveryError(f"non-finite transformed intensities in markers {names}; check the transforms")
    return X, names


#: scanpy computes exact (brute-force) neighbours below this many events, pynndescent's approximate ones above.
_EXACT_KNN_BELOW = 8192


class _NNDescentCSR:
    """scanpy's default approximate kNN (pynndescent, UMAP's parameters), returning a ``csr_matrix``.

    pynndescent >= 0.6 returns a ``scipy.sparse.csr_array``, which scanpy 1.11 cannot read
    under scipy >= 1.15 (``csr_array.getnnz`` is gone); this hands scanpy the matrix type it expects.
    """

    def __init__(self, n_neighbors: int, seed: int, n_obs: int) -> None:
        from pynndescent import PyNNDescentTransformer

        self._inner = PyNNDescentTransformer(
            n_neighbors=n_neighbors, metric="euclidean", random_state=seed,
            n_trees=min(64, 5 + round(n_obs ** 0.5 / 20.0)), n_iters=max(5, round(np.log2(n_obs))))

    def get_params(self, deep: bool = True) -> dict:
        return self._inner.get_params(deep)

    def fit_transform(self, X: np.ndarray):
        from scipy.sparse import csr_matrix

        return csr_matrix(self._inner.fit_transform(X))


def _ensure_neighbors(adata: AnnData, markers: Iterable[str] | None, n_neighbors: int, seed: int) -> None:
    """kNN graph on the markers (``scanpy.pp.neighbors``), unless one exists for these markers."""
    import scanpy as sc

    X, names = _marker_matrix(adata, markers)
    info = _uns(adata)
    if "neighbors" in adata.uns and info.get("neighbors_on") == names:
        return
    if adata.n_obs <= n_neighbors:
        raise DiscoveryError(f"{adata.n_obs} events: too few for a {n_neighbors}-neighbour graph")
    adata.obsm[REP_KEY] = X
    transformer = _NNDescentCSR(n_neighbors, seed, adata.n_obs) if adata.n_obs >= _EXACT_KNN_BELOW else None
    sc.pp.neighbors(adata, n_neighbors=n_neighbors, use_rep=REP_KEY, random_state=seed, transformer=transformer)
    info["neighbors_on"] = names
    info["markers"] = names


def embed(adata: AnnData, markers: Iterable[str] | None = None, method: str = "umap", *, n_neighbors: int = 15,
          min_dist: float = 0.5, seed: int = 0) -> AnnData:
    """A 2-D embedding of the events on the chosen markers.

    ``scanpy.pp.neighbors`` (on the transformed intensities of ``markers``, no PCA)
    followed by ``scanpy.tl.umap`` (umap-learn's layout). With a fixed ``seed`` the
    coordinates are reproducible (umap-learn then runs single-threaded).

    Parameters
    ----------
    adata
        Events, usually :func:`subsample`'s output (a few thousand to ~10^5 events).
    markers
        Markers to embed on (see :func:`marker_names`; default all stained channels).
    method
        ``"umap"`` (the only one for now).
    n_neighbors, min_dist
        UMAP's parameters (scanpy's defaults).
    seed
        Random state of the neighbour search and the layout.

    Returns
    -------
    AnnData
        ``adata`` with ``.obsm["X_umap"]``, ``.obsp`` neighbour graph and
        ``.uns["immuneprofile"]["markers"]``.
    """
    import scanpy as sc

    if method != "umap":
        raise DiscoveryError(f"unknown embedding method {method!r}; use 'umap'")
    _ensure_neighbors(adata, markers, n_neighbors, seed)
    sc.tl.umap(adata, min_dist=min_dist, random_state=seed)
    _uns(adata)["embedding"] = {"method": method, "n_neighbors": n_neighbors, "min_dist": min_dist, "seed": seed}
    return adata


# --------------------------------------------------------------------------- clustering


def _relabel_by_size(labels: np.ndarray) -> pd.Categorical:
    """Clusters renamed ``"1", "2", ...`` from largest to smallest (ties: first seen)."""
    values, first, counts = np.unique(labels, return_index=True, return_counts=True)
    order = np.lexsort((first, -counts))
    rename = {values[k]: str(i + 1) for i, k in enumerate(order)}
    cats = [str(i + 1) for i in range(len(values))]
    return pd.Categorical([rename[v] for v in labels], categories=cats)


def _leiden(adata: AnnData, markers, resolution: float, n_neighbors: int, seed: int) -> np.ndarray:
    import scanpy as sc

    _ensure_neighbors(adata, markers, n_neighbors, seed)
    sc.tl.leiden(adata, resolution=resolution, random_state=seed, key_added="_leiden", flavor="igraph",
                 n_iterations=-1, directed=False)
    labels = adata.obs.pop("_leiden").astype(str).to_numpy()
    adata.uns.pop("_leiden", None)
    return labels


def _flowsom(adata: AnnData, markers, n_clusters: int, grid: int, seed: int) -> np.ndarray:
    import anndata as ad

    try:
        import flowsom
    except ImportError:
        raise DiscoveryError("method='flowsom' needs the flowsom package (GPL-3.0, an optional extra): "
                             "pip install 'immuneprofile[flowsom]'") from None
    from loguru import logger

    X, names = _marker_matrix(adata, markers)
    _uns(adata)["markers"] = names
    if adata.n_obs < grid * grid:
        raise DiscoveryError(f"{adata.n_obs} events: too few for a {grid}x{grid} self-organising map")
    logger.disable("flowsom")  # its DEBUG progress lines would flood the console
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # mudata's announcement of a default change
        fsom = flowsom.FlowSOM(ad.AnnData(X=X), cols_to_use=list(range(len(names))), n_clusters=n_clusters,
                               xdim=grid, ydim=grid, seed=seed)
    cells = fsom.get_cell_data()
    adata.obs["som_node"] = pd.Categorical(np.asarray(cells.obs["clustering"]).astype(int).astype(str))
    return np.asarray(cells.obs["metaclustering"]).astype(int).astype(str)


def cluster(adata: AnnData, method: str = "leiden", *, markers: Iterable[str] | None = None,
            resolution: float = 0.5, n_clusters: int = 10, grid: int = 10, n_neighbors: int = 15, seed: int = 0,
            key_added: str = "cluster") -> AnnData:
    """Unsupervised clusters of the events on the chosen markers.

    Parameters
    ----------
    adata
        Events, usually :func:`subsample`'s output.
    method
        ``"leiden"``: Leiden community detection (``scanpy.tl.leiden``, igraph) on the
        kNN graph of :func:`embed` (built here if absent). ``"flowsom"``: FlowSOM (the
        ``flowsom`` package of the saeyslab): a ``grid`` x ``grid`` self-organising map,
        its nodes consensus-metaclustered into ``n_clusters`` clusters (the node of each
        event goes to ``.obs["som_node"]``).
    markers
        Markers to cluster on (see :func:`marker_names`; default: those :func:`embed` used,
        else all stained channels).
    resolution
        Leiden resolution (higher: more clusters).
    n_clusters, grid
        FlowSOM metaclusters and map side.
    n_neighbors
        Neighbours of the kNN graph (Leiden).
    seed
        Random state: the same seed on the same events gives the same clusters.
    key_added
        ``.obs`` column for the clusters.

    Returns
    -------
    AnnData
        ``adata`` with ``.obs[key_added]``: categories ``"1", "2", ...`` from the
        largest cluster to the smallest.
    """
    if method == "leiden":
        labels = _leiden(adata, markers, resolution, n_neighbors, seed)
        params = {"resolution": resolution, "n_neighbors": n_neighbors}
    elif method == "flowsom":
        labels = _flowsom(adata, markers, n_clusters, grid, seed)
        params = {"n_clusters": n_clusters, "grid": grid}
    else:
        raise DiscoveryError(f"unknown clustering method {method!r}; use 'leiden' or 'flowsom'")
    adata.obs[key_added] = _relabel_by_size(labels)
    _uns(adata)["clustering"] = {"method": method, "key": key_added, "seed": seed, **params}
    return adata


# --------------------------------------------------------------------------- concordance


def _greedy_union(counts_in: np.ndarray, sizes: np.ndarray, n_pos: int) -> tuple[list[int], int, int]:
    """Clusters whose union best matches a population (greedy F1), as (clusters, true positives, predicted)."""
    chosen: list[int] = []
    tp = pred = 0
    best = 0.0
    remaining = set(range(len(sizes)))
    while remaining:
        cand = np.array(sorted(remaining))
        f1 = 2.0 * (tp + counts_in[cand]) / (pred + sizes[cand] + n_pos)
        k = int(np.argmax(f1))
        if f1[k] <= best:
            break
        best = float(f1[k])
        chosen.append(int(cand[k]))
        tp, pred = tp + int(counts_in[cand[k]]), pred + int(sizes[cand[k]])
        remaining.discard(int(cand[k]))
    return chosen, tp, pred


def concordance(adata: AnnData, populations: Sequence[str] | None = None, *, key: str = "cluster") -> pd.DataFrame:
    """How well clusters reproduce each gated population.

    For each population, the clusters are added greedily: at each step the cluster
    whose addition gives the union the highest F1 against the gate, until no cluster
    raises F1 further. A population that one cluster captures gets that cluster; one
    that several clusters split gets their union; a rare population no cluster
    isolates gets a low F1, reported as it is.

    Parameters
    ----------
    adata
        Clustered events (:func:`cluster`).
    populations
        Gated populations (``.obs`` boolean columns). Default: every gated population
        with events among these events, except those that contain all of them (the
        parent populations the events were drawn from).
    key
        ``.obs`` column of the clusters.

    Returns
    -------
    pandas.DataFrame
        One row per population: ``population, n_gated, clusters`` (the union, e.g.
        ``"2+5"``), ``n_clusters, n_predicted, precision, recall, f1`` (of the union)
        and ``best_cluster, best_cluster_f1`` (the best single cluster).
    """
    if key not in adata.obs:
        raise DiscoveryError(f"AnnData has no .obs[{key!r}]; run immuneprofile.tl.cluster first")
    labels = pd.Categorical(adata.obs[key])
    codes, names = labels.codes, list(labels.categories)
    sizes = np.bincount(codes, minlength=len(names))
    pops = list(populations) if populations is not None else [
        c for c in _population_columns(adata) if 0 < adata.obs[c].sum() < adata.n_obs]
    unknown = [p for p in pops if p not in _population_columns(adata)]
    if unknown:
        raise DiscoveryError(f"population(s) {unknown} are not gated populations of this AnnData; "
                             f"it has {_population_columns(adata)}")
    rows = []
    for pop in pops:
        gate = adata.obs[pop].to_numpy(dtype=bool)
        n_pos = int(gate.sum())
        counts_in = np.bincount(codes[gate], minlength=len(names))
        chosen, tp, pred = _greedy_union(counts_in, sizes, n_pos)
        single = 2.0 * counts_in / (sizes + n_pos) if n_pos else np.zeros(len(names))
        best = int(np.argmax(single))
        rows.append({
            "population": pop, "n_gated": n_pos,
            "clusters": "+".join(names[c] for c in sorted(chosen)),
            "n_clusters": len(chosen), "n_predicted": pred,
            "precision": tp / pred if pred else float("nan"),
            "recall": tp / n_pos if n_pos else float("nan"),
            "f1": 2.0 * tp / (pred + n_pos) if (pred + n_pos) else float("nan"),
            "best_cluster": names[best], "best_cluster_f1": float(single[best]),
        })
    return pd.DataFrame(rows, columns=["population", "n_gated", "clusters", "n_clusters", "n_predicted",
                                       "precision", "recall", "f1", "best_cluster", "best_cluster_f1"])


def cluster_table(adata: AnnData, *, key: str = "cluster", min_share: float = 0.9) -> pd.DataFrame:
    """One row per cluster: its size, its median marker intensities and the gate that names it.

    Parameters
    ----------
    adata
        Clustered events (:func:`cluster`).
    key
        ``.obs`` column of the clusters.
    min_share
        A cluster is named after the smallest gated population holding at least this
        share of its events (``"mixed"`` if none does); among populations of equal size,
        the last (deepest) in the template.

    Returns
    -------
    pandas.DataFrame
        ``cluster, n_events, pct_events, gate, gate_share`` and ``median_<marker>`` (transformed
        intensity) for the markers clustered on.
    """
    if key not in adata.obs:
        raise DiscoveryError(f"AnnData has no .obs[{key!r}]; run immuneprofile.tl.cluster first")
    labels = adata.obs[key]
    X, markers = _marker_matrix(adata, None)
    pops = _population_columns(adata)
    gated = adata.obs[pops].to_numpy(dtype=bool) if pops else np.zeros((adata.n_obs, 0), bool)
    pop_sizes = gated.sum(axis=0)
    rows = []
    for name in labels.cat.categories:
        m = (labels == name).to_numpy()
        share = gated[m].mean(axis=0) if m.any() else np.zeros(len(pops))
        ok = np.flatnonzero(share >= min_share)
        # the smallest such population; among equals (a parent and its only child), the deeper one
        pick = ok[np.lexsort((-ok, pop_sizes[ok]))[0]] if ok.size else None
        row = {"cluster": str(name), "n_events": int(m.sum()), "pct_events": 100.0 * m.mean(),
               "gate": pops[pick] if pick is not None else "mixed",
               "gate_share": float(share[pick]) if pick is not None else float(share.max(initial=0.0))}
        row.update((f"median_{mk}", float(np.median(X[m, j])) if m.any() else float("nan"))
                   for j, mk in enumerate(markers))
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- abundance


def abundance(adata: AnnData, by: Sequence[str] = ("patient", "week"), *, key: str = "cluster",
              sample_key: str = "sample_id") -> pd.DataFrame:
    """Cluster frequencies per sample, shaped like the population table.

    A cluster becomes a readout like a gate: the table feeds
    :func:`immuneprofile.study.clinical.join_clinical` (with ``samples=None``, since
    it carries ``patient`` and ``week``), :func:`~immuneprofile.study.clinical.subset_changes`
    and the association functions. Frequencies are among the events analysed (after
    :func:`subsample`: among the drawn events of the parent population, an unbiased
    estimate of the frequency among all of them).

    Parameters
    ----------
    adata
        Clustered events (:func:`cluster`).
    by
        ``.obs`` columns carried to every row (constant within a sample), e.g. ``patient`` and
        ``week`` from :func:`add_metadata`.
    key
        ``.obs`` column of the clusters.
    sample_key
        ``.obs`` column identifying the sample.

    Returns
    -------
    pandas.DataFrame
        ``sample_id, *by, population`` (``"cluster 3"``), ``parent`` (the population the
        events were drawn from), ``count, parent_count, pct_parent`` (percent); every
        sample has a row for every cluster (0 if absent).
    """
    by = [b for b in by if b != sample_key]
    for col in (key, sample_key, *by):
        if col not in adata.obs:
            hint = " (add patient/week with immuneprofile.tl.add_metadata)" if col in by else ""
            raise DiscoveryError(f"AnnData has no .obs[{col!r}]{hint}")
    obs = adata.obs[[sample_key, *by, key]].copy()
    obs[sample_key] = obs[sample_key].astype(str)
    meta = obs.drop_duplicates(sample_key).set_index(sample_key)[by]
    meta = meta.astype({c: str for c in by if isinstance(meta[c].dtype, pd.CategoricalDtype)})  # plain data out
    inconsistent = [b for b in by if obs.groupby(sample_key, observed=True)[b].nunique().max() > 1]
    if inconsistent:
        raise DiscoveryError(f".obs column(s) {inconsistent} vary within a sample; 'by' must describe samples")
    counts = pd.crosstab(obs[sample_key], obs[key].astype(str))
    clusters = [str(c) for c in adata.obs[key].cat.categories] if hasattr(adata.obs[key], "cat") else list(counts)
    counts = counts.reindex(columns=clusters, fill_value=0)
    table = counts.stack().rename("count").reset_index()
    table.columns = [sample_key, "cluster", "count"]
    table["parent_count"] = table[sample_key].map(counts.sum(axis=1))
    table["pct_parent"] = 100.0 * table["count"] / table["parent_count"]
    table["population"] = "cluster " + table["cluster"]
    table["parent"] = _uns(adata).get("on", "all events")
    table = table.join(meta, on=sample_key)
    return table[[sample_key, *by, "population", "parent", "count", "parent_count", "pct_parent"]].rename(
        columns={sample_key: "sample_id"})
