"""Declarative gating templates (YAML), validated on load.

See ``gating/README.md`` for the file format. A :class:`Template` is plain data:
a topologically ordered list of :class:`Population`, each with one gate whose
dimensions name markers (not channels).
"""

from __future__ import annotations

import difflib
import graphlib
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence, Union

import numpy as np

from immuneprofile.engine.transforms import DEFAULT_FLUORESCENCE, TransformError, normalize_spec
from immuneprofile.exceptions import TemplateError

__all__ = [
    "TemplateError",
    "Dim",
    "ThresholdRef",
    "RectGate",
    "PolygonGate",
    "EllipseGate",
    "BooleanGate",
    "FitGate",
    "QCGate",
    "Population",
    "Template",
    "load_template",
    "parse_template",
    "THRESHOLD_METHODS",
]

ROOT = "root"
THRESHOLD_METHODS = {"valley", "tail", "quantile", "gmm"}
_RULE_KEYS = {"method", "scope", "on", "fallback", "fraction", "q", "min_height", "min_depth", "bw", "side"}
_QUALIFIERS = {"+": ("pos", True), "-": ("pos", False), "pos": ("pos", True), "neg": ("pos", False),
               "hi": ("hi", True), "++": ("hi", True), "bright": ("hi", True),
               "lo": ("hi", False), "dim": ("hi", False)}


@dataclass(frozen=True)
class ThresholdRef:
    """A cut point defined in the template's ``thresholds`` section (``marker.cut``)."""

    marker: str
    cut: str  # "pos" or "hi"

    def __str__(self) -> str:
        return f"{self.marker}.{self.cut}"


Bound = Union[float, ThresholdRef, None]


@dataclass(frozen=True)
class Dim:
    """One gating dimension.

    Attributes
    ----------
    marker
        Marker or channel name (resolved per file by :meth:`FCSData.find_channel`);
        for a ratio dimension, the ratio's name.
    transform
        Normalised transform spec (see :mod:`immuneprofile.transforms`), ``None`` = linear raw scale.
    compensated
        Use compensated values (default) or the uncompensated ones; a string names
        a spillover matrix of ``Template.compensation`` (a Gating-ML spectrum matrix)
        that the engine applies to the file's raw events.
    ratio
        ``(numerator, denominator, A, B, C)`` for a Gating-ML ratio dimension
        ``A * (x - B) / (y - C)``; ``None`` otherwise.
    """

    marker: str
    transform: Mapping[str, Any] | None = None
    compensated: bool = True
    ratio: tuple[str, str, float, float, float] | None = None

    def __hash__(self) -> int:  # transform dicts are not hashable
        return hash((self.marker, tuple(sorted((self.transform or {}).items())), self.compensated, self.ratio))

    @property
    def channels(self) -> tuple[str, ...]:
        return (self.ratio[0], self.ratio[1]) if self.ratio else (self.marker,)


@dataclass(frozen=True)
class RectGate:
    """Hyper-rectangle: per dimension ``lo <= v < hi`` (``None`` = unbounded).

    ``kind`` records how the template wrote it (range, rectangle, threshold, quadrant).
    For quadrants ``quadrant`` is ``(group name, {population: (x sign, y sign)})``.
    """

    dims: tuple[Dim, ...]
    bounds: tuple[tuple[Bound, Bound], ...]
    complement: bool = False
    kind: str = "rectangle"
    quadrant: tuple[str, tuple[tuple[str, str], ...]] | None = None


@dataclass(frozen=True)
class PolygonGate:
    """Polygon in two dimensions; winding-number membership (odd = inside), edges inclusive."""

    dims: tuple[Dim, Dim]
    vertices: tuple[tuple[float, float], ...]
    complement: bool = False


@dataclass(frozen=True)
class EllipseGate:
    """Ellipse/ellipsoid: ``(v - c)^T Σ^-1 (v - c) <= distance_square``."""

    dims: tuple[Dim, ...]
    center: tuple[float, ...]
    covariance: tuple[tuple[float, ...], ...]
    distance_square: float


