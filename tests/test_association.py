"""Tests for immuneprofile.association (rmcorr, Spearman on changes, LMM, pipeline)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import statsmodels.formula.api as smf
from statsmodels.stats.anova import anova_lm

from cohort import make_cohort as _make_cohort
from immuneprofile.study.association import (
    METHODS,
    associate,
    correlate,
    mixed_model,
    rmcorr,
    spearman_changes,
)
from immuneprofile.study.clinical import ClinicalDataError, join_clinical, subset_changes

OFFSET = {"P1": 0.0, "P2": 3.0, "P3": -1.5}  # between-patient differences
POPS = {"Treg": -0.15, "CLA+ memory": -0.10, "ncMono": -0.08, "Null": 0.0}


def make_cohort(seed: int = 0, noise: float = 0.3):
    """3 patients x 6 visits; subsets rise as PASI falls, plus a null subset."""
    return _make_cohort(seed, pops=[(p, s, 8.0) for p, s in POPS.items()], noise=noise, offsets=OFFSET,
                        pasi_noise=0.5)


def synthetic_rm(seed: int, n_subj: int = 5, n_obs: int = 6, slope: float = -0.4,
                 noise: float = 0.5) -> pd.DataFrame:
    """Subjects with different intercepts/x ranges and a common within-subject slope."""
    rng = np.random.default_rng(seed)
    rows = []
    for s in range(n_subj):
        x = rng.uniform(0, 30, n_obs) + 5 * s
        y = 10 * s - 2 + slope * x + rng.normal(0, noise, n_obs)
        rows += [{"subject": f"S{s}", "x": xi, "y": yi} for xi, yi in zip(x, y)]
    return pd.DataFrame(rows)


def ancova_rmcorr(df: pd.DataFrame) -> tuple[float, float, int]:
    """Independent rmcorr from the ANCOVA definition via statsmodels OLS."""
    fit = smf.ols("y ~ C(subject) + x", data=df).fit()
    aov = anova_lm(fit, typ=2)
    ss_x, ss_res = aov.loc["x", "sum_sq"], aov.loc["Residual", "sum_sq"]
    r = np.sign(fit.params["x"]) * np.sqrt(ss_x / (ss_x + ss_res))
    return float(r), float(fit.pvalues["x"]), int(fit.df_resid)


# --------------------------------------------------------------------------- rmcorr


@pytest.mark.parametrize("seed,slope,noise", [(0, -0.4, 0.5), (1, 0.3, 2.0), (2, -0.05, 3.0)])
def test_rmcorr_matches_ancova_ols(seed, slope, noise):
    df = synthetic_rm(seed, slope=slope, noise=noise)
    res = rmcorr(df, "x", "y", "subject")
    r_ols, p_ols, dof_ols = ancova_rmcorr(df)
    assert res["r"] == pytest.approx(r_ols, abs=1e-10)
    assert res["p_value"] == pytest.approx(p_ols, rel=1e-6)
    assert res["dof"] == dof_ols == len(df) - df["subject"].nunique() - 1
    # the within-subject slope equals the ANCOVA beta for x
    assert res["slope"] == pytest.approx(smf.ols("y ~ C(subject) + x", data=df).fit().params["x"])


@pytest.mark.parametrize("seed", [0, 3])
def test_rmcorr_matches_pingouin(seed):
    import pingouin as pg
    df = synthetic_rm(seed, noise=1.5)
    res = rmcorr(df, "x", "y", "subject")
    ref = pg.rm_corr(data=df, x="x", y="y", subject="subject")
    assert res["r"] == pytest.approx(ref["r"].iloc[0], abs=1e-10)
    assert res["dof"] == ref["dof"].iloc[0]
    assert res["p_value"] == pytest.approx(ref["pval"].iloc[0], rel=1e-6)
    lo, hi = ref["CI95"].iloc[0]  # pingouin rounds the CI to 2 decimals
    assert res["ci_low"] == pytest.approx(lo, abs=0.006)
    assert res["ci_high"] == pytest.approx(hi, abs=0.006)


def test_rmcorr_recovers_within_subject_sign_despite_between_subject_trend():
    # Between subjects, y rises with x (positive pooled correlation); within, y falls.
    df = synthetic_rm(5, n_subj=4, slope=-0.5, noise=0.3)
    assert np.corrcoef(df["x"], df["y"])[0, 1] > 0
    res = rmcorr(df, "x", "y", "subject")
    assert res["r"] < -0.9 and res["p_value"] < 1e-6
    assert res["ci_low"] < res["r"] < res["ci_high"] < 0


def test_rmcorr_degenerate_cases():
    df = pd.DataFrame({"subject": ["a", "a", "b", "b"], "x": [1, 1, 2, 2], "y": [1, 2, 3, 4]})
    res = rmcorr(df, "x", "y", "subject")  # no within-subject variation in x
    assert np.isnan(res["r"]) and np.isnan(res["p_value"])
    single = pd.DataFrame({"subject": ["a", "b"], "x": [1.0, 2.0], "y": [1.0, 2.0]})
    assert np.isnan(rmcorr(single, "x", "y", "subject")["r"])
    # a single-observation subject does not change r or dof
    df = synthetic_rm(7, n_subj=3)
    extra = pd.concat([df, pd.DataFrame({"subject": ["Z"], "x": [100.0], "y": [-50.0]})])
    a, b = rmcorr(df, "x", "y", "subject"), rmcorr(extra, "x", "y", "subject")
    assert a["r"] == pytest.approx(b["r"]) and a["dof"] == b["dof"]


# --------------------------------------------------------------------------- cohort helpers


@pytest.fixture(scope="module")
def changes():
    clin, sheet, pops = make_cohort()
    return subset_changes(join_clinical(pops, sheet, clin))


def test_spearman_changes_excludes_baseline(changes):
    sub = changes[changes.population == "Treg"]
    res = spearman_changes(sub)
    assert res["n_observations"] == 15  # 3 patients x 5 post-baseline visits
    assert res["n_subjects"] == 3
    assert res["rho"] < -0.8
    assert res["ci_low"] < res["rho"] < res["ci_high"]


def test_mixed_model_recovers_slope(changes):
    sub = changes[changes.population == "Treg"]
    res = mixed_model(sub)
    assert res["coef"] == pytest.approx(-0.15, abs=0.03)
    assert res["ci_low"] < res["coef"] < res["ci_high"] < 0
    assert res["n_subjects"] == 3 and res["n_observations"] == 18
    assert isinstance(res["fit_warnings"], str)


def test_mixed_model_does_not_crash_on_degenerate_data():
    df = pd.DataFrame({"patient": list("aabbcc"), "pasi": [1.0] * 6,
                       "pct_parent": [1, 2, 3, 4, 5, 6]})
    res = mixed_model(df)
    assert np.isnan(res["coef"]) and "constant" in res["fit_warnings"]
    # perfectly collinear with groups: fit may warn or fail, never raise
    df = pd.DataFrame({"patient": list("aabbcc"), "pasi": [1, 1, 2, 2, 3, 3.0],
                       "pct_parent": [1, 1.1, 2, 2.1, 3, 3.1]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing may escape the function
        res = mixed_model(df)
    assert set(res) >= {"coef", "converged", "fit_warnings"}


# --------------------------------------------------------------------------- associate


def test_associate_table_and_signs(changes):
    with pytest.warns(UserWarning, match="too small for inference"):
        tab = associate(changes)
    assert len(tab) == len(POPS) * len(METHODS)
    for col in ("population", "method", "coef", "std_coef", "ci_low", "ci_high", "p_value",
                "q_value", "dof", "n_patients", "n_observations", "fit_warnings", "warning"):
        assert col in tab.columns
    assert (tab["n_patients"] == 3).all()
    assert tab["warning"].str.contains("too small for inference").all()
    rm = tab[tab.method == "rmcorr"].set_index("population")
    assert (rm["n_observations"] == 18).all() and (rm["dof"] == 14).all()
    # subsets rise as PASI falls -> negative association for every method
    for pop in ("Treg", "CLA+ memory", "ncMono"):
        sub = tab[tab.population == pop]
        assert (sub["coef"] < 0).all(), pop
    assert rm.loc["Treg", "p_value"] < 0.001
    assert abs(rm.loc["Null", "coef"]) < rm.loc["Treg", "coef"] * -1
    sp = tab[tab.method == "spearman_delta"]
    assert (sp["n_observations"] == 15).all()
    assert sp["warning"].str.contains("not independent").all()
    assert tab["q_value"].ge(tab["p_value"] - 1e-15).all()


def test_associate_accepts_joined_table_and_population_filter():
    clin, sheet, pops = make_cohort(seed=3)
    joined = join_clinical(pops, sheet, clin)
    with pytest.warns(UserWarning):
        tab = associate(joined, populations=["Treg"], methods=["rmcorr"], min_patients=10)
    assert tab["population"].tolist() == ["Treg"] and tab["method"].tolist() == ["rmcorr"]
    with pytest.raises(ValueError, match="unknown method"):
        associate(joined, methods=["pearson"])


def test_associate_no_warning_for_large_cohort(changes):
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        tab = associate(changes, methods=["rmcorr"], min_patients=3)
    assert (tab["warning"] == "").all()


# --------------------------------------------------------------------------- correlate


def test_correlate_writes_outputs(tmp_path: Path):
    clin, sheet, pops = make_cohort(seed=4)
    clin_f, sheet_f, pops_f = tmp_path / "c.csv", tmp_path / "s.csv", tmp_path / "p.parquet"
    clin.to_csv(clin_f, index=False)
    sheet.to_csv(sheet_f, index=False)
    pops.to_parquet(pops_f)
    out = tmp_path / "out"
    with pytest.warns(UserWarning, match="too small"):
        res = correlate(pops_f, clin_f, sheet_f, out)
    for name in ("associations.csv", "changes.csv", "pasi_response.csv",
                 "pasi_trajectories.png", "subset_trajectories.png",
                 "association_heatmap.png"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
        assert res["files"][name] == out / name
    assoc = pd.read_csv(out / "associations.csv")
    assert len(assoc) == len(POPS) * len(METHODS)
    assert set(res) >= {"joined", "changes", "pasi_response", "associations", "files"}
    assert len(pd.read_csv(out / "pasi_response.csv")) == 18


def test_correlate_dataframe_input_no_plots_and_errors(tmp_path: Path):
    clin, sheet, pops = make_cohort(seed=5)
    with pytest.warns(UserWarning):
        res = correlate(pops, clin, sheet, tmp_path / "o", plots=False,
                        populations_subset=["Treg", "Null"])
    assert not (tmp_path / "o" / "pasi_trajectories.png").exists()
    assert set(res["associations"]["population"]) == {"Treg", "Null"}
    with pytest.raises(ClinicalDataError, match="P3"):
        correlate(pops, clin[clin.patient != "P3"], sheet, tmp_path / "o2", plots=False)


# --------------------------------------------------------------------------- declared readouts: permutations


def _exact_permutation_p(x, y, groups):
    """Every within-group permutation of x enumerated (the independent truth for the Monte Carlo p-value)."""
    import itertools

    df = pd.DataFrame({"g": groups, "x": x, "y": y})
    yc = (df["y"] - df.groupby("g")["y"].transform("mean")).to_numpy()
    xc = (df["x"] - df.groupby("g")["x"].transform("mean")).to_numpy()
    idx = [np.flatnonzero(df["g"].to_numpy() == g) for g in pd.unique(df["g"])]
    observed, hits, total = abs(xc @ yc), 0, 0
    for combo in itertools.product(*[itertools.permutations(i) for i in idx]):
        order = np.empty(len(x), dtype=int)
        for i, perm in zip(idx, combo):
            order[i] = perm
        hits += abs(xc[order] @ yc) >= observed - 1e-12
        total += 1
    return hits / total


def test_permutation_pvalue_matches_exact_enumeration():
    from immuneprofile.study.association import permutation_pvalues

    rng = np.random.default_rng(1)
    groups = np.repeat(["a", "b", "c"], 4)  # 24^3 = 13,824 within-patient permutations
    x = rng.uniform(0, 30, 12)
    for slope in (0.0, -0.1):
        y = np.repeat([5.0, 9.0, 2.0], 4) + slope * x + rng.normal(0, 0.5, 12)
        exact = _exact_permutation_p(x, y, groups)
        mc = permutation_pvalues(x, y, groups, n_perm=20000, rng=2)[0]
        assert mc == pytest.approx(exact, abs=0.01)


def test_permutations_stay_within_patient():
    from immuneprofile.study.association import within_patient_permutations

    groups = np.array(list("aaabbbbcc"))
    perm = within_patient_permutations(groups, 500, np.random.default_rng(0))
    assert (groups[perm] == groups).all()
    assert all(sorted(row) == list(range(9)) for row in perm[:20])
    assert len({tuple(r) for r in perm}) > 100  # really shuffled


def _readout_changes(n_patients=3, seed=0, effect=-0.15):
    """A described readout table: 'eff' follows PASI within patients, 'conf' differs only between patients."""
    from immuneprofile.study.readouts import describe_changes

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_patients):
        base = 10 + 12 * i
        for w, frac in zip((0, 1, 2, 4, 9), (1.0, 0.9, 0.7, 0.5, 0.35)):
            pasi = base * frac
            for name, pct in (("eff", 8 + effect * (pasi - base)), ("conf", 0.6 * base)):
                pct = pct * np.exp(rng.normal(0, 0.03))
                rows.append({"patient": f"P{i}", "week": float(w), "pasi": pasi, "readout": name,
                             "period": "MSC" if w < 9 or i else "biologic resumed",
                             "cotherapy": "etanercept" if i == 0 else "", "pct": pct,
                             "count": round(pct * 50), "of_count": 5000})
    return describe_changes(pd.DataFrame(rows))


def test_associate_readouts_msc_window_permutation_bh_and_no_lmm_for_three():
    from statsmodels.stats.multitest import multipletests

    from immuneprofile.study.association import associate_readouts

    ch = _readout_changes()
    tab = associate_readouts(ch, n_perm=1999).set_index("readout")
    assert tab.loc["eff", "n_observations"] == 14  # P0's W9 visit is on a resumed biologic: left out
    assert tab.loc["eff", "r"] < -0.9 and tab.loc["eff", "p_perm"] <= 0.002
    assert tab.loc["eff", "called"] and not tab.loc["conf", "called"]
    # 'conf' tracks baseline PASI between patients (pooled r > 0.5), but not within them
    assert np.corrcoef(ch.loc[ch.readout == "conf", "pasi"], ch.loc[ch.readout == "conf", "pct"])[0, 1] > 0.5
    assert tab.loc["conf", "p_perm"] > 0.05
    q = multipletests(tab["p_perm"], method="fdr_bh")[1]
    assert tab["q_value"].to_numpy() == pytest.approx(q)
    assert tab["lmm_note"].str.contains("not fitted: 3 patients").all() and tab["lmm_coef"].isna().all()
    assert np.isfinite(tab.loc["eff", "r_without_cotherapy"]) and tab.loc["eff", "cotherapy_patients"] == "P0"
    assert tab.loc["eff", "direction"] == "up"
    all_visits = associate_readouts(ch, period=None, n_perm=99).set_index("readout")
    assert all_visits.loc["eff", "n_observations"] == 15


def test_associate_readouts_fits_mixed_model_with_enough_patients_and_reports_convergence():
    from immuneprofile.study.association import MIN_PATIENTS_FOR_LMM, associate_readouts

    tab = associate_readouts(_readout_changes(n_patients=MIN_PATIENTS_FOR_LMM, seed=3), n_perm=99)
    eff = tab.set_index("readout").loc["eff"]
    assert eff["lmm_coef"] == pytest.approx(-0.15, abs=0.03)
    assert isinstance(eff["lmm_converged"], (bool, np.bool_))


def test_associate_readouts_keeps_low_counts_out():
    from immuneprofile.study.association import associate_readouts

    ch = _readout_changes()
    ch.loc[(ch.readout == "eff") & (ch.week == 2), "low_count"] = True
    eff = associate_readouts(ch, n_perm=99).set_index("readout").loc["eff"]
    assert eff["n_observations"] == 11 and eff["n_low_count"] == 3
    assert "kept out" in eff["note"]


def test_correlate_with_readouts_writes_description_claims_and_plots(tmp_path: Path):
    clin, sheet, pops = make_cohort(seed=4)
    ro = pd.DataFrame({"sample_id": pops["sample_id"], "readout": pops["population"], "population": pops["population"],
                       "of": "Live", "count": (pops["pct_parent"] * 30).round().astype(int), "of_count": 3000})
    ro["pct"] = 100 * ro["count"] / ro["of_count"]
    ref = ro[ro.sample_id.str.endswith("W00")].assign(sample_id=lambda d: "REF_" + d["sample_id"])
    ref["count"] = ref["count"].to_numpy() + np.resize([1, -2, 3, 0, -1, 2], len(ref))
    ref["pct"] = 100 * ref["count"] / ref["of_count"]
    sheet_ref = pd.DataFrame({"sample_id": ref["sample_id"].unique(), "patient": "REF", "week": [0, 1, 2]})
    sheet = pd.concat([sheet.assign(role="patient"), sheet_ref.assign(role="reference")], ignore_index=True)
    out = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        res = correlate(pops, clin, sheet, out, readouts=pd.concat([ro, ref]), n_perm=199)
    for name in ("readout_changes.csv", "readout_associations.csv", "assay_cv.csv", "claims.csv",
                 "patient_panels.png", "fold_changes.png"):
        assert (out / name).is_file() and res["files"][name] == out / name
    cv = res["assay_cv"].set_index("readout")
    assert (cv["cv_source"] == "reference sample").all() and (cv["n_reference"] == 3).all()
    claims = pd.read_csv(out / "claims.csv")
    assert {"claim", "readout", "observed", "reproduced"} <= set(claims.columns)
    assoc = res["readout_associations"].set_index("readout")
    assert assoc.loc["Treg", "r"] < 0 and set(assoc.index) == set(POPS)


# --------------------------------------------------------------------------- the claim table and the main command


def _paper_course() -> pd.DataFrame:
    """The abstract's clinical course written as a clinical table (PASI values beyond the stated facts invented)."""
    rows = []
    courses = {
        "P1": [(0, 20.0, "MSC", "infusion 1"), (1, 8.0, "MSC", "infusion 2"), (4, 2.4, "MSC", ""),
               (9, 1.0, "MSC", ""), (52, 0.5, "MSC", ""), (104, 1.2, "MSC", "")],
        "P2": [(0, 15.0, "MSC", "infusion 1"), (1, 12.0, "MSC", "infusion 2"), (4, 9.0, "MSC", ""),
               (9, 12.0, "biologic resumed", "resumed adalimumab"), (52, 1.0, "biologic resumed", ""),
               (104, 0.0, "biologic resumed", "")],
        "P3": [(0, 18.0, "MSC", "infusion 1"), (1, 16.0, "MSC", "infusion 2"), (4, 14.0, "MSC", ""),
               (9, 15.0, "biologic resumed", "resumed ustekinumab"),
               (24, 14.0, "new biologic", "switched to secukinumab")],
    }
    for p, visits in courses.items():
        rows += [{"patient": p, "week": w, "pasi": v, "treatment": t, "event": e,
                  "cotherapy": "etanercept" if p == "P2" else ""} for w, v, t, e in visits]
    return pd.DataFrame(rows)


