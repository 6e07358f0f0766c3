"""Declared readouts: template validation, the readout table, FlowJo's "Freq. of", absolute counts."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import EXAMPLE, GATING, flowkit_sample
from immuneprofile import TemplateError, gate_sample, load_fcs, load_template, parse_template, population_table
from immuneprofile.interop.flowkit import flowkit_gate_path, to_gating_strategy
from immuneprofile.stats import READOUT_COLUMNS, frequency_of, readout_table
from immuneprofile.study.run import run_study

SHEET = pd.read_csv(EXAMPLE / "samples.csv")

_TREE = {
    "populations": [
        {"name": "cells", "gate": {"type": "range", "marker": "FSC-A", "min": 1000}},
        {"name": "CD4+", "parent": "cells", "gate": {"type": "range", "marker": "CD4", "min": 0.5}},
        {"name": "CD8+", "parent": "cells", "gate": {"type": "range", "marker": "CD8", "min": 0.5}},
        {"name": "Treg", "parent": "CD4+", "gate": {"type": "range", "marker": "FoxP3", "min": 0.5}},
    ]
}


@pytest.mark.parametrize("readouts,absolute,problem", [
    ({"Treg": {"population": "Treg", "of": "CD8+"}}, None, "'CD8+' is not an ancestor of 'Treg'"),
    ({"Treg": {"population": "Treg", "of": "Treg"}}, None, "is not an ancestor"),
    ({"Treg": {"population": "Tregs", "of": "CD4+"}}, None, "population 'Tregs' is not in the template"),
    ({"Treg": {"population": "Treg"}}, None, "must be {population: ..., of: ...}"),
    (["Treg"], None, "'readouts' must map readout names"),
    ({}, {"population": "lymphocytes", "column": "lymphocytes_per_uL"}, "'absolute' must be"),
])
def test_bad_readouts_are_template_errors_naming_the_file(readouts, absolute, problem):
    doc = {**_TREE, "readouts": readouts, **({"absolute": absolute} if absolute else {})}
    with pytest.raises(TemplateError) as exc:
        parse_template(doc, "my_panel.yaml")
    assert "my_panel.yaml" in str(exc.value) and problem in str(exc.value)


def test_readouts_parse_and_shipped_templates_declare_the_papers_denominators():
    t = parse_template({**_TREE, "readouts": {"Treg": {"population": "Treg", "of": "CD4+"}},
                        "absolute": {"population": "cells", "column": "wbc_per_uL"}}, "x.yaml")
    assert (t.readouts["Treg"].population, t.readouts["Treg"].of) == ("Treg", "CD4+")
    assert (t.absolute.population, t.absolute.column) == ("cells", "wbc_per_uL")
    assert load_template(GATING / "treg.yaml").readouts["Treg"].of == "CD4+"
    mono = load_template(GATING / "monocytes.yaml")
    assert mono.readouts["non-classical"].of == "monocytes"
    assert "CD14- CD16-" in mono.path_of("CD14- CD16-") or mono["CD14- CD16-"].parent == "HLA-DR+"
    assert "monocytes" not in mono.path_of("CD14- CD16-"), "dendritic cells are outside the monocyte gate"
    tc = load_template(GATING / "tcell_skin_homing.yaml")
    assert tc.readouts["CD4+ CLA+CD103-"].of == "CD4+ memory"
    assert {"CD4+ naive", "CD4+ CM", "CD4+ EM", "CD4+ TEMRA", "CD8+ TEMRA"} <= set(tc.readouts)


def _flowkit_counts(path, template, names):
    data = load_fcs(path)
    res = gate_sample(data, template)
    fitted = {(f.marker, f.cut): f.value for f in res.thresholds}
    fk = to_gating_strategy(template, data, fitted).gate_sample(flowkit_sample(path))
    return res, {n: int(fk.get_gate_membership(n, gate_path=flowkit_gate_path(template, n)).sum()) for n in names}


def test_frequency_of_any_ancestor_matches_flowkit_counts():
    t = load_template(GATING / "treg.yaml")
    path = EXAMPLE / "P2_W04_treg.fcs"
    res, fk = _flowkit_counts(path, t, ["Treg", "CD4+", "live", "lymphocytes"])
    table = population_table([res])
    for anc in ("CD4+", "live", "lymphocytes"):
        f = frequency_of(table, "Treg", anc).iloc[0]
        assert (f["count"], f["of_count"]) == (fk["Treg"], fk[anc])
        assert f["pct"] == pytest.approx(100 * fk["Treg"] / fk[anc])
    with pytest.raises(TemplateError, match="not an ancestor"):
        frequency_of(table, "CD4+", "Treg")


def test_readout_table_from_results_and_from_table_with_absolute_counts():
    t = load_template(GATING / "monocytes.yaml")
    files = ["P1_W01_monocyte.fcs", "REF_W01_monocyte.fcs"]
    results, fk = [], {}
    for f in files:
        res, counts = _flowkit_counts(EXAMPLE / f, t, ["monocytes", "non-classical", "classical"])
        results.append(res)
        fk[res.sample_id] = counts
    a = readout_table(results, t, cell_counts=SHEET)
    b = readout_table(population_table(results), {"monocytes": t}, cell_counts=SHEET)
    pd.testing.assert_frame_equal(a, b)
    assert list(a.columns) == [*READOUT_COLUMNS, "per_uL"]
    assert set(a.readout) == {"classical", "non-classical"} and (a.of == "monocytes").all()
    for r in a.itertuples():
        assert (r.count, r.of_count) == (fk[r.sample_id][r.population], fk[r.sample_id]["monocytes"])
    p1 = a[(a.sample_id == "P1_W01_monocyte") & (a.readout == "non-classical")].iloc[0]
    mono_ul = float(SHEET.set_index("sample_id").loc["P1_W01_monocyte", "monocytes_per_uL"])
    assert p1.per_uL == pytest.approx(mono_ul * p1.pct / 100), "dual platform: % of monocytes x monocytes/µL"
    assert a[a.sample_id == "REF_W01_monocyte"].per_uL.isna().all(), "the reference aliquot has no blood count"
    assert "per_uL" not in readout_table(results, t).columns


@pytest.fixture(scope="module")
def tcell_study(tmp_path_factory):
    sheet = SHEET[(SHEET.panel == "tcell") & SHEET.week.isin([0, 4, 24])]
    d = tmp_path_factory.mktemp("tc")
    sheet.assign(file=[str(EXAMPLE / f) for f in sheet.file]).to_csv(d / "samples.csv", index=False)
    return d, run_study(d / "samples.csv", d / "out"), run_study(d / "samples.csv", d / "pooled", batch_by=None)


def test_study_fixes_cla_cd103_cuts_per_patient(tcell_study):
    d, per_patient, pooled = tcell_study
    th = pd.read_csv(d / "out" / "thresholds.csv").merge(SHEET[["sample_id", "patient"]], on="sample_id")
    cla = th[th.marker.isin(["CLA", "CD103"])]
    per = cla.groupby(["marker", "patient"]).value.nunique()
    assert (per == 1).all(), "one cut per patient, held across the visits"
    assert cla[cla.marker == "CLA"].groupby("patient").value.first().nunique() == 4, "P1-P3 and REF each fitted"
    assert (cla.fitted_on == "CD4+ memory").all() and cla.note.str.contains("pooled over 3 file").all()
    th_pooled = pd.read_csv(d / "pooled" / "thresholds.csv")
    assert th_pooled[th_pooled.marker == "CLA"].value.nunique() == 1


def test_study_writes_readouts_with_sheet_metadata(tcell_study):
    d, res, _ = tcell_study
    ro = pd.read_csv(d / "out" / "readouts.csv")
    assert list(ro.columns) == [*READOUT_COLUMNS, "per_uL", "patient", "week", "panel", "role"]
    assert len(ro) == 12 * 14 and set(ro.role) == {"patient", "reference"}
    table = res["table"].set_index(["sample_id", "population"])["count"]
    for r in ro.sample(20, random_state=0).itertuples():
        assert r.count == table[(r.sample_id, r.population)] and r.of_count == table[(r.sample_id, r.of)]
    pts = ro[ro.role == "patient"]
    cd4 = pts[pts.readout == "CD4+"].set_index("sample_id")
    lymph = SHEET.set_index("sample_id").lymphocytes_per_uL
    live = res["table"][res["table"].population == "live"].set_index("sample_id")["count"]
    expect = lymph[cd4.index] * cd4["count"] / live[cd4.index]
    np.testing.assert_allclose(cd4.per_uL, expect)
    assert (cd4.per_uL < lymph[cd4.index]).all()