@dataclass(frozen=True)
class BooleanGate:
    """``and``/``or``/``not`` of other populations; refs are ``(name, complement)``."""

    op: str
    refs: tuple[tuple[str, bool], ...]


@dataclass(frozen=True)
class FitGate:
    """A data-driven 2-D gate, fitted on its parent's events before gating (:mod:`immuneprofile.engine.fit2d`).

    ``kind`` is ``"singlet"`` (a band around the robust FSC-H/FSC-A line; becomes a
    :class:`PolygonGate`) or ``"cluster"`` (the Gaussian-mixture component nearest
    ``target``; becomes an :class:`EllipseGate`). ``options`` holds the fitting
    options as ``(key, value)`` pairs; ``scope`` is ``"sample"`` or ``"batch"``.
    """

    kind: str
    dims: tuple[Dim, Dim]
    options: tuple[tuple[str, Any], ...]
    scope: str = "sample"

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)


@dataclass(frozen=True)
class QCGate:
    """Acquisition QC's verdict on one sample (:mod:`immuneprofile.qc.acquisition`): the events kept.

    An event is kept unless its ``time_channel`` value lies in one of ``segments``
    (inclusive Time intervals) or its raw (uncompensated) value on a channel of
    ``margins`` is at or above that channel's limit.
    """

    time_channel: str | None
    segments: tuple[tuple[float, float], ...]
    margins: tuple[tuple[str, float], ...]


Gate = Union[RectGate, PolygonGate, EllipseGate, BooleanGate, FitGate, QCGate]


@dataclass(frozen=True)
class Population:
    """A named population: its parent (``None`` = all events) and its gate."""

    name: str
    parent: str | None
    gate: Gate

    @property
    def dims(self) -> tuple[Dim, ...]:
        return getattr(self.gate, "dims", ())


@dataclass
class Template:
    """A validated gating template.

    Attributes
    ----------
    name, description, path
        Identification.
    populations
        Topologically ordered: every parent (and boolean operand) precedes its users.
    thresholds
        ``{marker: {"pos"|"hi": number or rule dict}}``.
    transforms
        The template's ``transforms`` section as written (for export).
    compensation
        ``{matrix id: pandas.DataFrame}`` spillover matrices referenced by dims whose
        ``compensated`` is that id (rows: fluorochromes, columns: detector ``$PnN``);
        empty for YAML templates (Gating-ML import fills it).
    """

    name: str
    populations: list[Population]
    thresholds: dict[str, dict[str, Any]] = field(default_factory=dict)
    transforms: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    path: str = "<template>"
    compensation: dict[str, Any] = field(default_factory=dict)
    qc: dict[str, Any] | None = None  # the `qc:` step's options (immuneprofile.qc.acquisition), None: no QC

    def __post_init__(self) -> None:
        self._by_name = {p.name: p for p in self.populations}

    def __getitem__(self, name: str) -> Population:
        return self._by_name[name]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.populations]

    def children(self, name: str | None) -> list[Population]:
        return [p for p in self.populations if p.parent == name]

    def path_of(self, name: str) -> tuple[str, ...]:
        """Ancestors of ``name`` from the root, excluding ``name`` itself."""
        out: list[str] = []
        p = self._by_name[name].parent
        while p is not None:
            out.append(p)
            p = self._by_name[p].parent
        return tuple(reversed(out))

    @property
    def markers(self) -> list[str]:
        """Every marker/channel the template gates on, in first-use order."""
        seen: dict[str, None] = {}
        for p in self.populations:
            for d in p.dims:
                for c in d.channels:
                    seen.setdefault(c, None)
        return list(seen)

    def transform_for(self, marker: str, scatter: bool | None = None) -> dict[str, Any] | None:
        """The transform spec this template applies to ``marker`` (``scatter`` overrides name-based detection)."""
        p = _Parser({"transforms": self.transforms}, self.path)
        return p.spec_for(marker, scatter)

    def with_thresholds(self, values: Mapping[tuple[str, str], float]) -> "Template":
        """Copy with the given ``(marker, cut)`` thresholds fixed to numbers."""
        th = {m: dict(c) for m, c in self.thresholds.items()}
        for (m, c), v in values.items():
            th.setdefault(m, {})[c] = float(v)
        return replace(self, thresholds=th)


