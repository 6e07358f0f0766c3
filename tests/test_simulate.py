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
    COURSE,
    EFFECTS,
    MARKERS,
    PANELS,
    design_pct,
    format_spillover,
    has_true_effect,
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
    assert sizes == {"tcell": 12, "treg": 10, "monocyte": 11, "full": 19}
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
    assert len(full_fl) == len(MARKERS) == 16
    # marker labels come in several styles
    labels = {s for chans in PANELS.values() for _, s in chans}
    assert {"L/D Aqua", "CD3", "CD4 BV605", "FoxP3 PE", "HLA-DR PerCP-Cy5.5", "CD45RA",
            "CLA FITC", "CD103 APC", "CCR7 PE-CF594"} <= labels


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
    assert events.dtype == np.float32 and events.shape == (20_000, 12)
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
    for t in ("CD4+", "CD8+"):  # CD45RA x CCR7 subsets partition each lineage; memory = non-naive
        subsets = [labels[f"{t} {m}"].astype(int) for m in ("naive", "CM", "EM", "TEMRA")]
        assert (sum(subsets) == labels[t]).all()
        assert (labels[f"{t} memory"] == (labels[t] & ~labels[f"{t} naive"])).all()
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
    # 16-bit unsigned integers with a gain of 0.25: the stored values are non-negative steps of 4
    assert (md["datatype"], md["p4b"], md["p4g"], md["p4r"]) == ("I", "16", "0.25", "65536")
    assert path.stat().st_size < 20_000 * len(s.channels) * 2 + 4000
    assert raw.min() == 0 and np.all(raw[:, fl] % 4 == 0)
    # spillover really was applied (the raw and unmixed values differ substantially)
    assert np.abs(raw[:, fl] - s.unmixed[:, fl]).max() > 500
    comp = flowkit.Sample(str(path), compensation=md["spillover"]).get_events(source="comp")
    # compensation recovers the true values to the 16-bit step wherever no detector was clipped at 0
    mixed = s.unmixed[:, fl] @ s.spillover
    unclipped = (mixed > 2).all(axis=1)
    assert unclipped.mean() > 0.05
    np.testing.assert_allclose(comp[unclipped][:, fl], s.unmixed[unclipped][:, fl], rtol=0, atol=12)
    assert np.abs(raw[unclipped][:, fl] - s.unmixed[unclipped][:, fl]).max() > 100


def test_frequencies_and_shifts_control_subsets():
    base = simulate_sample("monocyte", 40_000, rng=3)
    up = simulate_sample("monocyte", 40_000, shifts={"non-classical": 0.15}, rng=3)
    fixed = simulate_sample("monocyte", 40_000, frequencies={"non-classical": 0.30}, rng=3)

    def frac(x):
        return x.labels["non-classical"].sum() / x.labels["monocytes"].sum()

    assert abs(frac(base) - 0.11) < 0.02
    assert abs(frac(up) - 0.26) < 0.025
    assert abs(frac(fixed) - 0.30) < 0.025
    with pytest.raises(KeyError):
        simulate_sample("tcell", 100, frequencies={"nonsense": 0.1}, rng=0)
    with pytest.raises(ValueError):
        simulate_sample("tcell", 100, shifts={"Treg": 0.5}, rng=0)
    with pytest.raises(ValueError):
        simulate_sample("bcell", 100, rng=0)


def test_truth_table_from_labels(tcell_sample):
    rows = {r["readout"]: r for r in truth_table(tcell_sample)}
    assert set(rows) == set(ip_load("tcell_skin_homing").readouts)
    lab = tcell_sample.labels
    r = rows["CD8+ CLA+CD103+"]
    assert (r["population"], r["of"]) == ("CD8+ CLA+CD103+", "CD8+ memory")
    assert r["pct"] == pytest.approx(100 * lab["CD8+ CLA+CD103+"].sum() / lab["CD8+ memory"].sum())
    assert rows["CD4+ TEMRA"]["of_count"] == lab["CD4+"].sum()
    full = simulate_sample("full", 2000, rng=1)
    got = {(r["template"], r["readout"]) for r in truth_table(full)}
    assert {("treg", "Treg"), ("monocytes", "non-classical"), ("tcell_skin_homing", "CD4+ CM")} <= got


