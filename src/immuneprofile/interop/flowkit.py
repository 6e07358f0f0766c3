"""Conversion of templates to FlowKit ``GatingStrategy`` objects.

A template names markers; a FlowKit gating strategy names channels. The
conversion therefore needs a loaded sample to resolve markers to ``$PnN``
channel names (and to know which compensation it carries). The strategy it
builds is what a FlowKit user would write by hand: the engine is tested to give
exactly its membership.
"""

from __future__ import annotations

from typing import Any

from immuneprofile.io.fcs import FCSData
from immuneprofile.template.parse import BooleanGate, Dim, EllipseGate, PolygonGate, RectGate, Template, ThresholdRef
from immuneprofile.engine.transforms import make_transform, transform_key

__all__ = ["to_gating_strategy", "flowkit_gate_path"]


def flowkit_gate_path(template: Template, name: str) -> tuple[str, ...]:
    """FlowKit gate path of population ``name`` (quadrant children sit under their quadrant gate)."""
    path: list[str] = ["root"]
    for anc in template.path_of(name):
        g = template[anc].gate
        if isinstance(g, RectGate) and g.quadrant is not None:
            path.append(g.quadrant[0])
        path.append(anc)
    return tuple(path)


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
        Values for thresholds, e.g. the fitted ones of a :class:`~immuneprofile.gating.GatingResult`
        (``{(marker, cut): value}``); required for data-driven thresholds.

    Data-driven transforms and 2-D gates (``W: auto``, ``singlet``, ``cluster``) are fitted
    on ``data`` first (:func:`~immuneprofile.engine.fit2d.fit_template`), as the engine fits
    them; or pass the fitted template of a result (``GatingResult.template``).
    """
    import flowkit as fk

    from immuneprofile.engine.fit2d import fit_template, needs_fitting

    if needs_fitting(template):
        template = fit_template(data, template, thresholds=thresholds)[0]

    gs = fk.GatingStrategy()
    from immuneprofile.io.fcs import fluoro_indices

    fluoro = [data.channels[i] for i in fluoro_indices(data.channels)]
    if data.compensation == "FCS" and list(data.compensated) == fluoro:
        comp_ref = "FCS"
    elif data.compensation is not None:  # a user's matrix, or a $SPILLOVER naming only some channels
        comp_ref = "custom"
        gs.add_comp_matrix("custom", data.spill)
    else:
        comp_ref = "uncompensated"
    xf_ids: dict[str, str] = {}
    fixed = dict(thresholds or {})

    def channel(marker: str, pop: str) -> str:
        return data.channels[data.find_channel(marker, context=f"template {template.path}, population {pop!r}")]

    def xref(d: Dim) -> str | None:
        if d.transform is None:
            return None
        key = transform_key(d.transform)
        if key not in xf_ids:
            gs.add_transform(key, make_transform(d.transform))
            xf_ids[key] = key
        return key

    def cref(d: Dim, ch: str) -> str:
        if not d.compensated:
            return "uncompensated"
        if isinstance(d.compensated, str):  # a spillover matrix of the template (Gating-ML import)
            if d.compensated not in gs.comp_matrices:
                frame = template.compensation[d.compensated]
                gs.add_comp_matrix(d.compensated, fk.Matrix(frame.to_numpy(dtype=float), list(frame.columns),
                                                            list(frame.index)))
            return d.compensated
        return comp_ref if data.channels.index(ch) not in data.scatter else "uncompensated"

    def value(b: Any) -> float | None:
        if isinstance(b, ThresholdRef):
            key = (b.marker, b.cut)
            if key in fixed:
                return float(fixed[key])
            v = template.thresholds[b.marker][b.cut]
            if not isinstance(v, (int, float)):
                raise ValueError(f"threshold {b} is data-driven; pass its fitted value in `thresholds`")
            return float(v)
        return b

    def dimension(d: Dim, pop: str, lo=None, hi=None):
        if d.ratio is not None:
            num, den, a, b, c = d.ratio
            rid = d.marker
            if rid not in gs.transformations:
                gs.add_transform(rid, fk.transforms.RatioTransform([channel(num, pop), channel(den, pop)], a, b, c))
            rc = cref(d, "") if isinstance(d.compensated, str) else comp_ref if d.compensated else "uncompensated"
            return fk.RatioDimension(rid, rc, xref(d),
                                     range_min=lo, range_max=hi)
        ch = channel(d.marker, pop)
        return fk.Dimension(ch, cref(d, ch), xref(d), range_min=lo, range_max=hi)

    done_quadrants: set[str] = set()
    for pop in template.populations:
        g = pop.gate
        parent_path = flowkit_gate_path(template, pop.name)
        if isinstance(g, RectGate) and g.quadrant is not None:
            group, signs = g.quadrant
            if group in done_quadrants:
                continue
            done_quadrants.add(group)
            (dx, dy) = g.dims
            # the cut is the bound shared by all four cells
            xc = value(next(b for b in (g.bounds[0][0], g.bounds[0][1]) if b is not None))
            yc = value(next(b for b in (g.bounds[1][0], g.bounds[1][1]) if b is not None))
            chx, chy = channel(dx.marker, pop.name), channel(dy.marker, pop.name)
            divs = [fk.QuadrantDivider("xdiv", chx, cref(dx, chx), [xc], xref(dx)),
                    fk.QuadrantDivider("ydiv", chy, cref(dy, chy), [yc], xref(dy))]
            quads = [
                fk.gates.Quadrant(name, ["xdiv", "ydiv"],
                                  [(xc, None) if s[0] == "+" else (None, xc),
                                   (yc, None) if s[1] == "+" else (None, yc)])
                for name, s in signs
            ]
            gs.add_gate(fk.gates.QuadrantGate(group, divs, quads), parent_path)
            continue
        if isinstance(g, RectGate):
            dims = [dimension(d, pop.name, value(lo), value(hi)) for d, (lo, hi) in zip(g.dims, g.bounds)]
            gate = fk.gates.RectangleGate(pop.name, dims, use_complement=g.complement)
        elif isinstance(g, PolygonGate):
            dims = [dimension(d, pop.name) for d in g.dims]
            gate = fk.gates.PolygonGate(pop.name, dims, [list(v) for v in g.vertices], use_complement=g.complement)
        elif isinstance(g, EllipseGate):
            dims = [dimension(d, pop.name) for d in g.dims]
            gate = fk.gates.EllipsoidGate(pop.name, dims, list(g.center), [list(r) for r in g.covariance],
                                          g.distance_square)
        elif isinstance(g, BooleanGate):
            refs = [{"ref": r, "path": _ref_path(template, r), "complement": c} for r, c in g.refs]
            gate = fk.gates.BooleanGate(pop.name, g.op, refs)
        else:  # pragma: no cover
            raise TypeError(f"unsupported gate {g!r}")
        gs.add_gate(gate, parent_path)
    return gs
