"""FlowJo 10 workspaces (``.wsp``) in and out.

:func:`read_flowjo` turns the gate tree of a workspace's sample group into a
:class:`~immuneprofile.template.Template` that the vectorised engine gates:
FlowKit's :class:`flowkit.Workspace` parses the XML into a ``GatingStrategy``
(one per sample) and :func:`~immuneprofile.interop.gatingml.from_gating_strategy`
converts it, the same path Gating-ML documents take. :func:`write_flowjo` writes
templates, with the thresholds a gating run used, back as a workspace that
FlowJo (and FlowKit) open.

Mapping
-------
* Population names are FlowJo's (a name used under several parents gets
  ``"name [parent/path]"``); ``template.gate_ids`` maps each to FlowKit's
  ``(gate name, gate path)``.
* Dimensions name the marker (``$PnS``, if the workspace's keywords give one, else
  the channel's ``$PnN``), so the template applies to new files of the same panel.
* FlowJo transforms (linear, log, logicle, ArcSinh, biex) become the dimensions'
  transform specs (``biex``: FlowKit's ``WSPBiexTransform``, FlowJo's own table).
* A ``Comp-`` dimension is compensated with the workspace's spillover matrix
  (kept in ``template.compensation``); other dimensions use uncompensated values.
* FlowJo quadrants are rectangles (as FlowKit reads them); FlowJo ellipses are the
  polygons FlowKit (and FlowJo) gate with; and/or/not nodes are boolean gates.
* ``template.flowjo_counts`` holds the event counts FlowJo stored for each sample
  (``sample``, ``population``, ``flowjo_count``); :func:`add_flowjo_counts` puts
  them beside ours in a population table. Where ours differ, see ``docs/flowjo.md``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from immuneprofile.exceptions import FlowJoError
from immuneprofile.template.model import BooleanGate, RectGate, Template, with_dims

__all__ = ["FlowJoError", "add_flowjo_counts", "convert_workspace", "flowjo_counts", "flowjo_groups", "read_flowjo",
           "workspace_templates", "write_flowjo"]

_BOOL_NODES = {"AndNode": "and", "OrNode": "or", "NotNode": "not"}


# --------------------------------------------------------------------------- reading


def _workspace(path: str):
    """FlowKit's ``Workspace`` of ``path`` (gates of every sample, no FCS data needed)."""
    import flowkit as fk

    if not os.path.exists(path):
        raise FlowJoError(f"{path}: no such file")
    try:
        with warnings.catch_warnings():  # "WSP references X, but sample was not loaded": we load none
            warnings.simplefilter("ignore")
            return fk.Workspace(path, load_missing_file_data=True)
    except Exception as exc:  # FlowKit raises ValueError, KeyError, lxml errors... for a bad workspace
        raise FlowJoError(f"{path}: not a readable FlowJo 10 workspace: {type(exc).__name__}: {exc}") from exc


def _group_samples(ws, path: str, group: str) -> list[str]:
    groups = ws.get_sample_groups()
    if group not in groups:
        raise FlowJoError(f"{path}: no sample group {group!r}; the workspace has {groups}")
    samples = ws.get_sample_ids(group_name=group, loaded_only=False)  # sorted by name
    if not samples:
        raise FlowJoError(f"{path}: sample group {group!r} has no samples, hence no gates")
    return samples


def _channel_markers(keywords: Mapping[str, str] | None) -> dict[str, str]:
    """``{$PnN: marker}``: the ``$PnS`` label where there is one (unique in the panel), else ``$PnN``."""
    kw = {str(k).upper(): str(v) for k, v in (keywords or {}).items()}
    pnn: dict[str, str] = {}
    for key, value in kw.items():
        if key.startswith("$P") and key.endswith("N") and key[2:-1].isdigit():
            label = kw.get(f"$P{key[2:-1]}S", "").strip()
            pnn[value] = label
    labels = [v for v in pnn.values() if v]
    return {ch: (lab if lab and labels.count(lab) == 1 else ch) for ch, lab in pnn.items()}


def _renamed(tmpl: Template, markers: Mapping[str, str]) -> Template:
    """``tmpl`` with every dimension naming its marker instead of its channel."""
    pops = []
    for p in tmpl.populations:
        g = p.gate
        if not isinstance(g, BooleanGate):
            g = with_dims(g, tuple(replace(d, marker=markers.get(d.marker, d.marker)) for d in p.dims))
        pops.append(replace(p, gate=g))
    return replace(tmpl, populations=pops)


