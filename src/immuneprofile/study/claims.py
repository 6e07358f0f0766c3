"""The case series' claims, checked against a study's data: claim -> our readout -> reproduced or not.

Each claim of Lwin et al. 2025 (Front Immunol 16:1656724) is a small function of
the clinical table, the patient table and the readout description/association
tables, so the verdict is computed, never typed.  Clinical claims restate the
paper's abstract; immune claims (:data:`IMMUNE_CLAIMS`) are the readouts the
case series followed, with the direction this project reads from it -- their
wording is ours, not a quotation.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np
import pandas as pd

__all__ = ["IMMUNE_CLAIMS", "case_series_claims"]

#: (claim, readout, expected direction of the change from baseline in the MSC window).
IMMUNE_CLAIMS: tuple[tuple[str, str, str], ...] = (
    ("Regulatory T cells (% of CD4+) rise after UC-MSC infusion", "Treg", "up"),
    ("Non-classical monocytes (% of monocytes) shift after UC-MSC infusion", "non-classical", "up"),
    ("Skin-homing CD4+ memory T cells (CLA+CD103-) shift as PASI falls", "CD4+ CLA+CD103-", "up"),
)

CLAIM_COLUMNS = ["claim", "source", "readout", "expected", "observed", "reproduced"]


def _text(clin: pd.DataFrame) -> pd.Series:
    cols = [c for c in ("treatment", "event", "notes") if c in clin.columns]
    return clin[cols].fillna("").astype(str).agg(" ".join, axis=1) if cols else pd.Series("", index=clin.index)


def _change_weeks(clin: pd.DataFrame, period: str, pattern: str) -> pd.Series:
    """Week of a treatment change per patient: its event (matching ``pattern``) or the period's first visit."""
    hit = (clin["period"] == period) | _text(clin).str.contains(pattern, case=False, regex=True)
    return clin[hit].groupby("patient")["week"].min()


def _women(clin: pd.DataFrame, patients: pd.DataFrame | None) -> tuple[str, bool | None]:
    n = clin["patient"].nunique()
    if patients is None or "sex" not in patients.columns:
        return f"{n} patients; sex not recorded", None
    sex = patients["sex"].astype(str).str.upper().str[0]
    adults = pd.to_numeric(patients.get("age", pd.Series(dtype=float)), errors="coerce")
    ok = n == 3 and (sex == "F").all() and bool((adults >= 18).all() if adults.notna().any() else True)
    return f"{n} patients, sex {', '.join(sorted(sex))}", bool(ok)


def _infusions(clin: pd.DataFrame, patients: pd.DataFrame | None) -> tuple[str, bool | None]:
    marked = clin[_text(clin).str.contains("infusion", case=False)]
    weeks = marked.groupby("patient")["week"].apply(lambda w: tuple(sorted(w)))
    all_two = len(weeks) == clin["patient"].nunique() and all(len(w) == 2 and w[1] - w[0] == 1 for w in weeks)
    return "; ".join(f"{p}: W{', W'.join(f'{x:g}' for x in w)}" for p, w in weeks.items()) or "no infusion marked", \
        bool(all_two)


def _doses(clin: pd.DataFrame, patients: pd.DataFrame | None) -> tuple[str, bool | None]:
    cols = [c for c in ("dose1_cells_per_kg", "dose2_cells_per_kg") if patients is not None and c in patients]
    if patients is None or not cols:
        return "doses not recorded", None
    d = patients[cols].apply(pd.to_numeric, errors="coerce").to_numpy(float).ravel()
    d = np.where(d > 1000, d / 1e6, d)  # cells/kg or 10^6 cells/kg
    return f"{np.nanmin(d):.2f}-{np.nanmax(d):.2f} x 10^6 cells/kg", bool(np.all((d >= 1.96 - 1e-9) & (d <= 3.0 + 1e-9)))


def _cotherapy(clin: pd.DataFrame, patients: pd.DataFrame | None) -> tuple[str, bool | None]:
    src = patients if patients is not None and "cotherapy" in patients.columns else clin
    on = src.loc[src["cotherapy"].fillna("").astype(str).str.contains("etanercept", case=False), "patient"].unique()
    return f"{len(on)} on etanercept ({', '.join(sorted(on))})", len(on) == 1


def _best_w4(clin: pd.DataFrame, patients: pd.DataFrame | None) -> tuple[str, bool | None]:
    base = clin[clin["week"] == 0].set_index("patient")["pasi"]
    w4 = clin[clin["week"] == 4].set_index("patient")["pasi"]
    imp = (100 * (base - w4) / base).dropna()
    if imp.empty:
        return "no W4 visit", False
    return f"best {imp.idxmax()}: {imp.max():.0f} % reduction at W4", bool(imp.max() >= 87 - 1e-9)


def _resumed_w9(clin: pd.DataFrame, patients: pd.DataFrame | None) -> tuple[str, bool | None]:
    starts = _change_weeks(clin, "biologic resumed", r"resum|restart")
    at9 = starts[starts == 9]
    return f"{len(at9)} resumed at W9 ({', '.join(at9.index)})", len(at9) == 2


