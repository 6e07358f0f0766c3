"""The engine at a realistic size: several templates at once, threads, subsampled fits.

A simulated full-panel sample of 100,000 events (every marker of the three
case-series templates in one tube) is large enough that the data-driven
thresholds are fitted on a subsample (populations above
``MAX_FIT_EVENTS``). Truths: FlowKit's own gating of the same definitions,
and the simulator's known frequencies.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from conftest import GATING, flowkit_sample
from immuneprofile import gate_sample, load_fcs, load_template, population_table
from immuneprofile.engine.thresholds import MAX_FIT_EVENTS
from immuneprofile.interop.flowkit import flowkit_gate_path, to_gating_strategy
from immuneprofile.study import simulate

NAMES = ("tcell_skin_homing", "treg", "monocytes")


@pytest.fixture(scope="module")
def big(tmp_path_factory):
    sim = simulate.simulate_sample("full", 100_000, rng=11)
    path = simulate.write_fcs(tmp_path_factory.mktemp("big") / "full.fcs", sim)
    templates = [load_template(GATING / f"{n}.yaml") for n in NAMES]
    data = load_fcs(path)
    return path, sim, templates, data, gate_sample(data, templates)


def test_fits_are_subsampled_here(big):
    _, _, _, _, results = big
    fitted = [f for r in results for f in r.thresholds if f.method not in ("fixed", "batch")]
    assert {(f.marker, f.cut) for f in fitted} >= {("CD25", "hi"), ("CD127", "hi"), ("FoxP3", "pos")}
    assert any(f.n_events > MAX_FIT_EVENTS for f in fitted)  # the subsample path is exercised
    assert not any(f.fallback for f in fitted)


def test_gated_together_equals_flowkit(big):
    path, _, templates, data, results = big
    sample = flowkit_sample(path)
    for t, res in zip(templates, results):
        fitted = {(f.marker, f.cut): f.value for f in res.thresholds}
        fk_res = to_gating_strategy(t, data, fitted).gate_sample(sample)
        for pop in t.populations:
            want = fk_res.get_gate_membership(pop.name, gate_path=flowkit_gate_path(t, pop.name))
            assert np.array_equal(want, res.mask(pop.name)), (t.name, pop.name)
            assert res.count(pop.name) == int(want.sum())


def test_gated_together_equals_gated_one_by_one_and_shares_populations(big):
    _, _, templates, data, together = big
    alone = [gate_sample(data, t, threads=1) for t in templates]
    for a, b in zip(together, alone):
        assert a.counts == b.counts
        assert [(f.marker, f.cut, f.value) for f in a.thresholds] == [(f.marker, f.cut, f.value) for f in b.thresholds]
        for name in a.bits:
            assert np.array_equal(a.bits[name], b.bits[name]), name
    tcell, treg, mono = together
    for name in ("lymphocytes", "singlets", "live", "CD3+"):  # identical definitions: computed once
        assert tcell.bits[name] is treg.bits[name]
    assert tcell.bits["CD4+"] is not treg.bits["CD4+"]  # CD4+ CD8- in one, CD4+ in the other
    assert not np.array_equal(tcell.bits["singlets"], mono.bits["singlets"])  # other parent
    with pytest.raises(ValueError):
        tcell.bits["live"][0] = 0  # shared, so read-only


def test_subsampled_fits_recover_the_simulated_truth(big):
    _, sim, templates, _, results = big
    truth = pd.DataFrame(simulate.truth_table(sim, NAMES))
    gated = population_table(results).drop_duplicates("population")
    m = truth.merge(gated, on="population", suffixes=("", "_gated"))
    assert len(m) == len(truth)
    err = (m.pct_parent_gated - m.pct_parent).abs()
    assert err.max() < 2.0, m.loc[err.idxmax(), ["population", "pct_parent", "pct_parent_gated"]]


def test_result_views(big):
    _, _, templates, _, results = big
    res = results[1]
    assert list(res.masks) == list(res.indices) == [p.name for p in templates[1].populations]
    for name in res.masks:
        m = res.masks[name]
        assert m.dtype == bool and m.size == res.n_events
        np.testing.assert_array_equal(res.indices[name], np.flatnonzero(m))
        assert res.count(name) == int(m.sum())
    with pytest.raises(KeyError):
        res.masks["no such population"]


def test_gate_files_with_several_templates(big, tmp_path):
    from immuneprofile import gate_files

    path, _, templates, _, together = big
    bad = tmp_path / "broken.fcs"
    bad.write_bytes(b"FCS3.1   garbage")
    for jobs in (1, 2):
        batch = gate_files([path, bad, path], templates, jobs=jobs)
        assert list(batch.errors) == [str(bad)] and "broken.fcs" in batch.errors[str(bad)]
        assert len(batch.results) == 2 * len(templates)
        assert [r.template.name for r in batch.results] == [t.name for t in templates] * 2
        for res, want in zip(batch.results[:3], together):
            assert res.counts == want.counts
        assert set(batch.table.template) == set(NAMES)
        assert len(batch.table) == 2 * sum(len(t.populations) for t in templates)


def test_cli_gate_with_several_templates(big, tmp_path):
    import anndata
    from click.testing import CliRunner

    from immuneprofile.cli import main

    path, _, templates, _, together = big
    out = tmp_path / "out"
    args = ["gate", *(a for n in NAMES for a in ("-t", str(GATING / f"{n}.yaml"))), str(path), "-o", str(out)]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    tab = pd.read_csv(out / "populations.csv")
    assert list(tab.template.unique()) == list(NAMES)
    for res in together:
        got = tab[tab.template == res.template.name].set_index("population")["count"]
        assert got.to_dict() == res.counts
    for n in NAMES:
        assert anndata.read_h5ad(out / f"events_{n}.h5ad").n_obs == 100_000
