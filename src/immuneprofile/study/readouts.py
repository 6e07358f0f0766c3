"""Declared readouts, described honestly: change from baseline judged against assay and counting noise.

A *readout table* is long: one row per sample x declared readout, with columns
``sample_id, readout, pct, count, of_count`` (``pct = 100 * count / of_count``,
the readout's frequency of its declared denominator) and usually ``template,
population, of``.  :func:`immuneprofile.stats.readout_table` writes it from
templates that declare their readouts; :func:`readouts_from_populations` builds
one from a population table and a declaration, for tables gated before
templates declared readouts.

Description comes first (:func:`describe_changes`): per patient, readout and
visit the change and log2 fold change from baseline, the binomial standard
error of each frequency (counting noise), whether the change exceeds twice the
assay CV of that readout (:func:`assay_cv`, measured on the reference sample
stained at every visit), and whether the readout holds too few events to be
used (:data:`MIN_COUNT`, :data:`MIN_OF_COUNT`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from immuneprofile.exceptions import ClinicalDataError
from immuneprofile.study.clinical import (
    DEFAULT_PSEUDOCOUNT,
    PathLike,
    _as_clinical,
    _as_samples,
    _read_table,
    _source_name,
)

__all__ = [
    "DEFAULT_ASSAY_CV",
    "MIN_COUNT",
    "MIN_OF_COUNT",
    "MIN_REFERENCE_VISITS",
    "assay_cv",
    "describe_changes",
    "join_readouts",
    "read_readouts",
    "declared_readouts",
]

#: Assay CV used when a study has no reference sample (or fewer than
#: :data:`MIN_REFERENCE_VISITS` reference stainings of a readout): 10 %, a
#: typical inter-assay CV of frequency readouts in standardised multicolour
#: panels.  Every row that uses it says so (``cv_source = "default"``).
DEFAULT_ASSAY_CV: float = 0.10

#: A readout with fewer events than this in its numerator is too noisy to use.
MIN_COUNT: int = 20

#: A readout with fewer events than this in its denominator is too noisy to use
#: (200 events put the binomial CV of a 10 % subset at ~21 %).
MIN_OF_COUNT: int = 200

#: Reference stainings needed before a readout's CV is measured rather than assumed.
MIN_REFERENCE_VISITS: int = 3

READOUT_REQUIRED = ("sample_id", "readout", "pct", "count", "of_count")

def declared_readouts(populations: pd.DataFrame, templates: Sequence | None = None) -> pd.DataFrame:
    """The readouts the templates declare, from a population table (``template`` column needed).

    Parameters
    ----------
    populations
        Population table (``sample_id, template, population, parent, count`` and optionally
        sample metadata such as ``patient, week, panel, role``).
    templates
        Templates whose ``readouts:`` to use; default: the shipped templates. A template whose
        populations the table does not hold is skipped.

    Returns
    -------
    pandas.DataFrame
        :func:`immuneprofile.stats.readout_table`'s columns plus any of ``patient, week, panel,
        role`` present in ``populations`` (empty without a ``template`` column).
    """
    from immuneprofile.exceptions import TemplateError
    from immuneprofile.stats import READOUT_COLUMNS, readout_table
    from immuneprofile.template import load_template, shipped_templates

    if "template" not in populations.columns:
        return pd.DataFrame(columns=READOUT_COLUMNS)
    templates = [load_template(n) for n in shipped_templates()] if templates is None else templates
    parts = []
    for tmpl in templates:
        try:
            part = readout_table(populations, tmpl)
        except TemplateError:  # the table holds another version of this template's tree
            continue
        if not part.empty:  # pandas would stop ignoring empty frames' dtypes in concat
            parts.append(part)
    out = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=READOUT_COLUMNS)
    meta = [c for c in ("sample_id", "patient", "week", "panel", "role") if c in populations.columns]
    if len(meta) > 1 and not out.empty:
        out = out.merge(populations[meta].drop_duplicates("sample_id"), on="sample_id", how="left")
    return out


def read_readouts(readouts: pd.DataFrame | PathLike) -> pd.DataFrame:
    """Load and check a readout table (DataFrame, CSV or Parquet).

    Raises
    ------
    ClinicalDataError
        Missing file or columns (``sample_id, readout, pct, count, of_count``),
        or non-numeric values; the message names the source.
    """
    df, src = _read_table(readouts, "readout table")
    missing = [c for c in READOUT_REQUIRED if c not in df.columns]
    if missing:
        raise ClinicalDataError(f"{src}: readout table is missing column(s) {missing}; found {list(df.columns)}.")
    for c in ("pct", "count", "of_count"):
        values = pd.to_numeric(df[c], errors="coerce")
        if values.isna().any():
            raise ClinicalDataError(f"{src}: column {c!r} has missing or non-numeric values "
                                    f"(readouts {sorted(set(df.loc[values.isna(), 'readout']))[:5]}).")
        df[c] = values
    df["sample_id"] = df["sample_id"].astype(str).str.strip()
    df["readout"] = df["readout"].astype(str)
    return df


def join_readouts(
    readouts: pd.DataFrame | PathLike,
    samples: pd.DataFrame | PathLike | None,
    clinical: pd.DataFrame | PathLike,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Split a readout table into patient visits (with PASI and period) and reference stainings.

    Parameters
    ----------
    readouts
        Readout table; may already carry ``patient, week[, panel, role]``.
    samples
        Sample sheet (``sample_id, patient, week[, panel, role]``), or None
        when the readout table carries the metadata.
    clinical
        Clinical table (validated with :func:`~immuneprofile.study.clinical.read_clinical`).

    Returns
    -------
    (patients, reference)
        ``patients``: readout rows of ``role != "reference"`` with ``patient,
        week, pasi, baseline_pasi, pasi_improvement_pct, period, cotherapy``;
        ``reference``: the reference sample's rows.

    Raises
    ------
    ClinicalDataError
        A sample without patient/week metadata, or a patient absent from the
        clinical table.
    """
    ro = read_readouts(readouts)
    clin = _as_clinical(clinical)
    if samples is not None:
        meta = _as_samples(samples)
        ro = ro.drop(columns=[c for c in ("patient", "week", "panel", "role") if c in ro.columns])
        ro = ro.merge(meta.drop(columns=[c for c in ("file",) if c in meta.columns]), on="sample_id", how="left")
    if "patient" not in ro.columns or "week" not in ro.columns or ro["patient"].isna().any():
        unknown = sorted(set(ro.loc[ro.get("patient", pd.Series(index=ro.index)).isna(), "sample_id"]))
        raise ClinicalDataError(f"readout table: no patient/week metadata for sample(s) {unknown[:20]}; "
                                "give a sample sheet.")
    ro["week"] = pd.to_numeric(ro["week"], errors="coerce")
    role = ro["role"].fillna("patient").astype(str).str.strip().str.lower() if "role" in ro.columns else \
        pd.Series("patient", index=ro.index)
    reference = ro[role == "reference"].reset_index(drop=True)
    pat = ro[role != "reference"]
    absent = sorted(set(pat["patient"].astype(str)) - set(clin["patient"]))
    if absent:
        raise ClinicalDataError(f"{_source_name(clinical)}: patient(s) {absent} in the readout table are absent "
                                f"from the clinical table (clinical patients: {sorted(set(clin['patient']))}).")
    base = clin.loc[clin["week"] == 0].set_index("patient")["pasi"].rename("baseline_pasi")
    cl = clin[["patient", "week", "pasi", "period", "cotherapy"]].join(base, on="patient")
    with np.errstate(divide="ignore", invalid="ignore"):
        cl["pasi_improvement_pct"] = (100.0 * (cl["baseline_pasi"] - cl["pasi"]) / cl["baseline_pasi"]).where(
            cl["baseline_pasi"] > 0)
    pat = pat.assign(patient=pat["patient"].astype(str)).merge(cl, on=["patient", "week"], how="left")
    return pat.reset_index(drop=True), reference


