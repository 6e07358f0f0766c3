"""Tests of immuneprofile.simulate and of the committed example data."""

from __future__ import annotations

import csv
from pathlib import Path

import flowkit
import numpy as np
import pandas as pd
import pytest

from immuneprofile.study import simulate as sim
from immuneprofile.study.simulate import (
    MARKERS,
    PANELS,
    STUDY_SLOPES,
    TRUTH_POPULATIONS,
    format_spillover,
    parse_spillover,
    simulate_sample,
    simulate_study,
    spillover_matrix,
    truth_table,
    write_fcs,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "example_data"
GATING = ROOT / "gating"
TEMPLATES = {"tcell": ["tcell_skin_homing"], "treg": ["treg"], "monocyte": ["monocytes"],
             "full": ["tcell_skin_homing", "treg", "monocytes"]}


# ----------------------------------------------------------------------------- panels


def _assert_same_events(path: Path, sample) -> np.ndarray:
    """The file's raw events equal the simulated float32 events (FlowKit scales Time by $TIMESTEP)."""
    raw = flowkit.Sample(str(path)).get_events(source="raw")
    pnn = [c for c, _ in sample.channels]
    expected = sample.events.astype(np.float64)
    if "Time" in pnn:
        expected[:, pnn.index("Time")] *= 0.01
    np.testing.assert_allclose(raw, expected, rtol=1e-6, atol=0)
    keep = [i for i, c in enumerate(pnn) if c != "Time"]
    np.testing.assert_array_equal(raw[:, keep].astype(np.float32), sample.events[:, keep])
    return raw


def test_panels_layout():
    assert set(PANELS) == {"tcell", "treg", "monocyte", "full"}
    sizes = {p: len(c) for p, c in PANELS.items()}
    assert sizes == {"tcell": 11, "treg": 10, "monocyte": 11, "full": 18}
    for p, chans in PANELS.items():
        pnn = [c for c, _ in chans]
        assert pnn[:3] == ["FSC-A", "FSC-H", "SSC-A"]
        assert len(set(pnn)) == len(pnn)
        assert ("Time" in pnn) == (p != "full")
        for c, s in chans:
            if c in ("FSC-A", "FSC-H", "SSC-A", "Time"):
                assert s == ""
            else:
                assert s, f"{p}:{c} has no $PnS"
    full_fl = [c for c, _ in PANELS["full"] if not c.startswith(("FSC", "SSC"))]
    assert len(full_fl) == len(MARKERS) == 15
    # marker labels come in several styles
    labels = {s for chans in PANELS.values() for _, s in chans}
    assert {"L/D Aqua", "CD3", "CD4 BV605", "FoxP3 PE", "HLA-DR PerCP-Cy5.5", "CD45RA",
            "CLA FITC", "CD103 APC"} <= labels


def test_spillover_matrix_and_keyword_roundtrip():
    dets = [c for c, _ in PANELS["full"] if not c.startswith(("FSC", "SSC"))]
    s = spillover_matrix(dets)
    assert np.allclose(np.diag(s), 1)
    off = s[~np.eye(len(dets), dtype=bool)]
    assert off.min() >= 0 and 0.1 <= off.max() <= 0.2
    assert (off >= 0.1).sum() >= 2
    names, back = parse_spillover(format_spillover(dets, s))
    assert names == dets
    np.testing.assert_array_equal(back, s)
    with pytest.raises(ValueError):
        parse_spillover("2,A,B,1,0")


# ----------------------------------------------------------------------------- one sample


@pytest.fixture(scope="module")
def tcell_sample():
    return simulate_sample("tcell", 20_000, rng=11)


def test_sample_shapes_and_labels(tcell_sample):
    s = tcell_sample
    events, labels, unmixed = s[0], s[1], s[2]
    assert events.dtype == np.float32 and events.shape == (20_000, 11)
    assert unmixed.shape == events.shape
    assert all(v.shape == (20_000,) and v.dtype == bool for v in labels.values())
    kinds = ["debris", "doublets", "dead", "T cells", "B cells", "NK cells", "monocytes",
             "dendritic cells", "granulocytes"]
    total = sum(labels[k].astype(int) for k in kinds)
    assert (total == 1).all(), "every event is exactly one kind"
    # nesting of the true populations
    def within(a, b):
        return not (labels[a] & ~labels[b]).any()
    chain = ["CD4+ CLA+CD103-", "CD4+ memory", "CD4+", "CD3+", "live lymphocytes", "live cells"]
    assert all(within(a, b) for a, b in zip(chain, chain[1:]))
    assert within("Treg", "CD25hi CD127lo") and within("CD25hi CD127lo", "CD4+")
    assert within("non-classical", "HLA-DR+") and within("CD8+ memory", "CD8+")
    for t in ("CD4+", "CD8+"):
        quads = [labels[f"{t} {q}"] for q in ("CLA+CD103+", "CLA+CD103-", "CLA-CD103+", "CLA-CD103-")]
        assert (sum(q.astype(int) for q in quads) == labels[f"{t} memory"]).all()
        assert (labels[f"{t} CLA-"] == (quads[2] | quads[3])).all()
    assert not (labels["CD4+"] & labels["CD8+"]).any()
    # realistic composition
    n = 20_000
    assert 0.5 < labels["live lymphocytes"].sum() / n < 0.85
    assert 0.55 < labels["CD4+"].sum() / labels["CD3+"].sum() < 0.72


def test_negative_and_positive_intensities(tcell_sample):
    s = tcell_sample
    pnn = [c for c, _ in s.channels]
    cd3 = s.unmixed[:, pnn.index("BUV395-A")]
    neg = cd3[s.labels["B cells"]]
    pos = cd3[s.labels["CD3+"]]
    assert abs(np.median(neg)) < 60 and 60 < neg.std() < 250, "negatives ~ N(0, 100-200)"
    assert 1e3 < np.median(pos) < 1e5
    assert (neg < 0).mean() > 0.3, "compensated-like negatives go below zero"


def test_fcs_roundtrip_and_compensation(tmp_path, tcell_sample):
    s = tcell_sample
    path = write_fcs(tmp_path / "x.fcs", s, {"PATIENT": "P9", "$DATE": "01-JAN-2024"})
    smp = flowkit.Sample(str(path))
    assert smp.event_count == 20_000
    assert list(smp.pnn_labels) == [c for c, _ in s.channels]
    assert [x or "" for x in smp.pns_labels] == [m for _, m in s.channels]
    md = smp.metadata
    assert md["patient"] == "P9" and md["date"] == "01-JAN-2024" and md["fil"] == "x.fcs"
    raw = _assert_same_events(path, s)
    # the stored $SPILLOVER is the simulator's matrix
    names, spill = parse_spillover(md["spillover"])
    assert names == s.detectors
    np.testing.assert_array_equal(spill, s.spillover)
    fl = [i for i, (c, _) in enumerate(s.channels) if c in names]
    # spillover really was applied (FITC -> PE is not in this panel; BV605 -> BV786 is small,
    # but the raw and unmixed values must differ somewhere substantially)
    assert np.abs(raw[:, fl] - s.unmixed[:, fl]).max() > 500
    comp = flowkit.Sample(str(path), compensation=md["spillover"]).get_events(source="comp")
    scale = np.abs(raw[:, fl]).max()
    np.testing.assert_allclose(comp[:, fl], s.unmixed[:, fl], rtol=0, atol=scale * 1e-6)
    # without compensation the error would be far larger
    assert np.abs(raw[:, fl] - s.unmixed[:, fl]).max() > 1e4 * scale * 1e-6


def test_frequencies_and_shifts_control_subsets():
    base = simulate_sample("monocyte", 40_000, rng=3)
    up = simulate_sample("monocyte", 40_000, shifts={"non-classical": 0.15}, rng=3)
    fixed = simulate_sample("monocyte", 40_000, frequencies={"non-classical": 0.30}, rng=3)

    def frac(x):
        return x.labels["non-classical"].sum() / x.labels["monocytes"].sum()

    assert abs(frac(base) - 0.08) < 0.02
    assert abs(frac(up) - 0.23) < 0.025
    assert abs(frac(fixed) - 0.30) < 0.025
    with pytest.raises(KeyError):
        simulate_sample("tcell", 100, frequencies={"nonsense": 0.1}, rng=0)
    with pytest.raises(ValueError):
        simulate_sample("tcell", 100, shifts={"Treg": 0.5}, rng=0)
    with pytest.raises(ValueError):
        simulate_sample("bcell", 100, rng=0)


def test_truth_table_from_labels(tcell_sample):
    rows = {r["population"]: r for r in truth_table(tcell_sample)}
    assert set(rows) == {p for p, _, _ in TRUTH_POPULATIONS["tcell_skin_homing"]}
    lab = tcell_sample.labels
    r = rows["CD8+ CLA+CD103+"]
    assert r["parent"] == "CD8+ memory"
    assert r["pct_parent"] == pytest.approx(100 * lab["CD8+ CLA+CD103+"].sum() / lab["CD8+ memory"].sum())
    assert rows["CD3+"]["parent_count"] == lab["live lymphocytes"].sum()
    full = simulate_sample("full", 2000, rng=1)
    pops = [r["population"] for r in truth_table(full)]
    assert len(pops) == len(set(pops))
    assert {"Treg", "non-classical", "CD4+ CLA-"} <= set(pops)


# ----------------------------------------------------------------------------- study


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """A small study, capturing every simulated sample as it is written."""
    out = tmp_path_factory.mktemp("study")
    captured = {}
    orig = sim.write_fcs

    def spy(path, sample, metadata=None):
        captured[Path(path).stem] = sample
        return orig(path, sample, metadata)

    mp = pytest.MonkeyPatch()
    mp.setattr(sim, "write_fcs", spy)
    try:
        paths = simulate_study(out, n_events=1500, weeks=(0, 1, 4, 24), seed=7)
    finally:
        mp.undo()
    return out, paths, captured


def test_study_files_and_tables(study):
    out, paths, captured = study
    assert len(paths["fcs"]) == 3 * 4 * 3
    assert (out / "P2_W04_treg.fcs").exists() and (out / "P3_W24_monocyte.fcs").exists()
    samples = pd.read_csv(paths["samples"])
    assert list(samples.columns) == ["file", "sample_id", "patient", "week", "panel"]
    assert (samples.sample_id == samples.file.str.replace(".fcs", "", regex=False)).all()
    smp = flowkit.Sample(str(out / "P2_W04_treg.fcs"))
    md = smp.metadata
    assert (md["patient"], md["week"], md["panel"], md["fil"]) == ("P2", "4", "treg", "P2_W04_treg.fcs")
    assert "date" in md and "spillover" in md
    assert smp.event_count == 1500
    clin = pd.read_csv(paths["clinical"], keep_default_na=False)
    assert list(clin.columns) == ["patient", "week", "pasi", "treatment", "notes"]
    assert len(clin) == 3 * 4
    assert (clin.loc[clin.week.isin([0, 1]), "treatment"] == "UC-MSC infusion").all()
    assert (clin.treatment == "biologic restart").sum() == 1
    base = clin[clin.week == 0].set_index("patient").pasi
    assert base.between(15, 30).all()
    last = clin[clin.week == 24].set_index("patient").pasi
    assert (last / base <= 0.25).sum() >= 2, "two patients reach PASI75"
    assert (last / base > 0.25).sum() >= 1, "one partial responder"


def test_study_truth_matches_written_events(study):
    out, paths, captured = study
    truth = pd.read_csv(paths["truth"])
    assert list(truth.columns) == ["sample_id", "patient", "week", "panel", "population", "parent",
                                   "pct_parent"]
    assert set(truth.sample_id) == set(captured)
    for sid in ("P1_W00_tcell", "P3_W24_treg", "P2_W01_monocyte"):
        s = captured[sid]
        _assert_same_events(out / f"{sid}.fcs", s)
        rows = truth[truth.sample_id == sid]
        tpl = sim.PANEL_TEMPLATES[s.panel][0]
        expected = {p: (par, key) for p, par, key in TRUTH_POPULATIONS[tpl]}
        assert set(rows.population) == set(expected)
        for r in rows.itertuples():
            par, key = expected[r.population]
            assert r.parent == par
            want = 100 * s.labels[r.population].sum() / s.labels[key].sum()
            assert r.pct_parent == pytest.approx(want, abs=1e-4)


def test_study_is_deterministic(tmp_path):
    kw = dict(n_events=500, patients=("P1",), weeks=(0, 9), panels=("treg", "full"), seed=3)
    a = simulate_study(tmp_path / "a", **kw)
    b = simulate_study(tmp_path / "b", **kw)
    for sid, p in a["fcs"].items():
        assert p.read_bytes() == b["fcs"][sid].read_bytes()
    assert a["truth"].read_text() == b["truth"].read_text()
    c = simulate_study(tmp_path / "c", **{**kw, "seed": 4})
    assert a["truth"].read_text() != c["truth"].read_text()


def _within_patient_r(truth: pd.DataFrame, clinical: pd.DataFrame, population: str) -> float:
    m = truth[truth.population == population].merge(clinical, on=["patient", "week"])
    x = m.pasi - m.groupby("patient").pasi.transform("mean")
    y = m.pct_parent - m.groupby("patient").pct_parent.transform("mean")
    return float(np.corrcoef(x, y)[0, 1])


@pytest.mark.parametrize("where", ["study", "example"])
def test_subsets_rise_as_pasi_falls(where, study):
    d = study[0] if where == "study" else EXAMPLE
    if where == "example" and not (d / "truth.csv").exists():
        pytest.skip("example_data not generated")
    truth = pd.read_csv(d / "truth.csv")
    clinical = pd.read_csv(d / "clinical.csv")
    rs = {pop: _within_patient_r(truth, clinical, pop) for pop in STUDY_SLOPES}
    assert all(r < 0 for r in rs.values()), rs
    assert np.mean(list(rs.values())) < -0.5, rs
    assert rs["non-classical"] < -0.6 and rs["CD4+ CLA+CD103-"] < -0.6, rs
    # complements move the other way
    assert _within_patient_r(truth, clinical, "CD4+ CLA-") > 0.5


# ----------------------------------------------------------------------------- example data vs gating


def test_example_data_layout():
    if not (EXAMPLE / "samples.csv").exists():
        pytest.skip("example_data not generated")
    samples = pd.read_csv(EXAMPLE / "samples.csv")
    assert len(samples) == 54
    assert all((EXAMPLE / f).exists() for f in samples.file)
    size = sum(p.stat().st_size for p in EXAMPLE.iterdir())
    assert size < 8.5e6
    with open(EXAMPLE / "truth.csv") as fh:
        header = next(csv.reader(fh))
    assert header == ["sample_id", "patient", "week", "panel", "population", "parent", "pct_parent"]


def test_example_data_matches_truth():
    """Gating every example file with its template recovers truth.csv within 2 points."""
    import immuneprofile as ip

    assert (EXAMPLE / "samples.csv").exists(), "example_data/ is part of the repository"
    templates = {t: ip.load_template(GATING / f"{t}.yaml")
                 for t in ("tcell_skin_homing", "treg", "monocytes")}
    samples = pd.read_csv(EXAMPLE / "samples.csv")
    truth = pd.read_csv(EXAMPLE / "truth.csv")
    tables = []
    for s in samples.itertuples():
        fcs = ip.load_fcs(EXAMPLE / s.file)
        results = [ip.gate_sample(fcs, templates[t]) for t in TEMPLATES[s.panel]]
        tab = ip.population_table(results)
        tab["sample_id"] = s.sample_id
        tables.append(tab.drop_duplicates("population"))
    gated = pd.concat(tables)
    m = truth.merge(gated[["sample_id", "population", "parent", "pct_parent"]],
                    on=["sample_id", "population"], how="left", suffixes=("", "_gated"))
    assert m.pct_parent_gated.notna().all(), m[m.pct_parent_gated.isna()]
    assert (m.parent == m.parent_gated).all()
    err = (m.pct_parent_gated - m.pct_parent).abs()
    bad = m[err > 2]
    assert bad.empty, bad
