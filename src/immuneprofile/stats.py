"""Population statistics and AnnData export.

The population table is tidy: one row per sample x population, with counts,
percentages and the median fluorescence (compensated, linear scale) of every
marker the template gates on.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd

from immuneprofile.engine.gating import GatingResult
from immuneprofile.exceptions import MarkerError

__all__ = ["population_table", "thresholds_table", "to_anndata", "write_tables", "TABLE_COLUMNS"]

TABLE_COLUMNS = ["sample_id", "population", "parent", "count", "parent_count", "pct_parent", "pct_total"]


def _pct(num: int, den: int) -> float:
    return 100.0 * num / den if den else float("nan")


class _Medians:
    """Medians of one sample's populations; a (population, channel) that several templates share is computed once.

    Each call is one compiled pass over the population's events for all the
    channels not yet known (:func:`immuneprofile.engine._kernels.kernels_for`).
    """

    def __init__(self, data) -> None:
        from immuneprofile.engine._kernels import kernels_for

        ev = data.events
        if not (isinstance(ev, np.ndarray) and ev.dtype == np.float64 and ev.flags.f_contiguous):
            ev = np.asfortranarray(ev, dtype=np.float64)
        self.data, self.ev, self.K = data, ev, kernels_for(data.n_events)
        self.buf, self.members = np.empty(data.n_events), np.empty(data.n_events, dtype=np.int64)
        self.hist = np.zeros(1 << 16, dtype=np.int64)
        self.known: dict[tuple[int, int], float] = {}

    def __call__(self, bits: np.ndarray, chans: list[int]) -> list[float]:
        todo = [c for c in dict.fromkeys(chans) if (id(bits), c) not in self.known]
        if todo:
            out = np.empty(len(todo))
            self.K.medians(self.ev, np.asarray(todo, dtype=np.int64), bits, self.members, self.buf, self.hist, out)
            self.known.update(((id(bits), c), float(v)) for c, v in zip(todo, out))
        return [self.known[id(bits), c] for c in chans]


def population_table(results: Iterable[GatingResult], *, medians: bool = True) -> pd.DataFrame:
    """Tidy statistics for every population of every sample.

    Parameters
    ----------
    results
        Gating results (from :func:`immuneprofile.gate_sample` or :func:`immuneprofile.gate_files`).
    medians
        Add ``median_<marker>`` columns: the median compensated (untransformed)
        intensity of each marker the template gates on, within the population
        (``NaN`` for an empty population).

    Returns
    -------
    pandas.DataFrame
        Columns ``sample_id, template, population, parent, count, parent_count,
        pct_parent, pct_total``, then the medians. ``parent`` is ``"root"`` for
        top-level populations; percentages are in percent (0–100).
    """
    rows = []
    cache = None
    for res in results:
        t = res.template
        chans: dict[str, int] = {}
        if medians and res.data is not None:
            for m in t.markers:
                try:
                    chans[m] = res.data.find_channel(m)
                except MarkerError:
                    continue
        if chans and (cache is None or cache.data is not res.data):
            cache = _Medians(res.data)
        for pop in t.populations:
            n = res.count(pop.name)
            pc = res.parent_count(pop.name)
            row = {
                "sample_id": res.sample_id,
                "template": t.name,
                "population": pop.name,
                "parent": pop.parent or "root",
                "count": n,
                "parent_count": pc,
                "pct_parent": _pct(n, pc),
                "pct_total": _pct(n, res.n_events),
            }
            if chans:
                row.update(zip((f"median_{m}" for m in chans), cache(res.bits[pop.name], list(chans.values()))))
            rows.append(row)
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["sample_id", "template", *TABLE_COLUMNS[1:]])
    return df


def thresholds_table(results: Iterable[GatingResult]) -> pd.DataFrame:
    """Every threshold used per sample (fixed or fitted), for audit."""
    rows = [
        {
            "sample_id": r.sample_id,
            "template": r.template.name,
            "marker": f.marker,
            "cut": f.cut,
            "value": f.value,
            "method": f.method,
            "fitted_on": f.fitted_on,
            "n_events": f.n_events,
            "fallback": f.fallback,
            "note": f.note,
        }
        for r in results
        for f in r.thresholds
    ]
    return pd.DataFrame(rows, columns=["sample_id", "template", "marker", "cut", "value", "method",
                                       "fitted_on", "n_events", "fallback", "note"])


def write_tables(out_dir, table: pd.DataFrame, thresholds: pd.DataFrame | None,
                 errors: dict[str, str]) -> dict[str, object]:
    """Write a run's tables into ``out_dir``: what ``gate`` and ``study`` both produce.

    ``populations.csv`` and ``.parquet`` and ``thresholds.csv`` (if any sample gated),
    ``errors.csv`` (if any file failed; an older one is removed otherwise, so the
    folder describes this run). Each file is written atomically (a temporary file,
    then a rename). Returns ``{name: path}`` of the files written.
    """
    from pathlib import Path

    from immuneprofile._atomic import atomic_write

    out = Path(out_dir)
    files: dict[str, object] = {}
    if not table.empty:
        files["populations"] = atomic_write(out / "populations.csv", lambda p: table.to_csv(p, index=False))
        atomic_write(out / "populations.parquet", lambda p: table.to_parquet(p, index=False))
        if thresholds is not None:
            files["thresholds"] = atomic_write(out / "thresholds.csv", lambda p: thresholds.to_csv(p, index=False))
    if errors:
        frame = pd.DataFrame({"file": list(errors), "error": list(errors.values())})
        files["errors"] = atomic_write(out / "errors.csv", lambda p: frame.to_csv(p, index=False))
    elif (out / "errors.csv").exists():
        (out / "errors.csv").unlink()
    return files


def to_anndata(results: Sequence[GatingResult] | GatingResult):
    """Events as an :class:`anndata.AnnData` for scanpy users.

    ``.X`` holds transformed intensities (float32): each channel with the
    transform the template gives its marker (fluorescence: the template's
    default, logicle unless changed; scatter: as the template says, raw by
    default). ``.var`` has ``channel`` and ``marker``; ``.obs`` has ``sample_id``
    and one boolean column per population. Samples are concatenated; they must
    share their channel names.
    """
    import anndata as ad

    from immuneprofile.engine.transforms import exact_transform

    if isinstance(results, GatingResult):
        results = [results]
    if not results:
        raise ValueError("to_anndata needs at least one gating result")
    adatas = []
    for res in results:
        if res.data is None:
            raise ValueError(f"{res.path}: result carries no event data (gated in a worker process)")
        d = res.data
        cols = []
        for j, ch in enumerate(d.channels):
            scatter = j in d.scatter
            spec = res.template.transform_for(ch if scatter else d.marker_label(j), scatter)
            col = d.column(j)
            if spec is not None:
                col = np.asarray(exact_transform(spec).apply(col.reshape(-1, 1))).reshape(-1)
            cols.append(col.astype(np.float32))
        X = np.column_stack(cols)
        obs = pd.DataFrame({"sample_id": pd.Categorical([res.sample_id] * res.n_events)})
        for name in res.indices:
            obs[name] = res.mask(name)
        obs.index = [f"{res.sample_id}:{i}" for i in range(res.n_events)]
        var = pd.DataFrame({"channel": d.channels, "marker": [d.marker_label(j) for j in range(len(d.channels))]},
                           index=[d.marker_label(j) for j in range(len(d.channels))])
        var.index = pd.Index(var.index).astype(str)
        adatas.append(ad.AnnData(X=X, obs=obs, var=var))
    if len(adatas) == 1:
        return adatas[0]
    first = list(adatas[0].var["channel"])
    for a, r in zip(adatas, results):
        if list(a.var["channel"]) != first:
            raise ValueError(f"{r.path}: channels differ from {results[0].path}; export samples of one panel together")
    out = ad.concat(adatas, join="outer", merge="first")
    for c in out.obs.columns:
        if c != "sample_id":
            out.obs[c] = out.obs[c].fillna(False).astype(bool)
    return out
