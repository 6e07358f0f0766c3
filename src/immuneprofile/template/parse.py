"""Declarative gating templates: YAML -> validated :class:`~immuneprofile.template.model.Template`.

See ``gating/README.md`` for the file format. The model (the dataclasses) lives in
:mod:`immuneprofile.template.model`; this module reads a parsed YAML mapping,
validates every key and value, and builds it. Each gate type of the file format
has one small parsing function (:data:`_GATE_PARSERS`).
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from immuneprofile.engine.thresholds import THRESHOLD_METHODS
from immuneprofile.engine.transforms import TransformError, normalize_spec
from immuneprofile.exceptions import TemplateError
from immuneprofile.template.model import (
    AbsoluteBasis,
    BooleanGate,
    Bound,
    Dim,
    EllipseGate,
    FitGate,
    Gate,
    PolygonGate,
    Population,
    QCGate,
    Readout,
    RectGate,
    Template,
    ThresholdRef,
    TransformTable,
    topological_order,
)

__all__ = [
    "TemplateError",
    "Dim",
    "ThresholdRef",
    "RectGate",
    "PolygonGate",
    "EllipseGate",
    "FitGate",
    "QCGate",
    "BooleanGate",
    "Population",
    "Template",
    "load_template",
    "parse_template",
    "Readout",
    "parse_readouts",
    "THRESHOLD_METHODS",
]

ROOT = "root"
_RULE_KEYS = {"method", "scope", "on", "fallback", "fraction", "q", "min_height", "min_depth", "bw", "side"}
_QUALIFIERS = {"+": ("pos", True), "-": ("pos", False), "pos": ("pos", True), "neg": ("pos", False),
               "hi": ("hi", True), "++": ("hi", True), "bright": ("hi", True),
               "lo": ("hi", False), "dim": ("hi", False)}
_POPULATION_KEYS = {"name", "parent", "gate", "description"}
_TOP_KEYS = {"name", "description", "transforms", "thresholds", "compensation", "populations", "readouts", "absolute",
             "qc"}
#: Options of the data-driven 2-D gates (besides x, y and scope).
FIT_GATE_OPTIONS = {"singlet": {"k"}, "cluster": {"target", "units", "components", "q"}}
#: the keys each gate type takes (besides ``type``)
_GATE_KEYS: dict[str, set[str]] = {
    "range": {"marker", "min", "max", "complement"},
    "rectangle": {"x", "y", "xmin", "xmax", "ymin", "ymax", "dims", "min", "max", "complement"},
    "threshold": {"markers", "complement"},
    "polygon": {"x", "y", "vertices", "complement"},
    "ellipse": {"x", "y", "dims", "center", "covariance", "distance_square"},
    "boolean": {"op", "of"},
    "quadrant": {"x", "y", "x_cut", "y_cut", "names"},
}


def _num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_target(opts: Mapping[str, Any]) -> str | None:
    """What is wrong with a cluster gate's ``target`` and ``units`` (``None``: nothing)."""
    t = opts.get("target")
    if not isinstance(t, Sequence) or isinstance(t, str) or len(t) != 2 or not all(map(_num, t)):
        return f"needs `target: [x, y]` (two numbers), got {t!r}"
    units = opts.get("units", "quantile")
    if units not in ("quantile", "data"):
        return f"units must be 'quantile' (target as quantiles of the parent's events) or 'data', got {units!r}"
    if units == "quantile" and not all(0 <= v <= 1 for v in t):
        return f"a target in quantile units needs two numbers in [0, 1], got {t!r}"
    return None


def _check_fit_options(kind: str, opts: Mapping[str, Any]) -> str | None:
    """What is wrong with a data-driven gate's options (``None``: nothing)."""
    if kind == "cluster" and _check_target(opts):
        return _check_target(opts)
    if "k" in opts and not (_num(opts["k"]) and opts["k"] > 0):
        return f"k (the band's half-width in robust SDs) must be a number > 0, got {opts['k']!r}"
    if "q" in opts and not (_num(opts["q"]) and 0 < opts["q"] < 1):
        return f"q (the ellipse's chi-square quantile) must be in (0, 1), got {opts['q']!r}"
    c = opts.get("components", 1)
    if not (isinstance(c, int) and not isinstance(c, bool) and 1 <= c <= 20):
        return f"components must be an integer from 1 to 20, got {c!r}"
    return None


