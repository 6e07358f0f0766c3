"""Population statistics and AnnData export.

The population table is tidy: one row per sample x population, with counts,
percentages and the median fluorescence (compensated, linear scale) of every
marker the template gates on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from concurrent.futures import Executor
from contextlib import nullcontext

import numpy as np
import pandas as pd

from immuneprofile.engine.gating import GatingResult
from immuneprofile.exceptions import MarkerError, TemplateError

__all__ = ["population_table", "thresholds_table", "to_anndata", "write_tables", "clear_outputs", "RUN_TABLES",
           "TABLE_COLUMNS", "frequency_of", "readout_table", "READOUT_COLUMNS"]

TABLE_COLUMNS = ["sample_id", "population", "parent", "count", "parent_count", "pct_parent", "pct_total"]


def _pct(num: int, den: int) -> float:
    return 100.0 * num / den if den else float("nan")


#: Populations from which their medians are split between threads (a few milliseconds of work).
_THREADED_MEDIANS_FROM = 1 << 14


class _Medians:
    """Medians of one sample's populations; a (population, channel) that several templates share is computed once.

    Each population's members are listed once, then its channels not yet known
    are split between the threads of ``pool`` (the compiled kernels release the
    GIL; :func:`immuneprofile.engine._kernels.kernels_for`), each with its own
    scratch; populations under :data:`_THREADED_MEDIANS_FROM` events use one thread.
    """

    def __init__(self, data, pool: Executor | None = None, threads: int = 1) -> None:
        from immuneprofile.engine._kernels import kernels_for

        ev = data.events
        if not (isinstance(ev, np.ndarray) and ev.dtype == np.float64 and ev.flags.f_contiguous):
            ev = np.asfortranarray(ev, dtype=np.float64)
        n = data.n_events
        self.data, self.ev, self.K = data, ev, kernels_for(n)
        self.pool: Executor | None = pool if self.K.compiled and threads > 1 else None
        self.threads = threads if self.pool is not None else 1
        self.members = np.empty(n, dtype=np.int64)
        self.scratch = [(np.empty(n), np.zeros(1 << 16, dtype=np.int64)) for _ in range(self.threads)]
        self.known: dict[tuple[int, int], float] = {}

    def _some(self, k: int, chans: list[int], m: int) -> list[float]:
        """Medians of ``chans`` with scratch ``k``."""
        buf, hist = self.scratch[k]
        return [self.K.median_of(self.ev[:, c], self.members, m, buf, hist) for c in chans]

    def __call__(self, bits: np.ndarray, chans: list[int]) -> list[float]:
        todo = [c for c in dict.fromkeys(chans) if (id(bits), c) not in self.known]
        if todo:
            m = self.K.members(bits, self.data.n_events, self.members)
            split = self.threads if self.pool is not None and m >= _THREADED_MEDIANS_FROM else 1
            shares = [todo[k::split] for k in range(split)]  # thread k: every split-th channel from the k-th
            if self.pool is not None and split > 1:
                parts = list(self.pool.map(self._some, range(split), shares, [m] * split))
            else:
                parts = [self._some(0, todo, m)]
            for share, part in zip(shares, parts):
                self.known.update(((id(bits), c), v) for c, v in zip(share, part))
        return [self.known[id(bits), c] for c in chans]


def population_table(results: Iterable[GatingResult], *, medians: bool = True, threads: int = 0) -> pd.DataFrame:
    """Tidy statistics for every population of every sample.

    Parameters
    ----------
    results
        Gating results (from :func:`immuneprofile.gate_sample` or :func:`immuneprofile.gate_files`).
    medians
        Add ``median_<marker>`` columns: the median compensated (untransformed)
        intensity of each marker the template gates on, within the population
        (``NaN`` for an empty population).
    threads
        Threads for the medians (``0``: all cores; ``1``: none; populations under
        16,384 events always use one). The table does not depend on it.

    Returns
    -------
    pandas.DataFrame
        Columns ``sample_id, template, population, parent, count, parent_count,
        pct_parent, pct_total``, then the medians. ``parent`` is ``"root"`` for
        top-level populations; percentages are in percent (0–100).
    """
    import os
    from concurrent.futures import ThreadPoolExecutor

    threads = threads if threads > 0 else (os.cpu_count() or 1)
    rows: list[dict] = []
    cache = None
    with ThreadPoolExecutor(threads) if medians and threads > 1 else nullcontext() as pool:
        for res in results:
            chans = _median_channels(res) if medians else {}
            if chans and (cache is None or cache.data is not res.data):
                cache = _Medians(res.data, pool, threads)
            rows.extend(_rows(res, chans, cache))
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=["sample_id", "template", *TABLE_COLUMNS[1:]])
    return df


def _median_channels(res: GatingResult) -> dict[str, int]:
    """``{marker: channel index}`` of the template's markers found in the result's data (none without data)."""
    chans: dict[str, int] = {}
    if res.data is not None:
        for m in res.template.markers:
            try:
                chans[m] = res.data.find_channel(m)
            except MarkerError:
                continue
    return chans


def _rows(res: GatingResult, chans: dict[str, int], cache: _Medians | None) -> list[dict]:
    """One sample's rows of :func:`population_table`."""
    t = res.template
    rows = []
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
        if chans and cache is not None:
            row.update(zip((f"median_{m}" for m in chans), cache(res.bits[pop.name], list(chans.values()))))
        rows.append(row)
    return rows


