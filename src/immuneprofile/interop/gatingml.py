"""Gating-ML 2.0 import and export.

:func:`read_gatingml` turns a Gating-ML 2.0 document into a
:class:`~immuneprofile.template.Template` that the vectorised engine
(:func:`immuneprofile.gate_sample`) gates; :func:`write_gatingml` writes any
template as a Gating-ML 2.0 document. FlowKit parses the XML (and validates it
against the Gating-ML schema); the engine does the gating.

Mapping
-------
* Gate ids become population names (Gating-ML ids are unique in a document;
  gates of a FlowKit strategy whose ids repeat under different parents get
  ``"id [parent/path]"`` names, see :func:`from_gating_strategy`).
* ``fcs-dimension`` -> :class:`~immuneprofile.template.Dim` naming the ``$PnN``
  channel; a fluorochrome name of a spectrum matrix is mapped to its detector,
  as FlowKit does.
* ``compensation-ref``: ``uncompensated`` -> ``compensated=False``; ``FCS`` ->
  ``compensated=True`` (the file's own spillover, i.e. ``load_fcs(..., "auto")``,
  none if the file has none); a ``spectrumMatrix`` id -> ``compensated=<id>``, the
  matrix being kept in ``Template.compensation[id]`` (a DataFrame, rows =
  fluorochromes, columns = detectors) and applied by the engine to the file's raw
  events. Load samples with the default ``compensation="auto"``.
* Transforms (``flin``, ``flog``, ``fasinh``, ``logicle``, ``hyperlog``) become the
  dims' transform specs; ``fratio`` becomes a ratio dimension (optionally followed
  by a transform).
* Rectangle -> ``range``/``rectangle``, polygon, ellipsoid, boolean gates map
  one to one. A quadrant gate with two single-value dividers and its four cells is
  a template quadrant; any other quadrant gate becomes one ``RectGate`` (kind
  ``"quadrant"``) per quadrant, with the bounds of the dividers it references.

Export writes numbers: thresholds (fixed, fitted on ``data`` or given) become the
gate coordinates. Population names that are not XML ids are stored, with the
template's name and the gate kinds, in a top-level ``custom_info`` element that
:func:`read_gatingml` reads back. ``complement: true`` gates (which Gating-ML
cannot express directly) are written as the region plus a boolean ``not`` gate and
folded back on import.
"""

from __future__ import annotations

import io
import math
import os
import re
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from immuneprofile.engine.transforms import normalize_spec
from immuneprofile.exceptions import GatingMLError, GatingMLWarning
from immuneprofile.interop.flowkit import compensation_ref
from immuneprofile.template.model import (
    BooleanGate,
    Dim,
    EllipseGate,
    PolygonGate,
    Population,
    RectGate,
    Template,
    ThresholdRef,
    topological_order,
)

__all__ = [
    "read_gatingml",
    "write_gatingml",
    "from_gating_strategy",
    "GatingMLError",
    "GatingMLWarning",
    "NS_GATING",
    "NS_DATATYPE",
    "NS_TRANSFORMS",
]

NS_GATING = "http://www.isac-net.org/std/Gating-ML/v2.0/gating"
NS_DATATYPE = "http://www.isac-net.org/std/Gating-ML/v2.0/datatypes"
NS_TRANSFORMS = "http://www.isac-net.org/std/Gating-ML/v2.0/transformations"
NS_IP = "urn:immuneprofile:gatingml:1"
_GML_NS = {NS_GATING, NS_DATATYPE, NS_TRANSFORMS}


# --------------------------------------------------------------------------- reading


def _parse_xml(path: str):
    """FlowKit ``GatingStrategy`` of the document plus the lxml tree (for ``custom_info``)."""
    import flowkit as fk
    from lxml import etree

    try:
        tree = etree.parse(path)
    except (OSError, etree.XMLSyntaxError) as exc:
        raise GatingMLError(f"{path}: not a readable XML document: {exc}") from exc
    try:
        return fk.parse_gating_xml(io.BytesIO(etree.tostring(tree))), tree
    except ValueError as exc:
        first = exc
    # lenient pass: unwrap elements outside the Gating-ML namespaces that hold gates
    root = tree.getroot()
    repaired = False
    for el in list(root):
        if not isinstance(el.tag, str) or etree.QName(el).namespace in _GML_NS:
            continue
        pos = list(root).index(el)
        for child in list(el):
            root.insert(pos, child)
            pos += 1
        root.remove(el)
        repaired = True
    if repaired:
        try:
            gs = fk.parse_gating_xml(io.BytesIO(etree.tostring(tree)))
        except ValueError as exc:
            raise GatingMLError(f"{path}: not a valid Gating-ML 2.0 document: {exc}") from exc
        warnings.warn(f"{path}: gates were wrapped in non-Gating-ML elements; unwrapped them "
                      f"(the document is not schema-valid as written)", GatingMLWarning, stacklevel=3)
        return gs, tree
    raise GatingMLError(f"{path}: not a valid Gating-ML 2.0 document: {first}") from first