# --------------------------------------------------------------------------- parsing

#: Options of the data-driven 2-D gates (besides x, y and scope).
FIT_GATE_OPTIONS = {"singlet": {"k"}, "cluster": {"target", "units", "components", "q"}}


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


def _is_scatter(marker: str) -> bool:
    m = marker.strip().upper()
    return m.startswith("FSC") or m.startswith("SSC") or m in ("TIME",)


class _Parser:
    def __init__(self, doc: Mapping[str, Any], src: str):
        self.doc = doc
        self.src = src
        tr = doc.get("transforms") or {}
        if not isinstance(tr, Mapping):
            raise _err(src, None, "'transforms' must be a mapping", "see gating/README.md")
        try:
            self.default = normalize_spec(tr.get("default", DEFAULT_FLUORESCENCE))
            self.scatter = normalize_spec(tr.get("scatter", None))
            self.per_marker = {str(k): normalize_spec(v) for k, v in (tr.get("channels") or {}).items()}
        except TransformError as exc:
            raise _err(src, None, f"bad transform: {exc}", "see the Transforms section of gating/README.md")
        self.transforms = dict(tr)
        self.thresholds = self._parse_thresholds(doc.get("thresholds") or {})

    # -- pieces
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

    def _parse_threshold_value(self, label: str, value: Any) -> Any:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, Mapping):
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
            return rule
        raise _err(self.src, None, f"threshold {label} must be a number or a rule, got {value!r}",
                   "write a number in transformed units or {method: valley|tail|quantile|gmm}")

    def dim(self, marker: Any, pop: str) -> Dim:
        if isinstance(marker, Mapping):
            return self._dim_mapping(marker, pop)
        if not isinstance(marker, str) or not marker.strip():
            raise _err(self.src, pop, f"marker must be a non-empty string, got {marker!r}",
                       "name the marker (e.g. CD4) or the scatter channel (e.g. FSC-A)")
        marker = marker.strip()
        return Dim(marker=marker, transform=self.spec_for(marker))

    def _dim_mapping(self, m: Mapping[str, Any], pop: str) -> Dim:
        """``{marker: X, transform: ..., compensated: false}`` or ``{ratio: [X, Y], A:, B:, C:, name:}``."""
        unknown = set(m) - {"marker", "transform", "compensated", "ratio", "A", "B", "C", "name"}
        if unknown:
            raise _err(self.src, pop, f"dimension has unknown key(s) {sorted(unknown)}",
                       "use marker, transform, compensated (or ratio, A, B, C, name)")
        ratio = None
        if "ratio" in m:
            r = m["ratio"]
            if not isinstance(r, Sequence) or isinstance(r, str) or len(r) != 2:
                raise _err(self.src, pop, f"ratio must be [numerator, denominator], got {r!r}",
                           "write `ratio: [FL2-H, FL3-H]`")
            try:
                ratio = (str(r[0]), str(r[1]), float(m.get("A", 1)), float(m.get("B", 0)), float(m.get("C", 0)))
            except (TypeError, ValueError):
                raise _err(self.src, pop, "ratio parameters A, B, C must be numbers", "write numbers")
            marker = str(m.get("name") or f"{r[0]}/{r[1]}")
        else:
            marker = m.get("marker")
            if not isinstance(marker, str) or not marker.strip():
                raise _err(self.src, pop, f"dimension needs a marker, got {m!r}", "write `marker: CD4`")
            marker = marker.strip()
        try:
            spec = normalize_spec(m["transform"]) if "transform" in m else (None if ratio else self.spec_for(marker))
        except TransformError as exc:
            raise _err(self.src, pop, f"bad transform: {exc}", "see the Transforms section of gating/README.md")
        return Dim(marker=marker, transform=spec, compensated=bool(m.get("compensated", True)), ratio=ratio)

    def spec_for(self, marker: str, scatter: bool | None = None) -> dict[str, Any] | None:
        if marker in self.per_marker:
            return self.per_marker[marker]
        if _is_scatter(marker) if scatter is None else scatter:
            return self.scatter
        return self.default

    def number(self, v: Any, pop: str, what: str, allow_ref: bool = False) -> Bound:
        if v is None:
            return None
        if allow_ref and isinstance(v, str) and "." in v:
            m, _, c = v.rpartition(".")
            if c not in ("pos", "hi"):
                raise _err(self.src, pop, f"{what} {v!r} refers to an unknown cut {c!r}",
                           "refer to a threshold as MARKER.pos or MARKER.hi")
            self.require_threshold(m, c, pop)
            return ThresholdRef(m, c)
        try:
            f = float(v)
        except (TypeError, ValueError):
            raise _err(self.src, pop, f"{what} must be a number, got {v!r}",
                       "write a number in transformed units" + (" or MARKER.pos" if allow_ref else ""))
        if math.isnan(f):
            raise _err(self.src, pop, f"{what} is NaN", "write a finite number")
        return f

    def require_threshold(self, marker: str, cut: str, pop: str) -> None:
        cuts = self.thresholds.get(marker)
        if cuts is None:
            close = difflib.get_close_matches(marker, list(self.thresholds), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise _err(self.src, pop, f"marker {marker!r} has no entry in `thresholds`{hint}",
                       f"add `{marker}: {{{cut}: <value>}}` under thresholds")
        if cut not in cuts and not (cut == "hi" and "pos" in cuts):
            raise _err(self.src, pop, f"threshold {marker}.{cut} is not defined",
                       f"add `{cut}: <value>` to thresholds.{marker}")

    def cut_ref(self, marker: str, cut: str) -> ThresholdRef:
        cuts = self.thresholds[marker]
        return ThresholdRef(marker, cut if cut in cuts else "pos")

    # -- gates
    def gate(self, pop: str, g: Any) -> list[Population] | Gate:
        if not isinstance(g, Mapping) or "type" not in g:
            raise _err(self.src, pop, "gate must be a mapping with a 'type'",
                       "write e.g. `gate: {type: range, marker: CD3, min: 0.4}`")
        kind = str(g["type"]).lower()
        comp = bool(g.get("complement", False))
        if kind == "range":
            d = self.dim(g.get("marker"), pop)
            lo = self.number(g.get("min"), pop, "min", True)
            hi = self.number(g.get("max"), pop, "max", True)
            if lo is None and hi is None:
                raise _err(self.src, pop, "range gate has neither min nor max", "give min, max or both")
            self._check_order(pop, lo, hi, d.marker)
            return RectGate((d,), ((lo, hi),), comp, "range")
        if kind == "rectangle":
            dx, dy = self.dim(g.get("x"), pop), self.dim(g.get("y"), pop)
            b = []
            for axis, d in (("x", dx), ("y", dy)):
                lo = self.number(g.get(f"{axis}min"), pop, f"{axis}min", True)
                hi = self.number(g.get(f"{axis}max"), pop, f"{axis}max", True)
                self._check_order(pop, lo, hi, d.marker)
                b.append((lo, hi))
            return RectGate((dx, dy), tuple(b), comp, "rectangle")
        if kind == "threshold":
            markers = g.get("markers")
            if not isinstance(markers, Mapping) or not markers:
                raise _err(self.src, pop, "threshold gate needs `markers: {MARKER: +|-|hi|lo}`",
                           "write e.g. `markers: {CD4: '+', CD8: '-'}`")
            dims, bounds = [], []
            for m, q in markers.items():
                q = str(q).strip().lower() if q is not None else ""
                if q not in _QUALIFIERS:
                    raise _err(self.src, pop, f"marker {m!r} has qualifier {q!r}",
                               "use one of '+', '-', 'hi', 'lo', '++'")
                cut, positive = _QUALIFIERS[q]
                self.require_threshold(str(m), cut, pop)
                ref = self.cut_ref(str(m), cut)
                dims.append(self.dim(str(m), pop))
                bounds.append((ref, None) if positive else (None, ref))
            return RectGate(tuple(dims), tuple(bounds), comp, "threshold")
        if kind == "polygon":
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
            return PolygonGate((dx, dy), tuple(map(tuple, arr.tolist())), comp)
        if kind == "ellipse":
            dims = tuple(self.dim(m, pop) for m in (g.get("dims") or [g.get("x"), g.get("y")]))
            try:
                c = np.asarray(g.get("center"), dtype=float)
                cov = np.asarray(g.get("covariance"), dtype=float)
                d2 = float(g.get("distance_square", 1.0))
            except (TypeError, ValueError):
                c = cov = None
            n = len(dims)
            if c is None or c.shape != (n,) or cov.shape != (n, n):
                raise _err(self.src, pop, f"ellipse needs center ({n} numbers) and a {n}x{n} covariance",
                           "write `center: [cx, cy]`, `covariance: [[a, b], [b, c]]`, `distance_square: 1`")
            if np.linalg.matrix_rank(cov) < n or d2 <= 0:
                raise _err(self.src, pop, "ellipse covariance is singular or distance_square <= 0",
                           "use a positive-definite covariance and a positive distance_square")
            return EllipseGate(dims, tuple(c.tolist()), tuple(map(tuple, cov.tolist())), d2)
        if kind == "boolean":
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
        if kind == "quadrant":
            return self.quadrant(pop, g)
        if kind in FIT_GATE_OPTIONS:
            return self.fit_gate(pop, kind, g)
        raise _err(self.src, pop, f"unknown gate type {kind!r}",
                   "use range, rectangle, polygon, ellipse, quadrant, threshold, boolean, singlet or cluster")

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

    def quadrant(self, group: str, g: Mapping[str, Any]) -> list[Population]:
        dx, dy = self.dim(g.get("x"), group), self.dim(g.get("y"), group)
        xc = self.number(g.get("x_cut"), group, "x_cut", True)
        yc = self.number(g.get("y_cut"), group, "y_cut", True)
        if xc is None or yc is None:
            raise _err(self.src, group, "quadrant needs x_cut and y_cut", "give both cuts (numbers or MARKER.pos)")
        names = g.get("names")
        keys = ("++", "+-", "-+", "--")
        if not isinstance(names, Mapping) or set(map(str, names)) != set(keys):
            raise _err(self.src, group, f"quadrant names must map exactly {list(keys)} to population names, got {names!r}",
                       "write `names: {'++': A, '+-': B, '-+': C, '--': D}` (first sign: x)")
        signs = tuple((str(names[k]), k) for k in keys)
        out = []
        for pname, k in signs:
            bx = (xc, None) if k[0] == "+" else (None, xc)
            by = (yc, None) if k[1] == "+" else (None, yc)
            out.append(Population(pname, None, RectGate((dx, dy), (bx, by), False, "quadrant", (group, signs))))
        return out

    def _check_order(self, pop: str, lo: Bound, hi: Bound, marker: str) -> None:
        if isinstance(lo, float) and isinstance(hi, float) and lo >= hi:
            raise _err(self.src, pop, f"{marker}: min {lo} is not below max {hi}", "swap or correct the bounds")

    # -- tree
    def populations(self) -> list[Population]:
        items = self.doc.get("populations")
        if not isinstance(items, Sequence) or isinstance(items, str) or not items:
            raise _err(self.src, None, "no `populations` list", "add `populations:` with at least one entry")
        pops: list[Population] = []
        seen: dict[str, int] = {}
        for i, item in enumerate(items):
            if not isinstance(item, Mapping) or "name" not in item:
                raise _err(self.src, None, f"entry #{i + 1} of populations has no name",
                           "give every population `name:`, `parent:` and `gate:`")
            name = str(item["name"]).strip()
            parent = item.get("parent", ROOT)
            parent = None if parent in (None, ROOT, "") else str(parent).strip()
            unknown = set(item) - {"name", "parent", "gate", "description"}
            if unknown:
                raise _err(self.src, name, f"unknown key(s) {sorted(unknown)}", "use name, parent, gate, description")
            g = self.gate(name, item.get("gate"))
            new = g if isinstance(g, list) else [Population(name, parent, g)]
            for p in new:
                if isinstance(g, list):
                    p = replace(p, parent=parent)
                if p.name in seen or p.name == ROOT:
                    raise _err(self.src, p.name, "duplicate population name" if p.name != ROOT else "'root' is reserved",
                               "give every population (and quadrant) a unique name")
                seen[p.name] = i
                pops.append(p)
        names = [p.name for p in pops]
        for p in pops:
            deps = ([p.parent] if p.parent else []) + [r for r, _ in getattr(p.gate, "refs", ())]
            for d in deps:
                if d not in seen:
                    close = difflib.get_close_matches(d, names, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    what = "parent" if d == p.parent else "boolean operand"
                    raise _err(self.src, p.name, f"unknown {what} {d!r}{hint}",
                               f"define {d!r} as a population or correct the name")
        for marker, cuts in self.thresholds.items():
            for cut, rule in cuts.items():
                on = rule.get("on") if isinstance(rule, Mapping) else None
                if on is not None and str(on) not in seen:
                    close = difflib.get_close_matches(str(on), names, n=1)
                    hint = f" (did you mean {close[0]!r}?)" if close else ""
                    raise _err(self.src, None, f"threshold {marker}.{cut} is fitted `on` unknown population {on!r}{hint}",
                               "name a population of this template")
        deps = {p.name: ([p.parent] if p.parent else []) + [r for r, _ in getattr(p.gate, "refs", ())] for p in pops}
        ts = graphlib.TopologicalSorter(deps)
        try:
            ts.prepare()
        except graphlib.CycleError as exc:
            cycle = exc.args[1]
            raise _err(self.src, cycle[0], f"cycle in the gate tree: {' -> '.join(cycle)}",
                       "a population cannot be its own ancestor; change one parent")
        # topological order, level by level, each level in file order (deterministic)
        by_name = {p.name: p for p in pops}
        rank = {p.name: i for i, p in enumerate(pops)}
        done: list[Population] = []
        while ts.is_active():
            ready = sorted(ts.get_ready(), key=rank.__getitem__)
            for name in ready:
                done.append(by_name[name])
                ts.done(name)
        return done


def parse_template(doc: Mapping[str, Any], source: str = "<template>") -> Template:
    """Validate a template given as a mapping (parsed YAML) and build a :class:`Template`."""
    if not isinstance(doc, Mapping):
        raise TemplateError(f"{source}: a template must be a mapping with `populations`, got {type(doc).__name__}")
    unknown = set(doc) - {"name", "description", "transforms", "thresholds", "populations", "qc"}
    if unknown:
        raise _err(source, None, f"unknown top-level key(s) {sorted(unknown)}",
                   "use name, description, transforms, thresholds, populations, qc")
    p = _Parser(doc, source)
    pops = p.populations()
    name = str(doc.get("name") or Path(source).stem)
    return Template(name=name, populations=pops, thresholds=p.thresholds, transforms=p.transforms,
                    description=str(doc.get("description", "")), path=source, qc=_parse_qc(doc, pops, source))


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
