"""The shipped templates, unedited, on a cohort recorded by another instrument (study/instrument.py)."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
import yaml

import immuneprofile as ip
from immuneprofile.stats import readout_table
from conftest import GATING
from immuneprofile.study.instrument import other_instrument
from immuneprofile.study.simulate import PANEL_TEMPLATES, simulate_sample, simulate_study

#: The scatter gates the shipped templates had before they were data-driven (absolute units).
FIXED_SCATTER = {
    "lymphocytes": {"type": "polygon", "x": "FSC-A", "y": "SSC-A",
                    "vertices": [[38000, 4000], [82000, 4000], [86000, 26000], [76000, 36000], [38000, 30000]]},
    "singlets": {"type": "polygon", "x": "FSC-A", "y": "FSC-H",
                 "vertices": [[5000, 3800], [270000, 205000], [270000, 280000], [5000, 6000]]},
}


def _record(sample, rng):
    return other_instrument(sample, rng=rng)  # -H detectors too: $SPILLOVER names only the -A ones


@pytest.fixture(scope="module")
def other_cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("other_instrument")
    simulate_study(out, n_events=3000, weeks=(0, 9), seed=5, instrument=_record)
    return out


def _gate_cohort(root, templates) -> pd.DataFrame:
    """Each declared readout of the cohort's files, gated, beside the simulator's truth (``err``: points)."""
    samples, truth = pd.read_csv(root / "samples.csv"), pd.read_csv(root / "truth.csv")
    samples = samples[[all(t in templates for t in PANEL_TEMPLATES[p]) for p in samples.panel]]
    truth = truth[truth.sample_id.isin(samples.sample_id)]
    tables = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for s in samples.itertuples():
            fcs = ip.load_fcs(root / s.file)
            used = [templates[t] for t in PANEL_TEMPLATES[s.panel]]
            tables.append(readout_table(ip.gate_sample(fcs, used), used))
    gated = pd.concat(tables)
    m = truth.merge(gated[["sample_id", "readout", "pct"]], on=["sample_id", "readout"], how="left",
                    suffixes=("", "_gated"))
    m["err"] = (m.pct_gated - m.pct).abs()
    return m


def test_other_instrument_scale(other_cohort):
    """The files really are on another scale: scatter range 2^20 and gains, wider compensated negatives."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = ip.load_fcs(other_cohort / "P1_W00_treg.fcs")
    j = data.find_channel("FSC-A")
    assert data.metadata[f"p{j + 1}r"] == str(2 ** 20)
    sim = simulate_sample("treg", 20000, rng=1)
    rec = other_instrument(sim, rng=2)
    names = [c for c, _ in rec.channels]
    comp = rec.events[:, [names.index(d) for d in rec.spill_detectors]] @ np.linalg.inv(rec.spillover)
    live = sim.labels["live cells"]  # LiveDead-negative: the spread of the compensated negatives
    mad = lambda v: np.median(np.abs(v - np.median(v)))  # noqa: E731
    assert mad(comp[live, 0]) > 1.5 * mad(sim.unmixed[live, [c for c, _ in sim.channels].index("BV510-A")])
    assert "BV510-H" in names and "BV510-H" not in rec.spill_detectors
    assert np.median(rec.events[:, 0]) > 2 * np.median(sim.events[:, 0])


def test_shipped_templates_travel_to_another_instrument(other_cohort):
    templates = {t: ip.load_template(t) for t in ("tcell_skin_homing", "treg", "monocytes")}
    m = _gate_cohort(other_cohort, templates)
    assert m.pct_gated.notna().all()
    assert m.err.max() <= 2.0, m.sort_values("err").tail()


def test_fixed_scatter_polygons_do_not_travel(other_cohort):
    """The check above can fail: with the old absolute-unit scatter polygons the same cohort gates far off."""
    doc = yaml.safe_load((GATING / "treg.yaml").read_text())
    for p in doc["populations"]:
        if p["name"] in FIXED_SCATTER:
            p["gate"] = FIXED_SCATTER[p["name"]]
    m = _gate_cohort(other_cohort, {"treg": ip.parse_template(doc, "treg-fixed")})
    m = m[m.panel == "treg"]
    assert m.pct_gated.isna().any() or m.err.max() > 5


def test_cli_simulates_another_instrument(tmp_path):
    from click.testing import CliRunner

    from immuneprofile.cli import main

    out = tmp_path / "other"
    r = CliRunner().invoke(main, ["simulate", str(out), "--events", "500", "--other-instrument"])
    assert r.exit_code == 0, r.output
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        data = ip.load_fcs(out / "P2_W09_monocyte.fcs")
    assert "AF700-H" in data.channels and "AF700-H" not in data.compensated
    assert data.metadata[f"p{data.channels.index('SSC-A') + 1}r"] == str(2 ** 20)