def _custom_info(tree) -> dict[str, Any]:
    """What :func:`write_gatingml` stored in the document's top-level ``custom_info``."""
    info: dict[str, Any] = {"names": {}, "kinds": {}, "complements": {}}
    if tree is None:
        return info
    for t in tree.getroot().iter(f"{{{NS_IP}}}template"):
        info["name"] = t.get("name")
        info["description"] = t.get("description", "")
        for p in t.iter(f"{{{NS_IP}}}population"):
            info["names"][p.get("id")] = p.get("name")
            if p.get("kind"):
                info["kinds"][p.get("id")] = p.get("kind")
        for c in t.iter(f"{{{NS_IP}}}complement"):
            info["complements"][c.get("gate")] = c.get("region")
    return info


def _spec(xform) -> dict[str, Any] | None:
    """Transform spec of a FlowKit transform object (identical curve: same class, same parameters)."""
    from flowkit import transforms as fkt

    if xform is None:
        return None
    if isinstance(xform, fkt.LogicleTransform):
        return normalize_spec({"type": "logicle", "T": xform.param_t, "W": xform.param_w,
                               "M": xform.param_m, "A": xform.param_a})
    if isinstance(xform, fkt.HyperlogTransform):
        return normalize_spec({"type": "hyperlog", "T": xform.param_t, "W": xform.param_w,
                               "M": xform.param_m, "A": xform.param_a})
    if isinstance(xform, fkt.AsinhTransform):
        return normalize_spec({"type": "asinh", "T": xform.param_t, "M": xform.param_m, "A": xform.param_a})
    if isinstance(xform, fkt.LinearTransform):
        return normalize_spec({"type": "linear", "T": xform.param_t, "A": xform.param_a})
    if isinstance(xform, fkt.LogTransform):
        return normalize_spec({"type": "log", "T": xform.param_t, "M": xform.param_m})
    if isinstance(xform, fkt.WSPBiexTransform):  # FlowJo workspaces (see immuneprofile.interop.flowjo)
        return normalize_spec({"type": "biex", "neg": xform.negative, "width": xform.width,
                               "pos": xform.positive, "max": xform.max_value})
    if isinstance(xform, fkt.WSPLogTransform):
        return normalize_spec({"type": "flowjo_log", "offset": xform.offset, "decades": xform.decades})
    raise GatingMLError(f"unsupported transform {xform!r}")


class _Reader:
    def __init__(self, gs, src: str):
        self.gs = gs
        self.src = src
        self.matrices = {mid: m for mid, m in gs.comp_matrices.items()}

    def comp(self, ref: str | None) -> bool | str:
        if ref in (None, "uncompensated"):
            return False
        if ref == "FCS":
            return True
        if ref not in self.matrices:
            raise GatingMLError(f"{self.src}: compensation-ref {ref!r} names no spectrumMatrix")
        return str(ref)

    def xform(self, ref: str | None) -> dict[str, Any] | None:
        if ref is None:
            return None
        try:
            return _spec(self.gs.transformations[ref])
        except KeyError:
            raise GatingMLError(f"{self.src}: transformation-ref {ref!r} is not defined") from None

    def channel(self, dim_id: str, comp_ref: str | None) -> str:
        m = self.matrices.get(comp_ref) if comp_ref not in (None, "uncompensated", "FCS") else None
        if m is not None and dim_id in m.fluorochromes and dim_id not in m.detectors:
            return m.detectors[m.fluorochromes.index(dim_id)]
        return dim_id

    def dim(self, d) -> Dim:
        import flowkit as fk
        from flowkit import transforms as fkt

        if isinstance(d, fk.RatioDimension):
            rt = self.gs.transformations.get(d.ratio_ref)
            if not isinstance(rt, fkt.RatioTransform):
                raise GatingMLError(f"{self.src}: ratio dimension refers to {d.ratio_ref!r}, not an fratio transform")
            num, den = rt.dimensions
            return Dim(marker=str(d.ratio_ref), transform=self.xform(d.transformation_ref),
                       compensated=self.comp(d.compensation_ref),
                       ratio=(str(num), str(den), float(rt.param_a), float(rt.param_b), float(rt.param_c)))
        if isinstance(d, fk.QuadrantDivider):
            return Dim(marker=self.channel(d.dimension_ref, d.compensation_ref),
                       transform=self.xform(d.transformation_ref), compensated=self.comp(d.compensation_ref))
        return Dim(marker=self.channel(d.id, d.compensation_ref), transform=self.xform(d.transformation_ref),
                   compensated=self.comp(d.compensation_ref))


