"""FlowJo workspaces: import against FlowKit's Workspace gating and FlowJo's stored counts, export, round trips."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import EXAMPLE, SHARED
from immuneprofile import FlowJoError, gate_sample, load_fcs, load_template, read_flowjo, write_flowjo, write_template
from immuneprofile.cli import main
from immuneprofile.interop.flowjo import add_flowjo_counts, flowjo_counts

FLOWJO = SHARED / "flowjo"
WORKSPACES = sorted(FLOWJO.glob("*/*.wsp"))
#: Populations whose count FlowJo stored differs from the exact geometry (FlowKit's, and ours): FlowJo's polygons
#: are evaluated on its 256-channel display grid (docs/flowjo.md; checked below).
FLOWJO_DIFFERS = {("simple_poly_and_rect_v2_poly50.wsp", "poly1")}
SHIPPED = [("treg", "treg"), ("monocytes", "monocyte"), ("tcell_skin_homing", "tcell")]


def _flowkit_workspace(wsp, fcs):
    import flowkit as fk

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ws = fk.Workspace(str(wsp), fcs_samples=[str(f) for f in fcs])
        ws.analyze_samples(use_mp=False)
    return ws


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_fcs(path)


@pytest.mark.parametrize("wsp", WORKSPACES, ids=lambda p: p.name)
def test_reference_workspace_membership_equals_flowkit_and_counts_flowjo(wsp):
    fcs = next(wsp.parent.glob("*.fcs"))
    tmpl = read_flowjo(wsp)
    res = gate_sample(_load(fcs), tmpl)
    ws = _flowkit_workspace(wsp, [fcs])
    stored = flowjo_counts(wsp, tmpl).set_index("population")["flowjo_count"]
    assert set(tmpl.gate_ids) == set(tmpl.names) and tmpl.names
    for name, (gid, path) in tmpl.gate_ids.items():
        truth = ws.get_gate_membership(fcs.name, gid, path)
        np.testing.assert_array_equal(res.mask(name), truth, err_msg=f"{wsp.name}: {name}")
        if name in stored.index:  # FlowJo stored a count: ours equals it, or the documented rule applies
            if (wsp.name, name) in FLOWJO_DIFFERS:
                assert res.count(name) != stored[name] and truth.sum() == res.count(name)
            else:
                assert res.count(name) == stored[name], f"{wsp.name}: {name}"


@pytest.mark.parametrize("wsp,name,exact", [("simple_poly_and_rect_v2_poly50.wsp", "poly1", 50),
                                             ("single_ellipse_51_events.wsp", "ellipse1", 51)])
def test_flowjo_polygon_counts_follow_the_documented_binning_rule(wsp, name, exact):
    """docs/flowjo.md: FlowJo rounds events and vertices to 256 display channels; exact geometry is ours."""
    from matplotlib.path import Path as MplPath

    from immuneprofile.engine.transforms import make_transform

    wsp = FLOWJO / "simple_line_example" / wsp
    tmpl = read_flowjo(wsp)
    data = _load(FLOWJO / "simple_line_example" / "data_set_simple_line_100.fcs")
    poly = tmpl[name].gate
    ev = data.sample.get_events(source="raw")
    pts = np.column_stack([make_transform(d.transform).apply(ev[:, [i]]).ravel() for i, d in enumerate(poly.dims)])
    verts = np.asarray(poly.vertices)
    assert MplPath(verts).contains_points(pts).sum() == exact == gate_sample(data, tmpl).count(name)
    binned = MplPath(np.round(verts * 256)).contains_points(np.round(pts * 256)).sum()
    assert binned == flowjo_counts(wsp, tmpl).set_index("population").loc[name, "flowjo_count"]


def test_markers_come_from_pns_and_biex_is_imported():
    tmpl = read_flowjo(FLOWJO / "simple_diamond_example" / "test_data_diamond_biex_rect.wsp")
    (dim_a, dim_b) = tmpl["upper_right"].gate.dims
    assert dim_a.transform["type"] == "biex" and dim_a.transform["width"] == -10.0
    assert tmpl.markers == ["channel_A", "channel_B"]  # $PnS empty in this file: the $PnN names


BIEX = {"type": "biex", "neg": 0.0, "width": -10.0, "pos": 4.418539922, "max": 262144.0}
FJLOG = {"type": "flowjo_log", "offset": 1.0, "decades": 5.5}


@pytest.mark.parametrize("spec,cut", [(BIEX, c) for c in (0.0, 1e-9, 0.5, 900.0, 1816.821072, 4095.999, 4096.0, 5e3)]
                         + [(FJLOG, c) for c in (-1.0, 0.0, 1e-12, 0.5, 0.9, 1.0)])
def test_flowjo_transform_bounds_match_flowkit(spec, cut):
    """The engine maps cuts on FlowJo's biex and log back to the raw scale (or not, where FlowKit clamps them
    flat): the same events as FlowKit's transform objects give."""
    from flowkit import transforms as fkt

    from immuneprofile import parse_template

    data = _load(FLOWJO / "simple_diamond_example" / "test_data_diamond_01.fcs")
    tmpl = parse_template({"populations": [
        {"name": "hi", "gate": {"type": "range", "marker": {"marker": "channel_A", "transform": spec}, "min": cut}},
        {"name": "lo", "gate": {"type": "range", "marker": {"marker": "channel_B", "transform": spec}, "max": cut}}]})
    res = gate_sample(data, tmpl)
    if spec["type"] == "biex":
        xf = fkt.WSPBiexTransform(negative=0, width=-10, positive=4.418539922, max_value=262144.0)
    else:
        xf = fkt.WSPLogTransform(offset=1.0, decades=5.5)
    raw = data.sample.get_events(source="raw")
    np.testing.assert_array_equal(res.mask("hi"), xf.apply(raw[:, 0]) >= cut)
    np.testing.assert_array_equal(res.mask("lo"), xf.apply(raw[:, 1]) < cut)