def _stored_counts(path: str) -> pd.DataFrame:
    """FlowJo's stored counts: ``sample``, ``gate``, ``gate_path`` (FlowKit's form), ``flowjo_count``."""
    from lxml import etree

    rows: list[dict[str, Any]] = []

    def walk(el, sample: str, gpath: tuple[str, ...]) -> None:
        for sub in el.findall("Subpopulations"):
            for node in sub:
                if not isinstance(node.tag, str) or (node.tag != "Population" and node.tag not in _BOOL_NODES):
                    continue
                name, count = node.get("name"), node.get("count")
                if count is not None and int(count) >= 0:
                    rows.append({"sample": sample, "gate": name, "gate_path": gpath, "flowjo_count": int(count)})
                walk(node, sample, gpath + (name,))

    try:
        root = etree.parse(path).getroot()
    except (OSError, etree.XMLSyntaxError) as exc:
        raise FlowJoError(f"{path}: not a readable XML document: {exc}") from exc
    for node in root.iter("SampleNode"):
        walk(node, node.get("name"), ("root",))
    return pd.DataFrame(rows, columns=["sample", "gate", "gate_path", "flowjo_count"])


def flowjo_counts(path: str | os.PathLike, template: Template | None = None) -> pd.DataFrame:
    """Event counts FlowJo stored in a workspace, one row per sample and population.

    Parameters
    ----------
    path
        The ``.wsp`` file.
    template
        A template read from it (:func:`read_flowjo`): populations are then named as
        in the template (and rows of gates it does not have are dropped).

    Returns
    -------
    pandas.DataFrame
        ``sample`` (FlowJo's sample name, usually the FCS file name), ``population``,
        ``flowjo_count``.
    """
    raw = _stored_counts(os.fspath(path))
    if template is None:
        return raw.rename(columns={"gate": "population"})[["sample", "population", "flowjo_count"]]
    name_of = {(gid, tuple(gp)): nm for nm, (gid, gp) in getattr(template, "gate_ids", {}).items()}
    raw["population"] = [name_of.get((g, p)) for g, p in zip(raw["gate"], raw["gate_path"])]
    raw = raw[raw["population"].notna()]
    return raw[["sample", "population", "flowjo_count"]].reset_index(drop=True)


def read_flowjo(path: str | os.PathLike, group: str = "All Samples", sample: str | None = None) -> Template:
    """Read the gates of a FlowJo 10 workspace's sample group as a template.

    Parameters
    ----------
    path
        The ``.wsp`` file (its FCS files are not needed).
    group
        The sample group (FlowJo's "All Samples" by default).
    sample
        The sample whose gate tree (and transforms, compensation) to take; by default
        the group's first (by name). FlowJo keeps one gate tree per sample: the group's gates
        plus any the analyst adjusted for that sample.

    Returns
    -------
    Template
        Gate it with ``gate_sample(load_fcs(fcs_path), template)``. ``template.flowjo_counts``
        holds FlowJo's stored counts for every sample of the workspace (see :func:`flowjo_counts`).

    Raises
    ------
    FlowJoError
        The file is missing or not a FlowJo 10 workspace, the group or sample does not
        exist, or a gate or transform is one the engine cannot gate.
    """
    from immuneprofile.interop.gatingml import from_gating_strategy

    path = os.fspath(path)
    ws = _workspace(path)
    samples = _group_samples(ws, path, group)
    if sample is None:
        sample = samples[0]
    elif sample not in samples:
        raise FlowJoError(f"{path}: sample {sample!r} is not in group {group!r}; its samples: {samples}")
    gs = ws.get_gating_strategy(sample)
    name = Path(path).stem if group == "All Samples" else f"{Path(path).stem}_{group}"
    try:
        tmpl = from_gating_strategy(gs, name=name, source=path,
                                    description=f"FlowJo workspace {Path(path).name}, group {group!r}, "
                                                f"gates of sample {sample!r}")
    except Exception as exc:  # GatingMLError names the gate; say it is the workspace's
        raise FlowJoError(f"{path}: group {group!r}, sample {sample!r}: {exc}") from exc
    tmpl = _renamed(tmpl, _channel_markers(ws.get_keywords(sample)))
    tmpl.flowjo_counts = flowjo_counts(path, tmpl)  # type: ignore[attr-defined]
    return tmpl


