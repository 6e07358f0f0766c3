"""Calibration: 200 simulated cohorts with known effects through the readout statistics.

The truth is the generator's: which readouts have an effect.  The test fails if the
within-patient permutation + Benjamini-Hochberg procedure calls null readouts above
the nominal rate, or misses the built-in effects in most cohorts.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from immuneprofile.study.calibration import CohortDesign, calibrate, simulate_readout_cohort

ALPHA = 0.05


@pytest.fixture(scope="module")
def run():
    return calibrate(200, alpha=ALPHA, n_perm=499, seed=2025)


def test_null_readouts_called_at_no_more_than_the_nominal_rate(run):
    calls = run["calls"]
    assert calls["cohort"].nunique() == 200
    n_null = int((~calls["effect"]).sum())
    assert n_null == 200 * CohortDesign().n_null
    # called null readouts / null readouts tested, and the mean false discovery proportion
    assert run["false_positive_rate"] <= ALPHA
    assert run["fdr"] <= ALPHA
    # under the null the permutation p-values are (super-)uniform: no excess of small values
    p_null = calls.loc[~calls["effect"], "p_perm"]
    assert (p_null <= ALPHA).mean() <= ALPHA + 2 * np.sqrt(ALPHA * (1 - ALPHA) / n_null)


def test_built_in_effects_found_in_most_cohorts(run):
    assert run["power"] >= 0.6
    eff = run["calls"][run["calls"]["effect"]]
    assert eff.groupby("cohort")["called"].any().mean() >= 0.9  # at least one effect found in 90 % of cohorts


def test_null_readouts_are_confounded_between_patients():
    """The nulls are a real trap: pooled across patients they correlate with PASI."""
    rng = np.random.default_rng(7)
    pooled_hits = []
    for _ in range(30):
        visits, _, truth = simulate_readout_cohort(CohortDesign(), rng)
        for name, g in visits.groupby("readout"):
            if not truth[name]:
                pooled_hits.append(sps.pearsonr(g["pasi"], g["pct"]).pvalue < ALPHA)
    assert np.mean(pooled_hits) > 3 * ALPHA
