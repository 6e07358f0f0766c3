"""Calibration of the readout statistics: many small simulated cohorts with known effects.

The FCS simulator (:mod:`immuneprofile.study.simulate`) is too slow to repeat
hundreds of times, and an analysis checked on one cohort says nothing about
how often it is wrong.  Here cohorts are drawn directly at the readout-table
level -- three patients, the MSC-window visits, PASI courses, readouts whose
frequency follows PASI (built-in effects, heterogeneous between patients) and
readouts that do not (true effect zero; their baseline differs between
patients in step with baseline PASI, a between-patient confounder that a
pooled analysis would pick up), with assay noise and binomial counting
noise -- and passed through the same functions as the real data
(:func:`~immuneprofile.study.readouts.assay_cv`,
:func:`~immuneprofile.study.readouts.describe_changes`,
:func:`~immuneprofile.study.association.associate_readouts`).

:func:`calibrate` reports the false-positive rate (null readouts called at
FDR ``alpha``), the false discovery proportion and the power (effect readouts
called).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = ["CohortDesign", "simulate_readout_cohort", "calibrate"]


@dataclass(frozen=True)
class CohortDesign:
    """What one simulated cohort looks like.

    Attributes
    ----------
    weeks
        Visits of the MSC window (week 0 = baseline).
    n_patients
        Patients per cohort.
    n_effect, n_null
        Readouts that follow PASI, and readouts with no true effect.
    effect_log2
        Mean log2 fold change of an effect readout at complete clearance
        (PASI 0); each patient's effect is this times U(1 - h, 1 + h).
    heterogeneity
        ``h`` above: how much the effect differs between patients.
    assay_cv
        Multiplicative assay noise (also what the reference sample shows).
    of_count
        Typical denominator events (each sample: x U(0.7, 1.3)).
    """

    weeks: tuple[float, ...] = (0, 1, 2, 4, 9)
    n_patients: int = 3
    n_effect: int = 4
    n_null: int = 8
    effect_log2: float = 0.8
    heterogeneity: float = 0.5
    assay_cv: float = 0.05
    of_count: int = 2000


def _pasi_courses(design: CohortDesign, rng: np.random.Generator) -> pd.DataFrame:
    weeks = np.asarray(design.weeks, dtype=float)
    rows = []
    for i in range(design.n_patients):
        base = rng.uniform(12, 30)
        response = rng.uniform(0.4, 0.95)
        pasi = base * (1 - response * (1 - np.exp(-weeks / 3.0)))
        pasi[1:] *= np.exp(rng.normal(0, 0.08, weeks.size - 1))
        rows += [{"patient": f"P{i + 1}", "week": w, "pasi": float(v), "baseline_pasi": base,
                  "cotherapy": "etanercept" if i == design.n_patients - 1 else ""} for w, v in zip(weeks, pasi)]
    return pd.DataFrame(rows)


def _counts(pct: np.ndarray, design: CohortDesign, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    of = np.round(design.of_count * rng.uniform(0.7, 1.3, pct.shape)).astype(np.int64)
    return rng.binomial(of, np.clip(pct / 100.0, 0, 1)), of


def simulate_readout_cohort(
    design: CohortDesign = CohortDesign(),
    rng: np.random.Generator | int | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, bool]]:
    """One simulated cohort at the readout-table level.

    Returns
    -------
    (visits, reference, truth)
        ``visits``: patient rows shaped like
        :func:`~immuneprofile.study.readouts.join_readouts` output (``patient,
        week, pasi, baseline_pasi, pasi_improvement_pct, period, cotherapy,
        readout, count, of_count, pct``); ``reference``: the reference sample's
        ``readout, week, pct`` at every visit; ``truth``: readout -> has a
        true effect.
    """
    rng = np.random.default_rng(rng)
    clin = _pasi_courses(design, rng)
    clin["pasi_improvement_pct"] = 100.0 * (1 - clin["pasi"] / clin["baseline_pasi"])
    clin["period"] = "MSC"
    improvement = clin["pasi_improvement_pct"].to_numpy() / 100.0
    pcodes = pd.factorize(clin["patient"].to_numpy())[0]
    base_pasi = clin.groupby("patient", sort=False)["baseline_pasi"].first().to_numpy()
    truth: dict[str, bool] = {}
    names, pcts, counts, ofs, ref_pcts = [], [], [], [], []
    h = design.heterogeneity
    for j in range(design.n_effect + design.n_null):
        effect = j < design.n_effect
        name = f"{'effect' if effect else 'null'}_{j}"
        truth[name] = effect
        level = np.exp(rng.uniform(np.log(2), np.log(20)))
        if effect:
            beta = design.effect_log2 * rng.choice([-1, 1]) * rng.uniform(1 - h, 1 + h, design.n_patients)
            base = level * np.exp(rng.normal(0, 0.2, design.n_patients))
            log2_pct = np.log2(base[pcodes]) + beta[pcodes] * improvement
        else:  # no effect, but baselines follow baseline PASI between patients
            base = level * base_pasi / base_pasi.mean()
            log2_pct = np.log2(base[pcodes])
        count, of = _counts(2.0 ** log2_pct * np.exp(rng.normal(0, design.assay_cv, log2_pct.shape)), design, rng)
        rc, ro = _counts(level * np.exp(rng.normal(0, design.assay_cv, len(design.weeks))), design, rng)
        names.append(name)
        counts.append(count)
        ofs.append(of)
        pcts.append(100.0 * count / of)
        ref_pcts.append(100.0 * rc / ro)
    visits = pd.concat([clin] * len(names), ignore_index=True)
    visits["readout"] = np.repeat(names, len(clin))
    visits["count"], visits["of_count"], visits["pct"] = np.concatenate(counts), np.concatenate(ofs), np.concatenate(pcts)
    reference = pd.DataFrame({"readout": np.repeat(names, len(design.weeks)),
                              "week": np.tile(np.asarray(design.weeks, float), len(names)),
                              "pct": np.concatenate(ref_pcts)})
    return visits, reference, truth


def calibrate(
    n_cohorts: int = 200,
    design: CohortDesign = CohortDesign(),
    *,
    alpha: float = 0.05,
    n_perm: int = 999,
    seed: int = 0,
) -> dict[str, object]:
    """Run the readout analysis on ``n_cohorts`` simulated cohorts and count its calls.

    Parameters
    ----------
    n_cohorts
        Cohorts simulated.
    design
        Cohort design (:class:`CohortDesign`).
    alpha
        FDR level at which a readout is called.
    n_perm
        Permutations per p-value.
    seed
        Seed of the whole run.

    Returns
    -------
    dict
        ``false_positive_rate`` (null readouts called / null readouts tested),
        ``fdr`` (mean over cohorts of false calls / calls, 0 without calls),
        ``power`` (effect readouts called / effect readouts tested),
        ``cohorts_with_false_call`` (fraction), ``n_cohorts`` and ``calls``
        (one row per cohort x readout: ``cohort, readout, effect, r, p_perm,
        q_value, called``).
    """
    from immuneprofile.study.association import associate_readouts
    from immuneprofile.study.readouts import assay_cv, describe_changes

    rng = np.random.default_rng(seed)
    tables = []
    for c in range(n_cohorts):
        visits, reference, truth = simulate_readout_cohort(design, rng)
        changes = describe_changes(visits, assay_cv(reference))
        res = associate_readouts(changes, n_perm=n_perm, alpha=alpha, seed=int(rng.integers(2**31)))
        res["effect"] = res["readout"].map(truth)
        res["cohort"] = c
        tables.append(res[["cohort", "readout", "effect", "r", "p_perm", "q_value", "called"]])
    calls = pd.concat(tables, ignore_index=True)
    null, eff = calls[~calls["effect"]], calls[calls["effect"]]
    per_cohort = calls.groupby("cohort").apply(
        lambda g: (g["called"] & ~g["effect"]).sum() / max(int(g["called"].sum()), 1), include_groups=False)
    return {
        "false_positive_rate": float(null["called"].mean()),
        "fdr": float(per_cohort.mean()),
        "power": float(eff["called"].mean()),
        "cohorts_with_false_call": float(null.groupby("cohort")["called"].any().mean()),
        "n_cohorts": n_cohorts,
        "calls": calls,
    }
