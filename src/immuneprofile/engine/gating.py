"""The vectorised gating engine.

:func:`gate_sample` evaluates a whole :class:`~immuneprofile.template.Template`
(or several) on one :class:`~immuneprofile.io.FCSData` at once. Each
population is a bit set over the sample's events (``uint64`` words,
:mod:`immuneprofile._kernels`), computed once.

How populations are computed
----------------------------
Every cut of a rectangle gate (a marker against a bound) is one compiled pass
over the whole column, into the bit sets of the events surely above and
surely below it; every polygon on untransformed axes (scatter) is one pass
over its two columns. These passes do not depend on the parent, so they are
kept for the sample and shared by every gate that uses the same cut or
polygon (siblings, quadrant cells, other templates); a population is then its
parent's bit set ANDed with its passes' bit sets. Populations that several
templates define identically are computed once (:meth:`_Engine.key`). With
threads, the passes that need no data-driven threshold start at once.

Exactness with FlowKit
----------------------
Gates are defined on transformed values, but transforming every event is the
expensive part of gating (logicle is a root-finding per value). The engine
therefore maps each gate boundary back to the raw scale once (``T^-1(cut)``,
for transforms that are increasing on the whole line) and compares raw values.
Events within a relative ``1e-6`` of a mapped boundary are "uncertain" and are
transformed with FlowKit's own transform object and compared exactly as FlowKit
compares them (``>= min``, ``< max``; winding number for polygons; Mahalanobis
``<=`` for ellipses). Polygons and ellipses on transformed axes transform only
the events of the parent that fall inside their (raw-scale) bounding box. The
membership is thus the membership FlowKit computes.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any, overload

import numpy as np

from immuneprofile.engine._kernels import TUPLE_VERTICES, convex_edges, full_bits, pack, unpack
from immuneprofile.engine._kernels import kernels_for as _kernels_for
from immuneprofile.engine.thresholds import MAX_FIT_EVENTS, ThresholdError
from immuneprofile.engine.transforms import density_transform
from immuneprofile.engine.values import Compensation, EventValues, gate_compensation
from immuneprofile.exceptions import GatingError
from immuneprofile.io.fcs import FCSData, MarkerError
from immuneprofile.template.model import (
    BooleanGate,
    Dim,
    EllipseGate,
    PolygonGate,
    Population,
    QCGate,
    RectGate,
    Template,
    ThresholdRef,
)

__all__ = ["GatingResult", "gate_sample", "GatingError", "ThresholdFit"]

_REL_TOL = 1e-6
_THREADS_FROM = 200_000  # events: smaller samples are gated on one thread




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
    bits
        ``{population: bit set of its events}``: ``uint64`` words, bit ``j`` of
        word ``w`` for event ``64 w + j``; read-only, and shared by the results
        of templates gated together that define the population identically.
        :attr:`masks` and :attr:`indices` unpack them.
    thresholds
        The threshold values used (fixed and fitted), for audit.
    data
        The loaded sample (for medians and AnnData export).
    counts
        ``{population: number of events}`` (counted from ``bits`` if not given).
    fits
        The data-driven transforms and 2-D gates fitted for this sample (or given for
        its batch), :class:`~immuneprofile.engine.fit2d.Fit`; ``template`` holds
        their fitted values.
    """

    sample_id: str
    path: str
    template: Template
    n_events: int
    bits: dict[str, np.ndarray]
    thresholds: list[ThresholdFit] = field(default_factory=list)
    data: FCSData | None = field(default=None, repr=False)
    counts: dict[str, int] = field(default_factory=dict, repr=False)
    fits: list = field(default_factory=list, repr=False)

    def __post_init__(self) -> None:
        for name, b in self.bits.items():
            if name not in self.counts:
                self.counts[name] = int(np.bitwise_count(b).sum())

    def count(self, name: str) -> int:
        return self.counts[name]

    def mask(self, name: str) -> np.ndarray:
        """Boolean membership of every event in population ``name``."""
        return unpack(self.bits[name], self.n_events)

    @property
    def masks(self) -> Mapping[str, np.ndarray]:
        """``{population: boolean membership of every event}``, unpacked when read."""
        return _Unpacked(self, self.mask)

    @property
    def indices(self) -> Mapping[str, np.ndarray]:
        """``{population: sorted int64 array of its event indices}``, computed when read."""
        return _Unpacked(self, lambda name: np.flatnonzero(self.mask(name)))

    def parent_count(self, name: str) -> int:
        parent = self.template[name].parent
        return self.n_events if parent is None else self.count(parent)