def _num(v) -> float | None:
    return None if v is None else float(v)


def from_gating_strategy(gs, *, name: str = "gatingml", description: str = "", source: str = "<gating strategy>",
                         _info: Mapping[str, Any] | None = None) -> Template:
    """Convert a FlowKit ``GatingStrategy`` into a :class:`Template` (see the module doc for the mapping).

    Population names are the gate ids; a gate id that occurs under several parents is
    named ``"id [parent/path]"``. ``template.gate_ids`` maps every population name to
    its FlowKit ``(gate id, gate path)``.
    """
    info = dict(_info or {})
    names_info: Mapping[str, str] = info.get("names", {})
    kinds_info: Mapping[str, str] = info.get("kinds", {})
    r = _Reader(gs, source)
    names = _Names(gs, names_info)
    gates, quad_gates = _gates_of(gs)
    pops: list[Population] = []
    gate_ids: dict[str, tuple[str, tuple[str, ...]]] = {}
    for (gid, path), g in gates.items():
        parent = names.parent(path, quad_gates, source)
        if (gid, path) in quad_gates:
            pops.extend(_quadrants(r, g, gid, path, parent, names.name, gate_ids))
            continue
        nm = names.name(gid, path)
        gate_ids[nm] = (gid, path)
        pops.append(Population(nm, parent, _gate_from_flowkit(r, g, gid, names, kinds_info)))
    pops = _fold_complements(pops, info.get("complements", {}), names_info, gate_ids, kinds_info)
    if names_info:  # written by write_gatingml: keep the template's population order
        rank = {n: i for i, n in enumerate(names_info.values())}
        pops.sort(key=lambda p: rank.get(p.name, len(rank)))
    return Template(name=str(info.get("name") or name), populations=_topological(pops, source),
                    thresholds={}, transforms={"default": "none", "scatter": "none"},
                    description=str(info.get("description") or description), path=source,
                    compensation={mid: _matrix_frame(m) for mid, m in r.matrices.items()}, gate_ids=gate_ids)


class _Names:
    """Population names of a strategy's gates: the gate id, or ``"id [parent/path]"`` where ids repeat."""

    def __init__(self, gs, names_info: Mapping[str, str]):
        self.names_info = names_info
        self.count: dict[str, int] = {}
        for gid, _ in gs.get_gate_ids():
            self.count[gid] = self.count.get(gid, 0) + 1

    def name(self, gid: str, path: tuple[str, ...]) -> str:
        base = self.names_info.get(gid, gid)
        return base if self.count[gid] == 1 else f"{base} [{'/'.join(path[1:])}]"

    def parent(self, path: tuple[str, ...], quad_gates: set, source: str) -> str | None:
        if len(path) <= 1:
            return None
        last, up = path[-1], path[:-1]
        if (last, up) in quad_gates:  # pragma: no cover - a quadrant gate itself is never a parent
            raise GatingMLError(f"{source}: a gate's parent is the quadrant gate {last!r}; use one of its quadrants")
        return self.name(last, up)


def _gates_of(gs) -> tuple[dict[tuple[str, tuple[str, ...]], Any], set[tuple[str, tuple[str, ...]]]]:
    """``{(gate id, path): gate}`` of a strategy (quadrants left to their quadrant gate), and the quadrant gates."""
    import flowkit as fk

    gates: dict[tuple[str, tuple[str, ...]], Any] = {}
    quad_gates: set[tuple[str, tuple[str, ...]]] = set()
    for gid, p in gs.get_gate_ids():
        path = tuple(p)
        try:
            g = gs.get_gate(gid, gate_path=path)
        except fk.exceptions.QuadrantReferenceError:
            continue  # a quadrant: handled with its quadrant gate
        gates[(gid, path)] = g
        if isinstance(g, fk.gates.QuadrantGate):
            quad_gates.add((gid, path))
    return gates, quad_gates


def _rect_from(r: _Reader, g, gid: str, names: _Names, kinds: Mapping[str, str]) -> RectGate:
    dims = tuple(r.dim(d) for d in g.dimensions)
    bounds = tuple((_num(d.min), _num(d.max)) for d in g.dimensions)
    kind = kinds.get(gid) or ("range" if len(dims) == 1 else "rectangle")
    return RectGate(dims, bounds, bool(getattr(g, "use_complement", False)), kind)


def _polygon_from(r: _Reader, g, gid: str, names: _Names, kinds: Mapping[str, str]) -> PolygonGate:
    dims = tuple(r.dim(d) for d in g.dimensions)
    return PolygonGate(dims, tuple((float(x), float(y)) for x, y in g.vertices),  # type: ignore[arg-type]
                       bool(getattr(g, "use_complement", False)))