def ip_load(name):
    from immuneprofile import load_template

    return load_template(name)


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
    assert len(paths["fcs"]) == (3 * 4 + 4) * 3, "3 patients x 4 visits + one reference sample per batch"
    assert (out / "P2_W04_treg.fcs").exists() and (out / "REF_W24_monocyte.fcs").exists()
    samples = pd.read_csv(paths["samples"], keep_default_na=False)
    assert list(samples.columns) == ["file", "sample_id", "patient", "week", "panel", "role", "batch",
                                     "lymphocytes_per_uL", "monocytes_per_uL"]
    assert (samples.sample_id == samples.file.str.replace(".fcs", "", regex=False)).all()
    ref = samples[samples.role == "reference"]
    assert set(ref.patient) == {"REF"} and sorted(set(ref.week)) == [0, 1, 4, 24]
    assert (ref.lymphocytes_per_uL == "").all()
    pts = samples[samples.role == "patient"]
    assert pd.to_numeric(pts.lymphocytes_per_uL).between(800, 4000).all()
    assert pd.to_numeric(pts.monocytes_per_uL).between(150, 1200).all()
    smp = flowkit.Sample(str(out / "P2_W04_treg.fcs"))
    md = smp.metadata
    assert (md["patient"], md["week"], md["panel"], md["fil"], md["batch"]) == ("P2", "4", "treg", "P2_W04_treg.fcs", "W04")
    assert "date" in md and "spillover" in md
    assert smp.event_count == 1500
    clin = pd.read_csv(paths["clinical"], keep_default_na=False)
    assert list(clin.columns) == ["patient", "week", "pasi", "treatment", "cotherapy", "event", "notes"]
    assert len(clin) == 3 * 4
    patients = pd.read_csv(paths["patients"], keep_default_na=False)
    assert list(patients.columns) == ["patient", "sex", "age", "dose1_cells_per_kg", "dose2_cells_per_kg",
                                      "cotherapy", "prior_biologics", "notes"]


def test_study_truth_matches_written_events(study):
    out, paths, captured = study
    truth = pd.read_csv(paths["truth"])
    assert set(truth.sample_id) == set(captured)
    for sid in ("P1_W00_tcell", "P3_W24_treg", "P2_W01_monocyte", "REF_W04_monocyte"):
        s = captured[sid]
        _assert_same_events(out / f"{sid}.fcs", s)
        rows = truth[truth.sample_id == sid]
        tpl = sim.PANEL_TEMPLATES[s.panel][0]
        assert set(rows.readout) == set(ip_load(tpl).readouts)
        for r in rows.itertuples():
            want = 100 * s.labels[r.population].sum() / s.labels[r.of].sum()
            assert r.pct == pytest.approx(want, abs=1e-4)
            assert r.count == s.labels[r.population].sum()
            assert (r.true_effect == "yes") == has_true_effect(r.readout)


def test_study_is_deterministic_and_subsets_reproduce(tmp_path):
    kw = dict(n_events=500, n_patients=1, panels=("treg", "full"), seed=3)
    a = simulate_study(tmp_path / "a", weeks=(0, 9), **kw)
    b = simulate_study(tmp_path / "b", weeks=(0, 9), **kw)
    for sid, p in a["fcs"].items():
        assert p.read_bytes() == b["fcs"][sid].read_bytes()
    assert a["truth"].read_text() == b["truth"].read_text()
    part = simulate_study(tmp_path / "p", weeks=(9,), **kw)  # a subset of visits: the same files
    assert part["fcs"]["P1_W09_treg"].read_bytes() == a["fcs"]["P1_W09_treg"].read_bytes()
    c = simulate_study(tmp_path / "c", weeks=(0, 9), **{**kw, "seed": 4})
    assert a["truth"].read_text() != c["truth"].read_text()


# ----------------------------------------------------------------------------- the study model


@pytest.fixture(scope="module")
def design():
    patients, visits, samples = sim.cohort_design(3, seed=2025)
    rows = [{"patient": s["patient"], "week": s["week"], "readout": r, "design": design_pct(s["design"], r)}
            for s in samples for r in sim.READOUT_SOURCES]
    return pd.DataFrame(visits), pd.DataFrame(rows)