def _counts(table: pd.DataFrame) -> pd.DataFrame:
    """``count`` and ``parent`` indexed by ``(sample_id, template, population)``."""
    if "template" not in table.columns:
        table = table.assign(template="")
    return table.set_index(["sample_id", "template", "population"])[["count", "parent"]]


def _ancestors(counts: pd.DataFrame, key: tuple[str, str], population: str) -> list[str]:
    out, p = [], population
    while (*key, p) in counts.index:
        p = counts.loc[(*key, p), "parent"]
        if p in (None, "root") or (isinstance(p, float) and p != p):
            break
        out.append(p)
    return out


def frequency_of(table: pd.DataFrame, population: str, ancestor: str) -> pd.DataFrame:
    """FlowJo's "Freq. of": ``population`` as a percentage of any of its named ancestors, per sample.

    Parameters
    ----------
    table
        A population table (:func:`population_table`), one or more samples.
    population, ancestor
        Population names; ``ancestor`` must be on ``population``'s path to the root in every
        sample's template.

    Returns
    -------
    pandas.DataFrame
        ``sample_id, template, population, of, count, of_count, pct`` (pct = 100 count / of_count,
        NaN when the ancestor is empty).

    Raises
    ------
    TemplateError
        When ``population`` is missing from a sample or ``ancestor`` is not its ancestor there.
    """
    counts = _counts(table)
    rows = []
    for key in counts.index.droplevel("population").unique():
        if (*key, population) not in counts.index:
            raise TemplateError(f"sample {key[0]!r}: no population {population!r} in its table")
        if ancestor not in _ancestors(counts, key, population):
            raise TemplateError(f"sample {key[0]!r}: {ancestor!r} is not an ancestor of {population!r} "
                                f"(its ancestors: {_ancestors(counts, key, population)})")
        n, d = int(counts.loc[(*key, population), "count"]), int(counts.loc[(*key, ancestor), "count"])
        rows.append({"sample_id": key[0], "template": key[1], "population": population, "of": ancestor,
                     "count": n, "of_count": d, "pct": _pct(n, d)})
    return pd.DataFrame(rows, columns=["sample_id", "template", "population", "of", "count", "of_count", "pct"])


#: Columns of :func:`readout_table` (``per_uL`` only when cell counts are given).
READOUT_COLUMNS = ["sample_id", "template", "readout", "population", "of", "count", "of_count", "pct"]


def readout_table(results_or_table, templates, *, cell_counts: pd.DataFrame | None = None) -> pd.DataFrame:
    """The readouts the templates declare (``readouts:``), one row per sample x readout.

    Parameters
    ----------
    results_or_table
        Gating results or a population table (:func:`population_table`, with ``template``).
    templates
        A :class:`~immuneprofile.Template` or several (a list, or a mapping whose values are
        templates); a table's rows are matched to them by the ``template`` column.
    cell_counts
        Optional sample sheet with ``sample_id`` and the per-µL cell count column a template
        names in ``absolute: {population, column}`` (e.g. ``lymphocytes_per_uL``): adds
        ``per_uL`` = column x count / count of that population (dual-platform absolute count;
        NaN where the sheet gives no count).

    Returns
    -------
    pandas.DataFrame
        :data:`READOUT_COLUMNS` (+ ``per_uL``); pct = 100 count / of_count.
    """
    from immuneprofile.template.model import Template

    table = results_or_table if isinstance(results_or_table, pd.DataFrame) else \
        population_table(list(results_or_table), medians=False)
    tmpls = [templates] if isinstance(templates, Template) else \
        list(templates.values() if isinstance(templates, dict) else templates)
    parts = []
    for t in tmpls:
        sub = table[table["template"] == t.name] if "template" in table.columns else table
        if sub.empty:
            continue
        for r in t.readouts.values():
            f = frequency_of(sub, r.population, r.of).assign(readout=r.name)
            if cell_counts is not None:
                f["per_uL"] = _per_ul(sub, f, t, cell_counts)
            parts.append(f)
    cols = READOUT_COLUMNS + (["per_uL"] if cell_counts is not None else [])
    if not parts:
        return pd.DataFrame(columns=cols)
    return pd.concat(parts, ignore_index=True)[cols]


