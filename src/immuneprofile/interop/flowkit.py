"""Conversion of templates to FlowKit ``GatingStrategy`` objects.

A template names markers; a FlowKit gating strategy names channels. The
conversion therefore needs a loaded sample to resolve markers to ``$PnN``
channel names (and to know which compensation it carries). The strategy it
builds is what a FlowKit user would write by hand: the engine is tested to give
exactly its membership.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from immuneprofile.engine.transforms import make_transform, transform_key
from immuneprofile.io.fcs import FCSData
from immuneprofile.template.model import (
    BooleanGate,
    Dim,
    EllipseGate,
    PolygonGate,
    Population,
    RectGate,
    Template,
    ThresholdRef,
    is_scatter,
)

__all__ = ["compensation_ref", "to_gating_strategy", "flowkit_gate_path"]


def flowkit_gate_path(template: Template, name: str) -> tuple[str, ...]:
    """FlowKit gate path of population ``name`` (quadrant children sit under their quadrant gate)."""
    path: list[str] = ["root"]
    for anc in template.path_of(name):
        g = template[anc].gate
        if isinstance(g, RectGate) and g.quadrant is not None:
            path.append(g.quadrant[0])
        path.append(anc)
    return tuple(path)


def compensation_ref(dim: Dim, data: FCSData | None, channel: str | None) -> str:
    """The FlowKit/Gating-ML compensation reference of a template dimension.

    ``"uncompensated"``; a matrix id of ``template.compensation`` (Gating-ML
    ``spectrumMatrix``); ``"FCS"`` (the file's own spillover); or ``"custom"`` (the
    matrix ``data`` was loaded with). Scatter channels are never compensated.
    Without ``data``, compensated fluorescence dimensions refer to ``"FCS"``.

    Parameters
    ----------
    dim
        The dimension.
    data
        The sample the strategy is built for (resolves the compensation it carries).
    channel
        The dimension's ``$PnN`` channel; ``None`` for a ratio dimension.
    """
    if not dim.compensated:
        return "uncompensated"
    if isinstance(dim.compensated, str):
        return dim.compensated
    if data is None:
        return "uncompensated" if channel is not None and is_scatter(channel) else "FCS"
    if channel is not None and data.channels.index(channel) in data.scatter:
        return "uncompensated"
    return file_compensation_ref(data)


def file_compensation_ref(data: FCSData) -> str:
    """How FlowKit names the compensation ``data`` was loaded with: ``"FCS"`` (the file's own
    spillover over all its fluorescence channels), ``"custom"`` (a user's matrix, or a
    ``$SPILLOVER`` naming only some channels) or ``"uncompensated"``."""
    from immuneprofile.io.fcs import fluoro_indices

    if data.compensation is None:
        return "uncompensated"
    fluoro = [data.channels[i] for i in fluoro_indices(data.channels)]
    return "FCS" if data.compensation == "FCS" and list(data.compensated) == fluoro else "custom"


def _ref_path(template: Template, name: str) -> tuple[str, ...]:
    """Path FlowKit's boolean gates expect for a reference (a quadrant's path ends in its quadrant gate)."""
    g = template[name].gate
    path = flowkit_gate_path(template, name)
    if isinstance(g, RectGate) and g.quadrant is not None:
        path = path + (g.quadrant[0],)
    return path


def to_gating_strategy(
    template: Template,
    data: FCSData,
    thresholds: dict[tuple[str, str], float] | None = None,
):
    """Build the FlowKit ``GatingStrategy`` equivalent to ``template`` for ``data``'s channels.

    Parameters
    ----------
    template
        The template.
    data
        A loaded sample: resolves markers to channels and gives the compensation
        (``'FCS'`` for the file's own spillover, a ``custom`` matrix otherwise).
    thresholds
        Values for thresholds, e.g. the fitted ones of a :class:`~immuneprofile.GatingResult`
        (``{(marker, cut): value}``); required for data-driven thresholds.

    Data-driven transforms and 2-D gates (``W: auto``, ``singlet``, ``cluster``) are fitted
    on ``data`` first (:func:`~immuneprofile.engine.fit2d.fit_template`), as the engine fits
    them; or pass the fitted template of a result (``GatingResult.template``).
    """
    from immuneprofile.engine.gating import fitted_template

    template = fitted_template(data, template, thresholds)
    return _StrategyBuilder(template, data, thresholds).build()


class _StrategyBuilder:
    """Builds a FlowKit ``GatingStrategy`` from a template, one small method per gate type (:data:`_GATES`)."""

    def __init__(self, template: Template, data: FCSData, thresholds: Mapping[tuple[str, str], float] | None):
        import flowkit as fk

        self.fk = fk
        self.template = template
        self.data = data
        self.fixed = dict(thresholds or {})
        self.gs = fk.GatingStrategy()
        if file_compensation_ref(data) == "custom":
            self.gs.add_comp_matrix("custom", data.spill)

    def build(self):
        done_quadrants: set[str] = set()
        for pop in self.template.populations:
            g = pop.gate
            if isinstance(g, RectGate) and g.quadrant is not None:
                if g.quadrant[0] not in done_quadrants:
                    done_quadrants.add(g.quadrant[0])
                    self.gs.add_gate(self.quadrant(pop, g), flowkit_gate_path(self.template, pop.name))
                continue
            make = _GATES.get(type(g))
            if make is None:  # pragma: no cover
                raise TypeError(f"unsupported gate {g!r}")
            self.gs.add_gate(make(self, pop, g), flowkit_gate_path(self.template, pop.name))
        return self.gs

    # -- pieces
    def channel(self, marker: str, pop: str) -> str:
        context = f"template {self.template.path}, population {pop!r}"
        return self.data.channels[self.data.find_channel(marker, context=context)]

    def xref(self, d: Dim) -> str | None:
        if d.transform is None:
            return None
        key = transform_key(d.transform)
        if key not in self.gs.transformations:
            self.gs.add_transform(key, make_transform(d.transform))
        return key

    def cref(self, d: Dim, ch: str | None) -> str:
        """Compensation reference of a dimension (``ch``: its channel; ``None`` for a ratio)."""
        ref = compensation_ref(d, self.data, ch)
        if isinstance(d.compensated, str) and ref not in self.gs.comp_matrices:  # a template's matrix
            frame = self.template.compensation[ref]
            self.gs.add_comp_matrix(ref, self.fk.Matrix(frame.to_numpy(dtype=float), list(frame.columns),
                                                        list(frame.index)))
        return ref

    def value(self, b: Any) -> float | None:
        if not isinstance(b, ThresholdRef):
            return b
        key = (b.marker, b.cut)
        if key in self.fixed:
            return float(self.fixed[key])
        v = self.template.thresholds[b.marker][b.cut]
        if not isinstance(v, (int, float)):
            raise ValueError(f"threshold {b} is data-driven; pass its fitted value in `thresholds`")
        return float(v)

    def dimension(self, d: Dim, pop: str, lo=None, hi=None):
        fk = self.fk
        if d.ratio is None:
            ch = self.channel(d.marker, pop)
            return fk.Dimension(ch, self.cref(d, ch), self.xref(d), range_min=lo, range_max=hi)
        num, den, a, b, c = d.ratio
        if d.marker not in self.gs.transformations:
            ratio = fk.transforms.RatioTransform([self.channel(num, pop), self.channel(den, pop)], a, b, c)
            self.gs.add_transform(d.marker, ratio)
        return fk.RatioDimension(d.marker, self.cref(d, None), self.xref(d), range_min=lo, range_max=hi)

    # -- one per gate type
    def quadrant(self, pop: Population, g: RectGate):
        fk = self.fk
        group, signs = g.quadrant  # type: ignore[misc]  # a quadrant cell has one
        dx, dy = g.dims
        # the cut is the bound shared by all four cells
        xc = self.value(next(b for b in g.bounds[0] if b is not None))
        yc = self.value(next(b for b in g.bounds[1] if b is not None))
        chx, chy = self.channel(dx.marker, pop.name), self.channel(dy.marker, pop.name)
        divs = [fk.QuadrantDivider("xdiv", chx, self.cref(dx, chx), [xc], self.xref(dx)),
                fk.QuadrantDivider("ydiv", chy, self.cref(dy, chy), [yc], self.xref(dy))]
        quads = [fk.gates.Quadrant(name, ["xdiv", "ydiv"], [(xc, None) if s[0] == "+" else (None, xc),
                                                            (yc, None) if s[1] == "+" else (None, yc)])
                 for name, s in signs]
        return fk.gates.QuadrantGate(group, divs, quads)

    def rect(self, pop: Population, g: RectGate):
        dims = [self.dimension(d, pop.name, self.value(lo), self.value(hi)) for d, (lo, hi) in zip(g.dims, g.bounds)]
        return self.fk.gates.RectangleGate(pop.name, dims, use_complement=g.complement)

    def polygon(self, pop: Population, g: PolygonGate):
        dims = [self.dimension(d, pop.name) for d in g.dims]
        return self.fk.gates.PolygonGate(pop.name, dims, [list(v) for v in g.vertices], use_complement=g.complement)

    def ellipse(self, pop: Population, g: EllipseGate):
        dims = [self.dimension(d, pop.name) for d in g.dims]
        return self.fk.gates.EllipsoidGate(pop.name, dims, list(g.center), [list(r) for r in g.covariance],
                                           g.distance_square)

    def boolean(self, pop: Population, g: BooleanGate):
        refs = [{"ref": r, "path": _ref_path(self.template, r), "complement": c} for r, c in g.refs]
        return self.fk.gates.BooleanGate(pop.name, g.op, refs)


#: the FlowKit gate of each template gate type (quadrant cells are built together, per quadrant)
_GATES: dict[type, Callable[[_StrategyBuilder, Any, Any], Any]] = {
    RectGate: _StrategyBuilder.rect,
    PolygonGate: _StrategyBuilder.polygon,
    EllipseGate: _StrategyBuilder.ellipse,
    BooleanGate: _StrategyBuilder.boolean,
}