def test_null_readouts_have_no_effect_and_effects_are_heterogeneous(design):
    visits, d = design
    pts = d[d.patient != "REF"]
    spread = pts.groupby(["readout", "patient"]).design.agg(lambda x: x.max() - x.min()).unstack()
    nulls = [r for r in sim.READOUT_SOURCES if not has_true_effect(r)]
    assert {"CD8+", "CD8+ CLA+CD103-", "CD4+ CM", "CD8+ TEMRA"} <= set(nulls)
    assert (spread.loc[nulls] == 0).all().all(), "a null readout's true value never moves"
    effects = [r for r in sim.READOUT_SOURCES if has_true_effect(r)]
    assert {"Treg", "non-classical", "CD4+ CLA+CD103-", "CD4+ CLA+CD103+", "CD8+ CLA+CD103+"} <= set(effects)
    assert (spread.loc[effects] > 0.3).all().all(), "every patient shows each built-in effect (> 0.3 points)"
    peak = spread.loc["Treg"]
    assert peak.max() > 1.8 * peak.min(), "responses differ between patients"


def test_effects_follow_treatment_windows_not_pasi_alone(design):
    visits, d = design
    pasi = visits.assign(pasi=visits.pasi.astype(float))
    m = d.merge(pasi, on=["patient", "week"])
    for p, g in m.groupby("patient"):
        nc = g[g.readout == "non-classical"].set_index("week").design
        assert nc[1] > nc[0] and nc[4] > nc[0], f"{p}: MSC effect on non-classical monocytes"
        assert nc[24] - nc[0] < 0.1 * (nc.max() - nc[0]), f"{p}: the MSC effect fades after the window"
        treg = g[g.readout == "Treg"]
        r = np.corrcoef(treg.pasi, treg.design)[0, 1]
        assert abs(r) < 0.95, f"{p}: Treg is not a linear function of PASI (r={r:.2f})"


# ----------------------------------------------------------------------------- example data


def test_example_clinical_course_is_the_papers():
    clin = pd.read_csv(EXAMPLE / "clinical.csv", keep_default_na=False)
    assert list(clin.columns) == ["patient", "week", "pasi", "treatment", "cotherapy", "event", "notes"]
    base = clin[clin.week == 0].set_index("patient").pasi
    w4 = clin[clin.week == 4].set_index("patient").pasi
    assert (1 - w4 / base).max() >= 0.87, "the best responder reaches PASI 87 by W4"
    resumed = clin[clin.event.str.startswith("resumed")]
    assert len(resumed) == 2 and (resumed.week == 9).all()
    switched = clin[clin.event.str.startswith("switched to")]
    assert len(switched) == 1 and (switched.week == 24).all()
    assert set(clin.treatment) == {"MSC", "biologic resumed", "new biologic"}
    for p, g in clin.groupby("patient"):
        change = g[g.event.str.startswith(("resumed", "switched"))].week.iloc[0]
        assert (g[g.week <= change].treatment == "MSC").all() and (g[g.week > change].treatment != "MSC").all()
    assert clin[clin.cotherapy == "etanercept"].patient.nunique() == 1
    assert set(clin[clin.week.isin([0, 1])].event) == {"infusion 1", "infusion 2"}
    late = clin[clin.week >= 52].groupby("patient").pasi.max()
    assert (late <= 2).sum() == 2 and clin.week.max() >= 104, "two patients hold PASI 0-2 long term"
    patients = pd.read_csv(EXAMPLE / "patients.csv", keep_default_na=False)
    doses = patients[["dose1_cells_per_kg", "dose2_cells_per_kg"]].astype(float).to_numpy()
    assert ((doses >= 1.96e6) & (doses <= 3.0e6)).all() and (patients.sex == "F").all()


def test_example_data_layout():
    samples = pd.read_csv(EXAMPLE / "samples.csv")
    assert all((EXAMPLE / f).exists() for f in samples.file)
    assert len(list(EXAMPLE.glob("*.fcs"))) == len(samples) == 81
    size = sum(p.stat().st_size for p in EXAMPLE.iterdir())
    assert size < 40e6
    ref = samples[samples.role == "reference"]
    assert set(ref.week) == set(samples[samples.role == "patient"].week), "a reference sample in every batch"
    with open(EXAMPLE / "truth.csv") as fh:
        header = next(csv.reader(fh))
    assert header == sim.TRUTH_COLUMNS


