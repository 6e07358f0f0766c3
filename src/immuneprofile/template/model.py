"""The template model: plain, frozen data that the parser builds and the engine, exporters and plots read.

A :class:`Template` is a topologically ordered list of :class:`Population`, each
with one gate (:data:`Gate`) whose dimensions (:class:`Dim`) name markers, not
channels.
"""

from __future__ import annotations

import graphlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from immuneprofile.engine.transforms import DEFAULT_FLUORESCENCE, normalize_spec

__all__ = [
    "AbsoluteBasis",
    "with_dims",
    "Bound",
    "BooleanGate",
    "Dim",
    "EllipseGate",
    "FitGate",
    "Gate",
    "PolygonGate",
    "Population",
    "QCGate",
    "Readout",
    "RectGate",
    "Template",
    "ThresholdRef",
    "TransformTable",
    "dependencies",
    "topological_order",
]


@dataclass(frozen=True)
class ThresholdRef:
    """A cut point defined in the template's ``thresholds`` section (``marker.cut``)."""

    marker: str
    cut: str  # "pos" or "hi"

    def __str__(self) -> str:
        return f"{self.marker}.{self.cut}"


Bound = float | ThresholdRef | None


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
    compensated: bool | str = True
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


Gate = RectGate | PolygonGate | EllipseGate | BooleanGate | FitGate | QCGate


@dataclass(frozen=True)
class Population:
    """A named population: its parent (``None`` = all events) and its gate."""

    name: str
    parent: str | None
    gate: Gate

    @property
    def dims(self) -> tuple[Dim, ...]:
        return getattr(self.gate, "dims", ())


def with_dims(gate: Gate, dims: tuple[Dim, ...]) -> Gate:
    """``gate`` with its dimensions replaced by ``dims`` (a gate without dimensions is returned as is)."""
    if isinstance(gate, RectGate | EllipseGate):
        return replace(gate, dims=dims)
    if isinstance(gate, PolygonGate | FitGate):
        return replace(gate, dims=(dims[0], dims[1]))
    return gate


@dataclass(frozen=True)
class Readout:
    """A reported frequency: ``population`` as a percentage of its ancestor ``of``."""

    name: str
    population: str
    of: str


@dataclass(frozen=True)
class AbsoluteBasis:
    """Dual-platform absolute counts: ``population`` holds the cells the sample sheet's ``column`` counts per µL."""

    population: str
    column: str


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
        from the YAML's ``compensation`` section, or filled by Gating-ML/FlowJo import.
    readouts
        ``{name: Readout}``: what the template reports (a population as % of an ancestor).
    absolute
        The population a sample-sheet cell count (per µL) refers to, for absolute counts.
    """

    name: str
    populations: list[Population]
    thresholds: dict[str, dict[str, Any]] = field(default_factory=dict)
    transforms: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    path: str = "<template>"
    compensation: dict[str, Any] = field(default_factory=dict)
    gate_ids: dict[str, tuple[str, tuple[str, ...]]] = field(default_factory=dict)
    readouts: dict[str, Readout] = field(default_factory=dict)
    qc: dict[str, Any] | None = None  # the `qc:` step's options (immuneprofile.qc.acquisition), None: no QC
    absolute: AbsoluteBasis | None = None

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

    def closure(self, names: Iterable[str | None]) -> set[str]:
        """The populations needed to gate ``names``: themselves, their ancestors and boolean operands."""
        need: set[str] = set()
        todo = [n for n in names if n is not None]
        while todo:
            n = todo.pop()
            if n in need:
                continue
            need.add(n)
            p = self._by_name[n]
            todo += ([p.parent] if p.parent else []) + [r for r, _ in getattr(p.gate, "refs", ())]
        return need

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
        return TransformTable.from_doc(self.transforms).spec_for(marker, scatter)

    def with_thresholds(self, values: Mapping[tuple[str, str], float]) -> Template:
        """Copy with the given ``(marker, cut)`` thresholds fixed to numbers."""
        th = {m: dict(c) for m, c in self.thresholds.items()}
        for (m, c), v in values.items():
            th.setdefault(m, {})[c] = float(v)
        return replace(self, thresholds=th)


def is_scatter(marker: str) -> bool:
    """Whether a channel name is a scatter (or time) channel, which takes the ``scatter`` transform."""
    m = marker.strip().upper()
    return m.startswith("FSC") or m.startswith("SSC") or m in ("TIME",)


@dataclass(frozen=True)
class TransformTable:
    """A template's ``transforms`` section, normalised: which transform each marker gets."""

    default: dict[str, Any] | None
    scatter: dict[str, Any] | None
    per_marker: dict[str, dict[str, Any] | None]

    @classmethod
    def from_doc(cls, section: Mapping[str, Any]) -> TransformTable:
        """Normalise a ``transforms`` section (raises :class:`~immuneprofile.TransformError`)."""
        return cls(normalize_spec(section.get("default", DEFAULT_FLUORESCENCE)),
                   normalize_spec(section.get("scatter", None)),
                   {str(k): normalize_spec(v) for k, v in (section.get("channels") or {}).items()})

    def spec_for(self, marker: str, scatter: bool | None = None) -> dict[str, Any] | None:
        """The spec for ``marker`` (``scatter`` overrides the name-based detection)."""
        if marker in self.per_marker:
            return self.per_marker[marker]
        if is_scatter(marker) if scatter is None else scatter:
            return self.scatter
        return self.default


def dependencies(pop: Population) -> list[str]:
    """The populations ``pop`` is computed from: its parent and its boolean operands."""
    return ([pop.parent] if pop.parent else []) + [r for r, _ in getattr(pop.gate, "refs", ())]


def topological_order(pops: Iterable[Population], on_missing: Callable[[Population, str], Exception],
                      on_cycle: Callable[[list[str]], Exception]) -> list[Population]:
    """``pops`` with every parent and boolean operand before its users; each level in the given order.

    ``on_missing(pop, name)`` and ``on_cycle(names)`` build the error raised for a
    dependency that is not among ``pops`` and for a cycle.
    """
    pops = list(pops)
    rank = {p.name: i for i, p in enumerate(pops)}
    ts: graphlib.TopologicalSorter = graphlib.TopologicalSorter()
    for p in pops:
        deps = dependencies(p)
        missing = [d for d in deps if d not in rank]
        if missing:
            raise on_missing(p, missing[0])
        ts.add(p.name, *deps)
    try:
        ts.prepare()
    except graphlib.CycleError as exc:
        raise on_cycle(list(exc.args[1])) from None
    by_name = {p.name: p for p in pops}
    out: list[Population] = []
    while ts.is_active():
        ready = sorted(ts.get_ready(), key=rank.__getitem__)
        out.extend(by_name[n] for n in ready)
        ts.done(*ready)
    return out
