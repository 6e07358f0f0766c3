"""Templates back to YAML: :func:`write_template` writes what :func:`~immuneprofile.load_template` reads.

A dimension is written as its bare marker name when the template's ``transforms``
section gives it its transform and it is compensated as usual; otherwise as a mapping
``{marker, transform, compensated}`` (templates imported from FlowJo or Gating-ML
carry a transform per dimension). Spillover matrices go under ``compensation``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from immuneprofile.exceptions import TemplateError
from immuneprofile.template.model import (
    BooleanGate,
    Dim,
    EllipseGate,
    FitGate,
    PolygonGate,
    Population,
    RectGate,
    Template,
    ThresholdRef,
)

__all__ = ["template_to_dict", "write_template"]

_SIGN = {("pos", True): "+", ("pos", False): "-", ("hi", True): "hi", ("hi", False): "lo"}


def _bound(b: Any) -> Any:
    return None if b is None else str(b) if isinstance(b, ThresholdRef) else float(b)


def _ref(lo: Any, hi: Any) -> ThresholdRef:
    """The threshold a one-sided threshold-gate bound refers to."""
    ref = lo if lo is not None else hi
    if not isinstance(ref, ThresholdRef):
        raise TemplateError(f"a threshold gate bound must name a threshold, got {ref!r}")
    return ref


class _Doc:
    def __init__(self, t: Template):
        self.t = t

    def dim(self, d: Dim) -> Any:
        if d.ratio is not None:
            num, den, a, b, c = d.ratio
            out: dict[str, Any] = {"ratio": [num, den], "A": a, "B": b, "C": c, "name": d.marker}
            if d.transform is not None:
                out["transform"] = dict(d.transform)
            return out
        if self.plain(d):
            return d.marker
        return {"marker": d.marker, "transform": dict(d.transform) if d.transform else "none",
                "compensated": d.compensated}

    def plain(self, d: Dim) -> bool:
        """Whether ``d`` is what the bare marker name means in this template."""
        return d.ratio is None and d.compensated is True and d.transform == self.t.transform_for(d.marker)

    def rect(self, p: Population, g: RectGate) -> dict[str, Any]:
        if g.kind == "threshold" and all(self.plain(d) for d in g.dims):
            markers = {d.marker: _SIGN[(_ref(lo, hi).cut, lo is not None)] for d, (lo, hi) in zip(g.dims, g.bounds)}
            out: dict[str, Any] = {"type": "threshold", "markers": markers}
        elif len(g.dims) == 1:
            (lo, hi), = g.bounds
            out = {"type": "range", "marker": self.dim(g.dims[0]), "min": _bound(lo), "max": _bound(hi)}
        elif len(g.dims) == 2:
            out = {"type": "rectangle", "x": self.dim(g.dims[0]), "y": self.dim(g.dims[1])}
            for axis, (lo, hi) in zip("xy", g.bounds):
                out[f"{axis}min"], out[f"{axis}max"] = _bound(lo), _bound(hi)
        else:
            out = {"type": "rectangle", "dims": [self.dim(d) for d in g.dims],
                   "min": [_bound(lo) for lo, _ in g.bounds], "max": [_bound(hi) for _, hi in g.bounds]}
        out = {k: v for k, v in out.items() if v is not None}
        if g.complement:
            out["complement"] = True
        return out

    def quadrant(self, g: RectGate) -> dict[str, Any]:
        assert g.quadrant is not None
        group, signs = g.quadrant
        cuts = [_bound(next(b for b in g.bounds[axis] if b is not None)) for axis in (0, 1)]
        return {"type": "quadrant", "x": self.dim(g.dims[0]), "y": self.dim(g.dims[1]), "x_cut": cuts[0],
                "y_cut": cuts[1], "names": {s: name for name, s in signs}}

    def polygon(self, p: Population, g: PolygonGate) -> dict[str, Any]:
        out = {"type": "polygon", "x": self.dim(g.dims[0]), "y": self.dim(g.dims[1]),
               "vertices": [[float(x), float(y)] for x, y in g.vertices]}
        return {**out, "complement": True} if g.complement else out

    def ellipse(self, p: Population, g: EllipseGate) -> dict[str, Any]:
        return {"type": "ellipse", "dims": [self.dim(d) for d in g.dims], "center": [float(c) for c in g.center],
                "covariance": [[float(v) for v in row] for row in g.covariance],
                "distance_square": float(g.distance_square)}

    def boolean(self, p: Population, g: BooleanGate) -> dict[str, Any]:
        return {"type": "boolean", "op": g.op, "of": [("!" if c else "") + r for r, c in g.refs]}

    def fit(self, p: Population, g: FitGate) -> dict[str, Any]:
        """A data-driven gate: written as the rule, refitted on each sample."""
        opts = {k: list(v) if isinstance(v, tuple) else v for k, v in g.options}
        out = {"type": g.kind, "x": self.dim(g.dims[0]), "y": self.dim(g.dims[1]), **opts}
        return {**out, "scope": g.scope} if g.scope != "sample" else out

    #: gate type -> the method writing it (one per gate type)
    _WRITERS: dict[type, Callable[..., dict[str, Any]]] = {
        RectGate: rect, PolygonGate: polygon, EllipseGate: ellipse, BooleanGate: boolean, FitGate: fit}

    def gate(self, p: Population) -> dict[str, Any]:
        write = self._WRITERS.get(type(p.gate))
        if write is None:
            raise TemplateError(f"template {self.t.path}: population {p.name!r}: unsupported gate {p.gate!r}")
        return write(self, p, p.gate)
    def populations(self) -> list[dict[str, Any]]:
        out, done = [], set()
        for p in self.t.populations:
            g = p.gate
            if isinstance(g, RectGate) and g.quadrant is not None:
                if g.quadrant[0] in done:
                    continue
                done.add(g.quadrant[0])
                out.append({"name": g.quadrant[0], "parent": p.parent or "root", "gate": self.quadrant(g)})
                continue
            out.append({"name": p.name, "parent": p.parent or "root", "gate": self.gate(p)})
        return out


def template_to_dict(template: Template) -> dict[str, Any]:
    """The YAML document (plain dicts and lists) of ``template``; :func:`~immuneprofile.parse_template` reads it back."""
    doc: dict[str, Any] = {"name": template.name}
    if template.description:
        doc["description"] = template.description
    doc["transforms"] = dict(template.transforms) or {"default": "none", "scatter": "none"}
    if template.thresholds:
        doc["thresholds"] = {m: dict(c) for m, c in template.thresholds.items()}
    if template.compensation:
        doc["compensation"] = {mid: {"detectors": [str(c) for c in f.columns],
                                     "fluorochromes": [str(i) for i in f.index],
                                     "matrix": f.to_numpy(dtype=float).tolist()}
                               for mid, f in template.compensation.items()}
    if template.qc is not None:
        doc["qc"] = dict(template.qc)
    doc["populations"] = _Doc(template).populations()
    if template.readouts:
        doc["readouts"] = {r.name: {"population": r.population, "of": r.of} for r in template.readouts.values()}
    if template.absolute is not None:
        doc["absolute"] = {"population": template.absolute.population, "column": template.absolute.column}
    return doc


def write_template(template: Template, path: str | os.PathLike) -> None:
    """Write ``template`` as an editable YAML template (read it back with :func:`~immuneprofile.load_template`).

    Raises
    ------
    TemplateError
        A gate the YAML format cannot express.
    """
    import yaml

    doc = template_to_dict(template)
    with open(os.fspath(path), "w", encoding="utf-8") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False, allow_unicode=True, width=110, default_flow_style=None)