def flowjo_groups(path: str | os.PathLike) -> dict[str, Template]:
    """:func:`read_flowjo` of every sample group that has samples, by group name."""
    path = os.fspath(path)
    ws = _workspace(path)
    return {g: read_flowjo(path, group=g) for g in ws.get_sample_groups()
            if ws.get_sample_ids(group_name=g, loaded_only=False)}


def add_flowjo_counts(table: pd.DataFrame, counts: pd.DataFrame) -> pd.DataFrame:
    """Put FlowJo's stored counts beside ours: a ``flowjo_count`` column after ``count``.

    A table row gets FlowJo's count where FlowJo stored one for its population and a
    sample whose name is the row's ``sample_id`` (with or without the ``.fcs``
    extension); other rows get ``<NA>``.
    """
    counts = counts.assign(sample_id=[_stem(s) for s in counts["sample"]])
    counts = counts.drop_duplicates(["sample_id", "population"])[["sample_id", "population", "flowjo_count"]]
    out = table.drop(columns=["flowjo_count"], errors="ignore")
    key = out["sample_id"].map(_stem)
    merged = pd.DataFrame({"sample_id": key, "population": out["population"]}).merge(
        counts, on=["sample_id", "population"], how="left")
    pos = list(out.columns).index("count") + 1 if "count" in out.columns else len(out.columns)
    out.insert(pos, "flowjo_count", merged["flowjo_count"].astype("Int64").to_numpy())
    return out


def _stem(name: Any) -> str:
    s = str(name)
    return s[:-4] if s.lower().endswith(".fcs") else s


# --------------------------------------------------------------------------- writing

_NS = {"gating": "http://www.isac-net.org/std/Gating-ML/v2.0/gating",
       "transforms": "http://www.isac-net.org/std/Gating-ML/v2.0/transformations",
       "data-type": "http://www.isac-net.org/std/Gating-ML/v2.0/datatypes"}
_COMP_PREFIX = "Comp-"


def _q(prefix: str, tag: str) -> str:
    return f"{{{_NS[prefix]}}}{tag}"


def _sub(parent, tag: str, **attrs: Any):
    from lxml import etree

    el = etree.SubElement(parent, tag)
    for k, v in attrs.items():
        el.set(k, str(v))
    return el


