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