# --------------------------------------------------------------------------- assay variation


def assay_cv(
    reference: pd.DataFrame,
    readouts: Sequence[str] | None = None,
    default: float = DEFAULT_ASSAY_CV,
    min_visits: int = MIN_REFERENCE_VISITS,
) -> pd.DataFrame:
    """Assay CV of every readout, measured on the reference sample stained at every visit.

    Parameters
    ----------
    reference
        Readout rows of the reference sample (``readout, pct``), one per staining.
    readouts
        Readouts to report (default: those in ``reference``); readouts with
        fewer than ``min_visits`` reference values get ``default``.
    default
        CV used (and labelled ``cv_source = "default"``) without enough reference data.
    min_visits
        Reference stainings needed to measure a CV.

    Returns
    -------
    pandas.DataFrame
        ``readout, n_reference, reference_mean, reference_sd, assay_cv,
        cv_source`` (``"reference sample"`` or ``"default"``).
    """
    names = list(dict.fromkeys(readouts if readouts is not None else reference.get("readout", [])))
    grouped = reference.groupby("readout")["pct"] if not reference.empty else None
    rows = []
    for name in names:
        vals = grouped.get_group(name).to_numpy(float) if grouped is not None and name in grouped.groups \
            else np.array([])
        vals = vals[np.isfinite(vals)]
        mean = float(vals.mean()) if vals.size else np.nan
        sd = float(vals.std(ddof=1)) if vals.size > 1 else np.nan
        measured = vals.size >= min_visits and mean > 0
        rows.append({"readout": name, "n_reference": int(vals.size), "reference_mean": mean,
                     "reference_sd": sd, "assay_cv": sd / mean if measured else default,
                     "cv_source": "reference sample" if measured else "default"})
    return pd.DataFrame(rows, columns=["readout", "n_reference", "reference_mean", "reference_sd",
                                       "assay_cv", "cv_source"])