class _SampleWriter:
    """One sample's FlowJo ``Sample`` element: its transforms, matrix, keywords and gate tree."""

    def __init__(self, result, sample_id: int, name: str, data):
        self.res = result
        self.name = name
        self.t = result.template
        self.data = data
        self.sid = sample_id
        self.values = {(f.marker, f.cut): float(f.value) for f in result.thresholds}
        self.xforms: dict[str, tuple[Any, Any]] = {}  # channel -> (spec, FlowKit transform)
        self.matrix: tuple[str, list[str], np.ndarray] | None = None  # (name, detectors, square matrix)
        self.node_of: dict[str | None, Any] = {}
        self.next_id = 1

    def where(self, pop: str) -> str:
        return f"{self.res.path}: template {self.t.name!r}, population {pop!r}"

    # -- values on FlowJo's (raw) scale
    def channel(self, marker: str, pop: str) -> str:
        return self.data.channels[self.data.find_channel(marker, context=f"template {self.t.path}, population {pop!r}")]

    def value(self, b: Any, pop: str) -> float | None:
        from immuneprofile.template.model import ThresholdRef

        if b is None or not isinstance(b, ThresholdRef):
            return None if b is None else float(b)
        v = self.values.get((b.marker, b.cut), self.t.thresholds.get(b.marker, {}).get(b.cut))
        if not isinstance(v, (int, float)):
            raise FlowJoError(f"{self.where(pop)}: threshold {b} has no value in this result")
        return float(v)

    def raw(self, dim, ch: str, t: float, pop: str) -> float:
        from immuneprofile.engine.transforms import inverse_bound

        if dim.transform is None:
            return float(t)
        spec, xf = self.xforms[ch]
        v = inverse_bound(spec, xf, float(t))
        if v is None:
            raise FlowJoError(f"{self.where(pop)}: {dim.marker} bound {t} lies where the {spec['type']} transform "
                              f"is flat; FlowJo stores gates on the raw scale and cannot express it")
        return v

    # -- dimensions
    def dim_name(self, dim, pop: str) -> tuple[str, str]:
        """FlowJo's parameter name for ``dim`` (``Comp-`` prefixed if compensated) and its channel; registers
        the channel's transform."""
        from immuneprofile.engine.transforms import make_transform

        if dim.ratio is not None:
            raise FlowJoError(f"{self.where(pop)}: FlowJo workspaces have no ratio dimensions")
        ch = self.channel(dim.marker, pop)
        old = self.xforms.get(ch)
        if old is not None and old[0] != dim.transform:
            raise FlowJoError(f"{self.where(pop)}: channel {ch} is gated with two transforms ({old[0]} and "
                              f"{dim.transform}); a FlowJo sample has one transform per channel")
        if old is None:
            self.xforms[ch] = (dim.transform, make_transform(dim.transform))
        return (_COMP_PREFIX + ch if self.compensates(dim, ch, pop) else ch), ch

    def compensates(self, dim, ch: str, pop: str) -> bool:
        if not dim.compensated:
            return False
        if isinstance(dim.compensated, str):
            frame = self.t.compensation[dim.compensated]
            if list(frame.index) not in (list(frame.columns), [""] * frame.shape[1]):
                raise FlowJoError(f"{self.where(pop)}: matrix {dim.compensated!r} is not a square spillover matrix")
            m = (dim.compensated, [str(c) for c in frame.columns], frame.to_numpy(dtype=float))
        elif self.data.spill is None or self.data.channels.index(ch) in self.data.scatter:
            return False
        else:
            m = ("Acquisition-defined" if self.data.compensation == "FCS" else "custom",
                 [str(c) for c in self.data.spill.detectors], np.asarray(self.data.spill.matrix, dtype=float))
        if ch not in m[1]:
            return False
        if self.matrix is not None and (self.matrix[0] != m[0] or not np.array_equal(self.matrix[2], m[2])):
            raise FlowJoError(f"{self.where(pop)}: a FlowJo sample has one compensation matrix; the template "
                              f"uses {self.matrix[0]!r} and {m[0]!r}")
        self.matrix = m
        return True

    def dimension(self, gate_el, dim, pop: str, lo: Any = None, hi: Any = None) -> tuple[str, str]:
        name, ch = self.dim_name(dim, pop)
        el = _sub(gate_el, _q("gating", "dimension"))
        for attr, b in (("min", lo), ("max", hi)):
            t = self.value(b, pop)
            if t is not None:
                el.set(_q("gating", attr), repr(self.raw(dim, ch, t, pop)))
        _sub(el, _q("data-type", "fcs-dimension"), **{_q("data-type", "name"): name})
        return name, ch

    # -- gates
    def population(self, pop) -> None:
        parent_el = self.node_of[pop.parent]
        g = pop.gate
        if isinstance(g, BooleanGate):
            self.boolean(parent_el, pop, g)
            return
        node = _sub(parent_el, "Population", name=pop.name, annotation="", owningGroup="",
                    count=self.res.count(pop.name))
        gate_el = _sub(node, "Gate", **{_q("gating", "id"): f"ID{self.sid}_{self.next_id}"})
        self.next_id += 1
        if isinstance(g, RectGate):
            el = _sub(gate_el, _q("gating", "RectangleGate"), eventsInside=0 if g.complement else 1)
            for dim, (lo, hi) in zip(g.dims, g.bounds):
                if lo is not None or hi is not None:
                    self.dimension(el, dim, pop.name, lo, hi)
        elif hasattr(g, "vertices"):
            el = _sub(gate_el, _q("gating", "PolygonGate"), eventsInside=0 if g.complement else 1)
            chans = [self.dimension(el, dim, pop.name)[1] for dim in g.dims]
            for vertex in g.vertices:
                v_el = _sub(el, _q("gating", "vertex"))
                for dim, ch, c in zip(g.dims, chans, vertex):
                    _sub(v_el, _q("gating", "coordinate"), **{_q("data-type", "value"): repr(self.raw(dim, ch, c, pop.name))})
        else:
            raise FlowJoError(f"{self.where(pop.name)}: {type(g).__name__} gates cannot be written to FlowJo "
                              f"(FlowJo ellipses are defined by foci; convert the gate to a polygon)")
        el.set(_q("gating", "id"), gate_el.get(_q("gating", "id")))
        self.node_of[pop.name] = _sub(node, "Subpopulations")

    def boolean(self, parent_el, pop, g: BooleanGate) -> None:
        if any(c for _, c in g.refs):
            raise FlowJoError(f"{self.where(pop.name)}: FlowJo boolean gates cannot complement an operand; "
                              f"use a 'not' population as the operand instead")
        tag = {"and": "AndNode", "or": "OrNode", "not": "NotNode"}[g.op]
        node = _sub(parent_el, tag, name=pop.name, annotation="", owningGroup="", count=self.res.count(pop.name))
        deps = _sub(node, "Dependents")
        for ref, _ in g.refs:
            _sub(deps, "Dependent", name="/".join(self.t.path_of(ref) + (ref,)))
        self.node_of[pop.name] = _sub(node, "Subpopulations")

    # -- the sample
    def write(self, sample_list) -> None:
        res = self.res
        sample_el = _sub(sample_list, "Sample")
        _sub(sample_el, "DataSet", uri=Path(res.path).resolve().as_uri() if res.path else res.sample_id,
             sampleID=self.sid)
        sample_node = _sub(sample_el, "SampleNode", name=self.name, annotation="", owningGroup="",
                           count=res.n_events, sampleID=self.sid)
        self.node_of[None] = _sub(sample_node, "Subpopulations")
        for pop in self.t.populations:
            self.population(pop)
        xforms_el = _sub(sample_el, "Transformations")
        sample_el.insert(1, xforms_el)
        for ch, (spec, _) in self.xforms.items():
            if spec is not None:
                for name in (ch, _COMP_PREFIX + ch) if self.matrix and ch in self.matrix[1] else (ch,):
                    _transform_element(xforms_el, name, spec)
        if self.matrix is not None:
            sample_el.insert(1, _matrix_element(*self.matrix))
        sample_el.insert(3, _keywords(self.data, res))