def _ellipse_from(r: _Reader, g, gid: str, names: _Names, kinds: Mapping[str, str]) -> EllipseGate:
    dims = tuple(r.dim(d) for d in g.dimensions)
    return EllipseGate(dims, tuple(float(c) for c in g.coordinates),
                       tuple(tuple(float(v) for v in row) for row in g.covariance_matrix), float(g.distance_square))


def _boolean_from(r: _Reader, g, gid: str, names: _Names, kinds: Mapping[str, str]) -> BooleanGate:
    refs = tuple((names.name(ref["ref"], tuple(ref["path"])), bool(ref["complement"])) for ref in g.gate_refs)
    return BooleanGate(str(g.type).lower(), refs)


def _gate_from_flowkit(r: _Reader, g, gid: str, names: _Names, kinds: Mapping[str, str]) -> Any:
    """The template gate of a FlowKit gate (one small function per gate type)."""
    import flowkit as fk

    convert = {fk.gates.RectangleGate: _rect_from, fk.gates.PolygonGate: _polygon_from,
               fk.gates.EllipsoidGate: _ellipse_from, fk.gates.BooleanGate: _boolean_from}.get(type(g))
    if convert is None:
        raise GatingMLError(f"{r.src}: gate {gid!r}: unsupported gate type {type(g).__name__}")
    return convert(r, g, gid, names, kinds)


def _matrix_frame(m):
    import pandas as pd

    return pd.DataFrame(np.asarray(m.matrix, dtype=float), index=list(m.fluorochromes), columns=list(m.detectors))


_SIGNS = ("++", "+-", "-+", "--")


def _quadrants(r: _Reader, g, gid: str, path, parent, pname, gate_ids) -> list[Population]:
    """A Gating-ML quadrant gate as template quadrant cells (or one rectangle per quadrant)."""
    comp_refs = {d.compensation_ref for d in g.dimensions} - {None, "uncompensated"}
    if len(comp_refs) > 1:
        raise GatingMLError(f"{r.src}: quadrant gate {gid!r} mixes compensations {sorted(comp_refs)}")
    # FlowKit compensates every divider of the gate when any is compensated
    gate_comp = r.comp(next(iter(comp_refs))) if comp_refs else False
    divs = {d.id: _with_comp(r.dim(d), gate_comp) for d in g.dimensions}
    qpath = path + (gid,)
    cells: list[tuple[str, tuple[Dim, ...], tuple[tuple[Any, Any], ...]]] = []
    for qid, q in g.quadrants.items():
        dims = tuple(divs[ref] for ref in q.divider_refs)
        bounds = tuple(tuple(_num(v) for v in q.get_divider_range(ref)) for ref in q.divider_refs)
        nm = pname(qid, qpath)
        gate_ids[nm] = (qid, qpath)
        cells.append((nm, dims, bounds))  # type: ignore[arg-type]
    signs = _quadrant_signs(g, cells)
    quad = None
    if signs is not None:  # cells in the template's quadrant order (++, +-, -+, --)
        quad = (pname(gid, path), tuple(sorted(signs.items(), key=lambda kv: _SIGNS.index(kv[1]))))
        cells.sort(key=lambda c: _SIGNS.index(signs[c[0]]))
    return [Population(nm, parent, RectGate(dims, bounds, False, "quadrant", quad)) for nm, dims, bounds in cells]


def _sign(lo: Any, hi: Any) -> str:
    if lo is not None and hi is None:
        return "+"
    return "-" if lo is None and hi is not None else "?"


def _quadrant_signs(g, cells) -> dict[str, str] | None:
    """``{cell: "+-"...}`` if the gate is a classic quadrant (two dividers with one value each, four cells
    covering the four sign pairs, in divider order), else ``None``."""
    if not (len(g.dimensions) == 2 and all(len(d.values) == 1 for d in g.dimensions) and len(cells) == 4):
        return None
    order = [d.id for d in g.dimensions]
    if any(list(q.divider_refs) != order for q in g.quadrants.values()):
        return None
    signs = {nm: "".join(_sign(lo, hi) for lo, hi in bounds) for nm, _, bounds in cells}
    return signs if sorted(signs.values()) == sorted(_SIGNS) else None


def _with_comp(d: Dim, comp: bool | str) -> Dim:
    from dataclasses import replace

    return replace(d, compensated=comp) if comp else d