def test_cli_simulate_reproduces_example_files(tmp_path):
    from click.testing import CliRunner

    from immuneprofile.cli import main

    # the same seed and design give the same bytes (here: the full study, compared file by file)
    r = CliRunner().invoke(main, ["simulate", str(tmp_path / "ex"), "--seed", "2025"])
    assert r.exit_code == 0, r.output
    for f in ("P1_W04_treg.fcs", "REF_W104_tcell.fcs", "P3_W52_monocyte.fcs", "samples.csv", "clinical.csv",
              "patients.csv", "truth.csv"):
        assert (tmp_path / "ex" / f).read_bytes() == (EXAMPLE / f).read_bytes(), f


@pytest.fixture(scope="module")
def example_readouts(tmp_path_factory):
    from immuneprofile.study.run import run_study

    res = run_study(EXAMPLE / "samples.csv", tmp_path_factory.mktemp("study"))
    assert not res["errors"]
    return res["readouts"]


def test_example_readouts_recover_truth(example_readouts):
    """Gating as `immuneprofile study` does (CLA/CD103 cuts per patient) recovers truth.csv."""
    truth = pd.read_csv(EXAMPLE / "truth.csv")
    m = truth.merge(example_readouts, on=["sample_id", "readout"], suffixes=("", "_gated"))
    assert len(m) == len(truth) == 81 // 3 * 17
    treg = m[m.readout == "Treg"]
    assert len(treg) == 27 and (treg.of == "CD4+").all()
    assert (treg.pct_gated - treg.pct).abs().max() < 1.0, "Treg % of CD4+ within 1 point in every file"
    assert (m.pct_gated - m.pct).abs().max() < 1.0
    assert m.count_gated.min() >= 200, m.loc[m.count_gated.idxmin()]
    assert m["count"].min() >= 200


def test_simulate_readouts_matches_the_fcs_study():
    """The table-level cohort has the design of the example data and their counting noise."""
    tab = sim.simulate_readouts(3, seed=2025)
    truth = pd.read_csv(EXAMPLE / "truth.csv")
    m = truth.merge(tab, on=["sample_id", "readout"], suffixes=("", "_tab"))
    assert len(m) == len(truth)
    np.testing.assert_allclose(m.design_pct_tab, m.design_pct, atol=1e-4)
    assert (m.true_effect == m.true_effect_tab.map({True: "yes", False: "no"})).all()
    # denominators within 15 % of the files' (gating losses aside), percentages within counting noise
    assert ((m.of_count_tab / m.of_count).between(0.85, 1.3)).all()
    z = (m.pct_tab - m.pct) / np.sqrt(2 * m.pct * (100 - m.pct) / m.of_count)
    assert abs(z.mean()) < 0.3 and 0.6 < z.std() < 1.5
    big = sim.simulate_readouts(12, seed=1)
    assert big.patient.nunique() == 13 and big.pasi[big.role == "patient"].notna().all()


def test_large_files_take_their_data_offsets_from_text(tmp_path):
    """A file over 99,999,999 bytes cannot hold its DATA offsets in the 8-character HEADER fields:
    the HEADER says 0 and TEXT's $BEGINDATA/$ENDDATA give them (FCS 3.0), which the reader follows."""
    from immuneprofile.io.reader import read_fcs
    from immuneprofile.study.simulate import fcs_header

    head = fcs_header(58, 2000, 2001, 190_002_406)
    assert len(head) == 58 and head[26:42] == f"{0:>8}{0:>8}"
    assert fcs_header(58, 2000, 2001, 99_999_999)[26:42] == f"{2001:>8}{99_999_999:>8}"
    # a real file written with the large-file HEADER reads back the same events
    small = sim.write_fcs(tmp_path / "small.fcs", simulate_sample("treg", 500, rng=3))
    raw = bytearray(small.read_bytes())
    raw[26:42] = f"{0:>8}{0:>8}".encode()  # as a >100 MB file's HEADER would say
    big = tmp_path / "large_convention.fcs"
    big.write_bytes(bytes(raw))
    a, b = read_fcs(str(small)), read_fcs(str(big))
    np.testing.assert_array_equal(a.events, b.events)
