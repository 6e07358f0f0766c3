"""The vectorised gating engine.

:func:`gate_sample` evaluates a whole :class:`~immuneprofile.template.Template`
on one :class:`~immuneprofile.io.FCSData` at once. Each population is computed
once, from its parent's events only, and is stored as a sorted index array.

Exactness with FlowKit
----------------------
Gates are defined on transformed values, but transforming every event is the
expensive part of gating (logicle is a root-finding per value). The engine
therefore maps each gate boundary back to the raw scale once (``T^-1(cut)``,
for transforms that are increasing on the whole line) and compares raw values.
Events within a relative ``1e-6`` of a mapped boundary are "uncertain" and are
transformed with FlowKit's own transform object and compared exactly as FlowKit
compares them (``>= min``, ``< max``; winding number for polygons; Mahalanobis
``<=`` for ellipses). Polygons and ellipses transform only the events of the
parent that fall inside their (raw-scale) bounding box. The membership is thus
the membership FlowKit computes, at the cost of a few comparisons per event.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from .io import FCSData, MarkerError
from .template import (
    BooleanGate,
    Dim,
    EllipseGate,
    PolygonGate,
    Population,
    RectGate,
    Template,
    ThresholdRef,
)
from .thresholds import MAX_FIT_EVENTS, ThresholdError
from .transforms import MONOTONE, make_transform, transform_key

__all__ = ["GatingResult", "gate_sample", "GatingError", "ThresholdFit"]

_REL_TOL = 1e-6


# ---------------------------------------------------------------------------
# Compiled kernels
#
# The kernels below are plain Python functions compiled on first use with
# ``numba.njit(cache=True)`` (no fastmath: IEEE arithmetic in the order
# written, no fused multiply-add), so they compute bit-for-bit what the NumPy
# expressions they replace compute (tests/test_kernels.py). The columns a
# template touches are extracted from the row-major event matrix in one pass
# (``_take_columns``); the gate kernels then read each column at the parent's
# event indices, fusing gather and comparison in one branch-free pass.
# Without numba the engine falls back to NumPy, with identical results.
# ---------------------------------------------------------------------------

_PIP_BLOCK = 512


def _pip_block(vx, vy, xs, ys, nb, w, out, start):  # pragma: no cover - compiled
    """Inside-polygon flags of the ``nb`` points ``xs, ys`` into ``out[start:start + nb]``.

    FlowUtils' ``points_in_polygon`` arithmetic: points outside the vertices'
    bounding box (``x < min_x || x > max_x || y < min_y || y > max_y``) are out;
    the others get Sunday's winding count, edge ``a -> b`` by edge (the last
    edge closes the polygon): an upward crossing (``ay <= y && y < by``) counts
    +1 if ``is_left > 0``, a downward one (else-branch: ``by <= y``) -1 if
    ``is_left < 0``, with ``is_left = ((bx - ax) * (y - ay)) - ((x - ax) * (by - ay))``;
    odd count = inside. Here the edges are the outer loop and a block of points
    the inner one (branch-free, so it vectorises); ``bx - ax`` and ``by - ay``
    are the same doubles whether computed once per edge or per point, and
    ``ay > y`` stands for FlowUtils' else-branch: they differ only when ``y`` or
    ``ay`` is NaN, where ``is_left`` is NaN and nothing is counted either way.
    """
    nv = vx.shape[0]
    min_x = vx[0]
    max_x = vx[0]
    min_y = vy[0]
    max_y = vy[0]
    for i in range(1, nv):
        min_x = min(min_x, vx[i])
        max_x = max(max_x, vx[i])
        min_y = min(min_y, vy[i])
        max_y = max(max_y, vy[i])
    for k in range(nb):
        w[k] = 0
    for i in range(nv):
        ax = vx[i]
        ay = vy[i]
        j = 0 if i >= nv - 1 else i + 1
        bx = vx[j]
        by = vy[j]
        dx = bx - ax
        dy = by - ay
        for k in range(nb):
            x = xs[k]
            y = ys[k]
            is_left = (dx * (y - ay)) - ((x - ax) * dy)
            up = (ay <= y) & (y < by) & (is_left > 0)
            down = (ay > y) & (by <= y) & (is_left < 0)
            w[k] += np.int32(up) - np.int32(down)
    for k in range(nb):
        x = xs[k]
        y = ys[k]
        outside = (x < min_x) | (x > max_x) | (y < min_y) | (y > max_y)
        out[start + k] = (not outside) & (w[k] % 2 != 0)


def _pip_gather(vx, vy, colx, coly, idx, full, out):  # pragma: no cover - compiled
    """``out[i]``: point ``(colx[e], coly[e])`` inside the polygon, ``e = idx[i]`` (``e = i`` if ``full``).

    Points are gathered block by block and tested by :func:`_pip_block`.
    """
    m = out.shape[0]
    xs = np.empty(_PIP_BLOCK)
    ys = np.empty(_PIP_BLOCK)
    w = np.empty(_PIP_BLOCK, dtype=np.int32)
    for start in range(0, m, _PIP_BLOCK):
        nb = min(m - start, _PIP_BLOCK)
        for k in range(nb):
            e = start + k if full else idx[start + k]
            xs[k] = colx[e]
            ys[k] = coly[e]
        _pip_block_j(vx, vy, xs, ys, nb, w, out, start)
    return out


def _range_and(col, idx, full, lo, hi, mask):  # pragma: no cover - compiled
    """``mask[i] &= lo <= col[e] <= hi`` for ``e = idx[i]`` (or ``i`` if ``full``); NaN is outside."""
    for i in range(mask.shape[0]):
        e = i if full else idx[i]
        v = col[e]
        mask[i] = mask[i] & (v >= lo) & (v <= hi)
    return mask


def _rect_dim(col, idx, full, has_lo, xlo, tlo, has_hi, xhi, thi, status):  # pragma: no cover - compiled
    """One rectangle dimension on raw values against raw-scale bounds.

    ``status``: 1 in so far, 0 out, 2 undecided (some value within the tolerance
    of a boundary: decided exactly afterwards). An event is out as soon as one
    bound certainly fails. Per bound this is :func:`_cmp` without the exact step:
    ``|v - xb| <= tol`` undecided, else ``v > xb`` (min) / ``v < xb`` (max).
    Branch-free (data-dependent branches mispredict on cytometry data).
    """
    for i in range(status.shape[0]):
        s = status[i]
        e = i if full else idx[i]
        v = col[e]
        lo_uns = has_lo & (abs(v - xlo) <= tlo)
        lo_fail = has_lo & (not lo_uns) & (not (v > xlo))
        hi_uns = has_hi & (abs(v - xhi) <= thi)
        hi_fail = has_hi & (not hi_uns) & (not (v < xhi))
        alive = (s != 0) & (not (lo_fail | hi_fail))
        und = lo_uns | hi_uns
        status[i] = np.int8(alive) * max(s, np.int8(2 * und))
    return status


def _take_columns(ev, cols, out):  # pragma: no cover - compiled
    """``out[k] = ev[:, cols[k]]``: one sequential pass over a row-major event matrix."""
    k = cols.shape[0]
    for i in range(ev.shape[0]):
        for j in range(k):
            out[j, i] = ev[i, cols[j]]
    return out


_KERNELS: Any = None


def _kernels():
    """The compiled kernels (namespace), or ``False`` when numba is unavailable."""
    global _KERNELS, _pip_block_j
    if _KERNELS is None:
        try:
            from numba import njit
        except ImportError:  # pragma: no cover - numba is a dependency; NumPy fallback
            _KERNELS = False
            return _KERNELS
        from types import SimpleNamespace

        jit = njit(cache=True, nogil=True)
        _pip_block_j = jit(_pip_block)
        _KERNELS = SimpleNamespace(
            pip_gather=jit(_pip_gather),
            range_and=jit(_range_and),
            rect_dim=jit(_rect_dim),
            take_columns=jit(_take_columns),
        )
    return _KERNELS


_pip_block_j: Any = _pip_block
_NO_IDX = np.empty(0, dtype=np.int64)


class GatingError(ValueError):
    """Gating a sample failed; the message names the file, template and population."""


@dataclass
class ThresholdFit:
    """A threshold used for one sample: where it came from and its value."""

    marker: str
    cut: str
    value: float
    method: str  # "fixed" or the data-driven rule
    fitted_on: str | None = None
    n_events: int = 0
    fallback: bool = False
    note: str = ""


@dataclass
class GatingResult:
    """Populations of one sample.

    Attributes
    ----------
    sample_id, path
        The sample gated.
    template
        The template applied.
    n_events
        Total events in the sample.
    indices
        ``{population: sorted int64 array of event indices}``.
    thresholds
        The threshold values used (fixed and fitted), for audit.
    data
        The loaded sample (for medians and AnnData export).
    """

    sample_id: str
    path: str
    template: Template
    n_events: int
    indices: dict[str, np.ndarray]
    thresholds: list[ThresholdFit] = field(default_factory=list)
    data: FCSData | None = field(default=None, repr=False)

    def count(self, name: str) -> int:
        return int(self.indices[name].size)

    def mask(self, name: str) -> np.ndarray:
        """Boolean membership of every event in population ``name``."""
        m = np.zeros(self.n_events, dtype=bool)
        m[self.indices[name]] = True
        return m

    @property
    def masks(self) -> dict[str, np.ndarray]:
        return {n: self.mask(n) for n in self.indices}

    def parent_count(self, name: str) -> int:
        parent = self.template[name].parent
        return self.n_events if parent is None else self.count(parent)


class _Columns:
    """Per-sample column access with lazily, exactly transformed values."""

    def __init__(self, data: FCSData, template: Template):
        self.data = data
        self.template = template
        self._raw_cols: dict[int, np.ndarray] = {}
        self._xf: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._xform_obj: dict[str, Any] = {}
        self._inv: dict[tuple, float] = {}
        self._chan: dict[str, int] = {}
        self._prefetched = False

    def channel(self, name: str, pop: str) -> int:
        idx = self._chan.get(name)
        if idx is None:
            idx = self.data.find_channel(name, context=f"template {self.template.path}, population {pop!r}")
            self._chan[name] = idx
        return idx

    def matrix_column(self, ch: int, matrix_id: str) -> np.ndarray:
        """Column ``ch`` of the raw events compensated with ``template.compensation[matrix_id]`` (as FlowKit)."""
        cache = self.__dict__.setdefault("_matrix_events", {})
        ev = cache.get(matrix_id)
        if ev is None:
            from flowkit import Matrix

            frame = self.template.compensation[matrix_id]
            m = Matrix(np.asarray(frame, dtype=float), list(frame.columns), list(frame.index))
            ev = cache[matrix_id] = m.apply(self.data.sample)
        return np.ascontiguousarray(ev[:, ch])

    def base(self, ch: int, compensated: bool) -> np.ndarray:
        """Contiguous column ``ch`` of the compensated (or, if not ``compensated``, raw) events."""
        if isinstance(compensated, str):  # a spillover matrix of the template (Gating-ML spectrumMatrix)
            return self.matrix_column(ch, compensated)
        if compensated or self.data.compensation is None:
            if not self._prefetched:
                self._prefetch()
            return self.data.column(ch)
        col = self._raw_cols.get(ch)
        if col is None:
            col = np.ascontiguousarray(self.data.sample.get_events(source="raw")[:, ch])
            self._raw_cols[ch] = col
        return col

    def _prefetch(self) -> None:
        """Extract every column the template touches in one pass over a row-major event matrix.

        :func:`immuneprofile.load_fcs` gives column-major events, whose columns need no
        copy; this serves event matrices built otherwise (C order).

        Copying columns one by one reads the whole matrix once per column; the
        compiled kernel reads it once and writes each column contiguously. The
        columns land in the sample's own column cache (:meth:`FCSData.column`),
        so the templates gated after this one reuse them.
        """
        self._prefetched = True
        ev = self.data.events
        if isinstance(ev, np.ndarray) and ev.flags.f_contiguous:
            return  # column-major (as load_fcs gives it): every column is already a contiguous view
        K = _kernels()
        cache = getattr(self.data, "_columns", None)
        if not K or not isinstance(cache, dict) or not isinstance(ev, np.ndarray) or ev.ndim != 2:
            return
        want: list[int] = []
        for marker in self.template.markers:
            try:
                ch = self.channel(marker, "(column prefetch)")
            except MarkerError:  # raised, with its population, when that population is gated
                self._chan.pop(marker, None)
                continue
            if ch not in cache and ch not in want:
                want.append(ch)
        if len(want) < 2 or ev.dtype != np.float64:
            return
        block = np.empty((len(want), ev.shape[0]), dtype=np.float64)
        K.take_columns(ev, np.asarray(want, dtype=np.int64), block)
        for k, ch in enumerate(want):
            cache.setdefault(ch, block[k])

    def xform(self, spec: Mapping[str, Any] | None):
        if spec is None:
            return None
        key = transform_key(spec)
        obj = self._xform_obj.get(key)
        if obj is None:
            obj = self._xform_obj[key] = make_transform(spec)
        return obj

    def raw(self, dim: Dim, idx: np.ndarray | None, compensated: bool, pop: str) -> np.ndarray:
        """Untransformed values of ``dim`` (ratio computed as FlowKit does) for events ``idx``."""
        if dim.ratio is not None:
            num, den, a, b, c = dim.ratio
            x = self.base(self.channel(num, pop), compensated)
            y = self.base(self.channel(den, pop), compensated)
            if idx is not None:
                x, y = x[idx], y[idx]
            with np.errstate(divide="ignore", invalid="ignore"):
                return a * ((x - b) / (y - c))
        col = self.base(self.channel(dim.marker, pop), compensated)
        return col if idx is None else col[idx]

    def exact(self, dim: Dim, raw_vals: np.ndarray) -> np.ndarray:
        """Transform values with FlowKit's transform object, as FlowKit does (column arrays)."""
        xf = self.xform(dim.transform)
        if xf is None or raw_vals.size == 0:
            return np.asarray(raw_vals, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = xf.apply(np.asarray(raw_vals, dtype=float).reshape(-1, 1))
        return np.asarray(out, dtype=float).reshape(-1)

    def transformed(self, dim: Dim, idx: np.ndarray | None, compensated: bool, pop: str) -> np.ndarray:
        """Exact transformed values for events ``idx`` (cached per event, computed once)."""
        if dim.transform is None:
            return self.raw(dim, idx, compensated, pop)
        key = (dim.marker, dim.ratio, transform_key(dim.transform), compensated)
        n = self.data.n_events
        cache = self._xf.get(key)
        if cache is None:
            cache = self._xf[key] = (np.empty(n), np.zeros(n, dtype=bool))
        vals, have = cache
        sel = np.arange(n) if idx is None else idx
        need = sel[~have[sel]]
        if need.size:
            vals[need] = self.exact(dim, self.raw(dim, need, compensated, pop))
            have[need] = True
        return vals[sel]

    def raw_bound(self, dim: Dim, t: float) -> float | None:
        """``T^-1(t)`` for increasing transforms (``None`` if not applicable)."""
        spec = dim.transform
        if spec is None:
            return t
        if spec["type"] not in MONOTONE or dim.ratio is not None:
            return None
        key = (transform_key(spec), t)
        v = self._inv.get(key)
        if v is None:
            v = float(np.asarray(self.xform(spec).inverse(np.array([[t]], dtype=float))).reshape(-1)[0])
            if not np.isfinite(v):
                return None
            self._inv[key] = v
        return v


def _cmp(vals_raw: np.ndarray, xb: float | None, t: float, ge: bool, exact_fn) -> np.ndarray:
    """``T(v) >= t`` (ge) or ``T(v) < t`` from raw values, exact near the boundary."""
    if xb is None:
        tv = exact_fn(np.arange(vals_raw.size))
        return tv >= t if ge else tv < t
    tol = _REL_TOL * (1.0 + abs(xb))
    out = vals_raw > xb if ge else vals_raw < xb
    unsure = np.flatnonzero(np.abs(vals_raw - xb) <= tol)
    if unsure.size:
        tv = exact_fn(unsure)
        out[unsure] = tv >= t if ge else tv < t
    return out


class _Engine:
    def __init__(self, data: FCSData, template: Template, fixed: Mapping[tuple[str, str], float] | None):
        self.data = data
        self.t = template
        self.cols = _Columns(data, template)
        self.idx: dict[str, np.ndarray] = {}
        self.fits: dict[tuple[str, str], ThresholdFit] = {}
        self.fixed = dict(fixed or {})

    # -- thresholds
    def bound(self, b: Any, pop: Population, dim: Dim) -> float | None:
        if b is None or isinstance(b, float):
            return b
        if isinstance(b, ThresholdRef):
            return self.threshold(b, pop, dim)
        return float(b)

    def threshold(self, ref: ThresholdRef, pop: Population, dim: Dim) -> float:
        key = (ref.marker, ref.cut)
        fit = self.fits.get(key)
        if fit is not None:
            return fit.value
        if key in self.fixed:
            given = self.fixed[key]
            if isinstance(given, ThresholdFit):  # fitted once on a pooled batch (gate_files)
                from dataclasses import replace

                fit = replace(given)
            else:
                fit = ThresholdFit(ref.marker, ref.cut, float(given), "batch")
        else:
            spec = self.t.thresholds[ref.marker][ref.cut]
            if isinstance(spec, (int, float)):
                fit = ThresholdFit(ref.marker, ref.cut, float(spec), "fixed")
            else:
                from .thresholds import fit_threshold

                on = spec.get("on", pop.parent)
                if on is not None and on not in self.idx:
                    raise GatingError(f"{self.data.path}: template {self.t.path}: threshold {ref} is fitted on "
                                      f"{on!r}, which is not gated before population {pop.name!r}")
                sel = np.arange(self.data.n_events) if on is None else self.idx[on]
                n_fit = int(sel.size)
                if spec["method"] != "quantile" and sel.size > MAX_FIT_EVENTS:
                    # density rules read a fixed-size subsample: transform only that (a systematic
                    # sample, every k-th event in acquisition order: deterministic and O(subsample))
                    sel = sel[np.linspace(0, sel.size - 1, MAX_FIT_EVENTS).astype(np.int64)]
                # transformed once, not cached: the subsample serves only this fit
                values = self.cols.exact(dim, self.cols.raw(dim, sel, True, pop.name))
                value, fallback, note = fit_threshold(values, spec, label=f"{self.data.path}: {ref}")
                if spec.get("scope") == "batch":
                    note = "; ".join(x for x in (note, "scope: batch, but fitted on this sample alone "
                                                       "(gate_files fits it on the pooled batch)") if x)
                fit = ThresholdFit(ref.marker, ref.cut, value, str(spec["method"]), on or "root",
                                   n_fit, fallback, note)
        self.fits[key] = fit
        return fit.value

    # -- gates
    def run(self) -> dict[str, np.ndarray]:
        for pop in self.t.populations:
            parent = None if pop.parent is None else self.idx[pop.parent]
            try:
                self.idx[pop.name] = self.population(pop, parent)
            except (MarkerError, GatingError, ThresholdError):  # already name the sample and what failed
                raise
            except Exception as exc:  # pragma: no cover - defensive: name the context
                raise GatingError(f"{self.data.path}: template {self.t.path}: population {pop.name!r}: "
                                  f"{type(exc).__name__}: {exc}") from exc
        return self.idx

    def _sel(self, parent: np.ndarray | None) -> np.ndarray:
        return np.arange(self.data.n_events) if parent is None else parent

    def population(self, pop: Population, parent: np.ndarray | None) -> np.ndarray:
        g = pop.gate
        if isinstance(g, BooleanGate):
            return self.boolean(g, parent)
        # FlowKit compensates all dims of a gate if any is (a matrix id if a dim names one)
        comp = next((d.compensated for d in g.dims if d.compensated), False)
        if isinstance(g, RectGate):
            keep = self.rect(pop, g, parent, comp)
        elif isinstance(g, PolygonGate):
            keep = self.polygon(pop, g, parent, comp)
        elif isinstance(g, EllipseGate):
            keep = self.ellipse(pop, g, parent, comp)
        else:  # pragma: no cover
            raise GatingError(f"unsupported gate {g!r}")
        if getattr(g, "complement", False):
            keep = ~keep
        sel = np.flatnonzero(keep)
        return sel if parent is None else parent[sel]

    def rect(self, pop: Population, g: RectGate, parent, comp: bool) -> np.ndarray:
        K = _kernels()
        if not K:
            return self._rect_numpy(pop, g, parent, comp)
        full = parent is None
        n = self.data.n_events if full else parent.size
        idx = _NO_IDX if full else parent
        status = np.ones(n, dtype=np.int8)  # 1 in, 0 out, 2 undecided (see _rect_dim)
        fast, slow = [], []  # (dim, t, raw bound, ge): compiled raw comparison / exact on every event
        for dim, (lo, hi) in zip(g.dims, g.bounds):
            lo, hi = self.bound(lo, pop, dim), self.bound(hi, pop, dim)
            b: dict[bool, float] = {}
            for t, ge in ((lo, True), (hi, False)):
                if t is None:
                    continue
                xb = self.cols.raw_bound(dim, t) if dim.ratio is None else None
                (slow if xb is None else fast).append((dim, t, xb, ge))
                if xb is not None:
                    b[ge] = xb
            if b:
                xlo, xhi = b.get(True, 0.0), b.get(False, 0.0)
                K.rect_dim(self.cols.base(self.cols.channel(dim.marker, pop.name), comp), idx, full,
                           True in b, xlo, _REL_TOL * (1.0 + abs(xlo)),
                           False in b, xhi, _REL_TOL * (1.0 + abs(xhi)), status)
        unsure = np.flatnonzero(status == 2)
        if unsure.size:  # values within the tolerance of a boundary: decide exactly, as _cmp does
            status[unsure] = self._rect_exact(pop, fast, unsure if full else parent[unsure], comp)
        if slow:  # bounds that cannot be mapped to the raw scale: exact transform of the events left
            cur = np.flatnonzero(status)
            status[cur] = self._rect_exact(pop, slow, cur if full else parent[cur], comp)
        return status.view(np.bool_)

    def _rect_exact(self, pop: Population, bounds, ev: np.ndarray, comp: bool) -> np.ndarray:
        """Membership of events ``ev`` for ``bounds`` ([(dim, t, raw bound or None, ge)]), via :func:`_cmp`."""
        ok = np.ones(ev.size, dtype=bool)
        for dim, t, xb, ge in bounds:
            vals = self.cols.raw(dim, ev, comp, pop.name) if xb is not None else np.empty(ev.size)

            def exact(rel, _dim=dim):
                return self.cols.transformed(_dim, ev[rel], comp, pop.name)

            ok &= _cmp(vals, xb, t, ge, exact)
        return ok

    def _rect_numpy(self, pop: Population, g: RectGate, parent, comp: bool) -> np.ndarray:
        n = self.data.n_events if parent is None else parent.size
        keep = np.ones(n, dtype=bool)
        for dim, (lo, hi) in zip(g.dims, g.bounds):
            lo, hi = self.bound(lo, pop, dim), self.bound(hi, pop, dim)
            cur = np.flatnonzero(keep) if not keep.all() else None
            sub = parent if cur is None else (cur if parent is None else parent[cur])
            vals = self.cols.raw(dim, sub, comp, pop.name)
            ok = np.ones(vals.size, dtype=bool)

            def exact(rel, _sub=sub, _dim=dim):
                ev = self._sel(_sub)[rel]
                return self.cols.transformed(_dim, ev, comp, pop.name)

            if lo is not None:
                ok &= _cmp(vals, self.cols.raw_bound(dim, lo), lo, True, exact)
            if hi is not None:
                ok &= _cmp(vals, self.cols.raw_bound(dim, hi), hi, False, exact)
            if cur is None:
                keep &= ok
            else:
                keep[cur[~ok]] = False
        return keep

    def _box_candidates(self, pop: Population, dims, lows, highs, parent, comp) -> np.ndarray:
        """Indices (relative to the parent) that may lie inside a transformed-space box (inclusive)."""
        K = _kernels()
        full = parent is None
        n = self.data.n_events if full else parent.size
        cand = np.ones(n, dtype=bool)
        for dim, lo, hi in zip(dims, lows, highs):
            xl, xh = self.cols.raw_bound(dim, lo), self.cols.raw_bound(dim, hi)
            if xl is None or xh is None:
                continue
            lo_t, hi_t = xl - _REL_TOL * (1.0 + abs(xl)), xh + _REL_TOL * (1.0 + abs(xh))
            if K and dim.ratio is None:
                col = self.cols.base(self.cols.channel(dim.marker, pop.name), comp)
                K.range_and(col, _NO_IDX if full else parent, full, lo_t, hi_t, cand)
            else:
                vals = self.cols.raw(dim, parent, comp, pop.name)
                cand &= vals >= lo_t
                cand &= vals <= hi_t
        return np.flatnonzero(cand)

    def polygon(self, pop: Population, g: PolygonGate, parent, comp: bool) -> np.ndarray:
        v = np.asarray(g.vertices, dtype=np.float64)
        full = parent is None
        n = self.data.n_events if full else parent.size
        K = _kernels()
        if K and all(d.transform is None and d.ratio is None for d in g.dims):
            # untransformed axes (scatter): one fused pass over the parent's events
            cx, cy = (self.cols.base(self.cols.channel(d.marker, pop.name), comp) for d in g.dims)
            keep = np.empty(n, dtype=bool)
            K.pip_gather(np.ascontiguousarray(v[:, 0]), np.ascontiguousarray(v[:, 1]), cx, cy,
                         _NO_IDX if full else parent, full, keep)
            return keep
        rel = self._box_candidates(pop, g.dims, v.min(axis=0), v.max(axis=0), parent, comp)
        ev = self._sel(parent)[rel]
        px = self.cols.transformed(g.dims[0], ev, comp, pop.name)
        py = self.cols.transformed(g.dims[1], ev, comp, pop.name)
        keep = np.zeros(n, dtype=bool)
        keep[rel] = points_in_polygon(v, px, py)
        return keep

    def ellipse(self, pop: Population, g: EllipseGate, parent, comp: bool) -> np.ndarray:
        from flowutils.gating import points_in_ellipsoid

        c = np.asarray(g.center, dtype=float)
        cov = np.asarray(g.covariance, dtype=float)
        half = np.sqrt(np.abs(np.diag(cov)) * g.distance_square) * (1 + 1e-9) + 1e-12
        n = self.data.n_events if parent is None else parent.size
        if np.array_equal(cov, cov.T) and np.all(np.linalg.eigvalsh(cov) > 0):
            rel = self._box_candidates(pop, g.dims, c - half, c + half, parent, comp)
        else:  # not an ellipsoid (Gating-ML allows any matrix): the region is unbounded, test every event
            rel = np.arange(n)
        ev = self._sel(parent)[rel]
        pts = np.column_stack([self.cols.transformed(d, ev, comp, pop.name) for d in g.dims])
        keep = np.zeros(n, dtype=bool)
        if rel.size:
            keep[rel] = points_in_ellipsoid(cov, c, g.distance_square, pts)
        return keep

    def boolean(self, g: BooleanGate, parent) -> np.ndarray:
        n = self.data.n_events
        masks = []
        for name, complement in g.refs:
            m = np.zeros(n, dtype=bool)
            m[self.idx[name]] = True
            masks.append(~m if complement else m)
        if g.op == "and":
            res = np.logical_and.reduce(masks)
        elif g.op == "or":
            res = np.logical_or.reduce(masks)
        else:
            res = ~masks[0]
        if parent is not None:
            pm = np.zeros(n, dtype=bool)
            pm[parent] = True
            res &= pm
        return np.flatnonzero(res)


def points_in_polygon(vertices: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Winding-number point-in-polygon, vectorised over points.

    Same arithmetic and the same bounding-box rule as FlowUtils'
    ``points_in_polygon`` (Sunday's algorithm; odd winding count = inside), so
    membership is identical, edge cases included. Compiled with numba when
    available, NumPy otherwise (:func:`_points_in_polygon_numpy`, same result).
    """
    v = np.asarray(vertices, dtype=np.float64)
    px = np.asarray(px, dtype=np.float64)
    py = np.asarray(py, dtype=np.float64)
    K = _kernels()
    if not K:
        return _points_in_polygon_numpy(v, px, py)
    out = np.empty(px.shape[0], dtype=bool)
    return K.pip_gather(np.ascontiguousarray(v[:, 0]), np.ascontiguousarray(v[:, 1]), px, py, _NO_IDX, True, out)


def _points_in_polygon_numpy(vertices: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """NumPy version of :func:`points_in_polygon` (edge by edge over all points)."""
    v = np.asarray(vertices, dtype=np.float64)
    px = np.asarray(px, dtype=np.float64)
    py = np.asarray(py, dtype=np.float64)
    inside_box = ~((px < v[:, 0].min()) | (px > v[:, 0].max()) | (py < v[:, 1].min()) | (py > v[:, 1].max()))
    idx = np.flatnonzero(inside_box)
    x, y = px[idx], py[idx]
    wind = np.zeros(idx.size, dtype=np.int64)
    nv = len(v)
    for i in range(nv):
        ax, ay = v[i]
        bx, by = v[(i + 1) % nv]
        up = (ay <= y) & (y < by)
        down = (ay > y) & (by <= y)
        cand = np.flatnonzero(up | down)
        if cand.size == 0:
            continue
        is_left = (bx - ax) * (y[cand] - ay) - (x[cand] - ax) * (by - ay)
        wind[cand] += (up[cand] & (is_left > 0)).astype(np.int64)
        wind[cand] -= (down[cand] & (is_left < 0)).astype(np.int64)
    out = np.zeros(px.size, dtype=bool)
    out[idx] = wind % 2 != 0
    return out


def gate_sample(
    data: FCSData,
    template: Template,
    *,
    thresholds: Mapping[tuple[str, str], float] | None = None,
) -> GatingResult:
    """Gate one sample with a template.

    Parameters
    ----------
    data
        A sample loaded with :func:`immuneprofile.load_fcs`.
    template
        A template loaded with :func:`immuneprofile.load_template`.
    thresholds
        Optional ``{(marker, cut): value}`` overriding the template's thresholds
        (used for batch-scope data-driven thresholds).

    Returns
    -------
    GatingResult

    Raises
    ------
    MarkerError
        A marker of the template is missing from the file.
    GatingError
        Anything else that prevents gating, naming the file, template and population.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        eng = _Engine(data, template, thresholds)
        idx = eng.run()
    return GatingResult(
        sample_id=data.sample_id,
        path=data.path,
        template=template,
        n_events=data.n_events,
        indices=idx,
        thresholds=list(eng.fits.values()),
        data=data,
    )


@dataclass
class Batch:
    """Results of gating many files with one template.

    Attributes
    ----------
    results
        One :class:`GatingResult` per file that gated (with event data when gated in-process).
    table
        The population table of all those samples (:func:`immuneprofile.population_table`).
    thresholds
        Every threshold used, per sample (:func:`immuneprofile.thresholds_table`).
    errors
        ``{path: message}`` for every file that could not be read or gated.
    """

    results: list[GatingResult]
    table: Any
    thresholds: Any
    errors: dict[str, str]


def _gate_path(path: str, template: Template, compensation: Any, keep_data: bool,
               fixed: Mapping[tuple[str, str], Any] | None = None):
    from .io import FCSError, load_fcs
    from .stats import population_table, thresholds_table
    from .thresholds import ThresholdError

    try:
        res = gate_sample(load_fcs(path, compensation), template, thresholds=fixed or None)
    except (FCSError, MarkerError, GatingError, ThresholdError) as exc:
        return path, None, None, None, str(exc)
    except Exception as exc:  # a file must never take the batch down
        return path, None, None, None, f"{path}: {type(exc).__name__}: {exc}"
    table = population_table([res])
    th = thresholds_table([res])
    if not keep_data:
        res.data = None
    return path, res, table, th, None


def _batch_rules(template: Template) -> dict[tuple[str, str], tuple[dict, str | None, Population, Dim]]:
    """``{(marker, cut): (rule, fitted-on population or None, first user, its dim)}`` of ``scope: batch`` rules."""
    rules = {(m, c): spec for m, cuts in template.thresholds.items() for c, spec in cuts.items()
             if isinstance(spec, Mapping) and spec.get("scope") == "batch"}
    out: dict[tuple[str, str], tuple[dict, str | None, Population, Dim]] = {}
    for pop in template.populations:
        g = pop.gate
        if not isinstance(g, RectGate):
            continue
        for dim, bounds in zip(g.dims, g.bounds):
            for b in bounds:
                if isinstance(b, ThresholdRef):
                    key = (b.marker, b.cut)
                    if key in rules and key not in out:
                        rule = rules[key]
                        out[key] = (rule, rule.get("on", pop.parent), pop, dim)
    return out


def _closure(template: Template, names: Iterable[str | None]) -> set[str]:
    """The populations needed to gate ``names``: themselves, their ancestors and boolean operands."""
    need: set[str] = set()
    todo = [n for n in names if n is not None]
    while todo:
        n = todo.pop()
        if n in need:
            continue
        need.add(n)
        p = template[n]
        todo += ([p.parent] if p.parent else []) + [r for r, _ in getattr(p.gate, "refs", ())]
    return need


def _batch_values(path: str, sub: Template, template: Template, compensation: Any,
                  known: Mapping[tuple[str, str], Any], targets: list) -> dict | None:
    """Pass 1 for one file: the transformed values each batch threshold is fitted on (``None``: file failed)."""
    from .io import load_fcs

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = load_fcs(path, compensation)
            res = gate_sample(data, sub, thresholds=dict(known) or None)
            cols = _Columns(data, template)
            out = {}
            for key, on, pop_name, dim in targets:
                sel = None if on is None else res.indices[on]
                out[key] = np.asarray(cols.transformed(dim, sel, True, pop_name), dtype=float)
            return out
    except Exception:  # reported by pass 2, which gates (and fails on) the same file
        return None


def _fit_batch_thresholds(paths: list[str], template: Template, compensation: Any,
                          jobs: int) -> tuple[dict[tuple[str, str], ThresholdFit], str | None]:
    """Fit every ``scope: batch`` threshold once on the pooled values of all files (pass 1).

    A batch threshold whose fitted-on population needs another batch threshold is
    fitted in a later round, after that one; each round reads every file once.
    """
    from dataclasses import replace

    from .thresholds import ThresholdError, fit_threshold

    rules = _batch_rules(template)
    fits: dict[tuple[str, str], ThresholdFit] = {}
    pending = dict(rules)
    while pending:
        ready, subsets = [], {}
        for key, (rule, on, pop, dim) in pending.items():
            need = _closure(template, [on])
            uses = {(b.marker, b.cut) for n in need for bs in getattr(template[n].gate, "bounds", ())
                    for b in bs if isinstance(b, ThresholdRef)}
            if key in uses:
                return fits, (f"template {template.path}: batch threshold {key[0]}.{key[1]} is fitted on "
                              f"{on!r}, which is gated with that same threshold")
            if not (uses & set(pending)):
                ready.append(key)
                subsets[key] = need
        if not ready:  # pragma: no cover - a cycle through several thresholds
            return fits, f"template {template.path}: batch thresholds {sorted(pending)} depend on each other"
        need_all = set().union(*subsets.values())
        sub = replace(template, populations=[p for p in template.populations if p.name in need_all])
        targets = [(k, pending[k][1], pending[k][2].name, pending[k][3]) for k in ready]
        if jobs > 1 and len(paths) > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=min(jobs, len(paths))) as pool:
                per_file = list(pool.map(_batch_values, paths, [sub] * len(paths), [template] * len(paths),
                                         [compensation] * len(paths), [fits] * len(paths),
                                         [targets] * len(paths)))
        else:
            per_file = [_batch_values(p, sub, template, compensation, fits, targets) for p in paths]
        used = [v for v in per_file if v is not None]
        for key in ready:
            rule, on, pop, dim = pending.pop(key)
            pooled = np.concatenate([v[key] for v in used]) if used else np.empty(0)
            label = f"batch of {len(used)} file(s): {key[0]}.{key[1]}"
            try:
                value, fallback, note = fit_threshold(pooled, rule, label=label)
            except ThresholdError as exc:
                return fits, str(exc)
            note = "; ".join(x for x in (f"scope: batch, pooled over {len(used)} file(s)", note) if x)
            fits[key] = ThresholdFit(key[0], key[1], value, str(rule["method"]), on or "root",
                                     int(pooled.size), fallback, note)
    return fits, None


def gate_files(
    paths: Iterable[str],
    template: Template,
    *,
    compensation: Any = "auto",
    jobs: int = 1,
    progress: Any = None,
) -> Batch:
    """Gate a batch of FCS files with one template; bad files are reported, not fatal.

    Parameters
    ----------
    paths
        FCS files.
    template
        The gating template.
    compensation
        As for :func:`immuneprofile.load_fcs` (``"auto"``: each file's own spillover).
    jobs
        Worker processes (``1``: in-process, results keep their event data for
        AnnData export; ``0`` or negative: all cores).
    progress
        Optional callable ``progress(path, error_or_None)`` called after each file.

    Thresholds with ``scope: batch`` are fitted once on the fitted-on population's
    values pooled over all files (pass 1), then every file is gated with that value
    (pass 2). If such a fit fails without a ``fallback``, every file reports the error.

    Returns
    -------
    Batch
    """
    import os

    import pandas as pd

    paths = [os.fspath(p) for p in paths]
    if jobs <= 0:
        jobs = os.cpu_count() or 1
    batch_fits, batch_error = _fit_batch_thresholds(paths, template, compensation, jobs)
    if batch_error is not None:
        for p in paths:
            if progress:
                progress(p, batch_error)
        return Batch(results=[], table=pd.DataFrame(), thresholds=pd.DataFrame(),
                     errors={p: batch_error for p in paths})
    outs = []
    if jobs == 1 or len(paths) <= 1:
        for p in paths:
            out = _gate_path(p, template, compensation, True, batch_fits)
            outs.append(out)
            if progress:
                progress(p, out[4])
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(jobs, len(paths))) as pool:
            futs = [pool.submit(_gate_path, p, template, compensation, False, batch_fits) for p in paths]
            for fut in futs:
                out = fut.result()
                outs.append(out)
                if progress:
                    progress(out[0], out[4])
    ok = [o for o in outs if o[4] is None]
    table = pd.concat([o[2] for o in ok], ignore_index=True) if ok else pd.DataFrame()
    th = pd.concat([o[3] for o in ok], ignore_index=True) if ok else pd.DataFrame()
    return Batch(results=[o[1] for o in ok], table=table, thresholds=th,
                 errors={o[0]: o[4] for o in outs if o[4] is not None})
