"""Tests for immuneprofile.study.readouts: readout tables, assay CV, description against noise."""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.proportion import proportion_confint

from conftest import EXAMPLE, GATING
from immuneprofile.study.clinical import ClinicalDataError
from immuneprofile.study.readouts import (
    DEFAULT_ASSAY_CV,
    assay_cv,
    describe_changes,
    join_readouts,
    declared_readouts,
)


def test_declared_readouts_are_the_templates_and_recover_truth():
    """Readouts from a population table: the shipped template's declarations (Treg as % of CD4+),
    within 1 point of the simulator's per-event truth in every treg example file."""
    from immuneprofile import gate_files, load_template

    sheet = pd.read_csv(EXAMPLE / "samples.csv")
    files = [EXAMPLE / f for f in sheet.loc[sheet["panel"] == "treg", "file"]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = gate_files(files, load_template(GATING / "treg.yaml"))
    assert not batch.errors
    with warnings.catch_warnings():  # the other shipped templates have no rows in this table
        warnings.simplefilter("error", FutureWarning)
        ro = declared_readouts(batch.table)
    treg = ro[ro.readout == "Treg"].set_index("sample_id")
    assert len(treg) == len(files) and (treg["of"] == "CD4+").all()
    truth = pd.read_csv(EXAMPLE / "truth.csv")
    truth = truth[truth.readout == "Treg"].set_index("sample_id")
    for sid, row in treg.iterrows():
        assert row["pct"] == pytest.approx(truth.loc[sid, "pct"], abs=1.0), sid
        assert row["pct"] == pytest.approx(100 * row["count"] / row["of_count"])
    assert declared_readouts(batch.table.drop(columns="template")).empty  # no template, no declaration


def test_assay_cv_from_reference_and_default():
    ref = pd.DataFrame({"readout": ["A"] * 4 + ["B"] * 2, "pct": [10.0, 11.0, 9.0, 10.5, 5.0, 6.0]})
    cv = assay_cv(ref, readouts=["A", "B", "C"]).set_index("readout")
    a = np.array([10.0, 11.0, 9.0, 10.5])
    assert cv.loc["A", "assay_cv"] == pytest.approx(a.std(ddof=1) / a.mean())
    assert cv.loc["A", "cv_source"] == "reference sample" and cv.loc["A", "n_reference"] == 4
    for r in ("B", "C"):  # fewer than 3 reference stainings, or none
        assert cv.loc[r, "assay_cv"] == DEFAULT_ASSAY_CV and cv.loc[r, "cv_source"] == "default"


def _visits(pct_w4: float, count_w0: int = 100, of_count: int = 1000) -> pd.DataFrame:
    return pd.DataFrame({
        "patient": "P1", "readout": "Treg", "week": [0.0, 4.0], "period": "MSC", "cotherapy": "",
        "pasi": [20.0, 5.0], "pasi_improvement_pct": [0.0, 75.0], "pct": [100 * count_w0 / of_count, pct_w4],
        "count": [count_w0, round(pct_w4 * of_count / 100)], "of_count": of_count,
    })


def test_describe_changes_against_noise():
    cv = pd.DataFrame({"readout": ["Treg"], "assay_cv": [0.10], "cv_source": ["reference sample"]})
    d = describe_changes(_visits(12.5), cv).set_index("week")
    assert d.loc[4, "delta_pct"] == pytest.approx(2.5) and d.loc[4, "rel_change"] == pytest.approx(0.25)
    assert d.loc[4, "log2fc"] == pytest.approx(np.log2(12.6 / 10.1))
    assert bool(d.loc[4, "beyond_assay"])  # 25 % > 2 x 10 %
    assert not bool(describe_changes(_visits(11.5), cv).set_index("week").loc[4, "beyond_assay"])  # 15 % < 20 %
    lo, hi = proportion_confint(125, 1000, alpha=0.05, method="normal")
    assert d.loc[4, "se_pct"] == pytest.approx(100 * (hi - lo) / 2 / 1.959964, rel=1e-5)
    assert not d["low_count"].any()


def test_low_counts_are_flagged_from_visit_or_baseline():
    d = describe_changes(_visits(12.5, count_w0=19))  # baseline numerator below 20 events
    assert d["low_count"].all()
    d = describe_changes(_visits(12.5, of_count=150))  # denominator below 200 events
    assert d["low_count"].all()
    assert (d["cv_source"] == "default").all() and (d["assay_cv"] == DEFAULT_ASSAY_CV).all()


def test_join_readouts_splits_reference_and_names_unknown_patients(tmp_path):
    ro = pd.DataFrame({"sample_id": ["a", "b", "r"], "readout": "Treg", "pct": [5.0, 6.0, 7.0],
                       "count": [50, 60, 70], "of_count": 1000})
    sheet = pd.DataFrame({"sample_id": ["a", "b", "r"], "patient": ["P1", "P1", "REF"], "week": [0, 4, 0],
                          "role": ["patient", "patient", "reference"]})
    clin = pd.DataFrame({"patient": ["P1", "P1"], "week": [0, 4], "pasi": [20.0, 4.0]})
    visits, ref = join_readouts(ro, sheet, clin)
    assert ref["sample_id"].tolist() == ["r"]
    assert visits["pasi_improvement_pct"].tolist() == pytest.approx([0.0, 80.0])
    assert (visits["period"] == "MSC").all()
    f = tmp_path / "clin.csv"
    pd.DataFrame({"patient": ["P9"], "week": [0], "pasi": [3.0]}).to_csv(f, index=False)
    with pytest.raises(ClinicalDataError, match=r"clin\.csv.*\['P1'\]"):
        join_readouts(ro, sheet, f)
    with pytest.raises(ClinicalDataError, match="missing column"):
        join_readouts(ro.drop(columns="of_count"), sheet, clin)