def test_claims_reproduce_the_abstract_course_and_fail_the_old_one(tmp_path):
    from immuneprofile.study.claims import case_series_claims
    from immuneprofile.study.clinical import validate_clinical

    patients = pd.DataFrame({"patient": ["P1", "P2", "P3"], "sex": ["F"] * 3, "age": [45, 52, 38],
                             "dose1_cells_per_kg": [1.96e6, 2.5e6, 3.0e6], "dose2_cells_per_kg": [2.0e6, 2.5e6, 2.9e6],
                             "cotherapy": ["", "etanercept", ""]})
    good = case_series_claims(validate_clinical(_paper_course()), patients=patients)
    clinical_rows = good[good.source == "abstract"]
    assert len(clinical_rows) == 8 and clinical_rows["reproduced"].eq(True).all(), clinical_rows
    assert good[good.source != "abstract"]["reproduced"].isna().all()  # no readouts given: not judged
    # the old example course quoted in issue 13 (old format: events in `treatment`): nobody past 57 % at W4,
    # nobody relapses at W9, P3's W24 event is a restart (not a switch), no etanercept, no follow-up past W24
    old_course = pd.DataFrame({
        "patient": ["P1"] * 6 + ["P3"] * 6, "week": [0, 1, 2, 4, 9, 24] * 2,
        "pasi": [24.6, 22.8, 17.9, 10.6, 4.2, 1.8, 28.4, 27.1, 23.0, 17.2, 13.9, 22.5],
        "treatment": ["UC-MSC infusion", "UC-MSC infusion", "", "", "", "",
                      "UC-MSC infusion", "UC-MSC infusion", "", "", "", "biologic restart"]})
    by = case_series_claims(validate_clinical(old_course)).set_index("claim")["reproduced"]
    assert by["Two IV UC-MSC infusions one week apart"] is True
    for claim in ("Best responder reached PASI 87 (>= 87 % reduction) by W4",
                  "On relapse two resumed their last failed biologic at W9", "One switched to a new biologic at W24",
                  "One patient alongside etanercept, two on MSCs alone",
                  "Two then held an absolute PASI of 0-2 for over two years"):
        assert by[claim] is False, claim
    assert by["Three adult women"] is None  # sex not recorded without a patient table


