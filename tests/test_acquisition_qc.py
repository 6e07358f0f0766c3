"""Acquisition QC (qc/acquisition.py) against simulated files with injected faults (truth per event)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import yaml

from conftest import GATING
from immuneprofile import TemplateError, gate_files, load_fcs, parse_template
from immuneprofile.qc.acquisition import acquisition_qc, flag_bins
from immuneprofile.study.instrument import FAULTS, inject_faults, write_recorded
from immuneprofile.study.simulate import simulate_sample

PANELS = (("treg", 21), ("tcell", 22), ("monocyte", 23))


@pytest.fixture(scope="module")
def faulty(tmp_path_factory):
    """One 50,000-event file per panel with a clog, a bubble, a drift and margin events."""
    d = tmp_path_factory.mktemp("qc")
    out = []
    for panel, seed in PANELS:
        rec = inject_faults(simulate_sample(panel, 50_000, rng=seed), rng=seed)
        out.append((write_recorded(d / f"{panel}.fcs", rec), rec.labels))
    return out


def _load(path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_fcs(path)


def test_qc_removes_the_faults_and_keeps_the_rest(faulty):
    for path, labels in faulty:
        res = acquisition_qc(_load(path))
        bad = labels["fault"]
        removed = ~res.keep
        assert removed[bad].mean() >= 0.95, f"{path.name}: {removed[bad].mean():.3f} of the faulty events removed"
        assert removed[~bad].mean() <= 0.02, f"{path.name}: {removed[~bad].mean():.4f} of the good events removed"
        for fault in ("clog", "bubble", "margin"):  # abrupt faults: all of them
            assert removed[labels[fault]].mean() > 0.99, fault
        assert res.removed_margin >= labels["margin"].sum()
        assert res.removed == removed.sum()


def test_clean_file_keeps_its_events(tmp_path):
    path = write_recorded(tmp_path / "clean.fcs", simulate_sample("tcell", 50_000, rng=5))
    res = acquisition_qc(_load(path))
    assert res.removed_time == 0
    assert res.removed / res.keep.size < 0.002  # only events piled on the scatter maximum


def test_flag_bins_finds_a_level_shift():
    rng = np.random.default_rng(0)
    stats = rng.normal(size=(200, 4))
    stats[150:, 1:] += 0.8  # a drift: three statistics shift by 0.8 SD from bin 150 on
    stats[60, 0] += 12  # a clog: one bin's rate
    bad = flag_bins(stats)
    assert bad[60] and bad[152:].mean() > 0.95
    assert bad[:150].sum() <= 8


def test_template_qc_step_counts_removed_events_per_file(faulty, tmp_path):
    doc = yaml.safe_load((GATING / "treg.yaml").read_text())
    doc["qc"] = {"k": 6}
    broken = tmp_path / "broken.fcs"
    broken.write_bytes(b"FCS3.1  not really")
    treg = [p for p, _ in faulty if p.name == "treg.fcs"]
    batch = gate_files(treg + [broken], parse_template(doc, "treg+qc"))
    assert list(batch.errors) == [str(broken)]  # the bad file is reported, the good one gated
    (res,), labels = batch.results, faulty[0][1]
    tab = batch.table.set_index("population")
    assert tab.loc["qc_removed", "count"] == int((~res.mask("qc_pass")).sum())
    assert tab.loc["qc_removed", "count"] + tab.loc["qc_pass", "count"] == 50_000
    assert tab.loc["lymphocytes", "parent"] == "qc_pass"
    th = batch.thresholds
    row = th[th.method == "acquisition-qc"].iloc[0]
    assert row.value == tab.loc["qc_removed", "count"]
    removed = res.mask("qc_removed")
    assert removed[labels["fault"]].mean() >= 0.95 and removed[~labels["fault"]].mean() <= 0.02
    assert set(FAULTS) <= set(labels)
    from immuneprofile.qc.report import report_warnings

    assert any(f"acquisition QC removed {tab.loc['qc_removed', 'count']:,} event" in w for w in report_warnings(batch))


@pytest.mark.parametrize("qc, msg", [({"k": -1}, "out of range"), ({"bogus": 1}, "unknown option"), (3, "mapping")])
def test_bad_qc_options_are_rejected(qc, msg):
    with pytest.raises(TemplateError, match=msg):
        parse_template({"qc": qc, "populations": [{"name": "p", "gate": {"type": "range", "marker": "CD3", "min": 0}}]})


def test_small_file_is_not_time_checked(tmp_path):
    """Under 50 bins the bin statistics say nothing reliable: the time course is left alone, and said so."""
    path = write_recorded(tmp_path / "small.fcs", inject_faults(simulate_sample("treg", 2000, rng=1), rng=1))
    res = acquisition_qc(_load(path))
    assert res.removed_time == 0 and "time course not checked" in res.note
    assert res.removed_margin >= 20  # margins are still removed (1 % of 2,000 injected)