# --------------------------------------------------------------------------- description


def describe_changes(
    visits: pd.DataFrame,
    cv: pd.DataFrame | None = None,
    *,
    min_count: int = MIN_COUNT,
    min_of_count: int = MIN_OF_COUNT,
    pseudocount: float = DEFAULT_PSEUDOCOUNT,
) -> pd.DataFrame:
    """Change of every readout from baseline, per patient and visit, against assay and counting noise.

    Parameters
    ----------
    visits
        Patient rows from :func:`join_readouts`.
    cv
        Output of :func:`assay_cv`; readouts missing from it (or ``None``) get
        :data:`DEFAULT_ASSAY_CV`.
    min_count, min_of_count
        A visit whose readout has fewer events (numerator or denominator) is
        flagged ``low_count`` and kept out of associations.
    pseudocount
        Percentage points added to both frequencies of the log2 fold change.

    Returns
    -------
    pandas.DataFrame
        One row per patient x readout x visit: ``patient, readout, week, period,
        cotherapy, pasi, pasi_improvement_pct, pct, count, of_count, se_pct``
        (binomial SE, percentage points), ``baseline_pct, delta_pct`` (pp),
        ``rel_change`` (pct / baseline - 1), ``log2fc``, ``assay_cv, cv_source``,
        ``beyond_assay`` (|rel_change| > 2 x assay CV), ``low_count``
        (this visit or the baseline is below the minimum event counts) and
        ``is_baseline``.
    """
    df = visits.copy()
    df["period"] = df["period"].fillna("MSC") if "period" in df.columns else "MSC"
    df["cotherapy"] = df["cotherapy"].fillna("") if "cotherapy" in df.columns else ""
    if "pasi_improvement_pct" not in df.columns:
        base = df[df["week"] == 0].groupby("patient")["pasi"].first()
        b = df["patient"].map(base)
        df["pasi_improvement_pct"] = (100.0 * (b - df["pasi"]) / b).where(b > 0)
    dup = df.duplicated(["patient", "readout", "week"], keep=False)
    if dup.any():
        ex = df.loc[dup, ["patient", "readout", "week", "sample_id"]].head(6).to_string(index=False)
        raise ClinicalDataError(f"describe_changes: more than one value per patient/readout/week:\n{ex}")
    p = (df["pct"] / 100.0).clip(0, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        df["se_pct"] = 100.0 * np.sqrt(p * (1 - p) / df["of_count"])
    df["low_count"] = (df["count"] < min_count) | (df["of_count"] < min_of_count)
    base = df.loc[df["week"] == 0, ["patient", "readout", "pct", "low_count"]].rename(
        columns={"pct": "baseline_pct", "low_count": "_base_low"})
    df = df.merge(base, on=["patient", "readout"], how="left")
    df["low_count"] = df["low_count"] | df["_base_low"].fillna(True).astype(bool)
    df["delta_pct"] = df["pct"] - df["baseline_pct"]
    with np.errstate(divide="ignore", invalid="ignore"):
        df["rel_change"] = df["pct"] / df["baseline_pct"] - 1.0
        df["log2fc"] = np.log2((df["pct"] + pseudocount) / (df["baseline_pct"] + pseudocount))
    cvs = cv.set_index("readout") if cv is not None and not cv.empty else pd.DataFrame(
        columns=["assay_cv", "cv_source"])
    df["assay_cv"] = df["readout"].map(cvs["assay_cv"]).fillna(DEFAULT_ASSAY_CV).astype(float)
    df["cv_source"] = df["readout"].map(cvs["cv_source"]).fillna("default")
    df["beyond_assay"] = (df["rel_change"].abs() > 2.0 * df["assay_cv"]).fillna(False)
    df["is_baseline"] = df["week"] == 0
    cols = ["patient", "readout", "week", "period", "cotherapy", "pasi", "pasi_improvement_pct", "pct",
            "count", "of_count", "se_pct", "baseline_pct", "delta_pct", "rel_change", "log2fc",
            "assay_cv", "cv_source", "beyond_assay", "low_count", "is_baseline"]
    extra = [c for c in ("sample_id", "template", "population", "of", "panel") if c in df.columns]
    return df[cols + extra].sort_values(["readout", "patient", "week"], kind="stable").reset_index(drop=True)
