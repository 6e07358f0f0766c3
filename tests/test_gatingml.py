"""Gating-ML 2.0: the compliance cases gated by our engine, export and round trips."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from conftest import GATING, ROOT, SHARED, flowkit_sample
from immuneprofile import gate_sample, load_fcs, load_template, parse_template
from immuneprofile.interop.flowkit import flowkit_gate_path, to_gating_strategy
from immuneprofile.interop.gatingml import GatingMLError, GatingMLWarning, read_gatingml, write_gatingml

GML = SHARED / "gatingml2_compliance"
DATA1 = GML / "data1.fcs"
#: truth files not named after their gate id (gml_parent_quadrant_rect_gate.xml: the rectangle under a quadrant)
TRUTH_FILE = {"ParRectangle1": "ParQuadRect"}


def _read(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", GatingMLWarning)
        return read_gatingml(path)


def _cases():
    """(document, gate id) for every gate of every compliance document that has a truth file."""
    import flowkit as fk

    out = []
    for doc in sorted((GML / "gml").glob("*.xml")):
        ids = set()
        try:
            gs = fk.parse_gating_xml(str(doc))
            ids = {g for g, _ in gs.get_gate_ids()}
        except ValueError:  # not schema-valid as written: list its ids from the XML itself
            import re

            ids = set(re.findall(r'gating:id="([^"]+)"', doc.read_text()))
        out += [pytest.param(doc.name, g, id=f"{doc.stem}-{g}") for g in sorted(ids)
                if (GML / "truth" / f"Results_{TRUTH_FILE.get(g, g)}.txt").exists()]
    return out


CASES = _cases()


@pytest.fixture(scope="module")
def data1():
    return load_fcs(DATA1)


@pytest.fixture(scope="module")
def compliance(data1):
    """Every compliance document read and gated once by the engine."""
    out = {}
    for doc in sorted((GML / "gml").glob("*.xml")):
        t = _read(doc)
        out[doc.name] = (t, gate_sample(data1, t))
    return out


def _truth(gate_id):
    return np.loadtxt(GML / "truth" / f"Results_{TRUTH_FILE.get(gate_id, gate_id)}.txt", dtype=int).astype(bool)


def _name_of(template, gate_id):
    names = [n for n, (g, _) in template.gate_ids.items() if g == gate_id]
    assert len(names) == 1, names
    return names[0]


def test_every_document_and_truth_file_is_covered():
    docs = {c.values[0] for c in CASES}
    assert docs == {p.name for p in (GML / "gml").glob("*.xml")} - {"gml_ellipse2_gate.xml"}  # myEllipse2: no truth
    gate_ids = {TRUTH_FILE.get(c.values[1], c.values[1]) for c in CASES}
    assert gate_ids == {p.stem[len("Results_"):] for p in (GML / "truth").glob("Results_*.txt")}
    assert len(CASES) >= 130


@pytest.mark.parametrize("doc,gate_id", CASES)
def test_compliance_membership(compliance, doc, gate_id):
    template, res = compliance[doc]
    got = res.mask(_name_of(template, gate_id))
    want = _truth(gate_id)
    diff = np.flatnonzero(got != want)
    assert diff.size == 0, f"{doc} {gate_id}: {diff.size} events differ from the truth (first {diff[:5]})"


@pytest.mark.parametrize("doc,gate_id", CASES)
def test_compliance_round_trip(compliance, data1, tmp_path, doc, gate_id):
    """template -> Gating-ML -> template: the same events, with and without a sample to resolve channels."""
    template, res = compliance[doc]
    name = _name_of(template, gate_id)
    for data in (None, data1):
        out = tmp_path / "rt.xml"
        write_gatingml(template, out, data)
        back = read_gatingml(out)
        assert back.names == template.names
        again = gate_sample(data1, back)
        assert np.array_equal(again.indices[name], res.indices[name])


def test_mapping_details(compliance):
    import pandas as pd

    t, _ = compliance["gml_matrix_transform_logicle_rect1_gate.xml"]
    (pop,) = t.populations
    assert [d.marker for d in pop.dims] == ["FL2-H", "FL3-H"]  # fluorochromes PE, PerCP -> detectors
    assert {d.compensated for d in pop.dims} == {"MySpill"}
    assert pop.dims[0].transform == {"type": "logicle", "T": 10000.0, "W": 0.5, "M": 4.5, "A": 0.0}
    frame = t.compensation["MySpill"]
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == ["FL1-H", "FL2-H", "FL3-H"] and list(frame.index) == ["FITC", "PE", "PerCP"]
    assert frame.loc["FITC", "FL3-H"] == 0.06

    t, _ = compliance["gml_log_ratio_range1_gate.xml"]
    (d,) = t["RatRange1a"].dims
    assert d.ratio == ("FL2-H", "FL2-A", 1.0, 0.0, -1.0)
    assert d.transform["type"] == "log" and d.compensated is False

    t, _ = compliance["gml_quadrant1_gate.xml"]  # two dividers, four cells: a template quadrant
    q = t["FL2P-FL4P"].gate
    assert q.kind == "quadrant" and q.quadrant[0] == "Quadrant1"
    assert dict(q.quadrant[1]) == {"FL2P-FL4P": "++", "FL2N-FL4P": "-+", "FL2N-FL4N": "--", "FL2P-FL4N": "+-"}
    t, _ = compliance["gml_quadrant2_gate.xml"]  # three dividers, five cells: one rectangle per cell
    g = t["FSCD-SSCN-FL1N"].gate
    assert g.kind == "quadrant" and g.quadrant is None and len(g.dims) == 3
    assert g.bounds[0] == (28.0654, 70.02725)

    t, _ = compliance["gml_parent_quadrant_rect_gate.xml"]
    assert t["ParRectangle1"].parent == "FL2P-FL4P"
    assert t.gate_ids["ParRectangle1"] == ("ParRectangle1", ("root", "Quadrant1", "FL2P-FL4P"))
    t, _ = compliance["gml_boolean_or2_gate.xml"]
    assert t["Or2"].gate.refs == (("Rectangle2", False), ("FL2N-FL4N", True))


def test_flowkit_agrees_on_imported_templates(compliance, data1):
    """The FlowKit strategy built from an imported template (matrices included) gates identically."""
    sample = flowkit_sample(DATA1)
    for doc in ("gml_all_gates.xml", "gml_parent_rect1_rect_par1_gate.xml", "gml_matrix_poly4_gate.xml"):
        t, res = compliance[doc]
        fk_res = to_gating_strategy(t, data1).gate_sample(sample)
        for pop in t.populations:
            want = fk_res.get_gate_membership(pop.name, gate_path=flowkit_gate_path(t, pop.name))
            assert np.array_equal(want, res.mask(pop.name)), (doc, pop.name)


def test_mixed_compensations_in_one_document(compliance):
    """gml_all_gates mixes 'FCS' (data1 has no spillover: uncompensated) and the MySpill matrix."""
    t, _ = compliance["gml_all_gates.xml"]
    comps = {d.compensated for p in t.populations for d in p.dims}
    assert comps == {False, True, "MySpill"}


def test_schema_invalid_wrapper_is_repaired_with_a_warning(data1):
    with pytest.warns(GatingMLWarning, match="unwrapped"):
        t = read_gatingml(GML / "gml" / "gml_range_gate_attr_testing.xml")
    assert np.array_equal(gate_sample(data1, t).mask("Range1"), _truth("Range1"))


def test_read_errors(tmp_path):
    with pytest.raises(GatingMLError, match="no such file"):
        read_gatingml(tmp_path / "missing.xml")
    bad = tmp_path / "bad.xml"
    bad.write_text("<not-xml")
    with pytest.raises(GatingMLError, match="not a readable XML"):
        read_gatingml(bad)
    other = tmp_path / "other.xml"
    other.write_text('<?xml version="1.0"?><root><a/></root>')
    with pytest.raises(GatingMLError, match="not a valid Gating-ML"):
        read_gatingml(other)


# --------------------------------------------------------------------------- export of templates


def _assert_flowkit_reads_it_the_same(path, template, res, fcs_path):
    """FlowKit, reading the exported document, gates every population exactly as our engine."""
    import flowkit as fk

    gs = fk.parse_gating_xml(str(path))
    back = read_gatingml(path)
    fk_res = gs.gate_sample(flowkit_sample(fcs_path))
    for name, (gid, gpath) in back.gate_ids.items():
        if name.endswith(" (region)"):
            continue
        want = fk_res.get_gate_membership(gid, gate_path=gpath)
        assert np.array_equal(want, res.mask(name)), name


CASE_SERIES = sorted(GATING.glob("*.yaml"))
SAMPLE_FOR = {"treg": "treg", "monocytes": "monocyte", "tcell_skin_homing": "tcell"}


@pytest.mark.parametrize("yaml_path", CASE_SERIES, ids=[p.stem for p in CASE_SERIES])
def test_case_series_templates_round_trip(yaml_path, tmp_path):
    kind = SAMPLE_FOR.get(yaml_path.stem)
    fcs = sorted((ROOT / "example_data").glob(f"*_{kind}.fcs")) if kind else []
    if not fcs:
        pytest.skip(f"no example sample for {yaml_path.name}")
    data = load_fcs(fcs[0])
    t = gate_sample(data, load_template(yaml_path)).template  # data-driven scatter gates: fitted on the sample
    res = gate_sample(data, t)
    fitted = {(f.marker, f.cut): f.value for f in res.thresholds}
    for d in (data, None):
        out = tmp_path / f"{yaml_path.stem}.xml"
        write_gatingml(t, out, d, thresholds=fitted)
        back = read_gatingml(out)
        assert back.names == t.names and back.name == t.name and back.description == t.description
        for p, q in zip(t.populations, back.populations):
            assert type(p.gate) is type(q.gate) and getattr(p.gate, "kind", None) == getattr(q.gate, "kind", None)
            assert getattr(p.gate, "complement", False) == getattr(q.gate, "complement", False)
            assert (getattr(p.gate, "quadrant", None) is None) == (getattr(q.gate, "quadrant", None) is None)
        again = gate_sample(data, back)
        for name in t.names:
            assert np.array_equal(again.indices[name], res.indices[name]), name
    write_gatingml(t, out, data, thresholds=fitted)
    _assert_flowkit_reads_it_the_same(out, t, res, fcs[0])


EDGE = {
    "name": "edge cases",
    "description": "everything Gating-ML cannot say directly",
    "transforms": {"default": {"type": "logicle", "T": 1024, "W": 0.5, "M": 4.5, "A": 0}, "scatter": "none",
                   "channels": {"FL2-H": {"type": "linear", "T": 100, "A": -15}}},  # negative values, cuts
    "thresholds": {"FL1-H": {"pos": 0.5}, "FL2-H": {"pos": -0.05, "hi": {"method": "quantile", "q": 0.8}}},
    "populations": [
        {"name": "cells +/- (1st)", "gate": {"type": "polygon", "x": "FSC-H", "y": "SSC-H", "complement": True,
                                             "vertices": [[0, 0], [60, 0], [60, 60], [0, 60]]}},
        {"name": "not big", "parent": "cells +/- (1st)",
         "gate": {"type": "rectangle", "x": "FSC-H", "y": "SSC-H", "xmin": 80, "ymin": 30, "complement": True}},
        {"name": "quad", "parent": "not big",
         "gate": {"type": "quadrant", "x": "FL1-H", "y": "FL2-H", "x_cut": "FL1-H.pos", "y_cut": "FL2-H.pos",
                  "names": {"++": "Q1+", "+-": "Q2", "-+": "Q3", "--": "Q4"}}},
        {"name": "FL2 bright", "parent": "not big", "gate": {"type": "threshold", "markers": {"FL2-H": "hi"}}},
        {"name": "ratio", "parent": "not big",
         "gate": {"type": "range", "marker": {"ratio": ["FL2-H", "FL2-A"], "A": 1, "B": 0, "C": -1, "name": "r1",
                                              "transform": {"type": "log", "T": 100, "M": 2},
                                              "compensated": False}, "min": 0.4, "max": 0.66}},
        {"name": "ellipse", "parent": "cells +/- (1st)",
         "gate": {"type": "ellipse", "x": {"marker": "FL3-H", "transform": "none", "compensated": False},
                  "y": {"marker": "FL4-H", "transform": "none", "compensated": False},
                  "center": [13, 16.2], "covariance": [[62.5, 37.5], [37.5, 62.5]], "distance_square": 1}},
        {"name": "only Q1", "parent": "not big", "gate": {"type": "boolean", "op": "and", "of": ["Q1+"]}},
        {"name": "neither", "parent": "cells +/- (1st)",
         "gate": {"type": "boolean", "op": "and", "of": ["!ellipse", "!ratio"]}},
    ],
}


def test_edge_template_round_trip_and_flowkit(data1, tmp_path):
    t = parse_template(EDGE)
    res = gate_sample(data1, t)
    assert all(res.count(n) > 0 for n in ("cells +/- (1st)", "not big", "Q1+", "Q4", "ratio", "ellipse", "neither"))
    assert res.count("not big") < res.count("cells +/- (1st)") < res.n_events
    out = tmp_path / "edge.xml"
    write_gatingml(t, out, data1)  # the data-driven FL2-H.hi is fitted on data1
    back = read_gatingml(out)
    assert back.names == t.names
    assert back["cells +/- (1st)"].gate.complement and back["not big"].gate.complement
    assert back["not big"].gate.kind == "rectangle" and back["FL2 bright"].gate.kind == "threshold"
    assert back["Q1+"].gate.quadrant is not None  # negative cut written with valid quadrant locations
    again = gate_sample(data1, back)
    for name in t.names:
        assert np.array_equal(again.indices[name], res.indices[name]), name
    _assert_flowkit_reads_it_the_same(out, t, res, DATA1)


def test_data_driven_thresholds_need_values(tmp_path):
    t = parse_template(EDGE)
    with pytest.raises(GatingMLError, match="FL2-H.hi"):
        write_gatingml(t, tmp_path / "x.xml")
    write_gatingml(t, tmp_path / "x.xml", thresholds={("FL2-H", "hi"): 0.5})
    back = read_gatingml(tmp_path / "x.xml")
    assert back["FL2 bright"].gate.bounds[0] == (0.5, None)


def test_export_without_data_uses_marker_names(tmp_path):
    t = load_template(GATING / "treg.yaml") if (GATING / "treg.yaml").exists() else parse_template(EDGE)
    t = gate_sample(load_fcs(ROOT / "example_data" / "P1_W00_treg.fcs"), t).template  # fitted: static gates
    out = tmp_path / "t.xml"
    fixed = {(m, c): r["fallback"] for m, cuts in t.thresholds.items() for c, r in cuts.items() if isinstance(r, dict)}
    write_gatingml(t, out, thresholds=fixed)
    text = out.read_text()
    assert 'compensation-ref="FCS"' in text
    back = read_gatingml(out)
    assert {d.marker for p in back.populations for d in p.dims} == {d.marker for p in t.populations for d in p.dims}
