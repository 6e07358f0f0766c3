"""Data-driven logicle widths and 2-D gates (engine/fit2d): fitted values, truth recovery, FlowKit identity."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from conftest import flowkit_sample
import immuneprofile.exceptions as ip_errors
from immuneprofile import TemplateError, gate_files, gate_sample, load_fcs, parse_template, thresholds_table
from immuneprofile.engine.fit2d import estimate_logicle_width, fit_singlet
from immuneprofile.interop.flowkit import flowkit_gate_path, to_gating_strategy
from immuneprofile.study.instrument import other_instrument, write_recorded
from immuneprofile.study.simulate import simulate_sample

DOC = {
    "name": "adaptive",
    "transforms": {"default": {"type": "logicle", "W": "auto"}, "scatter": "none"},
    "thresholds": {"CD3": {"pos": 0.5}, "CD4": {"pos": {"method": "valley", "fallback": 0.5}}},
    "populations": [
        {"name": "lymphocytes", "gate": {"type": "cluster", "x": "FSC-A", "y": "SSC-A", "target": [0.4, 0.3],
                                         "components": 5, "q": 0.99}},
        {"name": "singlets", "parent": "lymphocytes", "gate": {"type": "singlet", "k": 4}},
        {"name": "CD3+", "parent": "singlets", "gate": {"type": "threshold", "markers": {"CD3": "+"}}},
        {"name": "CD4+", "parent": "CD3+", "gate": {"type": "threshold", "markers": {"CD4": "+"}}},
        {"name": "CD3 CD4 poly", "parent": "CD3+", "gate": {"type": "polygon", "x": "CD3", "y": "CD4",
                                                              "vertices": [[0.4, 0.4], [1, 0.4], [1, 1], [0.4, 1]]}},
    ],
}


@pytest.fixture(scope="module")
def sim():
    return simulate_sample("treg", 20000, rng=11)


@pytest.fixture(scope="module")
def files(sim, tmp_path_factory):
    d = tmp_path_factory.mktemp("fit2d")
    ref = write_recorded(d / "ref.fcs", sim)
    other = write_recorded(d / "other.fcs", other_instrument(sim, rng=3))
    return ref, other


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_fcs(path)


def test_logicle_width_from_negative_spread():
    # N(0, sd) values: the 5 % quantile of the negatives is -1.96 sd (half-normal), so
    # estimateLogicle's W = (M - log10(T / (1.96 sd))) / 2
    rng = np.random.default_rng(0)
    for sd in (50.0, 200.0, 1500.0):
        v = np.concatenate([rng.normal(0, sd, 200_000), rng.lognormal(9, 1, 50_000)])
        w, n_neg = estimate_logicle_width(v, 262144, 4.5)
        assert w == pytest.approx((4.5 - np.log10(262144 / (1.96 * sd))) / 2, abs=0.01)
        assert 95_000 < n_neg < 105_000
    assert estimate_logicle_width(np.array([1.0, 5.0]), 262144, 4.5) == (0.0, 0)  # no negatives: W = 0
    assert estimate_logicle_width(np.array([-1e9]), 262144, 4.5)[0] == 2.25  # clamped to M / 2


def test_wider_negatives_give_wider_logicle(files):
    """On another instrument's file (negatives twice as wide) the fitted W grows; each is recorded."""
    ws = []
    for path in files:
        res = gate_sample(_load(path), parse_template(DOC))
        th = thresholds_table([res])
        row = th[(th.method == "logicle-auto") & (th.marker == "CD3")].iloc[0]
        assert json.loads(row.note.split("; ")[0])["W"] == row.value
        ws.append(row.value)
    assert ws[1] > ws[0] + 0.1


def test_fitted_template_gates_as_flowkit(files):
    """After fitting, the template is ordinary: FlowKit's GatingStrategy built from it gives the same events."""
    for path in files:
        data = _load(path)
        res = gate_sample(data, parse_template(DOC))
        fitted = {(f.marker, f.cut): f.value for f in res.thresholds}
        gs = to_gating_strategy(res.template, data, fitted)
        fk_res = gs.gate_sample(flowkit_sample(path))
        for pop in res.template.populations:
            want = fk_res.get_gate_membership(pop.name, gate_path=flowkit_gate_path(res.template, pop.name))
            assert np.array_equal(want, res.mask(pop.name)), pop.name
        assert res.count("CD3 CD4 poly") > 100


def test_gates_recover_truth_on_both_instruments(sim, files):
    """The cluster finds the lymphocytes and the singlet band drops the doublets, on either scale."""
    lab = sim.labels
    masks = []
    for path in files:
        res = gate_sample(_load(path), parse_template(DOC))
        lym, sgl = res.mask("lymphocytes"), res.mask("singlets")
        assert (lym & lab["live lymphocytes"]).sum() / lab["live lymphocytes"].sum() > 0.95
        assert (lym & ~lab["live lymphocytes"] & ~lab["dead"]).sum() / lym.sum() < 0.02
        masks.append(sgl)
    assert (masks[0] != masks[1]).mean() < 0.005  # the gains changed, the gated events did not


def test_singlet_band_removes_doublets(sim):
    """On all events: the band keeps the singlets and drops the doublets (simulator truth)."""
    ev = sim.unmixed
    x, y = ev[:, 0], ev[:, 1]
    cells = ~sim.labels["doublets"] & ~sim.labels["debris"]
    from immuneprofile.engine.gating import points_in_polygon

    inside = points_in_polygon(np.asarray(fit_singlet(x, y, 4.0)), x, y)
    assert inside[cells].mean() > 0.97
    assert inside[sim.labels["doublets"]].mean() < 0.05