def _transform_element(parent, channel: str, spec: Mapping[str, Any]) -> None:
    """A FlowJo transform element for ``channel`` (as FlowKit's workspace reader reads them)."""
    kind = spec["type"]
    if kind == "linear":
        attrs = {"minRange": spec["A"], "maxRange": spec["T"], "gain": 1}
    elif kind == "logicle":
        attrs = {"length": 256, "T": spec["T"], "W": spec["W"], "M": spec["M"], "A": spec["A"]}
    elif kind == "asinh":
        attrs = {"length": 256, "maxRange": spec["T"], "T": spec["T"], "M": spec["M"], "A": spec["A"], "W": 0}
        kind = "fasinh"
    elif kind == "biex":
        attrs = {"length": 256, "maxRange": spec["max"], "neg": spec["neg"], "width": spec["width"], "pos": spec["pos"]}
    elif kind == "flowjo_log":
        attrs, kind = {"offset": spec["offset"], "decades": spec["decades"]}, "log"
    else:
        raise FlowJoError(f"channel {channel}: the {kind} transform has no FlowJo equivalent "
                          f"(FlowJo has linear, log, logicle, ArcSinh and biex)")
    el = _sub(parent, _q("transforms", kind), **{_q("transforms", k) if k != "gain" else k:
                                                  str(v) if isinstance(v, int) else repr(float(v))
                                                  for k, v in attrs.items()})
    _sub(el, _q("data-type", "parameter"), **{_q("data-type", "name"): channel})


def _matrix_element(name: str, detectors: list[str], matrix: np.ndarray):
    from lxml import etree

    el = etree.Element(_q("transforms", "spilloverMatrix"), spectral="0", prefix=_COMP_PREFIX, suffix="", name=name,
                       id=name)
    params = _sub(el, _q("data-type", "parameters"))
    for d in detectors:
        _sub(params, _q("data-type", "parameter"), **{_q("data-type", "name"): d, "userProvidedCompInfix": _COMP_PREFIX + d})
    for d, row in zip(detectors, matrix):
        sp = _sub(el, _q("transforms", "spillover"), **{_q("data-type", "parameter"): d})
        for d2, v in zip(detectors, row):
            _sub(sp, _q("transforms", "coefficient"), **{_q("data-type", "parameter"): d2,
                                                         _q("transforms", "value"): repr(float(v))})
    return el


def _keywords(data, res):
    """``$PnN``/``$PnS`` (so the workspace names markers), ``$TOT`` and ``$FIL``."""
    from lxml import etree

    el = etree.Element("Keywords")
    kws: list[tuple[str, str]] = [("$FIL", Path(res.path).name if res.path else res.sample_id),
                                  ("$TOT", str(res.n_events)), ("$PAR", str(len(data.channels)))]
    for i, (ch, m) in enumerate(zip(data.channels, data.markers), start=1):
        kws += [(f"$P{i}N", ch), (f"$P{i}S", m)]
    for k, v in kws:
        _sub(el, "Keyword", name=k, value=v)
    return el


