"""Data-driven transforms and 2-D gates, fitted on the data before gating.

A template may leave three things to the data, so that it travels between
instruments (OpenCyto's data-driven templates):

* a logicle width ``W: auto`` (:func:`estimate_logicle_width`, as OpenCyto's
  ``estimateLogicle``: ``W = (M - log10(T / |r|)) / 2`` with ``r`` the 5 %
  quantile of the channel's negative compensated values, clamped to ``[0, M/2]``);
* a ``singlet`` gate (:func:`fit_singlet`, as OpenCyto's ``singletGate``: a band
  of ``k`` robust SDs around the robust linear fit of FSC-H on FSC-A);
* a ``cluster`` gate (:func:`fit_cluster`, as ``flowClust``: the Gaussian-mixture
  component nearest a stated target, as an ellipse at a chi-square quantile, gated as a
  16-vertex polygon on it, :func:`ellipse_polygon`).

:func:`fit_template` fits them, per sample or with values given for the batch
(``scope: batch``, pooled by :func:`fit_batch`), and returns an ordinary
template: fitted logicles are ordinary logicle transforms, fitted gates ordinary
polygons, so the engine's exactness holds and
:func:`~immuneprofile.interop.flowkit.to_gating_strategy` converts them as any
other gate. Every fitted value is returned as a :class:`Fit` (the ``fits.csv``
table, :func:`immuneprofile.stats.fits_table`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from immuneprofile.engine.thresholds import MAX_FIT_EVENTS
from immuneprofile.engine.transforms import is_auto
from immuneprofile.exceptions import GatingError
from immuneprofile.template.model import Dim, FitGate, PolygonGate, Population, Template, with_dims

#: A mixture (cluster) or a line (singlet) is fitted on at most this many of the events it is given
#: (every k-th): a handful of parameters, well determined by a few thousand events.
MAX_MODEL_EVENTS = 5_000

__all__ = ["Fit", "ellipse_polygon", "estimate_logicle_width", "fitted_logicle", "fit_singlet", "fit_cluster", "fit_template", "fit_batch",
           "needs_fitting"]


@dataclass
class Fit:
    """One fitted transform or gate of one sample (or of a batch).

    Attributes
    ----------
    kind
        ``"logicle"``, ``"singlet"``, ``"cluster"`` or ``"qc"`` (acquisition QC).
    name
        The marker (logicle) or the population (gates; ``qc_pass`` for QC).
    dims
        The markers/channels of the gate (the marker for a logicle).
    params
        ``{"T", "W", "M", "A"}`` for a logicle; ``{"vertices"}`` for a singlet
        polygon; ``{"center", "covariance", "distance_square"}`` for a cluster ellipse.
    n_events
        Events the fit read.
    scope
        ``"sample"`` or ``"batch"``.
    note
        What else the fit reports (e.g. how many files a batch fit pooled).
    """

    kind: str
    name: str
    dims: tuple[str, ...]
    params: dict[str, Any]
    n_events: int
    scope: str = "sample"
    note: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return ("logicle" if self.kind == "logicle" else "gate", self.name)

    def row(self) -> dict[str, Any]:
        """One row of the fits table."""
        return {"kind": self.kind, "name": self.name, "dims": " vs ".join(self.dims),
                "W": self.params.get("W", float("nan")), "params": json.dumps(self.params),
                "n_events": self.n_events, "scope": self.scope, "note": self.note}


# --------------------------------------------------------------------------- the fits


def estimate_logicle_width(values: np.ndarray, T: float, M: float, q: float = 0.05) -> tuple[float, int]:
    """Logicle ``W`` from the spread of the negative values (OpenCyto's ``estimateLogicle``).

    Parameters
    ----------
    values
        Compensated (untransformed) values of one channel.
    T, M
        The logicle's top of scale and decades.
    q
        Quantile of the negative values taken as their reach ``r``.

    Returns
    -------
    W, n_negative
        ``W = (M - log10(T / |r|)) / 2`` clamped to ``[0, M / 2]`` and rounded to 4
        decimals (so that it can be written back into a template); ``0`` without
        negative values.
    """
    v = np.asarray(values, dtype=float)
    neg = v[np.isfinite(v) & (v < 0)]
    if neg.size == 0:
        return 0.0, 0
    r = abs(float(np.quantile(neg, q)))
    w = (M - np.log10(T / r)) / 2 if r > 0 else 0.0
    return round(float(np.clip(w, 0.0, M / 2)), 4), int(neg.size)


def fit_singlet(x: np.ndarray, y: np.ndarray, k: float = 4.0) -> list[tuple[float, float]]:
    """Singlet band (OpenCyto's ``singletGate``): a polygon around the robust line of ``y`` on ``x``.

    The line ``y = a + b x`` is fitted by Tukey's biweight (statsmodels RLM,
    started from Huber's fit, so that doublets and debris do not pull it); the band
    keeps the events whose ratio ``y / (a + b x)`` is within ``k`` robust SDs
    (1.4826 MAD) of its median, over the x range of the events (plus 5 %). The line and
    the band's width are fitted on at most :data:`MAX_MODEL_EVENTS` of the events (every k-th).

    Returns
    -------
    list of (x, y)
        The four vertices of the band.
    """
    # the narrow modules, not ``statsmodels.api`` (which also imports its formula, time-series
    # and graphics stacks): the same RLM, norms and add_constant
    from statsmodels.robust.norms import HuberT, TukeyBiweight
    from statsmodels.robust.robust_linear_model import RLM
    from statsmodels.tools.tools import add_constant

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    step = max(1, -(-x.size // MAX_MODEL_EVENTS))  # the line on a systematic sample; the band's range on all
    span = float(x.max() - x.min()) if x.size else 0.0
    lo_x, hi_x = (float(x.min()) - 0.05 * span, float(x.max()) + 0.05 * span) if x.size else (0.0, 0.0)
    x, y = x[::step], y[::step]
    if x.size < 20:
        raise ValueError(f"only {x.size} events to fit a singlet band on")
    X = add_constant(x / x.std())
    start = RLM(y, X, M=HuberT()).fit().params
    a, b = RLM(y, X, M=TukeyBiweight()).fit(start_params=start).params
    b /= x.std()
    yhat = a + b * x
    ratio = y[yhat > 0] / yhat[yhat > 0]
    med = float(np.median(ratio))
    sd = 1.4826 * float(np.median(np.abs(ratio - med)))
    lo, hi = med - k * sd, med + k * sd
    x0, x1 = lo_x, hi_x
    line = lambda v: a + b * v  # noqa: E731
    verts = [(x0, line(x0) * lo), (x1, line(x1) * lo), (x1, line(x1) * hi), (x0, line(x0) * hi)]
    return [(round(float(u), 6), round(float(v), 6)) for u, v in verts]


def fit_cluster(x: np.ndarray, y: np.ndarray, target: tuple[float, float], *, units: str = "quantile",
                components: int = 4, q: float = 0.95) -> tuple[list[float], list[list[float]], float]:
    """The density cluster nearest ``target`` (as ``flowClust``): an ellipse of a Gaussian-mixture component.

    A ``components``-component mixture (scikit-learn, full covariances, fixed seed)
    is fitted on the events scaled by their per-axis medians; the component whose
    mean is nearest ``target`` (in those units) is the cluster; its ellipse holds a
    ``q`` chi-square quantile of it.

    Parameters
    ----------
    target
        Where the cluster is: per axis a quantile of the events (``units="quantile"``,
        e.g. ``[0.4, 0.3]``; unchanged by an instrument's gains) or a value (``"data"``).

    Returns
    -------
    center, covariance, distance_square
    """
    from sklearn.mixture import GaussianMixture

    pts = np.column_stack([np.asarray(x, dtype=float), np.asarray(y, dtype=float)])
    pts = pts[np.isfinite(pts).all(axis=1)]
    if pts.shape[0] < 20 * components:
        raise ValueError(f"only {pts.shape[0]} events to fit a {components}-component mixture on")
    pts = pts[:: max(1, -(-pts.shape[0] // MAX_MODEL_EVENTS))]  # a systematic sample: deterministic
    scale = np.median(np.abs(pts), axis=0)
    scale[scale == 0] = 1.0
    z = pts / scale
    t = np.array([np.quantile(pts[:, i], target[i]) for i in range(2)]) if units == "quantile" \
        else np.asarray(target, dtype=float)
    gm = GaussianMixture(components, covariance_type="full", random_state=0).fit(z)
    j = int(np.argmin(np.linalg.norm(gm.means_ - t / scale, axis=1)))
    center = gm.means_[j] * scale
    cov = gm.covariances_[j] * np.outer(scale, scale)
    return [float(c) for c in center], [[float(v) for v in row] for row in cov], chi2_ppf_2df(q)


def chi2_ppf_2df(q: float) -> float:
    """The ``q`` quantile of the chi-square distribution with 2 degrees of freedom.

    ``scipy.stats.chi2.ppf(q, 2)`` without importing :mod:`scipy.stats` (0.5 s): the same
    computation, ``2 * gammaincinv(df / 2, q)``, from :mod:`scipy.special`.
    """
    from scipy.special import gammaincinv

    return float(2 * gammaincinv(1.0, q))


# --------------------------------------------------------------------------- a template's fits


def needs_fitting(template: Template) -> bool:
    """Whether a template has data-driven transforms or 2-D gates left to fit."""
    return bool(template.qc) or any(isinstance(p.gate, FitGate) or any(is_auto(d.transform) for d in p.dims)
                                    for p in template.populations)


def _auto_specs(template: Template) -> dict[str, dict[str, Any]]:
    """``{marker: data-driven logicle spec}`` of every dim still to fit (first use wins)."""
    out: dict[str, dict[str, Any]] = {}
    for p in template.populations:
        for d in p.dims:
            if d.transform is not None and is_auto(d.transform):
                out.setdefault(d.marker, dict(d.transform))
    return out


def fitted_logicle(values: np.ndarray, spec: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
    """The ordinary logicle spec a data-driven one (``W: auto``) becomes on ``values``, and the negatives read."""
    w, n_neg = estimate_logicle_width(values, spec["T"], spec["M"], spec["q"])
    return {"type": "logicle", "T": spec["T"], "W": w, "M": spec["M"], "A": spec["A"]}, n_neg


def _fit_logicle(data, template: Template, marker: str, spec: Mapping[str, Any]) -> Fit:
    ch = data.find_channel(marker, context=f"template {template.path}, transform of {marker!r}")
    fitted, n_neg = fitted_logicle(data.column(ch), spec)
    params = {k: fitted[k] for k in ("T", "W", "M", "A")}
    return Fit("logicle", marker, (marker,), params, n_neg, "sample", f"{n_neg} negative values")


def with_fitted_transforms(data, template: Template, given: Mapping[tuple[str, str], Any] | None = None) -> Template:
    """``template`` with only its data-driven logicles (``W: auto``) fitted on ``data``, as :func:`fit_template` fits
    them (a ``scope: batch`` fit in ``given``, keyed by :attr:`Fit.key`, is used as it is): for reading transformed
    values before the 2-D gates are fitted."""
    given = given or {}
    specs = {m: {"type": "logicle", **(given.get(("logicle", m)) or _fit_logicle(data, template, m, spec)).params}
             for m, spec in _auto_specs(template).items()}
    return _with_transforms(template, specs) if specs else template


def _with_transforms(template: Template, specs: Mapping[str, dict[str, Any]]) -> Template:
    """Copy of ``template`` with the data-driven logicles of ``specs``' markers replaced by the fitted ones."""
    def fix(d: Dim) -> Dim:
        return replace(d, transform=specs[d.marker]) if is_auto(d.transform) and d.marker in specs else d

    pops = [replace(p, gate=with_dims(p.gate, tuple(fix(d) for d in p.dims))) if p.dims else p
            for p in template.populations]
    tr = dict(template.transforms)
    tr["channels"] = {**(tr.get("channels") or {}), **specs}
    return replace(template, populations=pops, transforms=tr)


def _parent_points(data, template: Template, pop: Population, thresholds,
                   gate: Callable) -> tuple[np.ndarray, np.ndarray]:
    """The parent's values on the gate's two axes (transformed as the dims say), at most ``MAX_FIT_EVENTS``.

    A systematic subsample (every k-th event of the parent): deterministic. ``gate`` is
    :func:`immuneprofile.gate_sample` (passed in: the engine calls this module first).
    """
    from immuneprofile.engine.values import EventValues

    if pop.parent is None:
        idx = np.arange(data.n_events)
    else:
        need = template.closure([pop.parent])
        sub = replace(template, populations=[p for p in template.populations if p.name in need])
        idx = gate(data, sub, thresholds=thresholds or None, threads=1).indices[pop.parent]
    idx = idx[:: max(1, -(-idx.size // MAX_FIT_EVENTS))]
    cols = EventValues(data, template)
    comp = next((d.compensated for d in pop.dims if d.compensated), False)
    x, y = (cols.transformed(d, idx, comp, pop.name) for d in pop.dims)
    return np.asarray(x, dtype=float), np.asarray(y, dtype=float)


def _fit_gate(pop: Population, x: np.ndarray, y: np.ndarray, scope: str = "sample", note: str = "") -> Fit:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):  # small (2x2) algebra on many events: BLAS threads would only contend
        return _fit_gate_1(pop, x, y, scope, note)


def _fit_gate_of(pop: Population) -> FitGate:
    """``pop``'s data-driven 2-D gate."""
    if not isinstance(pop.gate, FitGate):
        raise TypeError(f"population {pop.name!r} has no data-driven gate")
    return pop.gate


def _fit_gate_1(pop: Population, x: np.ndarray, y: np.ndarray, scope: str, note: str) -> Fit:
    g = _fit_gate_of(pop)
    o = g.opts
    dims = tuple(d.marker for d in g.dims)
    params: dict[str, Any]
    if g.kind == "singlet":
        params = {"vertices": fit_singlet(x, y, float(o.get("k", 4.0)))}
    else:
        c, cov, d2 = fit_cluster(x, y, o["target"], units=o.get("units", "quantile"),
                                 components=int(o.get("components", 4)), q=float(o.get("q", 0.95)))
        params = {"vertices": ellipse_polygon(c, cov, d2), "center": c, "covariance": cov, "distance_square": d2}
    return Fit(g.kind, pop.name, dims, params, int(x.size), scope, note)


def gate_of(fit: Fit, g: FitGate) -> PolygonGate:
    """The ordinary gate a fitted 2-D gate becomes: a polygon (the band; the cluster's ellipse as 16 vertices)."""
    return PolygonGate(g.dims, tuple(tuple(v) for v in fit.params["vertices"]))


def ellipse_polygon(center, covariance, distance_square: float, n: int = 16) -> list[tuple[float, float]]:
    """``n`` vertices on the ellipse ``(v - c)^T cov^-1 (v - c) = distance_square`` (a convex polygon).

    Gated as a polygon, a cluster costs one compiled pass over the events (an ellipse
    is tested event by event; 16 vertices is the most the engine's convex-polygon pass
    takes); the vertices are the gate, recorded with the ellipse they lie on.
    """
    a = np.linalg.cholesky(np.asarray(covariance, dtype=float)) * np.sqrt(distance_square)
    t = 2 * np.pi * np.arange(n) / n
    pts = np.asarray(center, dtype=float)[:, None] + a @ np.vstack([np.cos(t), np.sin(t)])
    return [(round(float(u), 6), round(float(v), 6)) for u, v in pts.T]


def _set_gate(template: Template, name: str, gate) -> Template:
    return replace(template, populations=[replace(p, gate=gate) if p.name == name else p
                                          for p in template.populations])


def _fit_qc(data, template: Template) -> tuple[Template, Fit]:
    """The template with acquisition QC's populations (:func:`immuneprofile.qc.acquisition.qc_populations`)."""
    from immuneprofile.qc.acquisition import QC_POPULATION, qc_populations

    out, res = qc_populations(data, template, template.qc or {})
    params = {"removed": res.removed, "removed_time": res.removed_time, "removed_margin": res.removed_margin,
              "segments": [list(s) for s in res.segments], "margins": res.margins, "bins": res.n_bins,
              "bin_events": res.bin_events}
    return replace(out, qc=None), Fit("qc", QC_POPULATION, tuple(data.channels[j] for j in range(len(data.channels))
                                                                  if data.channels[j].lower() == "time"),
                                      params, data.n_events, "sample", "; ".join(x for x in (f"{res.removed} event(s) removed", res.note) if x))


def _share_key(template: Template, name: str, thresholds) -> str:
    """What a data-driven gate's fit depends on: its gate and the (fitted) populations and thresholds above it."""
    need = template.closure([template[name].parent])
    pops = [repr(p) for p in template.populations if p.name in need]
    used = {str(r) for p in template.populations if p.name in need for bs in getattr(p.gate, "bounds", ())
            for r in bs if r is not None and not isinstance(r, float)}
    th = {k: v for k, v in template.thresholds.items() if any(u.startswith(f"{k}.") for u in used)}
    given = sorted((k, v) for k, v in (thresholds or {}).items() if f"{k[0]}.{k[1]}" in used)  # those above it
    return repr((template[name].gate, pops, th, given))


def fit_template(data, template: Template, given: Mapping[tuple[str, str], Fit] | None = None,
                 thresholds: Mapping[tuple[str, str], Any] | None = None, *,
                 gate: Callable, collect: tuple[str, str] | None = None, shared: dict | None = None):
    """Fit a template's data-driven transforms and 2-D gates on one sample.

    Parameters
    ----------
    data
        A loaded sample (:func:`immuneprofile.load_fcs`).
    template
        The template.
    given
        Fits made elsewhere (``scope: batch``, :func:`fit_batch`), keyed by :attr:`Fit.key`;
        used as they are.
    thresholds
        Threshold values given for the batch (as for :func:`immuneprofile.gate_sample`).
    collect
        Internal (:func:`fit_batch`): stop at this item and return the values it is fitted on.
    shared
        A dict kept while several templates are fitted on the same sample: a gate defined
        identically (same fitting options, same ancestry and thresholds) is fitted once.

    Returns
    -------
    (Template, list of Fit)
        The template with ordinary transforms and gates in place of the data-driven
        ones, and the fits (in template order: transforms, then gates).

    Raises
    ------
    GatingError
        A fit failed (too few events); the message names the file, template and population.
    """
    given = dict(given or {})
    fits: list[Fit] = []
    if template.qc:
        template, qc = _fit_qc(data, template)
        fits.append(qc)
    specs: dict[str, dict[str, Any]] = {}
    for marker, spec in _auto_specs(template).items():
        if collect == ("logicle", marker):
            col = data.column(data.find_channel(marker, context=f"template {template.path}"))
            return col[np.isfinite(col) & (col < 0)]
        fit = given.get(("logicle", marker)) or _fit_logicle(data, template, marker, spec)
        specs[marker] = {"type": "logicle", **fit.params}
        fits.append(fit)
    out = _with_transforms(template, specs) if specs else template
    for pop in template.populations:
        if isinstance(pop.gate, FitGate):
            gate_fit = _gate_fit(data, out, pop.name, given, thresholds, collect, shared, gate)
            if not isinstance(gate_fit, Fit):  # the values collected for a batch fit
                return gate_fit
            out = _set_gate(out, pop.name, gate_of(gate_fit, pop.gate))
            fits.append(gate_fit)
    return out, fits


def _gate_fit(data, out: Template, name: str, given, thresholds, collect, shared, gate: Callable) -> Fit | tuple:
    """The fit of data-driven gate ``name`` of ``out`` (given, shared, or fitted now), or its values (collect)."""
    fit = given.get(("gate", name))
    if fit is not None:
        return fit
    key = _share_key(out, name, thresholds) if shared is not None and collect is None else None
    if key is not None and key in shared:
        return replace(shared[key], name=name)
    x, y = _parent_points(data, out, out[name], thresholds, gate)
    if collect == ("gate", name):
        return x, y
    try:
        fit = _fit_gate(out[name], x, y)
    except ValueError as exc:
        raise GatingError(f"{data.path}: template {out.path}: population {name!r}: "
                          f"{_fit_gate_of(out[name]).kind} gate: {exc}") from None
    if key is not None:
        shared[key] = fit
    return fit


def batch_items(template: Template) -> list[tuple[str, str]]:
    """Keys of the ``scope: batch`` transforms and 2-D gates, in fitting order."""
    items = [("logicle", m) for m, s in _auto_specs(template).items() if s["scope"] == "batch"]
    return items + [("gate", p.name) for p in template.populations
                    if isinstance(p.gate, FitGate) and p.gate.scope == "batch"]


def _collect(d, template: Template, fits, thresholds, item, gate: Callable):
    """The values one sample contributes to a batch fit (``None``: the sample fails; gating reports it)."""
    from immuneprofile.exceptions import ImmuneProfileError

    try:
        return fit_template(d() if callable(d) else d, template, fits, thresholds, gate=gate, collect=item)
    except ImmuneProfileError:
        return None


def fit_batch(datas: Iterable, template: Template, thresholds=None, *, gate: Callable) -> dict[tuple[str, str], Fit]:
    """Fit the ``scope: batch`` transforms and gates of ``template`` on values pooled over samples.

    Parameters
    ----------
    datas
        A re-iterable of loaded samples, or of zero-argument callables loading them
        (read once per batch item); samples that fail to load or gate are left out
        (gating them reports the error).
    template
        The template.

    Returns
    -------
    dict
        ``{Fit.key: Fit}``, to pass as ``given`` to :func:`fit_template` (and
        :func:`immuneprofile.gate_sample`'s ``thresholds``).
    """
    fits: dict[tuple[str, str], Fit] = {}
    specs = _auto_specs(template)
    for item in batch_items(template):
        pooled = [v for v in (_collect(d, template, fits, thresholds, item, gate) for d in datas) if v is not None]
        note = f"scope: batch, pooled over {len(pooled)} sample(s)"
        if item[0] == "logicle":
            fitted, n_neg = fitted_logicle(np.concatenate(pooled) if pooled else np.empty(0), specs[item[1]])
            fits[item] = Fit("logicle", item[1], (item[1],), {k: fitted[k] for k in ("T", "W", "M", "A")},
                             n_neg, "batch", note)
        else:
            # each sample contributes at most MAX_FIT_EVENTS / n of its events
            step = [max(1, -(-x.size * len(pooled) // MAX_FIT_EVENTS)) for x, _ in pooled]
            x = np.concatenate([x[::s] for (x, _), s in zip(pooled, step)])
            y = np.concatenate([y[::s] for (_, y), s in zip(pooled, step)])
            try:
                fits[item] = _fit_gate(template[item[1]], x, y, "batch", note)
            except ValueError as exc:
                raise GatingError(f"template {template.path}: population {item[1]!r}: batch "
                                  f"{_fit_gate_of(template[item[1]]).kind} gate: {exc}") from None
    return fits