def _fold_complements(pops: list[Population], complements: Mapping[str, str], names: Mapping[str, str],
                      gate_ids, kinds: Mapping[str, str]) -> list[Population]:
    """Undo the region + ``not`` encoding :func:`write_gatingml` uses for ``complement: true`` gates."""
    if not complements:
        return pops
    from dataclasses import replace

    by_name = {p.name: p for p in pops}
    drop: set[str] = set()
    out: list[Population] = []
    for p in pops:
        region_id = complements.get(gate_ids[p.name][0]) if p.name in gate_ids else None
        region = by_name.get(names.get(region_id, region_id)) if region_id else None
        if region is not None and isinstance(p.gate, BooleanGate) and isinstance(region.gate, (RectGate, PolygonGate)):
            gate: RectGate | PolygonGate = replace(region.gate, complement=True)
            if isinstance(gate, RectGate) and kinds.get(gate_ids[p.name][0]):
                gate = replace(gate, kind=kinds[gate_ids[p.name][0]])
            p = replace(p, gate=gate)
            drop.add(region.name)
        out.append(p)
    return [p for p in out if p.name not in drop]


def _topological(pops: list[Population], source: str) -> list[Population]:
    def missing(p: Population, name: str) -> GatingMLError:
        return GatingMLError(f"{source}: gate {p.name!r} refers to undefined gate(s) [{name!r}]")

    def cycle(names: list[str]) -> GatingMLError:  # pragma: no cover - FlowKit rejects cycles first
        return GatingMLError(f"{source}: gates {names} depend on each other")

    return topological_order(pops, missing, cycle)


