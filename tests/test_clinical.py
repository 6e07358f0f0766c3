"""Tests for immuneprofile.clinical (reading, validation, joining, changes)."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cohort import make_cohort as _make_cohort
from immuneprofile.study.clinical import (
    ClinicalDataError,
    join_clinical,
    pasi_response,
    read_clinical,
    read_populations,
    read_sample_sheet,
    sample_metadata_from_fcs,
    subset_changes,
    validate_clinical,
)


def make_cohort(seed: int = 0):
    """3 patients x 6 visits of the treg panel; subsets rise as PASI falls (plus one null subset)."""
    clin, sheet, pops = _make_cohort(seed, suffix="_treg")
    sheet["panel"] = "treg"
    return clin, sheet, pops


@pytest.fixture()
def cohort_files(tmp_path: Path):
    clin, sheet, pops = make_cohort()
    paths = {
        "clinical": tmp_path / "clinical.csv",
        "samples": tmp_path / "samples.csv",
        "populations": tmp_path / "populations.csv",
    }
    clin.to_csv(paths["clinical"], index=False)
    sheet.to_csv(paths["samples"], index=False)
    pops.to_csv(paths["populations"], index=False)
    return paths


# --------------------------------------------------------------------------- read_clinical


def test_read_clinical_ok(cohort_files):
    df = read_clinical(cohort_files["clinical"])
    assert list(df.columns[:5]) == ["patient", "week", "pasi", "treatment", "notes"]
    assert len(df) == 18
    assert df["pasi"].dtype == float and df["week"].dtype == float
    assert set(df["patient"]) == {"P1", "P2", "P3"}
    assert df.loc[(df.patient == "P2") & (df.week == 9), "treatment"].item() == "biologic restart"


def test_read_clinical_week_labels_and_optional_columns(tmp_path):
    f = tmp_path / "c.csv"
    f.write_text("Patient,Week,PASI\nA,W0,10\nA,W04,4.5\nB,0,7\n")
    df = read_clinical(f)
    assert df["week"].tolist() == [0.0, 4.0, 0.0]
    assert (df["treatment"] == "").all() and (df["notes"] == "").all()


def _write(tmp_path, text, name="clin.csv"):
    f = tmp_path / name
    f.write_text(text)
    return f


def test_pasi_out_of_range_names_file_row_and_problem(tmp_path):
    f = _write(tmp_path, "patient,week,pasi\nP1,0,20\nP1,4,80\nP2,0,10\n")
    with pytest.raises(ClinicalDataError) as ei:
        read_clinical(f)
    msg = str(ei.value)
    assert str(f) in msg
    assert "out of range" in msg and "80" in msg
    assert "line 3" in msg and "P1" in msg


def test_pasi_non_numeric(tmp_path):
    f = _write(tmp_path, "patient,week,pasi\nP1,0,twenty\n")
    with pytest.raises(ClinicalDataError, match=r"non-numeric") as ei:
        read_clinical(f)
    assert str(f) in str(ei.value)


def test_week_non_numeric(tmp_path):
    f = _write(tmp_path, "patient,week,pasi\nP1,baseline,20\n")
    with pytest.raises(ClinicalDataError, match="week") as ei:
        read_clinical(f)
    assert str(f) in str(ei.value) and "line(s) 2" in str(ei.value)


def test_duplicate_visit(tmp_path):
    f = _write(tmp_path, "patient,week,pasi\nP1,0,20\nP1,4,10\nP1,4,11\n")
    with pytest.raises(ClinicalDataError) as ei:
        read_clinical(f)
    msg = str(ei.value)
    assert str(f) in msg and "duplicate visit" in msg
    assert "patient P1 week 4" in msg and "3, 4" in msg


def test_missing_baseline(tmp_path):
    f = _write(tmp_path, "patient,week,pasi\nP1,0,20\nP2,1,10\nP2,4,5\n")
    with pytest.raises(ClinicalDataError, match=r"baseline.*P2") as ei:
        read_clinical(f)
    assert str(f) in str(ei.value)


def test_missing_column(tmp_path):
    f = _write(tmp_path, "patient,visit,pasi\nP1,0,20\n")
    with pytest.raises(ClinicalDataError, match=r"missing required column.*week") as ei:
        read_clinical(f)
    assert str(f) in str(ei.value)


def test_missing_file(tmp_path):
    with pytest.raises(ClinicalDataError, match="not found"):
        read_clinical(tmp_path / "nope.csv")


def test_clinical_error_is_value_error():
    assert issubclass(ClinicalDataError, ValueError)


# --------------------------------------------------------------------------- sample metadata


def test_read_sample_sheet(cohort_files):
    s = read_sample_sheet(cohort_files["samples"])
    assert list(s.columns) == ["sample_id", "patient", "week", "panel", "file"]
    assert len(s) == 18


def test_sample_sheet_sample_id_from_file_and_duplicates(tmp_path):
    f = _write(tmp_path, "file,patient,week\ndata/A_1.fcs,A,0\nB_1.fcs,B,W2\n", "s.csv")
    s = read_sample_sheet(f)
    assert s["sample_id"].tolist() == ["A_1", "B_1"]
    assert s["week"].tolist() == [0.0, 2.0]
    g = _write(tmp_path, "sample_id,patient,week\nX,A,0\nX,A,1\n", "dup.csv")
    with pytest.raises(ClinicalDataError, match=r"duplicate sample_id.*X") as ei:
        read_sample_sheet(g)
    assert str(g) in str(ei.value)


def _write_fcs(path: Path, meta: dict) -> None:
    import flowio

    with open(path, "wb") as fh:
        flowio.create_fcs(fh, [1.0, 2.0, 3.0, 4.0], ["FSC-A", "CD3"], metadata_dict=meta)


def test_sample_metadata_from_fcs(tmp_path):
    _write_fcs(tmp_path / "P1_W00_treg.fcs", {"PATIENT": "P1", "WEEK": "0"})
    _write_fcs(tmp_path / "P1_W04_treg.fcs", {"PATIENT": "P1", "WEEK": "W4", "PANEL": "treg"})
    df = sample_metadata_from_fcs(tmp_path)
    assert df["sample_id"].tolist() == ["P1_W00_treg", "P1_W04_treg"]
    assert df["patient"].tolist() == ["P1", "P1"]
    assert df["week"].tolist() == [0.0, 4.0]
    assert "file" in df.columns and "panel" in df.columns
    # explicit list of paths and custom keyword
    _write_fcs(tmp_path / "x.fcs", {"SUBJ": "P9", "WEEK": "2"})
    df2 = sample_metadata_from_fcs([tmp_path / "x.fcs"], patient_key="subj")
    assert df2.loc[0, "patient"] == "P9"


def test_sample_metadata_from_fcs_missing_keyword(tmp_path):
    f = tmp_path / "P7_W02.fcs"
    _write_fcs(f, {"PATIENT": "P7"})
    with pytest.raises(ClinicalDataError, match=r"WEEK") as ei:
        sample_metadata_from_fcs([f])
    assert str(f) in str(ei.value)


# --------------------------------------------------------------------------- join


def test_join_clinical(cohort_files):
    j = join_clinical(cohort_files["populations"], cohort_files["samples"],
                      cohort_files["clinical"])
    assert len(j) == 18 * 3
    for col in ("sample_id", "patient", "week", "panel", "pasi", "baseline_pasi", "treatment",
                "population", "pct_parent"):
        assert col in j.columns
    row = j[(j.sample_id == "P2_W04_treg") & (j.population == "Treg")].iloc[0]
    assert row.patient == "P2" and row.week == 4 and row.pasi == pytest.approx(18.0)
    assert row.baseline_pasi == pytest.approx(36.0)


def test_join_from_parquet_and_dataframes(tmp_path):
    clin, sheet, pops = make_cohort()
    pq = tmp_path / "pops.parquet"
    pops.to_parquet(pq)
    j1 = join_clinical(pq, sheet, clin)
    j2 = join_clinical(pops, sheet, clin)
    pd.testing.assert_frame_equal(j1, j2)
    assert read_populations(pq).shape == pops.shape


def test_join_unknown_patient_is_error(cohort_files, tmp_path):
    clin = pd.read_csv(cohort_files["clinical"])
    clin = clin[clin.patient != "P3"]
    f = tmp_path / "clin_missing_p3.csv"
    clin.to_csv(f, index=False)
    with pytest.raises(ClinicalDataError) as ei:
        join_clinical(cohort_files["populations"], cohort_files["samples"], f)
    msg = str(ei.value)
    assert str(f) in msg and "P3" in msg and "absent from the clinical table" in msg


def test_join_extra_clinical_patient_warns(cohort_files, tmp_path):
    clin = pd.read_csv(cohort_files["clinical"])
    extra = pd.DataFrame({"patient": ["P4", "P4"], "week": [0, 4], "pasi": [10, 5]})
    f = tmp_path / "clin_p4.csv"
    pd.concat([clin, extra]).to_csv(f, index=False)
    with pytest.warns(UserWarning, match=r"P4.*no samples"):
        j = join_clinical(cohort_files["populations"], cohort_files["samples"], f)
    assert "P4" not in set(j.patient)


def test_join_sample_without_metadata_is_error(cohort_files):
    sheet = pd.read_csv(cohort_files["samples"])
    sheet = sheet[sheet.sample_id != "P1_W09_treg"]
    with pytest.raises(ClinicalDataError, match=r"P1_W09_treg"):
        join_clinical(cohort_files["populations"], sheet, cohort_files["clinical"])


def test_join_does_not_guess_from_file_names(cohort_files):
    # No sample sheet and no patient/week columns: must refuse, not parse "P1_W04".
    with pytest.raises(ClinicalDataError, match="never guessed"):
        join_clinical(cohort_files["populations"], None, cohort_files["clinical"])


def test_join_with_metadata_in_population_table(cohort_files):
    pops = pd.read_csv(cohort_files["populations"])
    sheet = pd.read_csv(cohort_files["samples"])
    pops = pops.merge(sheet[["sample_id", "patient", "week"]], on="sample_id")
    j = join_clinical(pops, None, cohort_files["clinical"])
    assert j["pasi"].notna().all() and len(j) == 54


def test_join_visit_without_pasi_warns(cohort_files, tmp_path):
    clin = pd.read_csv(cohort_files["clinical"])
    clin = clin[~((clin.patient == "P1") & (clin.week == 24))]
    f = tmp_path / "clin.csv"
    clin.to_csv(f, index=False)
    with pytest.warns(UserWarning, match=r"P1 W24"):
        j = join_clinical(cohort_files["populations"], cohort_files["samples"], f)
    assert j.loc[(j.patient == "P1") & (j.week == 24), "pasi"].isna().all()


# --------------------------------------------------------------------------- pasi_response


def test_pasi_response():
    clin = pd.DataFrame({
        "patient": ["A"] * 4 + ["B"] * 2,
        "week": [0, 4, 9, 24, 0, 4],
        "pasi": [20.0, 10.0, 5.0, 1.0, 0.0, 0.0],
    })
    r = pasi_response(clin)
    a = r[r.patient == "A"].set_index("week")
    assert a["pasi_improvement_pct"].tolist() == pytest.approx([0, 50, 75, 95])
    assert a["delta_pasi"].tolist() == pytest.approx([0, -10, -15, -19])
    assert a["pasi50"].tolist() == [False, True, True, True]
    assert a["pasi75"].tolist() == [False, False, True, True]
    assert a["pasi90"].tolist() == [False, False, False, True]
    # baseline PASI 0: improvement undefined -> NA, not False
    b = r[r.patient == "B"]
    assert b["pasi_improvement_pct"].isna().all()
    assert b["pasi75"].isna().all()


def test_pasi_response_validates():
    with pytest.raises(ClinicalDataError, match="<DataFrame>.*out of range"):
        pasi_response(pd.DataFrame({"patient": ["A"], "week": [0], "pasi": [99]}))


# --------------------------------------------------------------------------- subset_changes


def test_subset_changes(cohort_files):
    j = join_clinical(cohort_files["populations"], cohort_files["samples"],
                      cohort_files["clinical"])
    ch = subset_changes(j, pseudocount=0.1)
    assert len(ch) == len(j)
    base = ch[ch.is_baseline]
    assert (base["delta_pct_parent"] == 0).all() and (base["log2fc_pct_parent"] == 0).all()
    r = ch[(ch.patient == "P1") & (ch.population == "Treg")].set_index("week")
    b = r.loc[0, "pct_parent"]
    assert r.loc[9, "delta_pct_parent"] == pytest.approx(r.loc[9, "pct_parent"] - b)
    assert r.loc[9, "log2fc_pct_parent"] == pytest.approx(
        np.log2((r.loc[9, "pct_parent"] + 0.1) / (b + 0.1)))
    assert r.loc[24, "delta_pasi"] == pytest.approx(3.0 - 20.0)
    # built-in negative association: Treg rises as PASI falls
    post = ch[(ch.population == "Treg") & ~ch.is_baseline]
    assert (post["delta_pct_parent"] > 0).mean() > 0.8


def test_subset_changes_pseudocount_handles_zero():
    j = pd.DataFrame({
        "patient": ["A"] * 3, "week": [0.0, 1.0, 2.0], "population": ["X"] * 3,
        "pct_parent": [0.0, 0.9, 0.0], "pasi": [10.0, 5.0, 2.0],
    })
    ch = subset_changes(j, pseudocount=0.1).set_index("week")
    assert ch.loc[1.0, "log2fc_pct_parent"] == pytest.approx(np.log2(1.0 / 0.1))
    assert ch.loc[2.0, "log2fc_pct_parent"] == 0
    assert ch.loc[1.0, "baseline_pasi"] == 10.0


def test_subset_changes_missing_baseline_warns():
    j = pd.DataFrame({
        "patient": ["A", "A", "B", "B"], "week": [0.0, 4.0, 1.0, 4.0],
        "population": ["X"] * 4, "pct_parent": [1.0, 2.0, 3.0, 4.0],
        "pasi": [10.0, 5.0, 8.0, 4.0], "baseline_pasi": [10.0, 10.0, 9.0, 9.0],
    })
    with pytest.warns(UserWarning, match=re.escape("B/X")):
        ch = subset_changes(j)
    assert ch.loc[ch.patient == "B", "delta_pct_parent"].isna().all()


def test_subset_changes_duplicate_samples_error():
    j = pd.DataFrame({
        "patient": ["A", "A"], "week": [0.0, 0.0], "population": ["X", "X"],
        "pct_parent": [1.0, 2.0], "pasi": [10.0, 10.0],
    })
    with pytest.raises(ClinicalDataError, match="more than one sample"):
        subset_changes(j)


def test_validate_clinical_dataframe_numeric_patient_ids():
    df = validate_clinical(pd.DataFrame({"patient": [1, 1], "week": [0, 2], "pasi": [5, 2]}))
    assert df["patient"].tolist() == ["1", "1"]


def test_line_numbers_account_for_blank_lines(tmp_path):
    f = _write(tmp_path, "patient,week,pasi\nP1,0,20\n\nP1,4,99\n")
    with pytest.raises(ClinicalDataError, match=r"line 4 \(patient P1, week 4\): PASI 99"):
        read_clinical(f)


def test_header_only_file(tmp_path):
    f = _write(tmp_path, "patient,week,pasi\n")
    with pytest.raises(ClinicalDataError, match="no rows") as ei:
        read_clinical(f)
    assert str(f) in str(ei.value)


# --------------------------------------------------------------------------- treatment periods


def test_periods_given_as_data(tmp_path):
    f = _write(tmp_path, "patient,week,pasi,treatment,cotherapy,event,notes\n"
                         "A,0,20,MSC,,infusion 1,\nA,1,15,MSC,,infusion 2,\nA,9,12,biologic resumed,,resumed adalimumab,\n"
                         "A,24,3,biologic resumed,,,\nB,0,10,MSC,etanercept,infusion 1,\nB,24,9,new biologic,etanercept,"
                         "switched to secukinumab,\n")
    df = read_clinical(f)
    assert df["period"].tolist() == ["MSC", "MSC", "biologic resumed", "biologic resumed", "MSC", "new biologic"]
    blank = pd.read_csv(f).assign(treatment=lambda d: d["treatment"].where((d.patient != "A") | (d.week != 24)))
    assert validate_clinical(blank)["period"].tolist() == df["period"].tolist()  # a blank continues the period
    assert df.loc[df.patient == "B", "cotherapy"].eq("etanercept").all()
    assert df.loc[(df.patient == "A") & (df.week == 9), "event"].item() == "resumed adalimumab"


def test_periods_derived_from_old_files(cohort_files):
    # old format: `treatment` holds events ("UC-MSC infusion", "biologic restart"), no period column
    df = read_clinical(cohort_files["clinical"])
    p2 = df[df.patient == "P2"].set_index("week")["period"]
    assert p2.loc[[0, 1, 2, 4]].eq("MSC").all()
    assert p2.loc[[9, 24]].eq("biologic resumed").all()  # the restart visit and every later one
    assert df.loc[df.patient != "P2", "period"].eq("MSC").all()
    assert df.loc[(df.patient == "P1") & (df.week == 0), "event"].item() == "UC-MSC infusion"
    assert (df["cotherapy"] == "").all()


def test_example_clinical_file_reads_with_periods():
    from conftest import EXAMPLE
    from immuneprofile.study.clinical import PERIODS

    df = read_clinical(EXAMPLE / "clinical.csv")
    assert set(df["period"]) <= set(PERIODS)
    assert (df.loc[df.week == 0, "period"] == "MSC").all()  # every patient starts in the MSC window


def test_sample_sheet_keeps_role(tmp_path):
    f = _write(tmp_path, "file,sample_id,patient,week,panel,role\na.fcs,a,P1,0,treg,patient\n"
                         "r.fcs,r,REF,0,treg,reference\n", name="s.csv")
    assert read_sample_sheet(f)["role"].tolist() == ["patient", "reference"]