@pytest.mark.parametrize("template,panel", SHIPPED)
def test_exported_workspace_loads_in_flowkit_with_identical_membership(tmp_path, template, panel):
    tmpl = load_template(template)
    files = sorted(EXAMPLE.glob(f"P1_W0*_{panel}.fcs"))[:2]
    results = [gate_sample(_load(f), tmpl) for f in files]
    out = tmp_path / "out.wsp"
    write_flowjo(tmpl, results, out)
    ws = _flowkit_workspace(out, files)
    back = read_flowjo(out)
    for res in results:
        sample = res.path.rsplit("/", 1)[-1]
        for name in tmpl.names:
            gid, path = back.gate_ids[name]
            np.testing.assert_array_equal(ws.get_gate_membership(sample, gid, path), res.mask(name),
                                          err_msg=f"{sample}: {name}")
    stored = back.flowjo_counts  # our counts, as FlowJo will show them
    ours = {(r.path.rsplit("/", 1)[-1], n): r.count(n) for r in results for n in tmpl.names}
    assert {(s, p): c for s, p, c in stored.itertuples(index=False)} == ours


@pytest.mark.parametrize("template,panel", SHIPPED)
def test_yaml_wsp_yaml_round_trip_keeps_every_population(tmp_path, template, panel):
    tmpl = load_template(template)
    data = _load(sorted(EXAMPLE.glob(f"P1_W0*_{panel}.fcs"))[0])
    res = gate_sample(data, tmpl)
    write_flowjo(tmpl, [res], tmp_path / "t.wsp")
    write_template(read_flowjo(tmp_path / "t.wsp"), tmp_path / "t.yaml")
    again = gate_sample(data, load_template(tmp_path / "t.yaml"))
    for name in tmpl.names:
        np.testing.assert_array_equal(again.mask(name), res.mask(name), err_msg=name)
    # and the shipped YAML itself survives write_template unchanged in meaning
    write_template(tmpl, tmp_path / "same.yaml")
    same = load_template(tmp_path / "same.yaml")
    assert same.names == tmpl.names and same.thresholds == tmpl.thresholds and same.readouts == tmpl.readouts
    for name in tmpl.names:
        np.testing.assert_array_equal(gate_sample(data, same).mask(name), res.mask(name), err_msg=name)


@pytest.mark.parametrize("wsp", WORKSPACES, ids=lambda p: p.name)
def test_imported_workspace_survives_yaml(tmp_path, wsp):
    tmpl = read_flowjo(wsp)
    write_template(tmpl, tmp_path / "t.yaml")
    data = _load(next(wsp.parent.glob("*.fcs")))
    a, b = gate_sample(data, tmpl), gate_sample(data, load_template(tmp_path / "t.yaml"))
    for name in tmpl.names:
        np.testing.assert_array_equal(a.mask(name), b.mask(name), err_msg=name)


def test_one_file_several_templates_gives_a_sample_and_group_per_template(tmp_path):
    from dataclasses import replace

    treg = load_template("treg")
    other = replace(treg, name="treg_again")
    data = _load(EXAMPLE / "P1_W00_treg.fcs")
    res = gate_sample(data, [treg, other])
    write_flowjo([treg, other], res, tmp_path / "two.wsp")
    back = read_flowjo(tmp_path / "two.wsp", group="treg_again")
    assert back.description.endswith("gates of sample 'P1_W00_treg.fcs [treg_again]'")
    again = gate_sample(data, back)
    for name in treg.names:
        np.testing.assert_array_equal(again.mask(name), res[1].mask(name), err_msg=name)
    with pytest.raises(FlowJoError, match="holds no loaded data and the file cannot be reloaded"):
        write_flowjo(treg, [replace(res[0], data=None, path=str(tmp_path / "moved.fcs"))], tmp_path / "x.wsp")