def read_gatingml(path: str | os.PathLike) -> Template:
    """Read a Gating-ML 2.0 document as a :class:`~immuneprofile.template.Template`.

    Gate it with ``gate_sample(load_fcs(fcs_path), template)`` (default ``"auto"``
    compensation: Gating-ML ``FCS`` means the file's own spillover; spectrum matrices
    of the document are kept in ``template.compensation`` and applied by the engine).

    Raises
    ------
    GatingMLError
        The file is not XML, not Gating-ML 2.0, or uses something the engine cannot gate.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise GatingMLError(f"{path}: no such file")
    gs, tree = _parse_xml(path)
    return from_gating_strategy(gs, name=Path(path).stem, source=path, _info=_custom_info(tree))


# --------------------------------------------------------------------------- writing


_NCNAME_BAD = re.compile(r"[^A-Za-z0-9_.\-]")


def _fmt(v: float) -> str:
    v = float(v)
    if not math.isfinite(v):
        raise GatingMLError(f"cannot write the non-finite number {v} in Gating-ML")
    return repr(v)


class _Writer:
    def __init__(self, template: Template, data, values: Mapping[tuple[str, str], float]):
        from lxml import etree

        self.E = etree
        self.template = template
        self.data = data
        self.values = values
        self.used: set[str] = set()
        self.gate_id: dict[str, str] = {}
        self.xf_id: dict[tuple, str] = {}
        self.mx_id: dict[str, str] = {}
        self.info: list[tuple[str, dict[str, str]]] = []
        self.root = etree.Element(f"{{{NS_GATING}}}Gating-ML",
                                  nsmap={"gating": NS_GATING, "data-type": NS_DATATYPE, "transforms": NS_TRANSFORMS})
        self.defs: list[Any] = []  # transformations and matrices, written before the gates
        self.gates: list[Any] = []

    # -- ids
    def new_id(self, base: str) -> str:
        s = _NCNAME_BAD.sub("_", base.replace("+", "pos").replace(" ", "_")) or "g"
        if not (s[0].isalpha() or s[0] == "_"):
            s = "g_" + s
        out, i = s, 2
        while out in self.used:
            out, i = f"{s}_{i}", i + 1
        self.used.add(out)
        return out

    def g(self, tag: str, parent=None, **attrs) -> Any:
        el = self.E.Element(tag) if parent is None else self.E.SubElement(parent, tag)
        for k, v in attrs.items():
            el.set(k, v)
        return el

    # -- values
    def value(self, b: Any) -> float | None:
        if b is None:
            return None
        if isinstance(b, ThresholdRef):
            return float(self.values[(b.marker, b.cut)])
        return float(b)

    def channel(self, marker: str, pop: str) -> str:
        if self.data is None:
            return marker
        return self.data.channels[self.data.find_channel(marker, context=f"template {self.template.path}, population {pop!r}")]

    def comp_ref(self, d: Dim, ch: str | None) -> str:
        ref = compensation_ref(d, self.data, ch)
        if isinstance(d.compensated, str):
            return self.matrix(ref)
        return self.matrix("custom", self.data.spill) if ref == "custom" else ref

    def matrix(self, mid: str, fk_matrix: Any = None) -> str:
        if mid in self.mx_id:
            return self.mx_id[mid]
        if fk_matrix is None:
            frame = (self.template.compensation or {}).get(mid)
            if frame is None:
                raise GatingMLError(f"template {self.template.path}: dimension compensated with {mid!r}, "
                                    f"which is not in template.compensation")
            fluoros, dets, mat = list(frame.index), list(frame.columns), np.asarray(frame, dtype=float)
        else:
            fluoros, dets, mat = list(fk_matrix.fluorochromes), list(fk_matrix.detectors), np.asarray(fk_matrix.matrix)
        xid = self.mx_id[mid] = self.new_id(mid)
        T = NS_TRANSFORMS
        el = self.g(f"{{{T}}}spectrumMatrix", **{f"{{{T}}}id": xid})
        for tag, names in (("fluorochromes", fluoros), ("detectors", dets)):
            sub = self.g(f"{{{T}}}{tag}", el)
            for n in names:
                self.g(f"{{{NS_DATATYPE}}}fcs-dimension", sub, **{f"{{{NS_DATATYPE}}}name": str(n)})
        for row in mat:
            sp = self.g(f"{{{T}}}spectrum", el)
            for v in row:
                self.g(f"{{{T}}}coefficient", sp, **{f"{{{T}}}value": _fmt(v)})
        self.defs.append(el)
        return xid

    def transform(self, spec: Mapping[str, Any] | None) -> str | None:
        if spec is None:
            return None
        key = tuple(sorted(spec.items()))
        if key in self.xf_id:
            return self.xf_id[key]
        T = NS_TRANSFORMS
        kind = spec["type"]
        if kind in ("biex", "flowjo_log"):
            raise GatingMLError(f"template {self.template.path}: the FlowJo {kind} transform has no Gating-ML 2.0 "
                                f"equivalent; export it with write_flowjo instead")
        tag = {"linear": "flin", "log": "flog", "asinh": "fasinh", "logicle": "logicle", "hyperlog": "hyperlog"}[kind]
        params = {"flin": "TA", "flog": "TM", "fasinh": "TMA", "logicle": "TWMA", "hyperlog": "TWMA"}[tag]
        xid = self.xf_id[key] = self.new_id(f"{kind}_" + "_".join(f"{p}{spec[p]:g}" for p in params))
        el = self.g(f"{{{T}}}transformation", **{f"{{{T}}}id": xid})
        self.g(f"{{{T}}}{tag}", el, **{f"{{{T}}}{p}": _fmt(spec[p]) for p in params})
        self.defs.append(el)
        return xid

    def ratio(self, d: Dim, pop: str) -> str:
        key = ("ratio", d.marker, d.ratio)
        if key in self.xf_id:
            return self.xf_id[key]
        assert d.ratio is not None  # only ratio dimensions get here
        num, den, a, b, c = d.ratio
        T = NS_TRANSFORMS
        xid = self.xf_id[key] = self.new_id(d.marker)
        el = self.g(f"{{{T}}}transformation", **{f"{{{T}}}id": xid})
        fr = self.g(f"{{{T}}}fratio", el, **{f"{{{T}}}A": _fmt(a), f"{{{T}}}B": _fmt(b), f"{{{T}}}C": _fmt(c)})
        for ch in (num, den):
            self.g(f"{{{NS_DATATYPE}}}fcs-dimension", fr, **{f"{{{NS_DATATYPE}}}name": self.channel(ch, pop)})
        self.defs.append(el)
        return xid

    def dimension(self, gate_el, d: Dim, pop: str, comp: Any, lo=None, hi=None, tag: str = "dimension", **extra):
        G, D = NS_GATING, NS_DATATYPE
        ch = None if d.ratio is not None else self.channel(d.marker, pop)
        attrs = {f"{{{G}}}{k}": v for k, v in extra.items()}
        attrs[f"{{{G}}}compensation-ref"] = comp
        xf = self.transform(d.transform)
        if xf is not None:
            attrs[f"{{{G}}}transformation-ref"] = xf
        if lo is not None:
            attrs[f"{{{G}}}min"] = _fmt(lo)
        if hi is not None:
            attrs[f"{{{G}}}max"] = _fmt(hi)
        el = self.g(f"{{{G}}}{tag}", gate_el, **attrs)
        if d.ratio is not None:
            self.g(f"{{{D}}}new-dimension", el, **{f"{{{D}}}transformation-ref": self.ratio(d, pop)})
        else:
            self.g(f"{{{D}}}fcs-dimension", el, **{f"{{{D}}}name": ch})
        return el

    def gate_comp(self, dims, pop: str) -> str:
        """One compensation reference for the whole gate (Gating-ML tools compensate a gate as a whole)."""
        refs = [self.comp_ref(d, None if d.ratio is not None else self.channel(d.marker, pop)) for d in dims]
        real = sorted({r for r in refs if r != "uncompensated"})
        if len(real) > 1:
            raise GatingMLError(f"template {self.template.path}: population {pop!r} mixes compensations {real}")
        return real[0] if real else "uncompensated"

    # -- gates
    def new_gate(self, kind: str, name: str, parent: str | None, gid: str | None = None):
        G = NS_GATING
        gid = gid or self.gate_id.get(name) or self.new_id(name)
        self.gate_id[name] = gid
        el = self.g(f"{{{G}}}{kind}", **{f"{{{G}}}id": gid})
        if parent is not None:
            el.set(f"{{{G}}}parent_id", self.gate_id[parent])
        self.gates.append(el)
        return el

    def build(self):
        done_groups: set[str] = set()
        for pop in self.template.populations:
            g = pop.gate
            if isinstance(g, RectGate) and g.quadrant is not None:
                if g.quadrant[0] not in done_groups:
                    done_groups.add(g.quadrant[0])
                    self.quadrant(pop, g, *g.quadrant)
                continue
            if getattr(g, "complement", False):
                self.complement(pop, g)
            elif isinstance(g, BooleanGate):
                self.boolean(pop, g)
            else:
                self.shape(pop, g, pop.name, pop.parent)
            self.record(pop.name, g.kind if isinstance(g, RectGate) else None)
        self.custom_info()
        for el in self.defs + self.gates:
            self.root.append(el)
        return self.E.ElementTree(self.root)

    def complement(self, pop: Population, g) -> None:
        """A ``complement: true`` gate: the region, and a boolean ``not`` of it (recorded for reading back)."""
        G = NS_GATING
        region = self.region(pop, g)
        el = self.new_gate("BooleanGate", pop.name, pop.parent)
        self.g(f"{{{G}}}gateReference", self.g(f"{{{G}}}not", el), **{f"{{{G}}}ref": region})
        self.info.append(("complement", {"gate": self.gate_id[pop.name], "region": region}))

    def boolean(self, pop: Population, g: BooleanGate) -> None:
        G = NS_GATING
        el = self.new_gate("BooleanGate", pop.name, pop.parent)
        op = self.g(f"{{{G}}}{g.op}", el)
        refs = list(g.refs) if g.op == "not" or len(g.refs) > 1 else list(g.refs) * 2  # and/or need 2
        for ref, comp in refs:
            attrs = {f"{{{G}}}ref": self.gate_id[ref]}
            if comp:
                attrs[f"{{{G}}}use-as-complement"] = "true"
            self.g(f"{{{G}}}gateReference", op, **attrs)

    def custom_info(self) -> None:
        """The template's name, description and population names/kinds, for :func:`read_gatingml`."""
        custom = self.E.SubElement(self.root, f"{{{NS_DATATYPE}}}custom_info")
        tpl = self.E.SubElement(custom, f"{{{NS_IP}}}template", nsmap={"ip": NS_IP})
        tpl.set("name", self.template.name)
        tpl.set("description", self.template.description or "")
        for what, attrs in self.info:
            el = self.E.SubElement(tpl, f"{{{NS_IP}}}{what}")
            for k, v in attrs.items():
                el.set(k, v)

    def record(self, name: str, kind: str | None) -> None:
        attrs = {"id": self.gate_id[name], "name": name}
        if kind:
            attrs["kind"] = kind
        self.info.append(("population", attrs))

    def region(self, pop: Population, g) -> str:
        rid = self.new_id(f"{pop.name}_region")
        from dataclasses import replace

        self.shape(pop, replace(g, complement=False), f"{pop.name} (region)", pop.parent, rid)
        self.record(f"{pop.name} (region)", None)
        return rid

    def shape(self, pop: Population, g, name: str, parent: str | None, gid: str | None = None) -> None:
        G, D = NS_GATING, NS_DATATYPE
        if isinstance(g, RectGate):
            comp = self.gate_comp(g.dims, pop.name)
            el = self.new_gate("RectangleGate", name, parent, gid)
            for d, (lo, hi) in zip(g.dims, g.bounds):
                lo, hi = self.value(lo), self.value(hi)
                if lo is None and hi is None:
                    continue
                self.dimension(el, d, pop.name, comp, lo, hi)
            if not len(el):
                raise GatingMLError(f"template {self.template.path}: population {pop.name!r} has no bound to write")
        elif isinstance(g, PolygonGate):
            comp = self.gate_comp(g.dims, pop.name)
            el = self.new_gate("PolygonGate", name, parent, gid)
            for d in g.dims:
                self.dimension(el, d, pop.name, comp)
            for x, y in g.vertices:
                v = self.g(f"{{{G}}}vertex", el)
                for c in (x, y):
                    self.g(f"{{{G}}}coordinate", v, **{f"{{{D}}}value": _fmt(c)})
        elif isinstance(g, EllipseGate):
            comp = self.gate_comp(g.dims, pop.name)
            el = self.new_gate("EllipsoidGate", name, parent, gid)
            for d in g.dims:
                self.dimension(el, d, pop.name, comp)
            mean = self.g(f"{{{G}}}mean", el)
            for c in g.center:
                self.g(f"{{{G}}}coordinate", mean, **{f"{{{D}}}value": _fmt(c)})
            cov = self.g(f"{{{G}}}covarianceMatrix", el)
            for row in g.covariance:
                r = self.g(f"{{{G}}}row", cov)
                for v in row:
                    self.g(f"{{{G}}}entry", r, **{f"{{{D}}}value": _fmt(v)})
            self.g(f"{{{G}}}distanceSquare", el, **{f"{{{D}}}value": _fmt(g.distance_square)})
        else:  # pragma: no cover
            raise GatingMLError(f"unsupported gate {g!r}")

    def quadrant(self, pop: Population, g: RectGate, group: str, signs) -> None:
        G = NS_GATING
        cuts: list[float] = []
        for axis in (0, 1):
            cut = self.value(next(x for x in g.bounds[axis] if x is not None))
            assert cut is not None  # a quadrant's cut is a number or a threshold
            cuts.append(cut)
        comp = self.gate_comp(g.dims, pop.name)
        el = self.new_gate("QuadrantGate", group, pop.parent)
        self.record(group, None)
        div_ids = []
        for axis, (d, cut) in enumerate(zip(g.dims, cuts)):
            did = self.new_id(f"{group}_{'xy'[axis]}div")
            div_ids.append(did)
            dv = self.dimension(el, d, pop.name, comp, tag="divider", id=did)
            self.g(f"{{{G}}}value", dv).text = _fmt(cut)
        for cell, s in signs:
            qid = self.new_id(cell)
            self.gate_id[cell] = qid
            q = self.g(f"{{{G}}}Quadrant", el, **{f"{{{G}}}id": qid})
            for did, sign, cut in zip(div_ids, s, cuts):
                step = max(1.0, abs(cut))
                loc = cut + step if sign == "+" else cut - step
                self.g(f"{{{G}}}position", q, **{f"{{{G}}}divider_ref": did, f"{{{G}}}location": _fmt(loc)})
            self.record(cell, "quadrant")


