"""Bad input gets a clear error naming the file and the problem."""

from __future__ import annotations

import shutil
import textwrap
import warnings

import numpy as np
import pytest

from conftest import SHARED
from immuneprofile import (
    FCSError,
    MarkerError,
    TemplateError,
    gate_files,
    gate_sample,
    load_fcs,
    load_template,
    parse_template,
)

COMP = SHARED / "fcs" / "test_comp_example.fcs"
DATA1 = SHARED / "gatingml2_compliance" / "data1.fcs"


def write(tmp_path, text, name="t.yaml"):
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


# ---------------------------------------------------------------- FCS files


def test_not_an_fcs_file(tmp_path):
    p = tmp_path / "notes.fcs"
    p.write_text("patient notes, not cytometry")
    with pytest.raises(FCSError, match=r"notes\.fcs: not an FCS file"):
        load_fcs(p)


def test_empty_and_missing_file(tmp_path):
    p = tmp_path / "empty.fcs"
    p.write_bytes(b"")
    with pytest.raises(FCSError, match=r"empty\.fcs: file is empty"):
        load_fcs(p)
    with pytest.raises(FCSError, match="no such file"):
        load_fcs(tmp_path / "nope.fcs")


def test_truncated_file(tmp_path):
    p = tmp_path / "cut.fcs"
    p.write_bytes(DATA1.read_bytes()[: 5000])
    with pytest.raises(FCSError, match=r"cut\.fcs: corrupt or truncated FCS file"):
        load_fcs(p)


def test_off_by_one_offsets_read_with_warning():
    with pytest.warns(UserWarning, match="offsets are off by one"):
        d = load_fcs(COMP)
    assert d.compensation == "FCS" and d.n_events == 10703


def test_compensation_from_csv_matches_keyword():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        a = load_fcs(COMP)
        b = load_fcs(COMP, compensation=SHARED / "fcs" / "comp_complete_example.csv")
        raw = load_fcs(COMP, compensation=None)
    assert b.compensation == "custom" and raw.compensation is None
    j = a.find_channel("CD33")  # PE-A receives 30% of Ax488 in the CSV matrix
    # this file's own $SPILL is the identity; the CSV matrix is not
    assert np.array_equal(a.events, raw.events)
    assert not np.allclose(b.column(j), raw.column(j))
    assert np.array_equal(b.column(0), raw.column(0))  # scatter is never compensated
    # compensation inverts the spillover: re-applying the matrix gives back the raw detector values
    fl = raw.sample.fluoro_indices
    assert np.allclose(b.events[:, fl] @ b.spill.matrix, raw.events[:, fl], rtol=1e-9, atol=1e-6)