def test_cli_flowjo_export_from_parallel_workers(tmp_path):
    """With -j 2 the results come back without data and with copies of the template: the export still works."""
    files = sorted(EXAMPLE.glob("P1_W0*_treg.fcs"))[:2]
    r = CliRunner().invoke(main, ["gate", "-t", "treg", *map(str, files), "-j", "2", "-o", str(tmp_path / "o"),
                                  "--flowjo", str(tmp_path / "par.wsp")])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(tmp_path / "o" / "populations.csv")
    ws = _flowkit_workspace(tmp_path / "par.wsp", files)
    back = read_flowjo(tmp_path / "par.wsp")
    for f in files:
        rows = table[table["sample_id"] == f.stem].set_index("population")["count"]
        for name, (gid, path) in back.gate_ids.items():
            assert ws.get_gate_membership(f.name, gid, path).sum() == rows[name], f"{f.name}: {name}"


def test_add_flowjo_counts():
    table = pd.DataFrame({"sample_id": ["s1", "s1", "s2"], "population": ["A", "B", "A"], "count": [5, 6, 7]})
    counts = pd.DataFrame({"sample": ["s1.fcs", "s2.fcs"], "population": ["A", "A"], "flowjo_count": [5, 8]})
    out = add_flowjo_counts(table, counts)
    assert list(out.columns) == ["sample_id", "population", "count", "flowjo_count"]
    assert out["flowjo_count"].tolist()[0::2] == [5, 8] and pd.isna(out["flowjo_count"][1])


def test_cli_applies_a_workspace_to_new_files_of_the_panel(tmp_path):
    """A workspace made on one file gates other files of the panel exactly as FlowKit gates them with it."""
    import flowkit as fk

    tmpl = load_template("treg")
    first, *new = sorted(EXAMPLE.glob("P1_W0*_treg.fcs"))[:3]
    write_flowjo(tmpl, [gate_sample(_load(first), tmpl)], tmp_path / "study.wsp")
    r = CliRunner().invoke(main, ["gate", "--workspace", str(tmp_path / "study.wsp"), *map(str, new),
                                  "-o", str(tmp_path / "out"), "--no-anndata", "--flowjo", str(tmp_path / "new.wsp")])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(tmp_path / "out" / "populations.csv")
    assert "flowjo_count" in table.columns and table["flowjo_count"].isna().all()  # new files: FlowJo never saw them
    gs = _flowkit_workspace(tmp_path / "study.wsp", [first]).get_gating_strategy(first.name)
    back = read_flowjo(tmp_path / "study.wsp")
    for f in new:
        fk_res = gs.gate_sample(fk.Sample(str(f)))
        rows = table[table["sample_id"] == f.stem].set_index("population")["count"]
        for name, (gid, path) in back.gate_ids.items():
            assert rows[name] == fk_res.get_gate_membership(gid, path).sum(), f"{f.name}: {name}"
    assert set(read_flowjo(tmp_path / "new.wsp").flowjo_counts["sample"]) == {f.name for f in new}


def test_cli_gate_workspace_reports_flowjo_counts_and_convert(tmp_path):
    wsp = FLOWJO / "simple_diamond_example" / "simple_diamond_example_quad_gate.wsp"
    fcs = FLOWJO / "simple_diamond_example" / "test_data_diamond_01.fcs"
    r = CliRunner().invoke(main, ["gate", "--workspace", str(wsp), str(fcs), "-o", str(tmp_path / "o"), "--no-anndata"])
    assert r.exit_code == 0, r.output
    table = pd.read_csv(tmp_path / "o" / "populations.csv")
    assert len(table) == 4 and (table["count"] == table["flowjo_count"]).all()
    r = CliRunner().invoke(main, ["convert", str(FLOWJO / "simple_line_example" / "simple_poly_and_rect.wsp"),
                                  "-o", str(tmp_path / "gating")])
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "gating").glob("*.yaml")) == [
        "simple_poly_and_rect.yaml", "simple_poly_and_rect_my_group.yaml"]


def test_errors_name_the_file_and_the_problem(tmp_path):
    wsp = FLOWJO / "simple_diamond_example" / "test_data_diamond_biex_rect.wsp"
    with pytest.raises(FlowJoError, match="no sample group 'T cells'.*All Samples"):
        read_flowjo(wsp, group="T cells")
    with pytest.raises(FlowJoError, match="sample 'other.fcs' is not in group"):
        read_flowjo(wsp, sample="other.fcs")
    with pytest.raises(FlowJoError, match="no such file"):
        read_flowjo(tmp_path / "missing.wsp")
    bad = tmp_path / "bad.wsp"
    bad.write_text("<Workspace><Groups/></Workspace>")
    with pytest.raises(FlowJoError, match="bad.wsp: not a readable FlowJo 10 workspace"):
        read_flowjo(bad)
    from immuneprofile import parse_template

    ell = parse_template({"transforms": {"default": "none"}, "populations": [{"name": "e", "gate": {
        "type": "ellipse", "x": "channel_A", "y": "channel_B", "center": [1e5, 1e5],
        "covariance": [[1e8, 0], [0, 1e8]]}}]})
    res = gate_sample(_load(FLOWJO / "simple_line_example" / "data_set_simple_line_100.fcs"), ell)
    with pytest.raises(FlowJoError, match="population 'e': EllipseGate gates cannot be written to FlowJo"):
        write_flowjo(ell, [res], tmp_path / "e.wsp")