def _threshold_values(template: Template, data, given: Mapping[tuple[str, str], float] | None):
    values: dict[tuple[str, str], float] = {}
    needs_fit = False
    for marker, cuts in template.thresholds.items():
        for cut, v in cuts.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                values[(marker, cut)] = float(v)
            else:
                needs_fit = True
    values.update({k: float(v) for k, v in (given or {}).items()})
    missing = [(m, c) for m, cuts in template.thresholds.items() for c in cuts if (m, c) not in values]
    if needs_fit and missing:
        if data is None:
            raise GatingMLError(
                f"template {template.path}: thresholds {', '.join(f'{m}.{c}' for m, c in missing)} are "
                f"data-driven; pass `data` (they are fitted on it) or `thresholds={{(marker, cut): value}}`")
        from immuneprofile.engine.gating import gate_sample

        res = gate_sample(data, template, thresholds=given)
        for f in res.thresholds:
            values.setdefault((f.marker, f.cut), float(f.value))
    return values


def write_gatingml(template: Template, path: str | os.PathLike, data: Any = None, *,
                   thresholds: Mapping[tuple[str, str], float] | None = None) -> None:
    """Write ``template`` as a Gating-ML 2.0 document.

    Parameters
    ----------
    template
        Any template; data-driven transforms and 2-D gates are fitted on ``data`` first.
    path
        Output file.
    data
        Optional loaded sample (:func:`immuneprofile.load_fcs`): markers are then written
        as that file's ``$PnN`` channel names, its compensation as ``FCS`` (own spillover)
        or as a spectrum matrix (custom matrix), and data-driven thresholds are fitted on
        it. Without it, dimensions keep the template's marker names and compensated
        fluorescence dimensions refer to ``FCS``.
    thresholds
        ``{(marker, cut): value}`` for data-driven thresholds (overrides fitting on ``data``).

    Raises
    ------
    GatingMLError
        Data-driven thresholds without data or values, or a template Gating-ML cannot express.
    """
    import flowkit as fk
    from lxml import etree

    from immuneprofile.engine.fit2d import needs_fitting
    from immuneprofile.engine.gating import fitted_template

    if needs_fitting(template):
        if data is None:
            raise GatingMLError(f"template {template.path}: data-driven transforms or gates (W: auto, singlet, "
                                f"cluster, qc) are fitted per sample; pass `data`, or write a result's fitted "
                                f"template (GatingResult.template)")
        template = fitted_template(data, template, thresholds)
    values = _threshold_values(template, data, thresholds)
    tree = _Writer(template, data, values).build()
    try:  # FlowKit's public reader validates against the Gating-ML 2.0 schema
        fk.parse_gating_xml(io.BytesIO(etree.tostring(tree)))
    except ValueError as exc:  # pragma: no cover - a bug in the writer
        raise GatingMLError(f"template {template.path}: the Gating-ML written is not valid: {exc}") from exc
    tree.write(os.fspath(path), encoding="utf-8", xml_declaration=True, pretty_print=True)