def _result_data(res, compensation: Any):
    """The loaded sample of a result; reloaded from its file if the result holds none (``jobs > 1`` runs)."""
    if res.data is not None:
        return res.data
    from immuneprofile.io.fcs import load_fcs

    try:
        return load_fcs(res.path, compensation)
    except Exception as exc:  # FCSError, or a file that moved since gating
        raise FlowJoError(f"{res.path}: the result holds no loaded data and the file cannot be reloaded for its "
                          f"channel names and matrix: {exc}") from exc


def write_flowjo(templates: Template | Sequence[Template], results: Iterable[Any], path: str | os.PathLike, *,
                 compensation: Any = "auto") -> None:
    """Write gating results as a FlowJo 10 workspace (``.wsp``) that FlowJo and FlowKit open.

    Each gated sample gets its own gate tree (FlowJo's per-sample gates), with the
    threshold values its result used and our event count on every population; one
    sample group per template (named after it) lists the samples it gated. Bounds are
    written on the raw scale (FlowJo's convention) and each channel's transform with
    the sample, so FlowJo shows the gates on the template's axes.

    Parameters
    ----------
    templates
        The template(s) the results were gated with.
    results
        :class:`~immuneprofile.GatingResult` objects (e.g. ``Batch.results``): markers are
        written as the files' channel names (``$PnN``), compensated dimensions with the file's
        spillover matrix (the file is reloaded if the result holds no data).
    path
        The ``.wsp`` file to write.
    compensation
        How to reload the file of a result that holds no data (``jobs > 1`` runs drop it): as
        given to :func:`~immuneprofile.load_fcs` when gating.

    Raises
    ------
    FlowJoError
        A gate FlowJo cannot express (ellipse, ratio dimension, complemented boolean operand,
        one channel under two transforms or two compensation matrices), a result of a
        template not given, or one whose file cannot be reloaded. A file that several templates
        gated gets one sample per template, named ``"file.fcs [template]"``.
    """
    from lxml import etree

    templates = [templates] if isinstance(templates, Template) else list(templates)
    results = list(results)
    root = etree.Element("Workspace", nsmap=_NS, version="20.0", flowJoVersion="10.6.2", curGroup="All Samples")
    _sub(root, "Matrices")
    groups_el = _sub(root, "Groups")
    sample_list = _sub(root, "SampleList")
    members: dict[str, list[int]] = {t.name: [] for t in templates}  # by name: jobs > 1 results hold copies
    names = [Path(r.path).name if r.path else r.sample_id for r in results]
    for i, (res, name) in enumerate(zip(results, names), start=1):
        if res.template.name not in members:
            raise FlowJoError(f"{res.path}: gated with template {res.template.name!r}, which is not among those given")
        if names.count(name) > 1:  # one file, several templates: a FlowJo sample each
            name = f"{name} [{res.template.name}]"
        _SampleWriter(res, i, name, _result_data(res, compensation)).write(sample_list)
        members[res.template.name].append(i)
    for name, ids in [("All Samples", list(range(1, len(results) + 1)))] + list(members.items()):
        group_node = _sub(groups_el, "GroupNode", name=name, annotation="", owningGroup=name)
        refs = _sub(_sub(group_node, "Group", name=name), "SampleRefs")
        for sid in ids:
            _sub(refs, "SampleRef", sampleID=sid)
    etree.ElementTree(root).write(os.fspath(path), encoding="utf-8", xml_declaration=True, pretty_print=True)


# --------------------------------------------------------------------------- what the CLI calls


def workspace_templates(path: str | os.PathLike, group: str = "All Samples") -> tuple[list[Template], pd.DataFrame]:
    """A workspace as the template of ``immuneprofile gate --workspace``: ``([template], FlowJo's counts)``."""
    tmpl = read_flowjo(path, group=group)
    return [tmpl], tmpl.flowjo_counts  # type: ignore[attr-defined]


def convert_workspace(path: str | os.PathLike, out_dir: str | os.PathLike, group: str | None = None) -> list[Path]:
    """Write the workspace's templates as editable YAML files in ``out_dir``: one per sample group
    (or only ``group``), named after the template. Returns the files written."""
    from immuneprofile.template.write import write_template

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    templates = [read_flowjo(path, group=group)] if group is not None else list(flowjo_groups(path).values())
    files = []
    for t in templates:
        f = out / f"{t.name}.yaml"
        write_template(t, f)
        files.append(f)
    return files
