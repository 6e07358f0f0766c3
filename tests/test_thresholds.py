"""Data-driven thresholds: each rule against a known generator, fallbacks, and batch scope."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.stats import norm

from immuneprofile import gate_files, gate_sample, load_fcs, parse_template, thresholds_table
from immuneprofile.engine.thresholds import ThresholdError, ThresholdWarning, fit_threshold

# two populations of a marker: 70 % negative N(1.0, 0.25), 30 % positive N(3.0, 0.35)
W, MU, SD = (0.7, 0.3), (1.0, 3.0), (0.25, 0.35)


def _mixture(n, rng, w=W, mu=MU, sd=SD):
    k = rng.random(n) < w[1]
    return np.where(k, rng.normal(mu[1], sd[1], n), rng.normal(mu[0], sd[0], n))


def _truth(w=W, mu=MU, sd=SD):
    """Analytic valley (density minimum between the modes) and Bayes boundary (w1 f1 = w2 f2)."""
    x = np.linspace(mu[0], mu[1], 200_001)
    f0, f1 = w[0] * norm.pdf(x, mu[0], sd[0]), w[1] * norm.pdf(x, mu[1], sd[1])
    return float(x[np.argmin(f0 + f1)]), float(x[np.argmax(f1 >= f0)])


def test_truth_helper_is_sane():
    valley, boundary = _truth()
    assert 1.8 < boundary < valley < 2.5


def test_quantile_is_exact_even_beyond_the_subsample():
    v = np.random.default_rng(1).normal(size=60_000)
    v[:10] = np.nan  # non-finite values are ignored
    value, fell_back, _ = fit_threshold(v, {"method": "quantile", "q": 0.9})
    assert value == float(np.quantile(v[np.isfinite(v)], 0.9)) and not fell_back


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_valley_finds_the_density_minimum(seed):
    v = _mixture(20_000, np.random.default_rng(seed))
    value, fell_back, _ = fit_threshold(v, {"method": "valley"})
    assert not fell_back
    assert abs(value - _truth()[0]) < 0.08


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gmm_finds_the_bayes_boundary(seed):
    v = _mixture(20_000, np.random.default_rng(seed))
    value, fell_back, _ = fit_threshold(v, {"method": "gmm"})
    assert not fell_back
    assert abs(value - _truth()[1]) < 0.03


def test_gmm_boundary_moves_with_the_mixture_weights():
    w = (0.95, 0.05)  # rare positives (FoxP3+-like): the boundary shifts towards them
    v = _mixture(40_000, np.random.default_rng(3), w=w)
    # the positive peak is ~4 % of the negative one's height: below the default min_height (0.05) ...
    with pytest.raises(ThresholdError, match="no second peak"):
        fit_threshold(v, {"method": "gmm"})
    # ... so rare populations need a lower min_height
    value, _, _ = fit_threshold(v, {"method": "gmm", "min_height": 0.01})
    assert abs(value - _truth(w=w)[1]) < 0.05
    assert value > _truth()[1]


@pytest.mark.parametrize("fraction", [0.05, 0.2])
def test_tail_where_the_peak_falls_to_a_fraction(fraction):
    v = np.random.default_rng(4).normal(1.0, 0.25, 20_000)
    value, fell_back, _ = fit_threshold(v, {"method": "tail", "fraction": fraction})
    truth = 1.0 + 0.25 * np.sqrt(2 * np.log(1 / fraction))  # N(mu, sd) density = fraction x its peak
    assert not fell_back
    assert abs(value - truth) < 0.03


def test_tail_follows_the_dominant_peak_of_a_mixture():
    v = _mixture(20_000, np.random.default_rng(5))
    value, _, _ = fit_threshold(v, {"method": "tail", "fraction": 0.05})
    assert 1.4 < value < _truth()[0]  # above the negatives, below the valley


@pytest.mark.parametrize("method", ["valley", "gmm"])
def test_unimodal_falls_back_with_a_warning(method):
    v = np.random.default_rng(6).normal(1.0, 0.25, 10_000)
    with pytest.warns(ThresholdWarning, match="P9_W00.fcs: FoxP3.pos: .*fallback 2.5"):
        value, fell_back, note = fit_threshold(v, {"method": method, "fallback": 2.5}, label="P9_W00.fcs: FoxP3.pos")
    assert (value, fell_back) == (2.5, True) and "second peak" in note


@pytest.mark.parametrize("method", ["valley", "gmm"])
def test_unimodal_without_fallback_raises(method):
    v = np.random.default_rng(6).normal(1.0, 0.25, 10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # never silently
        with pytest.raises(ThresholdError, match="P9_W00.fcs: FoxP3.pos: .*no `fallback`"):
            fit_threshold(v, {"method": method}, label="P9_W00.fcs: FoxP3.pos")


def test_too_few_events_fall_back():
    with pytest.warns(ThresholdWarning, match="only 5 events"):
        assert fit_threshold(np.arange(5.0), {"method": "quantile", "fallback": 1})[:2] == (1.0, True)


# --------------------------------------------------------------------------- through the engine


def _write_fcs(path, n, rng, pos_frac=0.3, shift=0.0, foxp3_bimodal=True):
    """A sample: FSC-A, CD3 (60 % CD3+), FoxP3 (on CD3+ cells: ``pos_frac`` positive)."""
    import flowkit as fk

    fsc = rng.normal(50_000, 5_000, n)
    cd3_pos = rng.random(n) < 0.6
    cd3 = np.where(cd3_pos, rng.normal(3.0, 0.3, n), rng.normal(1.0, 0.3, n))
    w = (1 - pos_frac, pos_frac) if foxp3_bimodal else (1.0, 0.0)
    foxp3 = np.where(cd3_pos, _mixture(n, rng, w=w, mu=(1.0 + shift, 3.0 + shift)), rng.normal(1.0, 0.25, n))
    ev = np.column_stack([fsc, cd3, foxp3])
    fk.Sample(ev, sample_id=path.stem, channel_labels=["FSC-A", "CD3", "FoxP3"]).export(str(path), source="raw")
    return path


def _template(foxp3_rule, cd3=1.9):
    return parse_template({
        "name": "t", "transforms": {"default": "none", "scatter": "none"},
        "thresholds": {"CD3": {"pos": cd3}, "FoxP3": {"pos": foxp3_rule}},
        "populations": [
            {"name": "cells", "gate": {"type": "range", "marker": "FSC-A", "min": 30_000}},
            {"name": "CD3+", "parent": "cells", "gate": {"type": "threshold", "markers": {"CD3": "+"}}},
            {"name": "FoxP3+", "parent": "CD3+", "gate": {"type": "threshold", "markers": {"FoxP3": "+"}}},
            {"name": "FoxP3-", "parent": "CD3+", "gate": {"type": "threshold", "markers": {"FoxP3": "-"}}},
        ],
    })


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    d = tmp_path_factory.mktemp("thr")
    rng = np.random.default_rng(7)
    return [
        _write_fcs(d / "S1.fcs", 8_000, rng, pos_frac=0.3, shift=0.0),
        _write_fcs(d / "S2.fcs", 12_000, rng, pos_frac=0.15, shift=0.2),
        _write_fcs(d / "S3.fcs", 6_000, rng, pos_frac=0.4, shift=-0.1),
    ]


@pytest.fixture(scope="module")
def unimodal(tmp_path_factory):
    return _write_fcs(tmp_path_factory.mktemp("uni") / "U1.fcs", 5_000, np.random.default_rng(8), foxp3_bimodal=False)


def test_sample_scope_fits_on_the_parent_and_is_recorded(samples):
    data = load_fcs(samples[0])
    res = gate_sample(data, _template({"method": "gmm"}))
    fits = {(f.marker, f.cut): f for f in res.thresholds}
    cd3, fox = fits[("CD3", "pos")], fits[("FoxP3", "pos")]
    assert (cd3.method, cd3.value) == ("fixed", 1.9)
    assert fox.method == "gmm" and fox.fitted_on == "CD3+" and fox.n_events == res.count("CD3+")
    assert not fox.fallback
    expected = fit_threshold(data.column(data.find_channel("FoxP3"))[res.indices["CD3+"]], {"method": "gmm"})[0]
    assert fox.value == expected
    assert abs(fox.value - _truth()[1]) < 0.1
    assert res.count("FoxP3+") + res.count("FoxP3-") == res.count("CD3+")
    assert np.all(data.column(2)[res.indices["FoxP3+"]] >= fox.value)
    table = thresholds_table([res])
    row = table[(table.marker == "FoxP3")].iloc[0]
    assert (row.method, row.fitted_on, row.n_events, row.fallback) == ("gmm", "CD3+", res.count("CD3+"), False)


def test_on_names_the_population_to_fit_on(samples):
    data = load_fcs(samples[0])
    res = gate_sample(data, _template({"method": "quantile", "q": 0.5, "on": "cells"}))
    fox = next(f for f in res.thresholds if f.marker == "FoxP3")
    assert fox.fitted_on == "cells" and fox.n_events == res.count("cells")
    assert fox.value == float(np.quantile(data.column(2)[res.indices["cells"]], 0.5))


def test_unimodal_sample_falls_back_with_a_warning(unimodal):
    data = load_fcs(unimodal)
    with pytest.warns(ThresholdWarning, match=r"U1\.fcs: FoxP3\.pos"):
        res = gate_sample(data, _template({"method": "valley", "fallback": 2.0}))
    fox = next(f for f in res.thresholds if f.marker == "FoxP3")
    assert (fox.value, fox.fallback) == (2.0, True) and fox.note


def test_unimodal_sample_without_fallback_names_sample_and_threshold(unimodal, samples):
    with pytest.raises(ThresholdError, match=r"U1\.fcs: FoxP3\.pos: gmm threshold failed"):
        gate_sample(load_fcs(unimodal), _template({"method": "gmm"}))
    batch = gate_files([samples[0], unimodal], _template({"method": "gmm"}))  # reported, not fatal
    assert len(batch.results) == 1 and "FoxP3.pos" in batch.errors[str(unimodal)]


def _pooled(paths, template, on="CD3+"):
    vals = []
    for p in paths:
        d = load_fcs(p)
        r = gate_sample(d, template, thresholds={("FoxP3", "pos"): 0.0})
        vals.append(d.column(d.find_channel("FoxP3"))[r.indices[on]])
    return np.concatenate(vals)


@pytest.mark.parametrize("jobs", [1, 2])
def test_batch_scope_fits_once_on_the_pooled_batch(samples, jobs):
    rule = {"method": "gmm", "scope": "batch"}
    t = _template(rule)
    batch = gate_files(samples, t, jobs=jobs)
    assert not batch.errors and len(batch.results) == 3
    pooled = _pooled(samples, t)
    want = fit_threshold(pooled, rule)[0]
    for res in batch.results:
        fox = next(f for f in res.thresholds if f.marker == "FoxP3")
        assert fox.value == want and fox.method == "gmm" and fox.fitted_on == "CD3+"
        assert fox.n_events == pooled.size and "pooled over 3 file(s)" in fox.note
        d = load_fcs(res.path)
        assert np.array_equal(res.indices["FoxP3+"], gate_sample(d, t, thresholds={("FoxP3", "pos"): want}).indices["FoxP3+"])
    rows = batch.thresholds[batch.thresholds.marker == "FoxP3"]
    assert rows.value.nunique() == 1 and len(rows) == 3
    # per-sample fits differ from sample to sample
    per_sample = gate_files(samples, _template({"method": "gmm"}))
    assert per_sample.thresholds[per_sample.thresholds.marker == "FoxP3"].value.nunique() == 3


def test_batch_scope_chained_thresholds(samples):
    """A batch threshold fitted on a population gated with another batch threshold: two rounds."""
    t = parse_template({
        "name": "chain", "transforms": {"default": "none", "scatter": "none"},
        "thresholds": {"CD3": {"pos": {"method": "valley", "scope": "batch"}},
                       "FoxP3": {"pos": {"method": "quantile", "q": 0.8, "scope": "batch"}}},
        "populations": [
            {"name": "CD3+", "gate": {"type": "threshold", "markers": {"CD3": "+"}}},
            {"name": "FoxP3+", "parent": "CD3+", "gate": {"type": "threshold", "markers": {"FoxP3": "+"}}},
        ],
    })
    batch = gate_files(samples, t)
    assert not batch.errors
    cd3_all = np.concatenate([load_fcs(p).column(1) for p in samples])
    cd3 = fit_threshold(cd3_all, {"method": "valley"})[0]
    fox_on = np.concatenate([load_fcs(p).column(2)[load_fcs(p).column(1) >= cd3] for p in samples])
    fox = float(np.quantile(fox_on, 0.8))
    for res in batch.results:
        got = {f.marker: f.value for f in res.thresholds}
        assert got["CD3"] == cd3 and got["FoxP3"] == fox


def test_batch_threshold_on_a_data_driven_logicle_reads_each_files_fitted_width(tmp_path):
    """A `scope: batch` cut on a `W: auto` logicle pools each file's values in its own fitted logicle (FlowKit's)."""
    import flowkit as fk

    from immuneprofile.study import simulate

    files = [simulate.write_fcs(tmp_path / f"s{i}.fcs", simulate.simulate_sample("treg", 20000, rng=100 + i))
             for i in range(3)]
    rule = {"method": "quantile", "q": 0.5, "scope": "batch"}
    t = parse_template({
        "name": "auto", "transforms": {"default": {"type": "logicle", "W": "auto"}, "scatter": "none"},
        "thresholds": {"CD3": {"pos": 0.5}, "CD4": {"pos": rule}},
        "populations": [
            {"name": "CD3+", "gate": {"type": "threshold", "markers": {"CD3": "+"}}},
            {"name": "CD4+", "parent": "CD3+", "gate": {"type": "threshold", "markers": {"CD4": "+"}}},
        ],
    })
    batch = gate_files(files, t)
    assert not batch.errors
    pooled = []
    for res in batch.results:
        w = next(f.params["W"] for f in res.fits if f.kind == "logicle" and f.name == "CD4")
        d = load_fcs(res.path)
        raw = d.column(d.find_channel("CD4"))[res.indices["CD3+"]]
        pooled.append(fk.transforms.LogicleTransform(262144, w, 4.5, 0).apply(raw))
    want = fit_threshold(np.concatenate(pooled), rule)[0]
    for res in batch.results:
        cd4 = next(f for f in res.thresholds if f.marker == "CD4" and f.method == "quantile")
        assert cd4.value == want and "pooled over 3 file(s)" in cd4.note


def test_batch_scope_failure_is_reported_for_every_file(unimodal, tmp_path):
    other = _write_fcs(tmp_path / "U2.fcs", 4_000, np.random.default_rng(9), foxp3_bimodal=False)
    batch = gate_files([unimodal, other], _template({"method": "gmm", "scope": "batch"}))
    assert not batch.results and set(batch.errors) == {str(unimodal), str(other)}
    assert all("batch of 2 file(s): FoxP3.pos" in e for e in batch.errors.values())
    broken = tmp_path / "broken.fcs"
    broken.write_bytes(b"FCS3.0    not a real header")
    batch = gate_files([unimodal, broken, other], _template({"method": "gmm", "scope": "batch"}))
    assert "batch of 2 file(s)" in batch.errors[str(other)]
    assert "batch of" not in batch.errors[str(broken)] and "broken.fcs" in batch.errors[str(broken)]  # its own
    with pytest.warns(ThresholdWarning, match="batch of 2 file"):
        ok = gate_files([unimodal, other], _template({"method": "gmm", "scope": "batch", "fallback": 2.2}))
    assert len(ok.results) == 2
    assert all(next(f for f in r.thresholds if f.marker == "FoxP3").fallback for r in ok.results)


def test_batch_rule_in_gate_sample_is_fitted_on_the_sample_and_says_so(samples):
    res = gate_sample(load_fcs(samples[0]), _template({"method": "gmm", "scope": "batch"}))
    fox = next(f for f in res.thresholds if f.marker == "FoxP3")
    assert "fitted on this sample alone" in fox.note


def test_valley_ignores_lumps_of_a_broad_negative_population():
    """Two tall lumps in the negative population must not be taken for the two peaks."""
    rng = np.random.default_rng(7)
    neg = np.concatenate([rng.normal(0.12, 0.06, 4000), rng.normal(0.28, 0.06, 4000)])
    pos = rng.normal(0.75, 0.04, 300)  # rare, well separated positives
    value, fell_back, _ = fit_threshold(np.concatenate([neg, pos]), {"method": "valley", "min_height": 0.01})
    assert not fell_back and 0.45 < value < 0.65
    # without the depth criterion (min_depth 0) the two lumps win and the cut lands between them
    lumpy, _, _ = fit_threshold(np.concatenate([neg, pos]), {"method": "valley", "min_height": 0.01, "min_depth": 0.0})
    assert lumpy < 0.35


def test_tail_on_the_lower_side():
    rng = np.random.default_rng(3)
    v = np.concatenate([rng.normal(0.67, 0.03, 5000), rng.normal(0.15, 0.05, 150)])  # CD127lo below CD127+
    value, fell_back, _ = fit_threshold(v, {"method": "tail", "side": "lower", "fraction": 0.02})
    assert not fell_back and 0.3 < value < 0.62
    assert (v < value).sum() == pytest.approx(150, abs=5)


def test_yaml_on_key_and_unknown_rule_options(tmp_path):
    from immuneprofile import TemplateError, load_template

    p = tmp_path / "t.yaml"
    p.write_text("thresholds:\n  CD4: {pos: {method: valley, on: top, fallback: 0.5}}\n"
                 "populations:\n  - {name: top, gate: {type: range, marker: CD3, min: 0.3}}\n"
                 "  - {name: cd4, parent: top, gate: {type: threshold, markers: {CD4: '+'}}}\n")
    assert load_template(p).thresholds["CD4"]["pos"]["on"] == "top"  # YAML's `on` = true is mapped back
    p.write_text(p.read_text().replace("on: top", "on: tpo"))
    with pytest.raises(TemplateError, match=r"fitted `on` unknown population 'tpo' \(did you mean 'top'\?\)"):
        load_template(p)
    p.write_text(p.read_text().replace("on: tpo", "fracton: 0.1"))
    with pytest.raises(TemplateError, match=r"unknown option\(s\) \['fracton'\]"):
        load_template(p)


def test_case_series_templates_fit_their_thresholds_on_the_data():
    """CD25hi/CD127lo, FoxP3+, CLA+, CD103+ and CD16+ are data-driven and recorded for audit."""
    from conftest import EXAMPLE, GATING
    from immuneprofile import load_template

    expected = {"treg.yaml": {("CD25", "hi"), ("CD127", "hi"), ("FoxP3", "pos")},
                "tcell_skin_homing.yaml": {("CLA", "pos"), ("CD103", "pos")},
                "monocytes.yaml": {("CD16", "pos")}}
    files = {"treg.yaml": "P2_W24_treg.fcs", "tcell_skin_homing.yaml": "P2_W24_tcell.fcs",
             "monocytes.yaml": "P2_W24_monocyte.fcs"}
    for name, keys in expected.items():
        with warnings.catch_warnings():
            warnings.simplefilter("error", ThresholdWarning)  # must fit, not fall back
            res = gate_sample(load_fcs(EXAMPLE / files[name]), load_template(GATING / name))
        tab = thresholds_table([res]).set_index(["marker", "cut"])
        for key in keys:
            row = tab.loc[key]
            assert row["method"] != "fixed" and not row["fallback"] and row["n_events"] > 0, (name, key)


def test_peaks_and_prominences_are_scipy_signal_find_peaks():
    """The density rules' peak finder, without importing scipy.signal, gives scipy's peaks and prominences."""
    from scipy.signal import find_peaks as scipy_find_peaks

    from immuneprofile.engine.thresholds import _kde, find_peaks

    rng = np.random.default_rng(1)
    n_peaks = 0
    for trial in range(4000):
        m = int(rng.integers(1, 60))
        x = (rng.integers(0, 4, m).astype(float),  # flat tops, also at the ends
             rng.normal(size=m),
             np.repeat(rng.integers(0, 5, m), rng.integers(1, 4, m)).astype(float),
             _kde(np.concatenate([rng.normal(0.2, 0.05, int(rng.integers(20, 3000))),
                                  rng.normal(0.7, 0.05, int(rng.integers(0, 500)))]))[1])[trial % 4]
        height = float(rng.choice([0.0, -1.0, x.max() * rng.uniform(0, 1)]))
        peaks, prominences = find_peaks(x, height)
        expected, props = scipy_find_peaks(x, height=height, prominence=0.0)
        assert np.array_equal(peaks, expected), (x, height)
        assert np.array_equal(prominences, props["prominences"]), (x, height)  # bit for bit
        n_peaks += expected.size
    assert n_peaks > 10_000