def test_batch_scope_fits_once(files):
    doc = json.loads(json.dumps(DOC))
    doc["transforms"]["default"]["scope"] = "batch"
    doc["populations"][1]["gate"]["scope"] = "batch"
    batch = gate_files(list(files), parse_template(doc))
    assert not batch.errors
    th = batch.thresholds
    for name, cut in (("CD3", "W"), ("singlets", "singlet")):
        rows = th[(th.marker == name) & (th.cut == cut)]
        assert len(rows) == 2 and rows.note.nunique() == 1 and "pooled over 2" in rows.note.iloc[0]
    per_sample = th[(th.marker == "lymphocytes")]
    assert per_sample.note.nunique() == 2  # scope: sample, fitted per file


@pytest.mark.parametrize("gate, msg", [
    ({"type": "cluster", "x": "FSC-A", "y": "SSC-A"}, "target"),
    ({"type": "cluster", "x": "FSC-A", "y": "SSC-A", "target": [2, 0.5]}, "quantile"),
    ({"type": "singlet", "k": -1}, "half-width"),
    ({"type": "singlet", "bogus": 1}, "unknown key"),
    ({"type": "cluster", "x": "FSC-A", "y": "SSC-A", "target": [0.4, 0.3], "components": 0}, "components"),
])
def test_bad_fit_gates_are_rejected(gate, msg):
    with pytest.raises(TemplateError, match=msg):
        parse_template({"populations": [{"name": "p", "gate": gate}]})


def test_bad_auto_logicle_is_rejected():
    with pytest.raises(TemplateError, match="scope"):
        parse_template({"transforms": {"default": {"type": "logicle", "W": "auto", "scope": "everything"}},
                        "populations": [{"name": "p", "gate": {"type": "range", "marker": "CD3", "min": 0}}]})


def test_report_draws_the_fitted_gates(files):
    """The HTML report's gate plots show the fitted ellipse and band (the values in thresholds.csv)."""
    from immuneprofile.qc.report import gate_figure

    res = gate_sample(_load(files[1]), parse_template(DOC))
    th = thresholds_table([res]).set_index("marker")
    fig = gate_figure(res)
    gids = {x.get_gid(): x for a in fig.axes for x in a.patches if x.get_gid()}
    band = json.loads(th.loc["singlets", "note"].split("; ")[0])["vertices"]
    assert np.allclose(gids["gate:singlets"].get_xy()[:4], band)
    ell = json.loads(th.loc["lymphocytes", "note"].split("; ")[0])
    assert np.allclose(gids["gate:lymphocytes"].get_xy()[:16], ell["vertices"])


def test_cluster_polygon_lies_on_the_fitted_ellipse(files):
    """The cluster gate's vertices are on the recorded ellipse (Mahalanobis distance^2 = distance_square)."""
    res = gate_sample(_load(files[0]), parse_template(DOC))
    p = next(f for f in res.fits if f.kind == "cluster").params
    d = np.asarray(p["vertices"]) - p["center"]
    m2 = np.einsum("ij,jk,ik->i", d, np.linalg.inv(p["covariance"]), d)
    assert len(d) == 16 and np.allclose(m2, p["distance_square"], rtol=1e-6)
    assert p["distance_square"] == pytest.approx(9.2103, abs=1e-3)  # chi-square 99 % quantile, 2 dof


def test_too_few_events_to_fit_is_a_clear_error(files, tmp_path):
    """A data-driven gate with (almost) no parent events fails that file, naming it, the population and why."""
    doc = json.loads(json.dumps(DOC))
    doc["populations"][0] = {"name": "lymphocytes", "gate": {"type": "range", "marker": "FSC-A", "min": 1e12}}
    with pytest.raises(ip_errors.GatingError, match=r"ref\.fcs.*'singlets'.*only 0 events"):
        gate_sample(_load(files[0]), parse_template(doc))
    batch = gate_files(list(files), [parse_template(doc), parse_template(DOC)])
    assert set(batch.errors) == {str(files[0]), str(files[1])}  # every file fails the same way, reported


def test_cluster_ellipse_quantile_is_scipy_stats_chi2():
    """The ellipse's chi-square quantile, computed without importing scipy.stats, is scipy.stats' number."""
    from scipy.stats import chi2

    from immuneprofile.engine.fit2d import chi2_ppf_2df

    qs = np.concatenate([np.linspace(1e-6, 1 - 1e-6, 20_001), [0.5, 0.9, 0.95, 0.99, 0.999]])
    ours = np.array([chi2_ppf_2df(q) for q in qs])
    assert np.array_equal(ours, chi2.ppf(qs, 2))  # bit for bit
    assert not np.array_equal(ours, -2 * np.log1p(-qs))  # (the closed form differs in the last bits)


def test_a_fitted_gates_parent_is_gated_once_and_as_when_gated_alone(files, monkeypatch):
    """The singlet band is fitted on the lymphocytes: they are gated once per sample, for the fit and the result."""
    import immuneprofile.engine.gating as engine
    from immuneprofile.engine.gating import fitted_template

    data, tmpl = _load(files[0]), parse_template(DOC, "adaptive")
    gated: list[str] = []
    population = engine._Engine.population
    monkeypatch.setattr(engine._Engine, "population", lambda self, pop: gated.append(pop.name) or population(self, pop))
    res = gate_sample(data, tmpl)
    assert gated.count("lymphocytes") == 1 and gated.count("singlets") == 1
    monkeypatch.setattr(engine._Engine, "population", population)
    again = gate_sample(data, fitted_template(data, tmpl))  # the fitted template, gated on its own
    assert res.counts == again.counts
    assert all(np.array_equal(res.bits[k], again.bits[k]) for k in res.bits)
