"""End to end on the example data: shipped templates vs FlowKit, tables, AnnData, CLI."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import EXAMPLE, GATING, flowkit_sample
from immuneprofile import gate_sample, load_fcs, load_template, population_table, to_anndata
from immuneprofile.cli import main
from immuneprofile.interop.flowkit import flowkit_gate_path, to_gating_strategy
from immuneprofile.study.run import DEFAULT_TEMPLATES

SHEET = pd.read_csv(EXAMPLE / "samples.csv")


def _template(panel):
    return load_template(DEFAULT_TEMPLATES[panel])


@pytest.mark.parametrize("file,panel", list(SHEET[["file", "panel"]].itertuples(index=False, name=None)))
def test_shipped_templates_match_flowkit_on_example_data(file, panel):
    t = _template(panel)
    path = EXAMPLE / file
    data = load_fcs(path)
    res = gate_sample(data, t)
    fitted = {(f.marker, f.cut): f.value for f in res.thresholds}
    fk_res = to_gating_strategy(t, data, fitted).gate_sample(flowkit_sample(path))
    for pop in t.populations:
        want = fk_res.get_gate_membership(pop.name, gate_path=flowkit_gate_path(t, pop.name))
        assert np.array_equal(want, res.mask(pop.name)), f"{file}: {pop.name} differs from FlowKit"
        # FlowKit's own statistics agree with our table's counts
    assert res.count(t.populations[-1].name) == int(
        fk_res.get_gate_membership(t.populations[-1].name, gate_path=flowkit_gate_path(t, t.populations[-1].name)).sum())


def test_population_table_is_consistent():
    path = EXAMPLE / "P2_W09_treg.fcs"
    data = load_fcs(path)
    t = _template("treg")
    res = gate_sample(data, t)
    tab = population_table([res]).set_index("population")
    assert list(tab.index) == t.names
    for pop in t.populations:
        row = tab.loc[pop.name]
        parent_n = data.n_events if pop.parent is None else res.count(pop.parent)
        assert row["count"] == res.count(pop.name)
        assert row["parent"] == (pop.parent or "root")
        assert row["pct_parent"] == pytest.approx(100 * row["count"] / parent_n)
        assert row["pct_total"] == pytest.approx(100 * row["count"] / data.n_events)
    # median fluorescence = median of the compensated channel over the population's events
    j = data.find_channel("FoxP3")
    treg = res.mask("Treg")
    assert tab.loc["Treg", "median_FoxP3"] == pytest.approx(np.median(data.events[treg, j]))
    assert tab.loc["Treg", "median_FoxP3"] > tab.loc["CD4+", "median_FoxP3"]


def test_anndata_export():
    from flowkit import transforms

    path = EXAMPLE / "P1_W04_monocyte.fcs"
    data = load_fcs(path)
    res = gate_sample(data, _template("monocyte"))
    ad = to_anndata(res)
    assert ad.n_obs == data.n_events and ad.n_vars == len(data.channels)
    assert list(ad.var["channel"]) == data.channels
    for name in res.indices:
        assert np.array_equal(ad.obs[name].to_numpy(), res.mask(name))
    j = data.find_channel("CD14")
    want = transforms.LogicleTransform(262144, 0.5, 4.5, 0).apply(data.events[:, [j]]).ravel()
    np.testing.assert_allclose(ad.X[:, j], want.astype(np.float32))
    k = data.find_channel("FSC-A")  # scatter stays linear
    np.testing.assert_allclose(ad.X[:, k], data.events[:, k].astype(np.float32))


def test_cli_gate_reports_bad_file_and_keeps_the_rest(tmp_path):
    files = [EXAMPLE / "P1_W00_treg.fcs", EXAMPLE / "P1_W01_treg.fcs"]
    bad = tmp_path / "broken.fcs"
    bad.write_bytes(files[0].read_bytes()[:2000])
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["gate", "-t", str(GATING / "treg.yaml"), *map(str, files), str(bad), "-o", str(out)])
    assert r.exit_code == 1, r.output
    assert "broken.fcs" in r.output and "corrupt or truncated" in r.output
    tab = pd.read_csv(out / "populations.csv")
    assert sorted(tab["sample_id"].unique()) == ["P1_W00_treg", "P1_W01_treg"]
    assert pd.read_parquet(out / "populations.parquet").shape == tab.shape
    errs = pd.read_csv(out / "errors.csv")
    assert list(errs["file"]) == [str(bad)]
    import anndata

    ad = anndata.read_h5ad(out / "events.h5ad")
    assert ad.n_obs == 2 * load_fcs(files[0]).n_events
    assert set(ad.obs["sample_id"].unique()) == {"P1_W00_treg", "P1_W01_treg"}


def test_cli_gate_bad_template(tmp_path):
    t = tmp_path / "typo.yaml"
    t.write_text("populations:\n  - {name: a, parent: nowhere, gate: {type: range, marker: CD3, min: 0.4}}\n")
    r = CliRunner().invoke(main, ["gate", "-t", str(t), str(EXAMPLE / "P1_W00_treg.fcs"), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2
    assert "typo.yaml" in r.output and "unknown parent 'nowhere'" in r.output


def test_cli_study_on_subset(tmp_path):
    sub = SHEET[SHEET["patient"].isin(["P1", "P2", "P3"]) & SHEET["panel"].eq("treg")].copy()
    for f in sub["file"]:
        shutil.copy(EXAMPLE / f, tmp_path / f)
    sub.to_csv(tmp_path / "samples.csv", index=False)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["study", str(tmp_path / "samples.csv"), "--clinical",
                                  str(EXAMPLE / "clinical.csv"), "-o", str(out), "--gating-dir", str(GATING)])
    assert r.exit_code == 0, r.output
    tab = pd.read_csv(out / "populations.csv")
    assert {"patient", "week", "panel"} <= set(tab.columns)
    assert tab["sample_id"].nunique() == len(sub)
    assoc = pd.read_csv(out / "associations.csv")
    treg = assoc[(assoc["population"] == "Treg") & (assoc["method"] == "rmcorr")]
    assert len(treg) == 1 and treg["coef"].iloc[0] < 0  # Tregs rise as PASI falls


def test_events_are_column_major_and_layout_does_not_change_membership():
    from dataclasses import replace

    data = load_fcs(EXAMPLE / "P3_W04_tcell.fcs")
    assert data.events.flags.f_contiguous  # every channel a contiguous block
    j = data.find_channel("CLA")
    assert np.shares_memory(data.column(j), data.events)  # the engine reads columns without copying
    t = _template("tcell")
    a = gate_sample(data, t)
    row_major = replace(data, events=np.ascontiguousarray(data.events), _columns={})
    b = gate_sample(row_major, t)  # row-major input: columns are copied out once
    assert all(np.array_equal(a.indices[n], b.indices[n]) for n in t.names)


@pytest.mark.parametrize("source", ["example", "reference", "custom matrix"])
def test_compensated_events_are_flowkits_bit_for_bit(source):
    """load_fcs compensates column-major without FlowUtils' copies: the values must still be FlowKit's."""
    from conftest import SHARED

    if source == "example":
        data = load_fcs(EXAMPLE / "P2_W04_monocyte.fcs")
    elif source == "reference":
        data = load_fcs(SHARED / "fcs" / "test_comp_example.fcs")
    else:  # a user-given matrix: the file's own, perturbed
        ref = load_fcs(EXAMPLE / "P2_W04_monocyte.fcs")
        data = load_fcs(EXAMPLE / "P2_W04_monocyte.fcs", compensation=ref.spill.matrix * 0.97 + np.eye(len(ref.spill.matrix)) * 0.03)
    assert data.spill is not None and data.events.flags.f_contiguous
    assert np.array_equal(data.events, data.spill.apply(data.sample), equal_nan=True)