class _Unpacked(Mapping):
    """A read-only view of a result's populations, each made from its bit set when read."""

    def __init__(self, res: GatingResult, make):
        self._res, self._make = res, make

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self._res.bits:
            raise KeyError(name)
        return self._make(name)

    def __iter__(self):
        return iter(self._res.bits)

    def __len__(self) -> int:
        return len(self._res.bits)


def _cmp(vals_raw: np.ndarray, xb: float | None, t: float, ge: bool, exact_fn) -> np.ndarray:
    """``T(v) >= t`` (ge) or ``T(v) < t`` from raw values, exact near the boundary."""
    if xb is None:
        tv = exact_fn(np.arange(vals_raw.size))
        return tv >= t if ge else tv < t
    tol = _REL_TOL * (1.0 + abs(xb))
    with np.errstate(invalid="ignore"):
        out = vals_raw > xb if ge else vals_raw < xb
        # near the cut, or not finite: FlowKit's transform decides (logicle/hyperlog map NaN and +-inf to -1.0)
        unsure = np.flatnonzero((np.abs(vals_raw - xb) <= tol) | ~np.isfinite(vals_raw))
    if unsure.size:
        tv = exact_fn(unsure)
        out[unsure] = tv >= t if ge else tv < t
    return out


class _Spare:
    """Bit-set arrays kept between samples (a few dozen per size), so that passes reuse warm pages."""

    def __init__(self, per_size: int = 64) -> None:
        self._free: dict[int, list[np.ndarray]] = {}
        self._lock = threading.Lock()
        self._per_size = per_size

    def take(self, words: int) -> np.ndarray:
        with self._lock:
            free = self._free.get(words)
            if free:
                return free.pop()
        return np.empty(words, dtype=np.uint64)

    def give(self, arrays: list[np.ndarray]) -> None:
        with self._lock:
            for a in arrays:
                free = self._free.setdefault(a.shape[0], [])
                if len(free) < self._per_size:
                    free.append(a)
            while len(self._free) > 4:  # keep the sizes of the last few samples only
                self._free.pop(next(iter(self._free)))


#: Process-wide state (1 of 2): bit-set arrays recycled between samples (bounded: ``per_size`` per length);
#: holds no results -- a sample's arrays come back only after its results were copied out. See docs/architecture.md.
_SPARE = _Spare()


class _Shared:
    """What gating one sample has computed, kept for the next gate and the next template.

    Populations and fits are keyed by definition (:meth:`_Engine.key`): a
    population defined identically in two templates (same channels,
    transforms, resolved bounds and ancestry) is computed once. ``passes``
    holds the kernels' passes over every event (a cut of one column, a
    polygon over two), reused by every gate with that cut or polygon whatever
    its parent (siblings, quadrant cells, other templates); with a thread
    pool, the passes that need no data-driven threshold start at once and run
    while the engine walks the template (the kernels release the GIL).
    """

    def __init__(self, pool: Any = None) -> None:
        self.pops: dict[tuple, tuple[np.ndarray, int]] = {}  # key -> (bits, count)
        self.fits: dict[tuple, ThresholdFit] = {}
        self.passes: dict[tuple, Any] = {}  # key -> result, or its Future
        self.pool = pool
        self.buffers: list[np.ndarray] = []  # the passes' bit sets, from _SPARE, given back by release()

    def buffer(self, like: np.ndarray) -> np.ndarray:
        """A copy of ``like`` in a recycled array (fresh pages cost more than the pass that fills them)."""
        out = _SPARE.take(like.shape[0])
        out[:] = like
        self.buffers.append(out)
        return out

    def release(self) -> None:
        """Give the passes' bit sets back for the next sample (they never end up in a result)."""
        _SPARE.give(self.buffers)
        self.buffers = []
        self.passes.clear()

    def get(self, key: tuple, compute, wait: bool = True):
        """The result of pass ``key``, computed (in the pool unless waited for at once) on first request."""
        got = self.passes.get(key)
        if got is None:
            got = self.passes[key] = compute() if (wait or self.pool is None) else self.pool.submit(compute)
        if wait and hasattr(got, "result"):
            got = self.passes[key] = got.result()
        return got


