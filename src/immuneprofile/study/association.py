"""Association between immune subsets and clinical response (PASI).

Three complementary analyses are run for every population:

``spearman_delta``
    Spearman rank correlation between the subset's change from baseline
    (``delta_pct_parent``, percentage points) and the PASI change from baseline
    (``delta_pasi``), pooling all post-baseline visits of all patients.
    Baseline visits are excluded (both deltas are 0 by construction).  The
    observations are *not* independent (repeated visits per patient); the
    p-value permutes the PASI changes among each patient's visits.
``rmcorr``
    Repeated-measures correlation (Bakdash & Marusich 2017, Front Psychol
    8:456) between ``pct_parent`` and ``pasi``: the common within-patient
    linear association, obtained from the ANCOVA ``y ~ C(patient) + x``.
    Equivalent to a Pearson correlation of patient-mean-centred values with
    ``dof = N - k - 1`` (N observations, k patients).  The 95 % CI uses the
    Fisher z transform with ``se = 1 / sqrt(dof - 1)`` (as the R ``rmcorr``
    package and ``pingouin.rm_corr``).  In :func:`associate` its p-value is a
    within-patient permutation p-value (:func:`permutation_pvalues`).
``lmm``
    Linear mixed model ``pct_parent ~ pasi + (1 | patient)`` fitted by REML
    with :class:`statsmodels.regression.mixed_linear_model.MixedLM`; the fixed
    slope (percentage points per PASI point), Wald 95 % CI and p-value are
    reported.  Convergence / boundary warnings are caught and reported in the
    ``fit_warnings`` column; below :data:`MIN_PATIENTS_FOR_LMM` patients the
    row says it is an effect size only.

Declared readouts (:func:`associate_readouts`, the analysis ``correlate``
leads with) are described first (:mod:`immuneprofile.study.readouts`) and
associated in one treatment period with permutation p-values and
Benjamini-Hochberg FDR over the declared readouts only.

All coefficients have a common, unit-free companion ``std_coef`` (rho, r, and
the LMM slope standardised by ``sd(pasi) / sd(pct_parent)``) used for the
heatmap.  With fewer than :data:`MIN_PATIENTS_FOR_INFERENCE` patients (the
published series has 3) a :class:`UserWarning` is emitted and every row's
``warning`` column says that the results are exploratory.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats as sps

from immuneprofile.study.clinical import (
    DEFAULT_PSEUDOCOUNT,
    PathLike,
    _as_clinical,
    _feature_keys,
    join_clinical,
    pasi_response,
    read_populations,
    select_populations,
    subset_changes,
)
from immuneprofile.study.readouts import MIN_COUNT, MIN_OF_COUNT, read_readouts

__all__ = [
    "MIN_PATIENTS_FOR_INFERENCE",
    "METHODS",
    "rmcorr",
    "spearman_changes",
    "mixed_model",
    "associate",
    "associate_readouts",
    "correlate",
    "MIN_PATIENTS_FOR_LMM",
    "N_PERMUTATIONS",
    "permutation_pvalues",
    "within_patient_permutations",
]

#: Below this many patients, inference is flagged as unreliable.
MIN_PATIENTS_FOR_INFERENCE: int = 10

#: Methods run by :func:`associate`, in output order.
METHODS: tuple[str, ...] = ("spearman_delta", "rmcorr", "lmm")

#: Mixed models are fitted only with at least this many patients; with fewer the
#: between-patient (random-intercept) variance rests on too few patients to trust.
MIN_PATIENTS_FOR_LMM: int = 6

#: Default number of within-patient permutations behind every p-value.
N_PERMUTATIONS: int = 9999

READOUT_RESULT_COLUMNS = [
    "readout", "period", "n_patients", "n_observations", "n_low_count", "r", "ci_low", "ci_high", "slope",
    "p_perm", "q_value", "called", "permutations", "r_without_cotherapy", "cotherapy_patients",
    "median_log2fc_last", "n_patients_beyond_assay", "direction", "lmm_coef", "lmm_ci_low", "lmm_ci_high",
    "lmm_converged", "lmm_note", "note",
]


RESULT_COLUMNS = [
    "method", "x", "y", "coef", "std_coef", "ci_low", "ci_high", "p_value", "q_value",
    "statistic", "dof", "n_patients", "n_observations", "converged", "fit_warnings", "warning",
]


def _fisher_ci(r: float, se: float, confidence: float) -> tuple[float, float]:
    """Confidence interval of a correlation by Fisher's z transform with standard error ``se``."""
    crit = sps.norm.ppf(0.5 + confidence / 2.0)
    z = np.arctanh(np.clip(r, -1 + 1e-15, 1 - 1e-15))
    return float(np.tanh(z - crit * se)), float(np.tanh(z + crit * se))


def _nan_result(**extra: Any) -> dict[str, Any]:
    res = {
        "coef": np.nan, "std_coef": np.nan, "ci_low": np.nan, "ci_high": np.nan,
        "p_value": np.nan, "statistic": np.nan, "dof": np.nan,
        "n_patients": 0, "n_observations": 0, "converged": pd.NA, "fit_warnings": "",
    }
    res.update(extra)
    return res