def test_main_command_writes_patient_panels_with_periods_and_claims(tmp_path):
    import shutil

    from click.testing import CliRunner

    from conftest import EXAMPLE
    from immuneprofile.cli import main

    sheet = pd.read_csv(EXAMPLE / "samples.csv")
    sub = sheet[sheet["panel"].eq("treg")]
    for f in sub["file"]:
        shutil.copy(EXAMPLE / f, tmp_path / f)
    sub.to_csv(tmp_path / "samples.csv", index=False)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["study", str(tmp_path / "samples.csv"), "--clinical", str(EXAMPLE / "clinical.csv"),
                                  "-o", str(out)])
    assert r.exit_code == 0, r.output
    for name in ("patient_panels.png", "fold_changes.png", "claims.csv", "readout_changes.csv",
                 "readout_associations.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    claims = pd.read_csv(out / "claims.csv")
    assert claims["claim"].str.contains("PASI 87").any()
    changes = pd.read_csv(out / "readout_changes.csv")
    assert {"period", "log2fc", "beyond_assay", "se_pct", "low_count"} <= set(changes.columns)
    treg = changes[changes.readout == "Treg"]
    patients = sub[sub["role"].ne("reference")] if "role" in sub.columns else sub  # REF rows give the assay CV
    assert (treg["of"] == "CD4+").all() and len(treg) == len(patients)


def test_study_measures_assay_cv_on_the_reference_sample(tmp_path):
    """A reference sample (role `reference`) stained at every visit: its readouts give the assay CV."""
    import shutil

    from conftest import EXAMPLE
    from immuneprofile.study.run import run_study

    sheet = pd.read_csv(EXAMPLE / "samples.csv")
    sub = sheet[sheet["panel"].eq("treg")]
    n_ref = int(sub["role"].eq("reference").sum())
    assert n_ref >= 3  # the example study stains its reference sample in every batch
    for f in sub["file"]:
        shutil.copy(EXAMPLE / f, tmp_path / f)
    sub.to_csv(tmp_path / "samples.csv", index=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        res = run_study(tmp_path / "samples.csv", tmp_path / "out", clinical=EXAMPLE / "clinical.csv")
    corr = res["correlation"]
    cv = corr["assay_cv"].set_index("readout")
    # the reference never enters the patients' tables or the association
    assert "REF" not in set(corr["joined"]["patient"]) and "REF" not in set(corr["readout_changes"]["patient"])
    assert cv.loc["Treg", "cv_source"] == "reference sample" and cv.loc["Treg", "n_reference"] == n_ref
    table = res["table"]
    vals = table[(table.population == "Treg") & table.sample_id.str.startswith("REF")]
    of = table[(table.population == "CD4+") & table.sample_id.str.startswith("REF")]
    pct = 100 * vals["count"].to_numpy() / of["count"].to_numpy()
    assert cv.loc["Treg", "assay_cv"] == pytest.approx(pct.std(ddof=1) / pct.mean())


def test_cli_correlate_with_readouts_and_period(tmp_path: Path):
    from click.testing import CliRunner

    from immuneprofile.cli import main

    clin, sheet, pops = make_cohort(seed=6)
    ro = pd.DataFrame({"sample_id": pops["sample_id"], "readout": pops["population"], "population": pops["population"],
                       "of": "Live", "count": (pops["pct_parent"] * 30).round().astype(int), "of_count": 3000})
    ro["pct"] = 100 * ro["count"] / ro["of_count"]
    for name, df in (("c.csv", clin), ("s.csv", sheet), ("p.csv", pops), ("r.csv", ro)):
        df.to_csv(tmp_path / name, index=False)
    args = ["correlate", "--populations", str(tmp_path / "p.csv"), "--clinical", str(tmp_path / "c.csv"),
            "--samples", str(tmp_path / "s.csv"), "--readouts", str(tmp_path / "r.csv"), "--permutations", "199"]
    r = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "msc")])
    assert r.exit_code == 0, r.output
    msc = pd.read_csv(tmp_path / "msc" / "readout_associations.csv").set_index("readout")
    assert (msc["period"] == "MSC").all() and (msc["n_observations"] == 16).all()  # P2's W9/W24 on a biologic
    r = CliRunner().invoke(main, [*args, "--period", "all", "-o", str(tmp_path / "all")])
    assert r.exit_code == 0, r.output
    every = pd.read_csv(tmp_path / "all" / "readout_associations.csv").set_index("readout")
    assert (every["n_observations"] == 18).all()
    r = CliRunner().invoke(main, [*args[:-4], "--readouts", str(tmp_path / "c.csv"), "-o", str(tmp_path / "bad")])
    assert r.exit_code != 0 and "c.csv" in r.output and "missing column" in r.output