def test_bad_compensation_matrix(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("A,B\n1,0\n0,1\n")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(FCSError, match="test_comp_example.fcs: cannot compensate"):
            load_fcs(COMP, compensation=bad)
    with pytest.raises(FCSError, match="has no \\$SPILLOVER"):
        load_fcs(DATA1, compensation="fcs")


def test_marker_mapping_and_missing_marker():
    d = load_fcs(DATA1)  # $PnS like 'CD4 FITC', 'CD8 B PE', 'CD8 APC'
    assert d.channels[d.find_channel("cd4")] == "FL1-H"
    assert d.channels[d.find_channel("CD8 B")] == "FL2-H"
    assert d.channels[d.find_channel("FSC-H")] == "FSC-H"
    with pytest.raises(MarkerError, match="ambiguous"):
        d.find_channel("CD8")
    with pytest.raises(MarkerError, match=r"data1\.fcs: marker 'FoxP3'.*not in this file"):
        d.find_channel("FoxP3")


def test_missing_marker_names_template_and_population(tmp_path):
    t = load_template(write(tmp_path, """
        thresholds: {FoxP3: {pos: 0.5}}
        populations:
          - {name: Treg, gate: {type: threshold, markers: {FoxP3: "+"}}}
    """))
    with pytest.raises(MarkerError, match=r"data1\.fcs: marker 'FoxP3' \(template .*t\.yaml, population 'Treg'\)"):
        gate_sample(load_fcs(DATA1), t)


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize(
    "body, pattern",
    [
        ("""
         populations:
           - {name: a, gate: {type: range, marker: CD4, min: 0.1}}
           - {name: b, parent: aa, gate: {type: range, marker: CD4, min: 0.2}}
         """, r"population 'b': unknown parent 'aa' \(did you mean 'a'\?\)"),
        ("""
         populations:
           - {name: a, parent: b, gate: {type: range, marker: CD4, min: 0.1}}
           - {name: b, parent: a, gate: {type: range, marker: CD4, min: 0.2}}
         """, r"cycle in the gate tree"),
        ("""
         populations:
           - {name: a, gate: {type: range, marker: CD4, min: 0.1}}
           - {name: a, gate: {type: range, marker: CD4, min: 0.2}}
         """, r"population 'a': duplicate population name"),
        ("""
         populations:
           - {name: a, gate: {type: polygon, x: CD4, y: CD8, vertices: [[0, 0], [1]]}}
         """, r"population 'a': polygon vertices must be a list of at least 3"),
        ("""
         thresholds: {CD4: {pos: 0.5}}
         populations:
           - {name: a, gate: {type: threshold, markers: {CD44: "+"}}}
         """, r"population 'a': marker 'CD44' has no entry in `thresholds` \(did you mean 'CD4'\?\)"),
        ("""
         populations:
           - {name: a, gate: {type: rectangel, x: CD4, y: CD8}}
         """, r"unknown gate type 'rectangel'"),
        ("""
         populations:
           - {name: a, gate: {type: boolean, op: and, of: [b]}}
         """, r"unknown boolean operand 'b'"),
        ("""
         populations:
           - {name: a, gate: {type: range, marker: CD4, min: 0.9, max: 0.1}}
         """, r"min 0.9 is not below max 0.1"),
        ("""
         thresholds: {CD4: {pos: {method: otsu}}}
         populations:
           - {name: a, gate: {type: threshold, markers: {CD4: "+"}}}
         """, r"unknown method 'otsu'"),
    ],
)
def test_template_errors_name_file_population_and_fix(tmp_path, body, pattern):
    p = write(tmp_path, body)
    with pytest.raises(TemplateError, match=pattern) as info:
        load_template(p)
    msg = str(info.value)
    assert str(p) in msg and "Fix:" in msg


@pytest.mark.parametrize(
    "body, pattern",
    [
        ("""
         populations:
           - {name: a, gate: {type: range, marker: CD4, mx: 0.5}}
         """, r"population 'a': range gate has unknown key 'mx' \(did you mean 'max'\?\)"),
        ("""
         populations:
           - {name: a, gate: {type: polygon, x: CD4, y: CD8, vertices: [[0, 0], [1, 0], [1, 1]], complment: true}}
         """, r"population 'a': polygon gate has unknown key 'complment' \(did you mean 'complement'\?\)"),
        ("""
         populations:
           - {name: a, gate: {type: rectangle, x: CD4, y: CD8, xmin: 0.1, ymni: 0.2}}
         """, r"population 'a': rectangle gate has unknown key 'ymni' \(did you mean 'ymin'\?\)"),
        ("""
         populations:
           - {name: q, gate: {type: quadrant, x: CD4, y: CD8, x_cut: 0.5, y_cut: 0.5, complement: true,
                              names: {"++": a, "+-": b, "-+": c, "--": d}}}
         """, r"population 'q': `complement` is not supported on quadrant gates"),
        ("""
         thresholds: {CD4: {pos: .nan}}
         populations:
           - {name: a, gate: {type: threshold, markers: {CD4: "+"}}}
         """, r"threshold CD4\.pos is nan"),
        ("""
         thresholds: {CD4: {pos: .inf}}
         populations:
           - {name: a, gate: {type: threshold, markers: {CD4: "+"}}}
         """, r"threshold CD4\.pos is inf"),
        ("""
         thresholds: {CD4: {pos: {method: valley, fallback: .nan}}}
         populations:
           - {name: a, gate: {type: threshold, markers: {CD4: "+"}}}
         """, r"threshold CD4\.pos: fallback is nan"),
        ("""
         populations:
           - {name: a, gate: {type: range, marker: CD4, min: -.inf}}
         """, r"population 'a': min is -inf"),
        ("""
         transforms: {default: {type: logicle, T: 262144, W: 3, M: 4.5, A: 0}}
         populations:
           - {name: a, gate: {type: range, marker: CD4, min: 0.5}}
         """, r"logicle W = 3 is above M/2 = 2\.25"),
        ("""
         populations:
           - {name: a, gate: {type: range, marker: {marker: CD4, transform: {type: logicle, W: 2.5, M: 4.5}},
                              min: 0.5}}
         """, r"population 'a': bad transform: logicle W = 2\.5 is above M/2"),
    ],
)
def test_template_validation_of_gate_keys_and_numbers(tmp_path, body, pattern):
    p = write(tmp_path, body)
    with pytest.raises(TemplateError, match=pattern) as info:
        load_template(p)
    assert str(p) in str(info.value) and "Fix:" in str(info.value)


def test_hi_falls_back_to_pos_in_bounds():
    """gating/README.md: ``hi`` falls back to ``pos`` where only ``pos`` is defined -- also as ``MARKER.hi``
    in a range, rectangle or quadrant cut (it used to validate, then fail on every file)."""
    doc = {"thresholds": {"FL1-H": {"pos": 0.3}}, "transforms": {"default": "none"},
           "populations": [{"name": "r", "gate": {"type": "range", "marker": "FL1-H", "min": "FL1-H.hi"}},
                           {"name": "q", "gate": {"type": "quadrant", "x": "FL1-H", "y": "FL2-H",
                                                  "x_cut": "FL1-H.hi", "y_cut": 100,
                                                  "names": {"++": "a", "+-": "b", "-+": "c", "--": "d"}}}]}
    doc["thresholds"]["FL1-H"]["pos"] = 100.0
    res = gate_sample(load_fcs(DATA1), parse_template(doc))
    x = res.data.column(res.data.find_channel("FL1-H"))
    y = res.data.column(res.data.find_channel("FL2-H"))
    assert np.array_equal(res.mask("r"), x >= 100) and 0 < res.count("r") < res.n_events
    assert np.array_equal(res.mask("b"), (x >= 100) & (y < 100))


def test_invalid_yaml(tmp_path):
    p = write(tmp_path, "populations: [ {name: a, gate: {type: range")
    with pytest.raises(TemplateError, match="not valid YAML"):
        load_template(p)


def test_topological_order_allows_forward_references():
    t = parse_template({"populations": [
        {"name": "child", "parent": "top", "gate": {"type": "range", "marker": "CD4", "min": 0.5}},
        {"name": "top", "gate": {"type": "range", "marker": "CD3", "min": 0.5}},
    ]})
    assert t.names == ["top", "child"]
    assert t.path_of("child") == ("top",)


# ---------------------------------------------------------------- batches


def test_one_bad_file_does_not_lose_the_others(tmp_path):
    good = tmp_path / "good.fcs"
    shutil.copy(DATA1, good)
    bad = tmp_path / "bad.fcs"
    bad.write_bytes(DATA1.read_bytes()[:3000])
    t = parse_template({"populations": [{"name": "cd4", "gate": {"type": "range", "marker": "CD4", "min": 0.4}}]})
    batch = gate_files([bad, good], t)
    assert list(batch.errors) == [str(bad)] and "bad.fcs" in batch.errors[str(bad)]
    assert len(batch.results) == 1 and set(batch.table["sample_id"]) == {"good"}
    assert batch.table.loc[0, "count"] == batch.results[0].count("cd4") > 0