class _Engine:
    def __init__(self, data: FCSData, template: Template, fixed: Mapping[tuple[str, str], float] | None,
                 shared: _Shared):
        self.data = data
        self.template = template
        self.n = data.n_events
        self.cols = EventValues(data, template)
        self.bits: dict[str, np.ndarray] = {}
        self.counts: dict[str, int] = {}
        self.keys: dict[str, tuple | None] = {}
        self.fits: dict[tuple[str, str], ThresholdFit] = {}
        self.fixed = dict(fixed or {})
        self.shared = shared
        self.kernels = _kernels_for(data.n_events)
        self._full: np.ndarray | None = None

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
                fit = replace(given)
            else:
                fit = ThresholdFit(ref.marker, ref.cut, float(given), "batch")
        else:
            spec = self.template.thresholds[ref.marker][ref.cut]
            if isinstance(spec, (int, float)):
                fit = ThresholdFit(ref.marker, ref.cut, float(spec), "fixed")
            else:
                fit = self._fit(ref, spec, pop, dim)
        self.fits[key] = fit
        return fit.value

    def _fit(self, ref: ThresholdRef, spec: Mapping[str, Any], pop: Population, dim: Dim) -> ThresholdFit:
        """Fit a data-driven threshold on its population (or reuse the identical fit of another template)."""
        from immuneprofile.engine.thresholds import fit_threshold

        on = spec.get("on", pop.parent)
        if on is not None and on not in self.bits:
            raise GatingError(f"{self.data.path}: template {self.template.path}: threshold {ref} is fitted on "
                              f"{on!r}, which is not gated before population {pop.name!r}")
        share = self._fit_key(ref, spec, pop, dim, on)
        if share is not None and share in self.shared.fits:
            return replace(self.shared.fits[share], marker=ref.marker, fitted_on=on or "root")
        n_fit = self.n if on is None else self.counts[on]
        values = self._fit_values(spec, pop, dim, self._parent_of(on), n_fit)
        value, fallback, note = fit_threshold(values, spec, label=f"{self.data.path}: {ref}")
        if spec.get("scope") == "batch":
            note = "; ".join(x for x in (note, "scope: batch, but fitted on this sample alone "
                                               "(gate_files fits it on the pooled batch)") if x)
        fit = ThresholdFit(ref.marker, ref.cut, value, str(spec["method"]), on or "root", n_fit, fallback, note)
        if share is not None:
            self.shared.fits[share] = fit
        return fit

    def _fit_key(self, ref: ThresholdRef, spec: Mapping[str, Any], pop: Population, dim: Dim,
                 on: str | None) -> tuple | None:
        """What defines a fit (dimension, rule, fitted-on population), to share it across templates; ``None``: not."""
        dim_key, on_key = self.dim_key(dim, pop), (() if on is None else self.keys.get(on))
        if dim_key is None or on_key is None:
            return None
        return (dim_key, ref.cut, repr(sorted((k, v) for k, v in spec.items() if k != "on")), on_key)

    def _fit_values(self, spec: Mapping[str, Any], pop: Population, dim: Dim, bits: np.ndarray,
                    n_fit: int) -> np.ndarray:
        """The transformed values of ``dim`` a rule is fitted on, for the events in ``bits``."""
        if spec["method"] == "quantile":  # read off the values themselves: FlowKit's exact ones
            return self.cols.exact(dim, self.cols.raw(dim, _members(bits, self.n), True, pop.name))
        # a density rule reads a 1024-bin density: the fast transform (within 1e-8) serves it
        if n_fit <= MAX_FIT_EVENTS:
            raw = self.cols.raw(dim, _members(bits, self.n), True, pop.name)
        else:
            # a subsample: the population's events among every k-th event of the sample
            # (k = ceil(count / MAX_FIT_EVENTS)): systematic, deterministic, O(n / k)
            step = -(-n_fit // MAX_FIT_EVENTS)
            if dim.ratio is None:
                raw = _scratch("raw", min(MAX_FIT_EVENTS, -(-self.n // step)))
                col = self.cols.base(self.cols.channel(dim.marker, pop.name), True)
                raw = raw[:self.kernels.strided_values(bits, step, col, raw)]
            else:
                pos = np.arange(0, self.n, step)
                raw = self.cols.raw(dim, pos[unpack(bits, self.n)[pos]][:MAX_FIT_EVENTS], True, pop.name)
        return density_transform(dim.transform)(raw, out=_scratch("values", raw.shape[0]))

    # -- identity of populations across templates
    def dim_key(self, dim: Dim, pop: Population) -> tuple | None:
        if isinstance(dim.compensated, str):  # a template's own matrix: not comparable across templates
            return None
        chans = tuple(self.cols.channel(c, pop.name) for c in dim.channels)
        return (chans, self.cols.tkey(dim.transform), bool(dim.compensated), dim.ratio[2:] if dim.ratio else None)

    def key(self, pop: Population) -> tuple | None:
        """What defines ``pop``'s events: its gate (thresholds resolved), channels and ancestry; ``None``: not shareable."""
        pk = () if pop.parent is None else self.keys.get(pop.parent)
        if pk is None:
            return None
        g = pop.gate
        if isinstance(g, BooleanGate):
            refs = tuple((self.keys.get(name), c) for name, c in g.refs)
            return None if any(r is None for r, _ in refs) else (pk, "boolean", g.op, refs)
        if isinstance(g, QCGate):
            return (pk, "qc", g)
        dims = tuple(self.dim_key(d, pop) for d in g.dims)
        if any(d is None for d in dims):
            return None
        if isinstance(g, RectGate):
            bounds = tuple((self.bound(lo, pop, d), self.bound(hi, pop, d)) for d, (lo, hi) in zip(g.dims, g.bounds))
            return (pk, "rect", dims, bounds, g.complement)
        if isinstance(g, PolygonGate):
            return (pk, "polygon", dims, tuple(map(tuple, g.vertices)), g.complement)
        assert isinstance(g, EllipseGate), g  # data-driven gates are fitted into ordinary ones before gating
        return (pk, "ellipse", dims, g.center, g.covariance, g.distance_square)

    # -- gates
    def run(self) -> dict[str, np.ndarray]:
        for pop in self.template.populations:
            try:
                k = self.key(pop)
                got = self.shared.pops.get(k) if k is not None else None
                if got is None:
                    got = self.population(pop)
                    got[0].flags.writeable = False
                    if k is not None:
                        self.shared.pops[k] = got
                self.bits[pop.name], self.counts[pop.name] = got
                self.keys[pop.name] = k
            except (MarkerError, GatingError, ThresholdError):  # already name the sample and what failed
                raise
            except Exception as exc:  # pragma: no cover - defensive: name the context
                raise GatingError(f"{self.data.path}: template {self.template.path}: population {pop.name!r}: "
                                  f"{type(exc).__name__}: {exc}") from exc
        return self.bits

    def result(self, fits: list | None = None) -> GatingResult:
        """Gate the template (:meth:`run`): its :class:`GatingResult`, with the data-driven ``fits`` made for it."""
        bits = self.run()
        return GatingResult(sample_id=self.data.sample_id, path=self.data.path, template=self.template,
                            n_events=self.n, bits=dict(bits), thresholds=list(self.fits.values()), data=self.data,
                            counts=dict(self.counts), fits=list(fits or []))

    def full(self) -> np.ndarray:
        if self._full is None:
            self._full = full_bits(self.n)
            self._full.flags.writeable = False
        return self._full

    def _parent(self, pop: Population) -> np.ndarray:
        return self._parent_of(pop.parent)

    def _parent_of(self, name: str | None) -> np.ndarray:
        """Bit set of population ``name`` (every event for ``None``)."""
        return self.full() if name is None else self.bits[name]

    def population(self, pop: Population) -> tuple[np.ndarray, int]:
        """Bit set and count of ``pop``."""
        g = pop.gate
        parent = self._parent(pop)
        if isinstance(g, BooleanGate):
            b = self.boolean(g, parent)
        elif isinstance(g, QCGate):
            b = self.qc(pop, g, parent)
        else:
            comp = gate_compensation(g)
            if isinstance(g, RectGate):
                b = self.rect(pop, g, parent, comp)
            elif isinstance(g, PolygonGate):
                b = self.polygon(pop, g, parent, comp)
            elif isinstance(g, EllipseGate):
                b = self.ellipse(pop, g, parent, comp)
            else:  # pragma: no cover
                raise GatingError(f"unsupported gate {g!r}")
            if getattr(g, "complement", False):
                b = ~b & parent
        return b, _count(b)

    def _rect_plan(self, pop: Population, g: RectGate, comp):
        """Bounds of a rectangle: ``fast`` and ``slow`` (raw-scale / exact transform), and per channel its raw cuts."""
        fast: list[tuple] = []
        slow: list[tuple] = []
        cuts: list[tuple] = []  # fast/slow: (dim, t, raw bound, ge); cuts: (channel, lower, upper)
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
                cuts.append((self.cols.channel(dim.marker, pop.name), b.get(True), b.get(False)))
        return fast, slow, cuts

    def cut(self, ch: int, comp, xb: float, wait: bool = True) -> tuple[np.ndarray, np.ndarray, bool]:
        """Bit sets of all events surely at or above and surely below a raw-scale cut (one pass, kept).

        Events in neither are within the tolerance of the cut, or not finite (NaN, +-inf:
        decided by FlowKit's transform, see :func:`_cmp`); the third item says whether there are any.
        """
        col = self.cols.base(ch, comp)

        def compute():
            a, b = _sure_cut(xb)
            above, below = self.shared.buffer(self.full()), self.shared.buffer(self.full())
            self.kernels.interval_bits(col, a, _MAX, -_MAX, b, above, below)  # +-inf: never "sure"
            return above, below, bool(((above | below) != self.full()).any())

        return self.shared.get(("cut", ch, self._comp_key(comp), xb), compute, wait)

    def _comp_key(self, comp):
        return comp if not isinstance(comp, str) else (comp, id(self.template))  # a template's own matrix

    def _inside_polygon(self, pop: Population, g: PolygonGate, comp, wait: bool = True) -> np.ndarray:
        """Bit set of all events inside a polygon on untransformed axes (one pass, kept)."""
        chans = tuple(self.cols.channel(d.marker, pop.name) for d in g.dims)
        cols = [self.cols.base(c, comp) for c in chans]

        def compute():
            inside = self.shared.buffer(self.full())
            edges = convex_edges(tuple(map(tuple, g.vertices)))
            if edges is None:
                self.kernels.winding_bits(*_vertices(g.vertices), *cols, inside)
                return inside
            near = self.shared.buffer(self.full())  # a convex polygon by half-planes, edges by winding count
            self.kernels.convex_bits(*edges, *cols, inside, near)
            if near.any():
                ev = _members(near, self.n)
                _assign(inside, ev[points_in_polygon(g.vertices, cols[0][ev], cols[1][ev])], True)
            return inside

        return self.shared.get(("polygon", chans, self._comp_key(comp), tuple(map(tuple, g.vertices))), compute, wait)

    def prefetch(self) -> None:
        """Start, in the pool, the passes of every gate that needs no data-driven threshold."""
        if self.shared.pool is None:
            return
        for pop in self.template.populations:
            g = pop.gate
            if isinstance(g, BooleanGate) or getattr(g, "complement", False):
                continue
            try:
                self._prefetch_gate(pop, g, gate_compensation(g))
            except (MarkerError, GatingError, ThresholdError):  # reported when the population is gated
                continue

    def _prefetch_gate(self, pop: Population, g: Any, comp: Compensation) -> None:
        if isinstance(g, RectGate) and all(self._known(b) for bs in g.bounds for b in bs):
            for ch, lo, hi in self._rect_plan(pop, g, comp)[2]:
                for xb in (lo, hi):
                    if xb is not None:
                        self.cut(ch, comp, xb, wait=False)
        elif isinstance(g, PolygonGate) and all(d.transform is None and d.ratio is None for d in g.dims):
            self._inside_polygon(pop, g, comp, wait=False)

    def _known(self, b: Any) -> bool:
        """Whether a bound is known before gating (a number, a fixed threshold or one given for the batch)."""
        if not isinstance(b, ThresholdRef):
            return True
        spec = self.template.thresholds.get(b.marker, {}).get(b.cut)
        return (b.marker, b.cut) in self.fixed or isinstance(spec, (int, float))

    def _in_box(self, cuts, parent, comp) -> tuple[np.ndarray, np.ndarray | None]:
        """Bit sets of the events of ``parent`` surely inside raw-scale bounds ``[(channel, lower, upper)]``, and of
        those undecided (within the tolerance of a bound, or NaN; ``None`` if no event of the sample is)."""
        sure, maybe, band = parent.copy(), None, False
        sides = []  # (bit set of the events surely inside this bound, of those surely outside)
        for ch, lo, hi in cuts:
            if lo is not None:
                above, below, b = self.cut(ch, comp, lo)
                sides.append((above, below))
                band |= b
            if hi is not None:
                above, below, b = self.cut(ch, comp, hi)
                sides.append((below, above))
                band |= b
        for inside, _ in sides:
            sure &= inside
        if band:
            maybe = parent.copy()
            for _, outside in sides:
                maybe &= ~outside
            maybe &= ~sure
        return sure, maybe

    def rect(self, pop: Population, g: RectGate, parent, comp) -> np.ndarray:
        fast, slow, cuts = self._rect_plan(pop, g, comp)
        out, unsure = self._in_box(cuts, parent, comp)
        if unsure is not None and unsure.any():  # within the tolerance of a boundary: decide exactly, as _cmp does
            ev = _members(unsure, self.n)
            _assign(out, ev[self._rect_exact(pop, fast, ev, comp)], True)
        if slow:  # bounds that cannot be mapped to the raw scale: exact transform of the events left
            ev = _members(out, self.n)
            _assign(out, ev[~self._rect_exact(pop, slow, ev, comp)], False)
        return out

    def _rect_exact(self, pop: Population, bounds, ev: np.ndarray, comp) -> np.ndarray:
        """Membership of events ``ev`` for ``bounds`` ([(dim, t, raw bound or None, ge)]), via :func:`_cmp`."""
        ok = np.ones(ev.size, dtype=bool)
        for dim, t, xb, ge in bounds:
            vals = self.cols.raw(dim, ev, comp, pop.name) if xb is not None else np.empty(ev.size)

            def exact(rel, _dim=dim):
                return self.cols.transformed(_dim, ev[rel], comp, pop.name)

            ok &= _cmp(vals, xb, t, ge, exact)
        return ok

    def _box_candidates(self, pop: Population, dims, lows, highs, parent, comp) -> np.ndarray:
        """Indices of the events of ``parent`` that may lie inside a transformed-space box (edges included)."""
        cuts = []
        for dim, lo, hi in zip(dims, lows, highs):
            a, b = self.cols.raw_bound(dim, lo), self.cols.raw_bound(dim, hi)
            if a is not None and b is not None and dim.ratio is None:
                cuts.append((self.cols.channel(dim.marker, pop.name), a, b))
        sure, unsure = self._in_box(cuts, parent, comp)
        # not finite (NaN, +-inf) in a bounded dimension: never "sure", so among ``unsure`` and transformed exactly
        return _members(sure if unsure is None else sure | unsure, self.n)

    def polygon(self, pop: Population, g: PolygonGate, parent, comp) -> np.ndarray:
        if all(d.transform is None and d.ratio is None for d in g.dims):
            # untransformed axes (scatter): one pass over the two columns (every event, kept)
            return self._inside_polygon(pop, g, comp) & parent
        v = np.asarray(g.vertices, dtype=np.float64)
        ev = self._box_candidates(pop, g.dims, v.min(axis=0), v.max(axis=0), parent, comp)
        px = self.cols.transformed(g.dims[0], ev, comp, pop.name)
        py = self.cols.transformed(g.dims[1], ev, comp, pop.name)
        out = np.zeros_like(parent)
        _assign(out, ev[points_in_polygon(v, px, py)], True)
        return out

    def ellipse(self, pop: Population, g: EllipseGate, parent, comp) -> np.ndarray:
        from flowutils.gating import points_in_ellipsoid

        c = np.asarray(g.center, dtype=float)
        cov = np.asarray(g.covariance, dtype=float)
        half = np.sqrt(np.abs(np.diag(cov)) * g.distance_square) * (1 + 1e-9) + 1e-12
        if np.array_equal(cov, cov.T) and np.all(np.linalg.eigvalsh(cov) > 0):
            ev = self._box_candidates(pop, g.dims, c - half, c + half, parent, comp)
        else:  # not an ellipsoid (Gating-ML allows any matrix): the region is unbounded, test every event
            ev = _members(parent, self.n)
        out = np.zeros_like(parent)
        if ev.size:
            pts = np.column_stack([self.cols.transformed(d, ev, comp, pop.name) for d in g.dims])
            _assign(out, ev[np.asarray(points_in_ellipsoid(cov, c, g.distance_square, pts), dtype=bool)], True)
        return out

    def qc(self, pop: Population, g: QCGate, parent) -> np.ndarray:
        """Events kept by acquisition QC: outside its Time segments and below its margins (raw values)."""
        keep = np.ones(self.n, dtype=bool)
        if g.segments and g.time_channel is not None:
            t = self.cols.base(self.cols.channel(g.time_channel, pop.name), False)
            for a, b in g.segments:
                keep &= ~((t >= a) & (t <= b))
        for ch, limit in g.margins:
            keep &= ~(self.cols.base(self.cols.channel(ch, pop.name), False) >= limit)
        return pack(keep) & parent

    def boolean(self, g: BooleanGate, parent) -> np.ndarray:
        operands = [~self.bits[name] if complement else self.bits[name] for name, complement in g.refs]
        if g.op == "and":
            res = np.bitwise_and.reduce(operands)
        elif g.op == "or":
            res = np.bitwise_or.reduce(operands)
        else:
            res = ~operands[0]
        return res & parent  # also clears the bits past the last event that ~ set


#: Process-wide state (2 of 2): per thread, the float buffers a threshold fit reads (nothing is kept in them).
_SCRATCH = threading.local()


def _scratch(name: str, size: int) -> np.ndarray:
    """A float array of ``size`` reused by this thread's next fits (a fit reads it and keeps nothing)."""
    buf = getattr(_SCRATCH, name, None)
    if buf is None or buf.shape[0] < size:
        buf = np.empty(max(size, MAX_FIT_EVENTS))
        setattr(_SCRATCH, name, buf)
    return buf[:size]


def _count(bits: np.ndarray) -> int:
    return int(np.bitwise_count(bits).sum())


def _members(bits: np.ndarray, n: int) -> np.ndarray:
    """Sorted indices of the events in a bit set."""
    return np.flatnonzero(unpack(bits, n))


def _assign(bits: np.ndarray, ev: np.ndarray, value: bool) -> None:
    """Set (``value``) or clear the bits of events ``ev`` (in place)."""
    if ev.size:
        one = np.left_shift(np.uint64(1), (ev & 63).astype(np.uint64))
        if value:
            np.bitwise_or.at(bits, ev >> 6, one)
        else:
            np.bitwise_and.at(bits, ev >> 6, ~one)


def _vertices(vertices) -> tuple:
    """Vertex x and y for the winding kernel: tuples (compiled per vertex count, unrolled) for small polygons."""
    v = np.asarray(vertices, dtype=np.float64)
    if len(v) <= TUPLE_VERTICES:
        return tuple(float(x) for x in v[:, 0]), tuple(float(y) for y in v[:, 1])
    return np.ascontiguousarray(v[:, 0]), np.ascontiguousarray(v[:, 1])


_MAX = float(np.finfo(np.float64).max)


def _sure_cut(xb: float) -> tuple[float, float]:
    """``(a, b)`` for a raw-scale cut: values ``>= a`` are surely at or above it, values ``<= b`` surely below.

    Surely: more than the tolerance (relative ``1e-6``) away, so that the rounding
    of ``T^-1`` cannot matter; the values in between are decided exactly.
    """
    tol = _REL_TOL * (1.0 + abs(xb))
    return float(np.nextafter(xb + tol, np.inf)), float(np.nextafter(xb - tol, -np.inf))


def points_in_polygon(vertices: np.ndarray | Sequence[Sequence[float]], px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """Winding-number point-in-polygon, vectorised over points (boolean per point).

    Same arithmetic and the same bounding-box rule as FlowUtils'
    ``points_in_polygon`` (Sunday's algorithm; odd winding count = inside), so
    membership is identical, edge cases included. Compiled with numba when
    available, NumPy otherwise (same result).
    """
    px = np.ascontiguousarray(px, dtype=np.float64)
    py = np.ascontiguousarray(py, dtype=np.float64)
    out = full_bits(px.shape[0])
    _kernels_for(px.shape[0]).winding_bits(*_vertices(vertices), px, py, out)
    return unpack(out, px.shape[0])


@overload
def gate_sample(data: FCSData, template: Template, *, thresholds: Mapping[tuple[str, str], Any] | None = None,
                threads: int = 0) -> GatingResult: ...


@overload
def gate_sample(data: FCSData, template: Sequence[Template], *,
                thresholds: Mapping[tuple[str, str], Any] | None = None, threads: int = 0) -> list[GatingResult]: ...


def gate_sample(data, template, *, thresholds=None, threads=0):
    """Gate one sample with a template (or several).

    Parameters
    ----------
    data
        A sample loaded with :func:`immuneprofile.load_fcs`.
    template
        A template loaded with :func:`immuneprofile.load_template`, or a list of
        templates: each is gated, and a population (or data-driven threshold)
        defined identically in several of them (same channels, transforms,
        resolved bounds and ancestry) is computed once.
    thresholds
        Optional ``{(marker, cut): value}`` overriding the templates' thresholds
        (used for batch-scope data-driven thresholds).
    threads
        Threads for the engine's passes over the events (``0``: all cores; ``1``:
        none; samples under 200,000 events always use one). The result does not
        depend on it.

    Returns
    -------
    GatingResult
        Or a list of them, one per template, for a list of templates.

    Raises
    ------
    MarkerError
        A marker of the template is missing from the file.
    ThresholdError
        A data-driven threshold could not be fitted and its rule gives no ``fallback``.
    GatingError
        Anything else that prevents gating, naming the file, template and population.
    """
    if isinstance(template, Template):
        return _gate_templates(data, [template], [thresholds], threads)[0]
    templates = list(template)
    return _gate_templates(data, templates, [thresholds] * len(templates), threads)


def fitted_template(data: FCSData, template: Template,
                    thresholds: Mapping[tuple[str, str], Any] | None = None) -> Template:
    """``template`` with its data-driven transforms and 2-D gates fitted on ``data``, as :func:`gate_sample`
    fits them (unchanged when it has none): the template to convert to FlowKit or Gating-ML."""
    from immuneprofile.engine.fit2d import fit_template, needs_fitting

    return fit_template(data, template, thresholds=thresholds, gate=gate_sample)[0] if needs_fitting(template) \
        else template


def _fit_templates(data: FCSData, templates: Sequence[Template], fixed: Sequence[Mapping | None],
                   gate: Callable = gate_sample, shared: dict[Any, Any] | None = None):
    """Templates with their data-driven transforms and 2-D gates fitted on ``data`` (:mod:`.fit2d`).

    ``fixed`` may carry batch fits (:class:`~immuneprofile.engine.fit2d.Fit`, keyed by
    ``Fit.key``) besides threshold values; ``gate`` gates a fit's parent population
    (:func:`gate_sample`'s signature). Returns the templates, the thresholds alone, and
    each template's fits. ``shared``: the 2-D gates already fitted on ``data`` (by an
    earlier call, e.g. a batch's first pass), filled as gates are fitted.
    """
    from immuneprofile.engine.fit2d import Fit, fit_template, needs_fitting

    out_t, out_fx, out_fits = [], [], []
    shared = {} if shared is None else shared
    for t, fx in zip(templates, fixed):
        fx = dict(fx or {})
        given = {k: v for k, v in fx.items() if isinstance(v, Fit)}
        th = {k: v for k, v in fx.items() if not isinstance(v, Fit)}
        fits: list = []
        if needs_fitting(t):
            t, fits = fit_template(data, t, given, th, gate=gate, shared=shared)
        out_t.append(t)
        out_fx.append(th or None)
        out_fits.append(fits)
    return out_t, out_fx, out_fits


def _gate_shared(data: FCSData, template: Template, *, thresholds: Mapping[tuple[str, str], Any] | None = None,
                 threads: int = 0, shared: _Shared) -> GatingResult:
    """:func:`gate_sample` of one template on the cache ``shared`` (its populations are kept there).

    ``threads`` is ignored: the passes run in the cache's pool.
    """
    from immuneprofile.engine.fit2d import needs_fitting

    if needs_fitting(template):  # not a fit's parent populations (fitted in order): gate it on its own
        return gate_sample(data, template, thresholds=thresholds, threads=threads)
    eng = _Engine(data, template, thresholds, shared)
    eng.prefetch()
    return eng.result()


def _gate_templates(data: FCSData, templates: Sequence[Template],
                    fixed: Sequence[Mapping[tuple[str, str], Any] | None], threads: int = 0,
                    fitted: dict[Any, Any] | None = None) -> list[GatingResult]:
    import os
    from concurrent.futures import ThreadPoolExecutor

    threads = threads if threads > 0 else (os.cpu_count() or 1)
    # below ~200k events a pass takes tens of microseconds: starting threads would cost more than it saves
    pool = ThreadPoolExecutor(threads) if threads > 1 and data.n_events >= _THREADS_FROM else None
    shared = _Shared(pool)
    out = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            # the fits' parent populations are gated on the shared cache: gated once, not again below
            templates, fixed, fits_of = _fit_templates(data, templates, fixed, partial(_gate_shared, shared=shared),
                                                       fitted)
            engines = [_Engine(data, tmpl, fx, shared) for tmpl, fx in zip(templates, fixed)]
            for eng in engines:
                eng.prefetch()
            out = [eng.result(fits) for eng, fits in zip(engines, fits_of)]
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        shared.release()
    return out