def _err(src: str, pop: str | None, problem: str, fix: str) -> TemplateError:
    where = f"population {pop!r}: " if pop else ""
    return TemplateError(f"{src}: {where}{problem}. Fix: {fix}")


def _hint(name: str, choices: Sequence[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or nothing."""
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


class _Parser:
    def __init__(self, doc: Mapping[str, Any], src: str):
        self.doc = doc
        self.src = src
        tr = doc.get("transforms") or {}
        if not isinstance(tr, Mapping):
            raise _err(src, None, "'transforms' must be a mapping", "see gating/README.md")
        try:
            self.table = TransformTable.from_doc(tr)
        except TransformError as exc:
            raise _err(src, None, f"bad transform: {exc}", "see the Transforms section of gating/README.md") from None
        self.transforms = dict(tr)
        self.thresholds = self._parse_thresholds(doc.get("thresholds") or {})
        self.compensation = self._parse_compensation(doc.get("compensation") or {})

    # -- thresholds
    def _parse_thresholds(self, th: Any) -> dict[str, dict[str, Any]]:
        if not isinstance(th, Mapping):
            raise _err(self.src, None, "'thresholds' must map markers to {pos: ..., hi: ...}",
                       "write e.g. `CD3: {pos: 0.4}`")
        out: dict[str, dict[str, Any]] = {}
        for marker, cuts in th.items():
            if isinstance(cuts, (int, float)):
                cuts = {"pos": cuts}
            if not isinstance(cuts, Mapping):
                raise _err(self.src, None, f"threshold for {marker!r} must be a mapping, got {cuts!r}",
                           f"write `{marker}: {{pos: 0.5}}`")
            out[str(marker)] = {}
            for cut, value in cuts.items():
                if cut not in ("pos", "hi"):
                    raise _err(self.src, None, f"threshold {marker}.{cut} is not a known cut",
                               "use `pos` (for +/-) or `hi` (for hi/lo/++)")
                out[str(marker)][cut] = self._parse_threshold_value(f"{marker}.{cut}", value)
        return out

    def _parse_compensation(self, comp: Any) -> dict[str, Any]:
        """``{id: {detectors: [...], fluorochromes: [...], matrix: [[...]]}}`` -> ``{id: DataFrame}``."""
        import pandas as pd

        if not isinstance(comp, Mapping):
            raise _err(self.src, None, "'compensation' must map matrix ids to {detectors, matrix}",
                       "write `compensation: {M1: {detectors: [FL1-A, FL2-A], matrix: [[1, 0.1], [0.02, 1]]}}`")
        out: dict[str, Any] = {}
        for mid, m in comp.items():
            try:
                dets = [str(d) for d in m["detectors"]]
                fluoros = [str(f) for f in m.get("fluorochromes", dets)]
                mat = np.asarray(m["matrix"], dtype=float)
            except (TypeError, KeyError, ValueError):
                mat, dets, fluoros = None, [], []
            if mat is None or mat.shape != (len(fluoros), len(dets)) or not np.isfinite(mat).all():
                raise _err(self.src, None, f"compensation matrix {mid!r} must have `detectors` and a finite "
                           f"`matrix` with one row per fluorochrome and one column per detector",
                           "write `{detectors: [A, B], matrix: [[1, 0.1], [0.02, 1]]}`")
            out[str(mid)] = pd.DataFrame(mat, index=fluoros, columns=dets)
        return out

    def _parse_threshold_value(self, label: str, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return self._finite(float(value), f"threshold {label}")
        if isinstance(value, Mapping):
            return self._parse_rule(label, value)
        raise _err(self.src, None, f"threshold {label} must be a number or a rule, got {value!r}",
                   "write a number in transformed units or {method: valley|tail|quantile|gmm}")

    def _parse_rule(self, label: str, value: Mapping[Any, Any]) -> dict[str, Any]:
        method = value.get("method")
        if method not in THRESHOLD_METHODS:
            raise _err(self.src, None, f"threshold {label}: unknown method {method!r}",
                       f"use one of {sorted(THRESHOLD_METHODS)}")
        rule = dict(value)
        if True in rule:  # YAML 1.1 reads an unquoted `on:` key as the boolean true
            rule["on"] = rule.pop(True)
        unknown = set(rule) - _RULE_KEYS
        if unknown:
            raise _err(self.src, None, f"threshold {label}: unknown option(s) {sorted(map(str, unknown))}",
                       f"use {sorted(_RULE_KEYS)}")
        if rule.get("scope", "sample") not in ("sample", "batch"):
            raise _err(self.src, None, f"threshold {label}: scope must be 'sample' or 'batch'",
                       "write `scope: sample` or `scope: batch`")
        for key, v in rule.items():
            if isinstance(v, float):
                self._finite(v, f"threshold {label}: {key}")
        return rule

    def _finite(self, v: float, what: str, pop: str | None = None) -> float:
        if not math.isfinite(v):
            raise _err(self.src, pop, f"{what} is {v}", "write a finite number")
        return v

    def require_threshold(self, marker: str, cut: str, pop: str) -> None:
        cuts = self.thresholds.get(marker)
        if cuts is None:
            raise _err(self.src, pop, f"marker {marker!r} has no entry in `thresholds`{_hint(marker, list(self.thresholds))}",
                       f"add `{marker}: {{{cut}: <value>}}` under thresholds")
        if cut not in cuts and not (cut == "hi" and "pos" in cuts):
            raise _err(self.src, pop, f"threshold {marker}.{cut} is not defined",
                       f"add `{cut}: <value>` to thresholds.{marker}")

    def cut_ref(self, marker: str, cut: str, pop: str) -> ThresholdRef:
        """A reference to ``marker.cut`` (``hi`` falls back to ``pos`` where only ``pos`` is defined)."""
        self.require_threshold(marker, cut, pop)
        return ThresholdRef(marker, cut if cut in self.thresholds[marker] else "pos")

    # -- dimensions and numbers
    def dim(self, marker: Any, pop: str) -> Dim:
        if isinstance(marker, Mapping):
            return self._dim_mapping(marker, pop)
        if not isinstance(marker, str) or not marker.strip():
            raise _err(self.src, pop, f"marker must be a non-empty string, got {marker!r}",
                       "name the marker (e.g. CD4) or the scatter channel (e.g. FSC-A)")
        marker = marker.strip()
        return Dim(marker=marker, transform=self.spec_for(marker))

    def _ratio(self, m: Mapping[str, Any], pop: str) -> tuple[str, str, float, float, float]:
        r = m["ratio"]
        if not isinstance(r, Sequence) or isinstance(r, str) or len(r) != 2:
            raise _err(self.src, pop, f"ratio must be [numerator, denominator], got {r!r}",
                       "write `ratio: [FL2-H, FL3-H]`")
        try:
            return str(r[0]), str(r[1]), float(m.get("A", 1)), float(m.get("B", 0)), float(m.get("C", 0))
        except (TypeError, ValueError):
            raise _err(self.src, pop, "ratio parameters A, B, C must be numbers", "write numbers") from None

    def _dim_mapping(self, m: Mapping[str, Any], pop: str) -> Dim:
        """``{marker: X, transform: ..., compensated: false}`` or ``{ratio: [X, Y], A:, B:, C:, name:}``."""
        unknown = set(m) - {"marker", "transform", "compensated", "ratio", "A", "B", "C", "name"}
        if unknown:
            raise _err(self.src, pop, f"dimension has unknown key(s) {sorted(unknown)}",
                       "use marker, transform, compensated (or ratio, A, B, C, name)")
        ratio = self._ratio(m, pop) if "ratio" in m else None
        if ratio is not None:
            marker = str(m.get("name") or f"{ratio[0]}/{ratio[1]}")
        else:
            given = m.get("marker")
            if not isinstance(given, str) or not given.strip():
                raise _err(self.src, pop, f"dimension needs a marker, got {m!r}", "write `marker: CD4`")
            marker = given.strip()
        try:
            spec = normalize_spec(m["transform"]) if "transform" in m else (None if ratio else self.spec_for(marker))
        except TransformError as exc:
            raise _err(self.src, pop, f"bad transform: {exc}",
                       "see the Transforms section of gating/README.md") from None
        comp = m.get("compensated", True)
        if isinstance(comp, str):
            if comp not in self.compensation:
                raise _err(self.src, pop, f"dimension compensated with {comp!r}, which is not under `compensation`",
                           "define the matrix under the top-level `compensation` or write true/false")
        else:
            comp = bool(comp)
        return Dim(marker=marker, transform=spec, compensated=comp, ratio=ratio)

    def spec_for(self, marker: str, scatter: bool | None = None) -> dict[str, Any] | None:
        return self.table.spec_for(marker, scatter)

    def number(self, v: Any, pop: str, what: str, allow_ref: bool = False) -> Bound:
        if v is None:
            return None
        if allow_ref and isinstance(v, str) and "." in v:
            m, _, c = v.rpartition(".")
            if c not in ("pos", "hi"):
                raise _err(self.src, pop, f"{what} {v!r} refers to an unknown cut {c!r}",
                           "refer to a threshold as MARKER.pos or MARKER.hi")
            return self.cut_ref(m, c, pop)
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise _err(self.src, pop, f"{what} must be a number, got {v!r}",
                       "write a number in transformed units" + (" or MARKER.pos" if allow_ref else "")) from None
        if math.isnan(f):
            raise _err(self.src, pop, f"{what} is NaN", "write a finite number")
        return self._finite(f, what, pop)

    def bounds(self, g: Mapping[str, Any], pop: str, lo_key: str, hi_key: str, marker: str) -> tuple[Bound, Bound]:
        lo = self.number(g.get(lo_key), pop, lo_key, True)
        hi = self.number(g.get(hi_key), pop, hi_key, True)
        if isinstance(lo, float) and isinstance(hi, float) and lo >= hi:
            raise _err(self.src, pop, f"{marker}: min {lo} is not below max {hi}", "swap or correct the bounds")
        return lo, hi

    # -- gates: one function per gate type (_GATE_PARSERS)
    def gate(self, pop: str, g: Any) -> list[Population] | Gate:
        if not isinstance(g, Mapping) or "type" not in g:
            raise _err(self.src, pop, "gate must be a mapping with a 'type'",
                       "write e.g. `gate: {type: range, marker: CD3, min: 0.4}`")
        kind = str(g["type"]).lower()
        if kind in FIT_GATE_OPTIONS:
            return self.fit_gate(pop, kind, g)
        parse = _GATE_PARSERS.get(kind)
        if parse is None:
            raise _err(self.src, pop, f"unknown gate type {kind!r}",
                       "use range, rectangle, polygon, ellipse, quadrant, threshold, boolean, singlet or cluster")
        self._check_gate_keys(pop, kind, g)
        return parse(self, pop, g)

    def fit_gate(self, pop: str, kind: str, g: Mapping[str, Any]) -> FitGate:
        """``{type: singlet, x: FSC-A, y: FSC-H, k: 4}`` or ``{type: cluster, x:, y:, target: [x, y], ...}``."""
        allowed = FIT_GATE_OPTIONS[kind]
        unknown = set(g) - {"type", "x", "y", "scope", *allowed}
        if unknown:
            raise _err(self.src, pop, f"{kind} gate has unknown key(s) {sorted(map(str, unknown))}",
                       f"use x, y, scope, {', '.join(sorted(allowed))}")
        default_x, default_y = ("FSC-A", "FSC-H") if kind == "singlet" else (None, None)
        dx, dy = self.dim(g.get("x", default_x), pop), self.dim(g.get("y", default_y), pop)
        scope = str(g.get("scope", "sample"))
        if scope not in ("sample", "batch"):
            raise _err(self.src, pop, f"scope must be 'sample' or 'batch', got {scope!r}", "write `scope: batch`")
        opts = {k: g[k] for k in allowed if k in g}
        problem = _check_fit_options(kind, opts)
        if problem:
            raise _err(self.src, pop, f"{kind} gate: {problem}", "see the data-driven gates in gating/README.md")
        if "target" in opts:
            opts["target"] = tuple(float(v) for v in opts["target"])
        return FitGate(kind, (dx, dy), tuple(sorted(opts.items())), scope)

    def _check_gate_keys(self, pop: str, kind: str, g: Mapping[str, Any]) -> None:
        allowed = _GATE_KEYS[kind]
        for key in g:
            if key == "type" or key in allowed:
                continue
            if key == "complement":
                raise _err(self.src, pop, f"`complement` is not supported on {kind} gates",
                           "remove it (for a quadrant, use the opposite cell; otherwise a boolean `not` gate)")
            raise _err(self.src, pop, f"{kind} gate has unknown key {str(key)!r}{_hint(str(key), sorted(allowed))}",
                       f"use {', '.join(sorted(allowed))}")

    def _range(self, pop: str, g: Mapping[str, Any]) -> RectGate:
        d = self.dim(g.get("marker"), pop)
        lo, hi = self.bounds(g, pop, "min", "max", d.marker)
        if lo is None and hi is None:
            raise _err(self.src, pop, "range gate has neither min nor max", "give min, max or both")
        return RectGate((d,), ((lo, hi),), bool(g.get("complement", False)), "range")

    def _rectangle(self, pop: str, g: Mapping[str, Any]) -> RectGate:
        if "dims" in g:
            return self._box(pop, g)
        dx, dy = self.dim(g.get("x"), pop), self.dim(g.get("y"), pop)
        b = tuple(self.bounds(g, pop, f"{axis}min", f"{axis}max", d.marker) for axis, d in (("x", dx), ("y", dy)))
        return RectGate((dx, dy), b, bool(g.get("complement", False)), "rectangle")

    def _box(self, pop: str, g: Mapping[str, Any]) -> RectGate:
        """``{type: rectangle, dims: [A, B, C], min: [a, null, c], max: [...]}``: a box in any number of dimensions."""
        dims, lows, highs = g.get("dims"), g.get("min"), g.get("max")
        n = len(dims) if isinstance(dims, Sequence) and not isinstance(dims, str) else 0
        if (not n or not isinstance(dims, Sequence) or not isinstance(lows, Sequence) or not isinstance(highs, Sequence)
                or any(isinstance(v, str) or len(v) != n for v in (lows, highs))):
            raise _err(self.src, pop, "a rectangle with `dims` needs `min` and `max` lists of the same length",
                       "write `dims: [CD3, CD19]`, `min: [0.4, null]`, `max: [null, 0.3]` (null = unbounded)")
        ds = tuple(self.dim(m, pop) for m in dims)
        bounds = tuple(self.bounds({"min": lo, "max": hi}, pop, "min", "max", d.marker)
                       for d, lo, hi in zip(ds, lows, highs))
        return RectGate(ds, bounds, bool(g.get("complement", False)), "rectangle")

    def _threshold(self, pop: str, g: Mapping[str, Any]) -> RectGate:
        markers = g.get("markers")
        if not isinstance(markers, Mapping) or not markers:
            raise _err(self.src, pop, "threshold gate needs `markers: {MARKER: +|-|hi|lo}`",
                       "write e.g. `markers: {CD4: '+', CD8: '-'}`")
        dims, bounds = [], []
        for m, q in markers.items():
            q = str(q).strip().lower() if q is not None else ""
            if q not in _QUALIFIERS:
                raise _err(self.src, pop, f"marker {m!r} has qualifier {q!r}", "use one of '+', '-', 'hi', 'lo', '++'")
            cut, positive = _QUALIFIERS[q]
            ref = self.cut_ref(str(m), cut, pop)
            dims.append(self.dim(str(m), pop))
            bounds.append((ref, None) if positive else (None, ref))
        return RectGate(tuple(dims), tuple(bounds), bool(g.get("complement", False)), "threshold")

    def _polygon(self, pop: str, g: Mapping[str, Any]) -> PolygonGate:
        dx, dy = self.dim(g.get("x"), pop), self.dim(g.get("y"), pop)
        verts = g.get("vertices")
        try:
            arr = np.asarray(verts, dtype=float)
        except (TypeError, ValueError):
            arr = None
        if arr is None or arr.ndim != 2 or arr.shape[1] != 2 or arr.shape[0] < 3:
            raise _err(self.src, pop, f"polygon vertices must be a list of at least 3 [x, y] pairs, got {verts!r}",
                       "write `vertices: [[x1, y1], [x2, y2], [x3, y3], ...]` with numbers")
        if not np.isfinite(arr).all():
            raise _err(self.src, pop, "polygon vertices contain non-finite numbers", "use finite numbers")
        return PolygonGate((dx, dy), tuple(map(tuple, arr.tolist())), bool(g.get("complement", False)))

    def _ellipse(self, pop: str, g: Mapping[str, Any]) -> EllipseGate:
        dims = tuple(self.dim(m, pop) for m in (g.get("dims") or [g.get("x"), g.get("y")]))
        n = len(dims)
        try:
            c = np.asarray(g.get("center"), dtype=float)
            cov = np.asarray(g.get("covariance"), dtype=float)
            d2 = float(g.get("distance_square", 1.0))
        except (TypeError, ValueError):
            c = cov = np.empty(0)
            d2 = 1.0
        if c.shape != (n,) or cov.shape != (n, n) or not (np.isfinite(c).all() and np.isfinite(cov).all()):
            raise _err(self.src, pop, f"ellipse needs center ({n} numbers) and a {n}x{n} covariance",
                       "write `center: [cx, cy]`, `covariance: [[a, b], [b, c]]`, `distance_square: 1`")
        if np.linalg.matrix_rank(cov) < n or not d2 > 0 or not math.isfinite(d2):
            raise _err(self.src, pop, "ellipse covariance is singular or distance_square <= 0",
                       "use a positive-definite covariance and a positive distance_square")
        return EllipseGate(dims, tuple(c.tolist()), tuple(map(tuple, cov.tolist())), d2)

    def _boolean(self, pop: str, g: Mapping[str, Any]) -> BooleanGate:
        op = str(g.get("op", "")).lower()
        of = g.get("of")
        if op not in ("and", "or", "not"):
            raise _err(self.src, pop, f"boolean op {op!r}", "use op: and | or | not")
        if not isinstance(of, Sequence) or isinstance(of, str) or not of:
            raise _err(self.src, pop, "boolean gate needs `of: [population, ...]`", "list the populations to combine")
        if op == "not" and len(of) != 1:
            raise _err(self.src, pop, "'not' takes exactly one population", "write `op: not, of: [NAME]`")
        refs = tuple((str(r)[1:], True) if str(r).startswith("!") else (str(r), False) for r in of)
        return BooleanGate(op, refs)

    def _quadrant(self, group: str, g: Mapping[str, Any]) -> list[Population]:
        dx, dy = self.dim(g.get("x"), group), self.dim(g.get("y"), group)
        xc = self.number(g.get("x_cut"), group, "x_cut", True)
        yc = self.number(g.get("y_cut"), group, "y_cut", True)
        if xc is None or yc is None:
            raise _err(self.src, group, "quadrant needs x_cut and y_cut", "give both cuts (numbers or MARKER.pos)")
        names = g.get("names")
        keys = ("++", "+-", "-+", "--")
        if not isinstance(names, Mapping) or set(map(str, names)) != set(keys):
            raise _err(self.src, group,
                       f"quadrant names must map exactly {list(keys)} to population names, got {names!r}",
                       "write `names: {'++': A, '+-': B, '-+': C, '--': D}` (first sign: x)")
        signs = tuple((str(names[k]), k) for k in keys)
        out = []
        for pname, k in signs:
            bx = (xc, None) if k[0] == "+" else (None, xc)
            by = (yc, None) if k[1] == "+" else (None, yc)
            out.append(Population(pname, None, RectGate((dx, dy), (bx, by), False, "quadrant", (group, signs))))
        return out

    # -- tree
    def populations(self) -> list[Population]:
        items = self.doc.get("populations")
        if not isinstance(items, Sequence) or isinstance(items, str) or not items:
            raise _err(self.src, None, "no `populations` list", "add `populations:` with at least one entry")
        pops: list[Population] = []
        seen: set[str] = set()
        for i, item in enumerate(items):
            for p in self._entry(i, item):
                if p.name in seen or p.name == ROOT:
                    raise _err(self.src, p.name, "duplicate population name" if p.name != ROOT else "'root' is reserved",
                               "give every population (and quadrant) a unique name")
                seen.add(p.name)
                pops.append(p)
        self._names = [p.name for p in pops]
        self._check_fitted_on(self._names)
        return topological_order(pops, self._unknown_dependency, self._cycle)

    def _entry(self, i: int, item: Any) -> list[Population]:
        """The population(s) of entry ``i`` of ``populations`` (a quadrant gives four)."""
        if not isinstance(item, Mapping) or "name" not in item:
            raise _err(self.src, None, f"entry #{i + 1} of populations has no name",
                       "give every population `name:`, `parent:` and `gate:`")
        name = str(item["name"]).strip()
        parent = item.get("parent", ROOT)
        parent = None if parent in (None, ROOT, "") else str(parent).strip()
        unknown = set(item) - _POPULATION_KEYS
        if unknown:
            raise _err(self.src, name, f"unknown key(s) {sorted(unknown)}", "use name, parent, gate, description")
        g = self.gate(name, item.get("gate"))
        if isinstance(g, list):
            return [replace(p, parent=parent) for p in g]
        return [Population(name, parent, g)]

    def _check_fitted_on(self, names: list[str]) -> None:
        for marker, cuts in self.thresholds.items():
            for cut, rule in cuts.items():
                on = rule.get("on") if isinstance(rule, Mapping) else None
                if on is not None and str(on) not in names:
                    raise _err(self.src, None, f"threshold {marker}.{cut} is fitted `on` unknown population "
                               f"{on!r}{_hint(str(on), names)}", "name a population of this template")

    def _unknown_dependency(self, pop: Population, name: str) -> TemplateError:
        what = "parent" if name == pop.parent else "boolean operand"
        return _err(self.src, pop.name, f"unknown {what} {name!r}{_hint(name, self._names)}",
                    f"define {name!r} as a population or correct the name")

    def _cycle(self, cycle: list[str]) -> TemplateError:
        return _err(self.src, cycle[0], f"cycle in the gate tree: {' -> '.join(cycle)}",
                    "a population cannot be its own ancestor; change one parent")


#: the parsing function of each gate type of the file format
_GATE_PARSERS: dict[str, Callable[[_Parser, str, Mapping[str, Any]], Any]] = {
    "range": _Parser._range,
    "rectangle": _Parser._rectangle,
    "threshold": _Parser._threshold,
    "polygon": _Parser._polygon,
    "ellipse": _Parser._ellipse,
    "boolean": _Parser._boolean,
    "quadrant": _Parser._quadrant,
}


def parse_template(doc: Mapping[str, Any], source: str = "<template>") -> Template:
    """Validate a template given as a mapping (parsed YAML) and build a :class:`Template`."""
    if not isinstance(doc, Mapping):
        raise TemplateError(f"{source}: a template must be a mapping with `populations`, got {type(doc).__name__}")
    unknown = set(doc) - _TOP_KEYS
    if unknown:
        raise _err(source, None, f"unknown top-level key(s) {sorted(unknown)}{_hint(sorted(map(str, unknown))[0], sorted(_TOP_KEYS))}",
                   f"use {', '.join(sorted(_TOP_KEYS))}")
    p = _Parser(doc, source)
    pops = p.populations()
    name = str(doc.get("name") or Path(source).stem)
    tmpl = Template(name=name, populations=pops, thresholds=p.thresholds, transforms=p.transforms,
                    description=str(doc.get("description", "")), path=source, compensation=p.compensation,
                    qc=_parse_qc(doc, pops, source))
    tmpl.readouts, tmpl.absolute = parse_readouts(doc, tmpl)
    return tmpl


def _parse_qc(doc: Mapping[str, Any], pops: Sequence[Population], source: str) -> dict[str, Any] | None:
    """The validated options of a template's ``qc:`` step (``None`` without one)."""
    if doc.get("qc") in (None, False):
        return None
    from immuneprofile.qc.acquisition import QC_POPULATIONS, check_qc_options

    taken = sorted(set(QC_POPULATIONS) & {p.name for p in pops})
    if taken:
        raise _err(source, taken[0], "this name is reserved for the `qc:` step's populations",
                   "rename the population")
    return check_qc_options(doc["qc"], source)


def parse_readouts(doc: Mapping[str, Any], tmpl: Template) -> tuple[dict[str, Readout], AbsoluteBasis | None]:
    """Validate a template's ``readouts:`` and ``absolute:`` blocks against its population tree.

    ``readouts: {NAME: {population: POP, of: ANCESTOR}}``: ``of`` must be an ancestor of
    ``POP`` (FlowJo's "Freq. of"). ``absolute: {population: POP, column: SHEET_COLUMN}``
    names the population whose cells the sample sheet's column counts per µL.

    Raises
    ------
    TemplateError
        For a malformed entry, an unknown population, or an ``of`` that is not an ancestor.
    """
    src = tmpl.path
    block = doc.get("readouts") or {}
    if not isinstance(block, Mapping):
        raise _err(src, None, "'readouts' must map readout names to {population: ..., of: ...}",
                   "write e.g. `Treg: {population: Treg, of: CD4+}`")
    out: dict[str, Readout] = {}
    for name, spec in block.items():
        if not isinstance(spec, Mapping) or set(spec) != {"population", "of"}:
            raise _err(src, None, f"readout {name!r} must be {{population: ..., of: ...}}, got {spec!r}",
                       "write e.g. `Treg: {population: Treg, of: CD4+}`")
        pop, of = str(spec["population"]), str(spec["of"])
        if pop not in tmpl:
            raise _err(src, None, f"readout {name!r}: population {pop!r} is not in the template",
                       f"use one of {tmpl.names}")
        if of not in tmpl.path_of(pop):
            raise _err(src, None, f"readout {name!r}: {of!r} is not an ancestor of {pop!r}",
                       f"choose `of` among its ancestors {list(tmpl.path_of(pop))}")
        out[str(name)] = Readout(str(name), pop, of)
    absolute = doc.get("absolute")
    if absolute is None:
        return out, None
    if not isinstance(absolute, Mapping) or set(absolute) != {"population", "column"} \
            or str(absolute["population"]) not in tmpl:
        raise _err(src, None, f"'absolute' must be {{population: <a population>, column: <sheet column>}}, "
                   f"got {absolute!r}", "write e.g. `absolute: {population: live, column: lymphocytes_per_uL}`")
    return out, AbsoluteBasis(str(absolute["population"]), str(absolute["column"]))


def load_template(path: str | os.PathLike) -> Template:
    """Load and validate a YAML gating template: a file, or a shipped template by name.

    Parameters
    ----------
    path
        A YAML file, or the name of a shipped template (``"treg"``, ``"monocytes"``,
        ``"tcell_skin_homing"``; :func:`~immuneprofile.template.shipped_templates` lists them).

    Raises
    ------
    TemplateError
        For unreadable YAML, unknown parents or operands, cycles, duplicate names,
        malformed gates or undefined thresholds; the message names the file, the
        population and the fix.
    """
    import yaml

    from immuneprofile.template.shipped import resolve_template

    path = os.fspath(resolve_template(path))
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except FileNotFoundError:
        from immuneprofile.template.shipped import shipped_templates

        raise TemplateError(f"{path}: template file not found (shipped templates, usable by name: "
                            f"{', '.join(shipped_templates())})") from None
    except yaml.YAMLError as exc:
        raise TemplateError(f"{path}: not valid YAML: {exc}") from exc
    return parse_template(doc, path)