def _switched_w24(clin: pd.DataFrame, patients: pd.DataFrame | None) -> tuple[str, bool | None]:
    starts = _change_weeks(clin, "new biologic", r"switch|new biologic")
    at24 = starts[starts == 24]
    return f"{len(at24)} switched at W24 ({', '.join(at24.index)})", len(at24) == 1


def _long_term(clin: pd.DataFrame, patients: pd.DataFrame | None) -> tuple[str, bool | None]:
    held = []
    for pat, g in clin.groupby("patient"):
        late = g[g["week"] >= 52]
        if not late.empty and late["week"].max() >= 104 and (late["pasi"] <= 2).all():
            held.append(pat)
    last = clin.groupby("patient")["week"].max()
    return f"{len(held)} held PASI <= 2 from W52 to W{last.max():g} ({', '.join(held)})", len(held) == 2


CLINICAL_CLAIMS: tuple[tuple[str, str, Callable], ...] = (
    ("Three adult women", "patients.csv: sex, age", _women),
    ("Two IV UC-MSC infusions one week apart", "clinical.csv: event", _infusions),
    ("Doses 1.96-3.00 x 10^6 cells/kg", "patients.csv: doses", _doses),
    ("One patient alongside etanercept, two on MSCs alone", "cotherapy", _cotherapy),
    ("Best responder reached PASI 87 (>= 87 % reduction) by W4", "clinical.csv: PASI", _best_w4),
    ("On relapse two resumed their last failed biologic at W9", "clinical.csv: treatment period", _resumed_w9),
    ("One switched to a new biologic at W24", "clinical.csv: treatment period", _switched_w24),
    ("Two then held an absolute PASI of 0-2 for over two years", "clinical.csv: PASI", _long_term),
)


def _readout_named(name: str, changes: pd.DataFrame | None) -> str:
    """The readout called ``name``, or else the one whose gated population is ``name``."""
    if changes is None or name in set(changes["readout"]) or "population" not in changes.columns:
        return name
    hits = changes.loc[changes["population"] == name, "readout"].unique()
    return str(hits[0]) if len(hits) == 1 else name


def _immune_row(claim: str, readout: str, expected: str, changes: pd.DataFrame | None,
                associations: pd.DataFrame | None) -> dict:
    row = {"claim": claim, "source": "readouts (direction as this project reads the paper)",
           "readout": readout, "expected": f"{expected} in >= 2 of 3 patients beyond 2 x assay CV"}
    readout = _readout_named(readout, changes)
    if associations is None or readout not in set(associations["readout"]):
        return {**row, "observed": "readout not measured", "reproduced": None}
    row["readout"] = readout
    a = associations.set_index("readout").loc[readout]
    n_dir = 0
    if changes is not None:
        post = changes[(changes["readout"] == readout) & (changes["period"] == "MSC") & ~changes["is_baseline"]
                       & ~changes["low_count"]]
        last = post.sort_values("week").groupby("patient").tail(1)
        sign = np.sign(last["log2fc"]) == (1 if expected == "up" else -1)
        n_dir = int((last["beyond_assay"] & sign).sum())
    observed = (f"{n_dir} patient(s) {expected} beyond assay at the last MSC visit; rmcorr with PASI r = "
                f"{a['r']:.2f}, permutation q = {a['q_value']:.3f} (exploratory)")
    return {**row, "observed": observed, "reproduced": n_dir >= 2}


def case_series_claims(
    clinical: pd.DataFrame,
    *,
    patients: pd.DataFrame | None = None,
    changes: pd.DataFrame | None = None,
    associations: pd.DataFrame | None = None,
) -> pd.DataFrame:
    """Every claim of the case series, what our data show, and whether it is reproduced.

    Parameters
    ----------
    clinical
        Validated clinical table (with ``period``).
    patients
        Optional patient table (``patient, sex, age, dose1_cells_per_kg,
        dose2_cells_per_kg, cotherapy``).
    changes, associations
        Outputs of :func:`~immuneprofile.study.readouts.describe_changes` and
        :func:`~immuneprofile.study.association.associate_readouts`.

    Returns
    -------
    pandas.DataFrame
        ``claim, source, readout, expected, observed, reproduced`` (True,
        False, or None when the data needed are absent).
    """
    rows = []
    for claim, source, check in CLINICAL_CLAIMS:
        observed, ok = check(clinical, patients)
        rows.append({"claim": claim, "source": "abstract", "readout": re.sub(r"^.*?: ", "", source),
                     "expected": claim, "observed": observed, "reproduced": ok})
    rows += [_immune_row(c, r, e, changes, associations) for c, r, e in IMMUNE_CLAIMS]
    out = pd.DataFrame(rows, columns=CLAIM_COLUMNS)
    out["reproduced"] = out["reproduced"].astype(object)
    return out