def _per_ul(table: pd.DataFrame, freq: pd.DataFrame, template, sheet: pd.DataFrame) -> np.ndarray:
    """Absolute counts per µL of the rows of ``freq`` (NaN without a basis or a count)."""
    basis = template.absolute
    if basis is None or basis.column not in sheet.columns:
        return np.full(len(freq), np.nan)
    per_ul = pd.to_numeric(sheet.set_index("sample_id")[basis.column], errors="coerce")
    base = table[table["population"] == basis.population].set_index("sample_id")["count"]
    ids = freq["sample_id"]
    den = base.reindex(ids).to_numpy(dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return per_ul.reindex(ids).to_numpy(dtype=float) * freq["count"].to_numpy() / np.where(den > 0, den, np.nan)


def thresholds_table(results: Iterable[GatingResult]) -> pd.DataFrame:
    """Every threshold used per sample (fixed or fitted), for audit.

    Data-driven transforms and 2-D gates (:mod:`immuneprofile.engine.fit2d`) follow
    as rows of their own: ``marker`` is the marker (logicle) or the population
    (gate), ``cut`` is ``"W"`` or the gate's kind, ``value`` the fitted ``W`` (NaN
    for gates), ``method`` ``"logicle-auto"``/``"singlet"``/``"cluster"``, and
    ``note`` the fitted parameters as JSON (vertices; center, covariance and
    distance_square), to rebuild the gate. Acquisition QC (a template's ``qc:``
    step) is a row ``qc_pass``/``qc``/``acquisition-qc`` whose ``value`` is the
    number of events removed (the time segments and margins in ``note``).
    """
    results = list(results)
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
    ] + [_fit_row(r, f) for r in results for f in r.fits]
    return pd.DataFrame(rows, columns=["sample_id", "template", "marker", "cut", "value", "method",
                                       "fitted_on", "n_events", "fallback", "note"])


def _fit_row(res: GatingResult, fit) -> dict[str, object]:
    """A fitted transform or 2-D gate as a row of the thresholds table."""
    row = fit.row()
    logicle = fit.kind == "logicle"
    parent = None if logicle else res.template[fit.name].parent
    value = row["W"] if logicle else fit.params["removed"] if fit.kind == "qc" else float("nan")
    method = {"logicle": "logicle-auto", "qc": "acquisition-qc"}.get(fit.kind, fit.kind)
    return {"sample_id": res.sample_id, "template": res.template.name, "marker": fit.name,
            "cut": "W" if logicle else fit.kind, "value": value, "method": method,
            "fitted_on": "root" if parent is None else parent, "n_events": fit.n_events,
            "fallback": False, "note": "; ".join(x for x in (row["params"], fit.note) if x)}


#: The tables :func:`write_tables` writes; it removes those an earlier run left in the folder.
RUN_TABLES = ("populations.csv", "populations.parquet", "thresholds.csv", "errors.csv")


def clear_outputs(out_dir) -> list[str]:
    """Remove the outputs an earlier ``gate`` run left in ``out_dir`` (tables and ``events*.h5ad``).

    Returns the names removed.
    """
    from pathlib import Path

    out = Path(out_dir)
    stale = [out / n for n in RUN_TABLES] + sorted(out.glob("events*.h5ad"))
    removed = [p.name for p in stale if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return removed


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
    for name in RUN_TABLES:  # a run's outputs are that run's: no table left from an earlier run
        (out / name).unlink(missing_ok=True)
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


def _column_spec(template, label: str, scatter: bool, col: np.ndarray):
    """The transform spec of a channel for AnnData; a data-driven logicle the template did not gate on
    (``W: auto``) is fitted on the column."""
    from immuneprofile.engine.fit2d import fitted_logicle
    from immuneprofile.engine.transforms import is_auto

    spec = template.transform_for(label, scatter)
    return fitted_logicle(col, spec)[0] if is_auto(spec) else spec


def _sample_anndata(res: GatingResult):
    """One sample's events: transformed intensities, channel/marker names, a boolean column per population."""
    import anndata as ad

    from immuneprofile.engine.transforms import exact_transform

    if res.data is None:
        raise ValueError(f"{res.path}: result carries no event data (gated in a worker process)")
    d = res.data
    cols = []
    for j, ch in enumerate(d.channels):
        scatter = j in d.scatter
        col = d.column(j)
        spec = _column_spec(res.template, ch if scatter else d.marker_label(j), scatter, col)
        if spec is not None:
            col = np.asarray(exact_transform(spec).apply(col.reshape(-1, 1))).reshape(-1)
        cols.append(col.astype(np.float32))
    obs = pd.DataFrame({"sample_id": pd.Categorical([res.sample_id] * res.n_events)})
    for name in res.indices:
        obs[name] = res.mask(name)
    obs.index = [f"{res.sample_id}:{i}" for i in range(res.n_events)]
    labels = [d.marker_label(j) for j in range(len(d.channels))]
    var = pd.DataFrame({"channel": d.channels, "marker": labels}, index=pd.Index(labels).astype(str))
    return ad.AnnData(X=np.column_stack(cols), obs=obs, var=var)


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

    if isinstance(results, GatingResult):
        results = [results]
    if not results:
        raise ValueError("to_anndata needs at least one gating result")
    adatas = [_sample_anndata(res) for res in results]
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