# --------------------------------------------------------------------------- rmcorr


def rmcorr(
    data: pd.DataFrame,
    x: str,
    y: str,
    subject: str,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Repeated-measures correlation (Bakdash & Marusich 2017).

    Parameters
    ----------
    data
        Long table, one row per observation.
    x, y
        Numeric columns.
    subject
        Subject identifier column.
    confidence
        Confidence level of the interval.

    Returns
    -------
    dict
        ``r`` (signed, within-subject correlation), ``dof`` (N - k - 1),
        ``p_value`` (two-sided t test with ``dof``), ``ci_low``, ``ci_high``
        (Fisher z, ``se = 1/sqrt(dof - 1)``), ``slope`` (common within-subject
        slope of y on x), ``statistic`` (t), ``n_subjects`` (subjects with at
        least 2 observations) and ``n_observations``.  Values are NaN when
        undefined (no within-subject variation, ``dof < 1``).

    Notes
    -----
    With subject-mean-centred values ``xc``, ``yc`` the ANCOVA
    ``y ~ C(subject) + x`` gives ``SS_x = (sum xc*yc)^2 / sum xc^2`` and
    ``SS_resid = sum yc^2 - SS_x``, so ``r = sign(beta) * sqrt(SS_x / (SS_x +
    SS_resid))`` reduces to the Pearson correlation of ``xc`` and ``yc``.
    Subjects with a single observation contribute nothing (they add one
    observation and one subject parameter).
    """
    xv = pd.to_numeric(data[x], errors="coerce").to_numpy(float)
    yv = pd.to_numeric(data[y], errors="coerce").to_numpy(float)
    ok = data[subject].notna().to_numpy()
    return _rmcorr_arrays(xv[ok], yv[ok], data[subject].to_numpy()[ok], confidence)


def _rmcorr_arrays(xv: np.ndarray, yv: np.ndarray, subjects: np.ndarray, confidence: float = 0.95) -> dict[str, Any]:
    """:func:`rmcorr` on arrays (x, y, subject labels); non-finite pairs are dropped."""
    ok = np.isfinite(xv) & np.isfinite(yv)
    codes = pd.factorize(subjects[ok])[0]
    xv, yv = xv[ok], yv[ok]
    keep = np.bincount(codes)[codes] >= 2 if codes.size else np.zeros(0, bool)
    codes, xv, yv = pd.factorize(codes[keep])[0], xv[keep], yv[keep]
    n = int(xv.size)
    k = int(codes.max() + 1) if n else 0
    dof = n - k - 1
    out: dict[str, Any] = {
        "r": np.nan, "dof": dof if dof >= 0 else np.nan, "p_value": np.nan,
        "ci_low": np.nan, "ci_high": np.nan, "slope": np.nan, "statistic": np.nan,
        "n_subjects": k, "n_observations": n,
    }
    if k == 0 or dof < 1:
        return out
    sizes = np.bincount(codes)
    xc = xv - (np.bincount(codes, weights=xv) / sizes)[codes]
    yc = yv - (np.bincount(codes, weights=yv) / sizes)[codes]
    sxx, syy, sxy = float(xc @ xc), float(yc @ yc), float(xc @ yc)
    scale = max(float(np.abs(xv).max()), float(np.abs(yv).max()), 1.0)
    if sxx <= 1e-24 * scale**2 * n or syy <= 1e-24 * scale**2 * n:
        return out
    r = float(np.clip(sxy / np.sqrt(sxx * syy), -1.0, 1.0))
    out["r"] = r
    out["slope"] = sxy / sxx
    if abs(r) < 1:
        t = r * np.sqrt(dof / (1.0 - r * r))
        out["statistic"] = float(t)
        out["p_value"] = float(2 * sps.t.sf(abs(t), dof))
    else:
        out["statistic"] = float(np.sign(r) * np.inf)
        out["p_value"] = 0.0
    if dof > 1:
        out["ci_low"], out["ci_high"] = _fisher_ci(r, 1.0 / np.sqrt(dof - 1), confidence)
    return out


# --------------------------------------------------------------------------- spearman


def spearman_changes(
    data: pd.DataFrame,
    x: str = "delta_pasi",
    y: str = "delta_pct_parent",
    subject: str = "patient",
    exclude_baseline: bool = True,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Spearman correlation of changes from baseline, pooled across subjects.

    Parameters
    ----------
    data
        Output of :func:`immuneprofile.clinical.subset_changes` restricted to
        one population.
    x, y
        Columns to correlate (default PASI change vs subset change).
    subject
        Subject column (only used to count subjects).
    exclude_baseline
        Drop week-0 rows (``is_baseline``), whose deltas are 0 by definition.
    confidence
        Confidence level of the interval.

    Returns
    -------
    dict
        ``rho``, ``p_value``, ``ci_low``, ``ci_high`` (Fisher z with the
        Fieller-Hartley-Pearson variance ``1.06 / (n - 3)``), ``n_subjects``,
        ``n_observations``.
    """
    d = data
    if exclude_baseline:
        if "is_baseline" in d.columns:
            d = d[~d["is_baseline"].astype(bool)]
        elif "week" in d.columns:
            d = d[d["week"] != 0]
    d = d[[subject, x, y]].copy()
    d[x] = pd.to_numeric(d[x], errors="coerce")
    d[y] = pd.to_numeric(d[y], errors="coerce")
    d = d.dropna()
    n = len(d)
    out: dict[str, Any] = {
        "rho": np.nan, "p_value": np.nan, "ci_low": np.nan, "ci_high": np.nan,
        "n_subjects": int(d[subject].nunique()), "n_observations": n,
    }
    if n < 3 or d[x].nunique() < 2 or d[y].nunique() < 2:
        return out
    res = sps.spearmanr(d[x].to_numpy(float), d[y].to_numpy(float))
    rho = float(res.statistic)
    out["rho"], out["p_value"] = rho, float(res.pvalue)
    if n > 3 and np.isfinite(rho):
        out["ci_low"], out["ci_high"] = _fisher_ci(rho, np.sqrt(1.06 / (n - 3)), confidence)
    return out


# --------------------------------------------------------------------------- mixed model


def mixed_model(
    data: pd.DataFrame,
    x: str = "pasi",
    y: str = "pct_parent",
    group: str = "patient",
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Random-intercept linear mixed model ``y ~ x + (1 | group)``.

    Fitted by REML with statsmodels ``MixedLM``.  Warnings raised during the
    fit (e.g. ``ConvergenceWarning``, random-effect variance on the boundary)
    are caught and returned as text; failures return NaNs instead of raising.

    Parameters
    ----------
    data
        Long table.
    x, y, group
        Predictor, response and grouping columns.
    confidence
        Confidence level of the Wald interval.

    Returns
    -------
    dict
        ``coef`` (fixed slope), ``std_coef`` (slope * sd(x) / sd(y)),
        ``ci_low``, ``ci_high``, ``p_value``, ``statistic`` (z), ``converged``
        (bool), ``fit_warnings`` (``"; "``-joined messages), ``group_var``
        (random-intercept variance), ``n_subjects``, ``n_observations``.
    """
    import statsmodels.api as sm

    d = data[[group, x, y]].copy()
    d[x] = pd.to_numeric(d[x], errors="coerce")
    d[y] = pd.to_numeric(d[y], errors="coerce")
    d = d.dropna()
    n, k = len(d), int(d[group].nunique())
    out: dict[str, Any] = {
        "coef": np.nan, "std_coef": np.nan, "ci_low": np.nan, "ci_high": np.nan,
        "p_value": np.nan, "statistic": np.nan, "converged": False, "fit_warnings": "",
        "group_var": np.nan, "n_subjects": k, "n_observations": n,
    }
    if n < 4 or k < 2:
        out["fit_warnings"] = f"not fitted: too few observations (n={n}) or groups (k={k})"
        return out
    if d[x].nunique() < 2 or d[y].nunique() < 2:
        out["fit_warnings"] = "not fitted: predictor or response is constant"
        return out

    exog = sm.add_constant(d[[x]].astype(float), has_constant="add")
    messages: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            model = sm.MixedLM(d[y].astype(float), exog, groups=d[group].astype(str).to_numpy())
            res = model.fit(reml=True)
        except Exception as exc:  # noqa: BLE001 - report, never crash the pipeline
            res = None
            messages.append(f"fit failed: {type(exc).__name__}: {exc}")
    for w in caught:
        msg = f"{w.category.__name__}: {str(w.message).strip()}"
        if msg not in messages:
            messages.append(msg)
    if res is None:
        out["fit_warnings"] = "; ".join(messages)
        return out

    alpha = 1.0 - confidence
    try:
        ci = res.conf_int(alpha=alpha)
        out["ci_low"], out["ci_high"] = float(ci.loc[x, 0]), float(ci.loc[x, 1])
    except Exception as exc:  # noqa: BLE001
        messages.append(f"CI unavailable: {exc}")
    out["coef"] = float(res.fe_params[x])
    out["p_value"] = float(res.pvalues.get(x, np.nan))
    out["statistic"] = float(res.tvalues.get(x, np.nan))
    out["converged"] = bool(getattr(res, "converged", False))
    with contextlib.suppress(Exception):
        out["group_var"] = float(np.asarray(res.cov_re)[0, 0])
    if np.isfinite(out["group_var"]) and out["group_var"] <= 1e-8 * max(res.scale, 1e-300):
        messages.append("random-intercept variance ~0 (boundary fit)")
    sx, sy = float(d[x].std(ddof=1)), float(d[y].std(ddof=1))
    if sy > 0:
        out["std_coef"] = out["coef"] * sx / sy
    out["fit_warnings"] = "; ".join(messages)
    return out


# --------------------------------------------------------------------------- associate


def _bh(p: pd.Series) -> pd.Series:
    """Benjamini-Hochberg q-values, NaN-aware."""
    q = pd.Series(np.nan, index=p.index, dtype=float)
    ok = p.notna()
    m = int(ok.sum())
    if m == 0:
        return q
    pv = p[ok].to_numpy(float)
    order = np.argsort(pv)
    ranked = pv[order] * m / np.arange(1, m + 1)
    ranked = np.minimum.accumulate(ranked[::-1])[::-1]
    vals = np.empty(m)
    vals[order] = np.minimum(ranked, 1.0)
    q[ok] = vals
    return q


def _permutation_p(sub: pd.DataFrame, x: str, y: str, n_perm: int, ranks: bool = False) -> float:
    """Within-patient permutation p-value of ``x`` vs ``y`` (rmcorr; pooled Spearman with ``ranks``)."""
    d = sub[["patient", x, y]].assign(**{c: pd.to_numeric(sub[c], errors="coerce") for c in (x, y)}).dropna()
    d = d[d["patient"].map(d["patient"].value_counts()) >= 2]
    if len(d) < 3:
        return np.nan
    xs, ys = d[x].to_numpy(float), d[y].to_numpy(float)
    if ranks:
        xs, ys = sps.rankdata(xs), sps.rankdata(ys)
    return float(permutation_pvalues(xs, ys, d["patient"].to_numpy(), n_perm, 0,
                                     centre="all" if ranks else "within")[0])


def _method_result(method: str, sub: pd.DataFrame, value: str, n_perm: int) -> tuple[dict[str, Any], list[str]]:
    """One population's result row and notes for one method of :func:`associate`."""
    notes: list[str] = []
    if method == "spearman_delta":
        r = spearman_changes(sub, x="delta_pasi", y=f"delta_{value}")
        p = _permutation_p(sub[~sub["is_baseline"]], "delta_pasi", f"delta_{value}", n_perm, ranks=True)
        res = _nan_result(
            x="delta_pasi", y=f"delta_{value}", coef=r["rho"], std_coef=r["rho"], ci_low=r["ci_low"],
            ci_high=r["ci_high"], p_value=p if np.isfinite(r["rho"]) else np.nan, statistic=r["rho"],
            dof=r["n_observations"] - 2, n_patients=r["n_subjects"], n_observations=r["n_observations"],
        )
        return res, ["pooled repeated measures: observations not independent"]
    if method == "rmcorr":
        r = rmcorr(sub, x="pasi", y=value, subject="patient")
        res = _nan_result(
            x="pasi", y=value, coef=r["r"], std_coef=r["r"], ci_low=r["ci_low"], ci_high=r["ci_high"],
            p_value=_permutation_p(sub, "pasi", value, n_perm) if np.isfinite(r["r"]) else np.nan,
            statistic=r["statistic"], dof=r["dof"], n_patients=r["n_subjects"], n_observations=r["n_observations"],
        )
        return res, notes
    r = mixed_model(sub, x="pasi", y=value, group="patient")
    res = _nan_result(
        x="pasi", y=value, coef=r["coef"], std_coef=r["std_coef"], ci_low=r["ci_low"], ci_high=r["ci_high"],
        p_value=r["p_value"], statistic=r["statistic"], dof=np.nan, n_patients=r["n_subjects"],
        n_observations=r["n_observations"], converged=r["converged"], fit_warnings=r["fit_warnings"],
    )
    if r["n_subjects"] < MIN_PATIENTS_FOR_LMM:
        notes.append(f"mixed model with {r['n_subjects']} patients (< {MIN_PATIENTS_FOR_LMM}): an effect "
                     "size only, its Wald p-value is not trustworthy")
    if r["fit_warnings"]:
        notes.append("model fit warnings (see fit_warnings)")
    if np.isfinite(r["coef"]) and not r["converged"]:
        notes.append("mixed model did not converge; estimate unreliable")
    return res, notes


def associate(
    data: pd.DataFrame,
    populations: Sequence[str] | None = None,
    methods: Iterable[str] = METHODS,
    value: str = "pct_parent",
    min_patients: int = MIN_PATIENTS_FOR_INFERENCE,
    pseudocount: float = DEFAULT_PSEUDOCOUNT,
    n_perm: int = N_PERMUTATIONS,
) -> pd.DataFrame:
    """Run the association analyses for every population.

    Parameters
    ----------
    data
        Output of :func:`immuneprofile.clinical.subset_changes` or of
        :func:`immuneprofile.clinical.join_clinical` (changes are then
        computed with ``pseudocount``).
    populations
        Restrict to these population names (default: all).
    methods
        Subset of :data:`METHODS`.
    value
        Subset measure (default ``pct_parent``).
    min_patients
        Cohorts with fewer patients trigger a ``UserWarning`` and a
        ``warning`` entry on every row.
    pseudocount
        Passed to :func:`subset_changes` when ``data`` is a joined table.
    n_perm
        Within-patient permutations behind the ``spearman_delta`` and
        ``rmcorr`` p-values (the ``lmm`` p-value is the model's Wald test).

    Returns
    -------
    pandas.DataFrame
        One row per population (x panel) x method with columns
        ``population[, panel]`` and :data:`RESULT_COLUMNS`: ``coef`` is rho
        (spearman_delta), r (rmcorr) or the LMM slope; ``std_coef`` is
        unit-free; ``q_value`` is the Benjamini-Hochberg adjustment across
        populations within each method; ``x``/``y`` name the variables used.
    """
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if f"delta_{value}" not in data.columns:
        data = subset_changes(data, value=value, pseudocount=pseudocount)
    feats = _feature_keys(data)
    if populations is not None:
        data = select_populations(data, populations)

    n_patients_total = int(data["patient"].nunique())
    small = n_patients_total < min_patients
    cohort_msg = ""
    if small:
        cohort_msg = (
            f"cohort too small for inference (n_patients={n_patients_total} < {min_patients}); "
            "p-values and CIs are exploratory only"
        )
        warnings.warn(f"associate: {cohort_msg}.", UserWarning, stacklevel=2)

    rows: list[dict[str, Any]] = []
    for key, sub in data.groupby(feats, sort=True, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        ident = dict(zip(feats, key))
        for method in methods:
            notes = [cohort_msg] if cohort_msg else []
            res, method_notes = _method_result(method, sub, value, n_perm)
            notes += method_notes
            if not np.isfinite(res["coef"]):
                notes.append("not estimable (too few observations or no variation)")
            res["warning"] = "; ".join(notes)
            rows.append({**ident, "method": method, **res})

    out = pd.DataFrame(rows, columns=[*feats, *RESULT_COLUMNS])
    if not out.empty:
        out["q_value"] = out.groupby("method", group_keys=False)["p_value"].apply(_bh)
        out["method"] = pd.Categorical(out["method"], categories=list(methods), ordered=True)
        out = out.sort_values(["method", *feats], kind="stable").reset_index(drop=True)
        out["method"] = out["method"].astype(str)
    return out


# --------------------------------------------------------------------------- pipeline


def _select_plot_populations(assoc: pd.DataFrame, all_pops: Sequence[str], limit: int) -> list[str]:
    if len(all_pops) <= limit:
        return list(all_pops)
    rm = assoc[assoc["method"] == "rmcorr"].sort_values("p_value", na_position="last")
    chosen = list(dict.fromkeys(rm["population"]))[:limit]
    return chosen or list(all_pops)[:limit]


def correlate(
    populations: pd.DataFrame | PathLike,
    clinical: pd.DataFrame | PathLike,
    samples: pd.DataFrame | PathLike | Iterable[PathLike] | None,
    out_dir: PathLike,
    *,
    populations_subset: Sequence[str] | None = None,
    value: str = "pct_parent",
    pseudocount: float = DEFAULT_PSEUDOCOUNT,
    min_patients: int = MIN_PATIENTS_FOR_INFERENCE,
    plots: bool = True,
    max_plot_populations: int = 12,
    dpi: int = 150,
    readouts: pd.DataFrame | PathLike | None = None,
    patients: pd.DataFrame | PathLike | None = None,
    period: str | None = "MSC",
    n_perm: int = N_PERMUTATIONS,
) -> dict[str, Any]:
    """Run the full clinical-correlation workflow and write results.

    Parameters
    ----------
    populations
        Population table: DataFrame or CSV/Parquet path.
    clinical
        Clinical CSV path or DataFrame.
    samples
        Sample sheet CSV / DataFrame, FCS file(s) or directory (keywords), or
        None if the population table carries ``patient`` and ``week``.
    out_dir
        Output directory (created).
    populations_subset
        Only analyse these populations.
    value, pseudocount, min_patients
        See :func:`associate` / :func:`subset_changes`.
    plots
        Write PNG plots.
    max_plot_populations
        At most this many populations in the subset-trajectory plot (those
        with the smallest rmcorr p-values when there are more).
    dpi
        PNG resolution.
    readouts
        Readout table (``sample_id, readout, pct, count, of_count`` ...; see
        :mod:`immuneprofile.study.readouts`), DataFrame or CSV/Parquet path.
        When None it is built from the population table with the readouts
        the shipped templates declare (:func:`~immuneprofile.study.readouts.declared_readouts`),
        if the table holds those templates.  With readouts, the population-level
        association runs over the declared readouts' populations only, and the
        readout analysis below is added.
    patients
        Patient table (``patient, sex, age, dose1_cells_per_kg, ...``) for the
        claim table; default: ``patients.csv`` beside a clinical CSV, if any.
    period
        Treatment period of the readout association (default the MSC window;
        None pools all visits).
    n_perm
        Within-patient permutations per readout p-value.

    Returns
    -------
    dict
        ``joined``, ``changes``, ``pasi_response``, ``associations``
        (DataFrames) and ``files`` (mapping name -> Path of written files:
        ``associations.csv``, ``changes.csv``, ``pasi_response.csv`` and, with
        ``plots``, ``pasi_trajectories.png``, ``subset_trajectories.png``,
        ``association_heatmap.png``).  With readouts also ``readout_changes``,
        ``readout_associations``, ``assay_cv`` and ``claims`` (DataFrames;
        written as ``readout_changes.csv``, ``readout_associations.csv``,
        ``assay_cv.csv``, ``claims.csv`` and, with ``plots``,
        ``patient_panels.png`` and ``fold_changes.png``).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pops = read_populations(populations)
    clin = _as_clinical(clinical)
    if readouts is None:
        from immuneprofile.study.readouts import declared_readouts

        declared_tbl = declared_readouts(pops)
        readouts = None if declared_tbl.empty else declared_tbl
    if readouts is not None and populations_subset is None:
        declared = read_readouts(readouts)
        populations_subset = sorted(set(declared.get("population", declared["readout"])) & set(pops["population"]))
    pops = _without_reference(pops, samples)
    joined = join_clinical(pops, samples, clin)
    if populations_subset is not None:
        joined = select_populations(joined, populations_subset)
    changes = subset_changes(joined, value=value, pseudocount=pseudocount)
    # restrict the response table to patients that have population data
    response = pasi_response(clin)
    response = response[response["patient"].isin(set(joined["patient"]))].reset_index(drop=True)
    assoc = associate(changes, value=value, min_patients=min_patients)

    files: dict[str, Path] = {}
    for name, df in (("associations", assoc), ("changes", changes), ("pasi_response", response)):
        path = out / f"{name}.csv"
        df.to_csv(path, index=False)
        files[f"{name}.csv"] = path

    if plots:
        import matplotlib.pyplot as plt

        from immuneprofile import plotting

        clin_plot = clin[clin["patient"].isin(set(joined["patient"]))]
        all_pops = sorted(joined["population"].unique())
        chosen = _select_plot_populations(assoc, all_pops, max_plot_populations)
        for name, make in (
            ("pasi_trajectories.png", lambda p: plotting.plot_pasi_trajectories(clin_plot, save=p, dpi=dpi)),
            ("subset_trajectories.png", lambda p: plotting.plot_subset_trajectories(
                joined, populations=chosen, value=value, clinical=clin_plot, save=p, dpi=dpi)),
            ("association_heatmap.png", lambda p: plotting.plot_association_heatmap(assoc, save=p, dpi=dpi)),
        ):
            fig = make(out / name)
            plt.close(fig)
            files[name] = out / name

    result = {
        "joined": joined,
        "changes": changes,
        "pasi_response": response,
        "associations": assoc,
        "files": files,
    }
    if readouts is not None:
        result.update(_readout_analysis(readouts, samples, clinical, clin, out, patients=patients, period=period,
                                        n_perm=n_perm, plots=plots, dpi=dpi))
        files.update(result.pop("readout_files"))
    return result


def _without_reference(pops: pd.DataFrame, samples: Any) -> pd.DataFrame:
    """The population table without the reference sample's rows (``role == "reference"``)."""
    from immuneprofile.study.clinical import _as_samples

    if "role" in pops.columns:
        return pops[pops["role"].fillna("").astype(str).str.lower() != "reference"]
    if samples is None:
        return pops
    meta = _as_samples(samples)
    if "role" not in meta.columns:
        return pops
    ref = set(meta.loc[meta["role"].str.lower() == "reference", "sample_id"])
    return pops[~pops["sample_id"].isin(ref)]


def _patients_table(patients: Any, clinical: Any) -> pd.DataFrame | None:
    if isinstance(patients, pd.DataFrame):
        return patients
    if patients is None and isinstance(clinical, (str, Path)):
        patients = Path(clinical).with_name("patients.csv")
        if not patients.exists():
            return None
    if patients is None:
        return None
    tab = pd.read_csv(patients, dtype={"patient": str})
    tab.columns = [str(c).strip().lower() for c in tab.columns]
    return tab


def _readout_analysis(readouts: Any, samples: Any, clinical: Any, clin: pd.DataFrame, out: Path, *,
                      patients: Any, period: str | None, n_perm: int, plots: bool, dpi: int) -> dict[str, Any]:
    """Describe, associate and check the claims on the declared readouts; write tables and plots."""
    from immuneprofile.study.claims import case_series_claims
    from immuneprofile.study.readouts import assay_cv, describe_changes, join_readouts

    visits, reference = join_readouts(readouts, samples, clin)
    cv = assay_cv(reference, readouts=sorted(visits["readout"].unique()))
    if (cv["cv_source"] == "default").any():
        warnings.warn("correlate: no reference sample (role 'reference') measured for readout(s) "
                      f"{cv.loc[cv['cv_source'] == 'default', 'readout'].tolist()}; their assay CV is the stated "
                      f"default {cv['assay_cv'].max():.0%}.", UserWarning, stacklevel=3)
    changes = describe_changes(visits, cv)
    assoc = associate_readouts(changes, period=period, n_perm=n_perm)
    claims = case_series_claims(clin, patients=_patients_table(patients, clinical), changes=changes,
                                associations=assoc)
    files: dict[str, Path] = {}
    for name, df in (("readout_changes", changes), ("readout_associations", assoc), ("assay_cv", cv),
                     ("claims", claims)):
        files[f"{name}.csv"] = out / f"{name}.csv"
        df.to_csv(files[f"{name}.csv"], index=False)
    if plots:
        import matplotlib.pyplot as plt

        from immuneprofile import plotting

        clin_plot = clin[clin["patient"].isin(set(visits["patient"]))]
        for name, make in (("patient_panels.png", lambda p: plotting.plot_patient_panels(changes, clin_plot, save=p)),
                           ("fold_changes.png", lambda p: plotting.plot_fold_changes(changes, save=p))):
            plt.close(make(out / name))
            files[name] = out / name
    return {"readout_changes": changes, "readout_associations": assoc, "assay_cv": cv, "claims": claims,
            "readout_files": files}


# --------------------------------------------------------------------------- declared readouts

def within_patient_permutations(groups: np.ndarray, n_perm: int, rng: np.random.Generator) -> np.ndarray:
    """``n_perm`` index permutations (rows) that shuffle positions only within each group.

    Parameters
    ----------
    groups
        Group label of every observation.
    n_perm
        Number of permutations.
    rng
        Random generator.

    Returns
    -------
    numpy.ndarray
        ``(n_perm, len(groups))`` integer array; row ``b`` reorders the
        observations so that each keeps its group.
    """
    groups = np.asarray(groups)
    out = np.empty((n_perm, groups.size), dtype=np.int64)
    for g in pd.unique(groups):
        idx = np.flatnonzero(groups == g)
        out[:, idx] = rng.permuted(np.broadcast_to(idx, (n_perm, idx.size)), axis=1)
    return out


def permutation_pvalues(
    x: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    n_perm: int = N_PERMUTATIONS,
    rng: np.random.Generator | int | None = 0,
    *,
    centre: str = "within",
) -> np.ndarray:
    """Two-sided within-patient permutation p-values of the correlation of ``x`` with each column of ``y``.

    Under the null hypothesis the visit labels are exchangeable within a
    patient, so ``x`` (PASI) is permuted among each patient's visits and the
    correlation of each permutation is compared with the observed one
    (``p = (1 + #{|r*| >= |r|}) / (1 + n_perm)``).  With ``centre="within"``
    the values are centred per patient, so the statistic is the
    repeated-measures correlation (rmcorr) and between-patient differences
    never enter; with ``centre="all"`` it is the pooled correlation (pass
    ranks for Spearman's rho).

    Parameters
    ----------
    x
        Predictor (n,), e.g. PASI.
    y
        Responses (n,) or (n, k), e.g. readout frequencies.
    groups
        Patient of every observation (n,).
    n_perm
        Permutations.
    rng
        Generator or seed.
    centre
        ``"within"`` (per patient: rmcorr) or ``"all"`` (pooled correlation).

    Returns
    -------
    numpy.ndarray
        (k,) p-values (NaN where a response has no variation).
    """
    rng = np.random.default_rng(rng)
    y = np.asarray(y, dtype=float).reshape(len(x), -1)
    x = np.asarray(x, dtype=float)
    codes = pd.factorize(np.asarray(groups))[0]

    def centred(a: np.ndarray) -> np.ndarray:
        if centre == "all":
            return a - a.mean(axis=0)
        means = np.stack([np.bincount(codes, weights=col) / np.bincount(codes) for col in a.T], axis=1)
        return a - means[codes]

    xc = centred(x[:, None])[:, 0]
    yc = centred(y)
    observed = np.abs(xc @ yc)
    perm = within_patient_permutations(codes, n_perm, rng)
    null = np.abs(xc[perm] @ yc)
    exceed = (null >= observed - 1e-12 * np.maximum(observed, 1.0)).sum(axis=0)
    p = (1.0 + exceed) / (1.0 + n_perm)
    flat = (np.abs(yc).sum(axis=0) == 0) | (np.abs(xc).sum() == 0)
    return np.where(flat, np.nan, p)


def _readout_summary(v: dict[str, np.ndarray]) -> dict[str, Any]:
    """Descriptive summary of one readout in one period: the last usable visit's change per patient."""
    post = ~v["is_baseline"]
    if not post.any():
        return {"median_log2fc_last": np.nan, "n_patients_beyond_assay": 0, "direction": ""}
    order = np.lexsort((v["week"][post], v["patient"][post]))
    pats, fc, beyond = v["patient"][post][order], v["log2fc"][post][order], v["beyond_assay"][post][order]
    last = np.r_[pats[1:] != pats[:-1], True]  # the last (latest) row of each patient
    fc, beyond = fc[last], beyond[last]
    ups, downs = int((fc[beyond] > 0).sum()), int((fc[beyond] < 0).sum())
    direction = "up" if ups > downs else "down" if downs > ups else "no change beyond assay"
    return {"median_log2fc_last": float(np.median(fc)), "n_patients_beyond_assay": int(beyond.sum()),
            "direction": direction}


def _readout_lmm(sub: pd.DataFrame, min_patients: int) -> dict[str, Any]:
    """The mixed model of one readout on PASI, or why it was not fitted."""
    k = int(sub["patient"].nunique())
    if k < min_patients:
        return {"lmm_coef": np.nan, "lmm_ci_low": np.nan, "lmm_ci_high": np.nan, "lmm_converged": pd.NA,
                "lmm_note": f"not fitted: {k} patients < {min_patients} needed for a mixed model"}
    m = mixed_model(sub, x="pasi", y="pct", group="patient")
    return {"lmm_coef": m["coef"], "lmm_ci_low": m["ci_low"], "lmm_ci_high": m["ci_high"],
            "lmm_converged": m["converged"], "lmm_note": m["fit_warnings"]}


def associate_readouts(
    changes: pd.DataFrame,
    *,
    period: str | None = "MSC",
    n_perm: int = N_PERMUTATIONS,
    alpha: float = 0.05,
    seed: int = 0,
    min_patients_lmm: int = MIN_PATIENTS_FOR_LMM,
) -> pd.DataFrame:
    """Within-patient association of every declared readout with PASI, honest for n = 3.

    For each readout, visits of ``period`` (default: the MSC window) whose
    counts are sufficient (``low_count`` false) are used.  The effect size is
    the repeated-measures correlation r of the readout (% of its denominator)
    with PASI (:func:`rmcorr`, Fisher-z CI); its p-value is a within-patient
    permutation p-value (:func:`permutation_pvalues`: PASI permuted
    among each patient's visits, ``n_perm`` permutations), and q-values are
    Benjamini-Hochberg over the declared readouts only.  Co-therapy is a
    stratum: ``r_without_cotherapy`` repeats rmcorr without the patients on
    co-therapy.  A random-intercept mixed model is fitted only with at least
    ``min_patients_lmm`` patients, with its convergence reported.

    Parameters
    ----------
    changes
        Output of :func:`immuneprofile.study.readouts.describe_changes`.
    period
        Treatment period analysed (None: all visits pooled).
    n_perm, seed
        Permutations and their random seed.
    alpha
        FDR level for ``called``.
    min_patients_lmm
        Patients needed before a mixed model is fitted.

    Returns
    -------
    pandas.DataFrame
        One row per readout, :data:`READOUT_RESULT_COLUMNS`.  ``direction`` and
        ``median_log2fc_last`` describe the last visit of the period with enough events, relative
        to baseline (``n_patients_beyond_assay``: patients whose change exceeds
        2 x the assay CV).
    """
    data = changes if period is None else changes[changes["period"] == period]
    fields = ("patient", "week", "pasi", "pct", "low_count", "is_baseline", "log2fc", "beyond_assay", "cotherapy")
    arrays = {c: data[c].to_numpy() for c in fields}
    arrays["cotherapy"] = data["cotherapy"].fillna("").astype(str).to_numpy()
    rows = []
    for name, idx in data.groupby("readout", sort=True).indices.items():
        v = {c: a[idx] for c, a in arrays.items()}
        low = v["low_count"].astype(bool)
        use = ~low & np.isfinite(v["pasi"].astype(float))
        x, y, pats = v["pasi"][use].astype(float), v["pct"][use].astype(float), v["patient"][use]
        r = _rmcorr_arrays(x, y, pats)
        p = permutation_pvalues(x, y, pats, n_perm, seed)[0] if np.isfinite(r["r"]) else np.nan
        cot = np.unique(pats[v["cotherapy"][use] != ""])
        free = ~np.isin(pats, cot)
        notes = [] if np.isfinite(r["r"]) else ["not estimable (too few usable visits or no variation)"]
        if low.any():
            notes.append(f"{int(low.sum())} visit(s) below {MIN_COUNT} events or {MIN_OF_COUNT} of-count kept out")
        rows.append({
            "readout": name, "period": period or "all", "n_patients": r["n_subjects"],
            "n_observations": r["n_observations"], "n_low_count": int(low.sum()), "r": r["r"],
            "ci_low": r["ci_low"], "ci_high": r["ci_high"], "slope": r["slope"], "p_perm": p,
            "permutations": f"{n_perm} within-patient permutations of PASI among visits",
            "r_without_cotherapy": _rmcorr_arrays(x[free], y[free], pats[free])["r"] if len(cot) else np.nan,
            "cotherapy_patients": ", ".join(sorted(map(str, cot))),
            **_readout_summary({c: a[~low] for c, a in v.items()}),
            **_readout_lmm(data.iloc[idx][use], min_patients_lmm), "note": "; ".join(notes),
        })
    out = pd.DataFrame(rows, columns=[c for c in READOUT_RESULT_COLUMNS if c not in ("q_value", "called")])
    out["q_value"] = _bh(out["p_perm"]) if not out.empty else pd.Series(dtype=float)
    out["called"] = (out["q_value"] < alpha).fillna(False).astype(bool)
    return out[READOUT_RESULT_COLUMNS]
