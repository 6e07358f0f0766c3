"""Clinical data and sample metadata: reading, validation, joining, change from baseline.

This module links the gating engine's tidy *population table* (one row per
sample x population) to clinical outcomes (PASI) through explicit sample
metadata (patient, week).  Sample metadata is only ever taken from a sample
sheet or from FCS keywords -- never guessed from file names.

Tables
------
Clinical CSV
    ``patient, week, pasi[, treatment, cotherapy, event, notes]``; one row per
    patient visit.  PASI is 0-72; week 0 is the (pre-treatment) baseline and
    must exist for every patient.  ``treatment`` is the treatment *period* of
    the visit (``MSC``, ``biologic resumed``, ``new biologic``); older files
    that only mark events there (``UC-MSC infusion``, ``biologic restart``)
    still read: a normalised ``period`` column is always derived, see
    :func:`treatment_periods`.
Sample sheet CSV
    ``[file,] sample_id, patient, week[, panel]``; ``sample_id`` is the FCS file
    stem used in the population table.  If ``sample_id`` is absent it is taken
    as the stem of ``file``.
Population table
    ``sample_id, population, parent, count, parent_count, pct_parent,
    pct_total, median_<marker>...`` (CSV or Parquet).

Weeks may be written as numbers (``4``, ``4.0``) or as visit labels of the form
``W4`` / ``W04`` / ``week 4`` (case-insensitive); anything else is an error.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from immuneprofile.exceptions import ClinicalDataError

__all__ = [
    "ClinicalDataError",
    "PASI_MAX",
    "DEFAULT_PSEUDOCOUNT",
    "read_clinical",
    "validate_clinical",
    "read_sample_sheet",
    "validate_sample_sheet",
    "sample_metadata_from_fcs",
    "read_populations",
    "join_clinical",
    "treatment_periods",
    "MSC_PERIOD",
    "PERIODS",
    "pasi_response",
    "select_populations",
    "subset_changes",
]

PathLike = str | Path

#: Maximum possible PASI score.
PASI_MAX: float = 72.0

#: Pseudocount (in percentage points) added to numerator and denominator of the
#: log2 fold change, ``log2((pct + pc) / (pct_baseline + pc))``.  0.1 pp keeps
#: the ratio finite when a subset is absent at a visit while barely affecting
#: subsets that make up more than ~1 % of their parent.
DEFAULT_PSEUDOCOUNT: float = 0.1

CLINICAL_REQUIRED = ("patient", "week", "pasi")
CLINICAL_OPTIONAL = ("treatment", "notes")
CLINICAL_EXTRA = ("cotherapy", "event")

#: The treatment period every association defaults to: baseline through the
#: UC-MSC window, up to (not including) the first visit on a changed biologic.
MSC_PERIOD: str = "MSC"

#: Known treatment periods, in clinical order.
PERIODS: tuple[str, ...] = (MSC_PERIOD, "biologic resumed", "new biologic")

#: Patterns (case-insensitive) that open a later period when a file gives
#: events instead of periods in ``treatment``/``event`` (older clinical files).
_PERIOD_PATTERNS: tuple[tuple[str, str], ...] = (
    ("new biologic", r"switch|new biologic"),
    ("biologic resumed", r"restart|resum"),
)
SAMPLE_REQUIRED = ("patient", "week")
POPULATION_REQUIRED = ("sample_id", "population", "pct_parent")

_WEEK_RE = re.compile(r"^\s*(?:w(?:eek|k)?)?\s*[-_]?\s*([+-]?\d+(?:\.\d+)?)\s*$", re.IGNORECASE)


# --------------------------------------------------------------------------- helpers


def _source_name(source: object) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return "<DataFrame>"


def _line_numbers(index: Iterable[int], lines: Sequence[int] | None = None) -> str:
    """Human-readable CSV line numbers for 0-based data-row positions.

    ``lines`` maps positions to file line numbers (from :func:`_read_csv`);
    without it the header is assumed on line 1 and no blank lines.
    """
    if lines is None:
        return ", ".join(str(int(i) + 2) for i in index)
    return ", ".join(str(int(lines[int(i)])) for i in index)


def _parse_week_value(value: object) -> float:
    """Parse one week value; returns NaN if it cannot be parsed."""
    if value is None:
        return np.nan
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    if not text or text.lower() in {"nan", "none", "na"}:
        return np.nan
    m = _WEEK_RE.match(text)
    if m is None:
        return np.nan
    return float(m.group(1))


def _normalize_weeks(
    values: pd.Series, source: str, what: str = "week", lines: Sequence[int] | None = None
) -> pd.Series:
    """Convert a week column to numbers, raising :class:`ClinicalDataError` on failures.

    Returns float64 values (integral weeks stay exactly representable).
    """
    parsed = values.map(_parse_week_value).astype(float)
    bad = parsed.isna() | ~np.isfinite(parsed)
    if bad.any():
        pos = np.flatnonzero(bad.to_numpy())
        shown = ", ".join(repr(values.iloc[i]) for i in pos[:10])
        raise ClinicalDataError(
            f"{source}: non-numeric or missing {what} value(s) {shown} at line(s) "
            f"{_line_numbers(pos[:10], lines)}; weeks must be numbers (e.g. 4) or labels like 'W4'."
        )
    if (parsed < 0).any():
        pos = np.flatnonzero((parsed < 0).to_numpy())
        raise ClinicalDataError(
            f"{source}: negative {what} at line(s) {_line_numbers(pos[:10], lines)}; "
            "week 0 is the baseline visit."
        )
    return parsed


def _normalize_ids(values: pd.Series) -> pd.Series:
    """Patient / sample identifiers as stripped strings (missing stays NaN)."""
    out = values.astype("string").str.strip()
    out = out.mask(out == "")
    return out.astype(object).where(out.notna(), np.nan)


def _read_csv(path: PathLike, kind: str) -> tuple[pd.DataFrame, list[int]]:
    """Read a CSV as strings; also return the file line number of every data row."""
    p = Path(path)
    if not p.exists():
        raise ClinicalDataError(f"{p}: {kind} file not found.")
    try:
        df = pd.read_csv(p, dtype=str, keep_default_na=True, skipinitialspace=True,
                         skip_blank_lines=False)
    except pd.errors.EmptyDataError as exc:
        raise ClinicalDataError(f"{p}: {kind} file is empty.") from exc
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ClinicalDataError(f"{p}: cannot parse {kind} CSV: {exc}") from exc
    keep = df.notna().any(axis=1).to_numpy()
    lines = [int(i) + 2 for i in np.flatnonzero(keep)]  # header is line 1
    return df[keep].reset_index(drop=True), lines


def _standardize_columns(df: pd.DataFrame) -> pd.DataFrame:
    df = df.copy()
    df.columns = [str(c).strip().lower() for c in df.columns]
    return df


def _require_columns(df: pd.DataFrame, required: Sequence[str], source: str, kind: str) -> None:
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise ClinicalDataError(
            f"{source}: {kind} is missing required column(s) {missing}; "
            f"found {list(df.columns)}."
        )


# --------------------------------------------------------------------------- clinical


def validate_clinical(
    df: pd.DataFrame, source: PathLike | None = None, _lines: Sequence[int] | None = None
) -> pd.DataFrame:
    """Validate and normalise a clinical table.

    Parameters
    ----------
    df
        Table with columns ``patient, week, pasi`` and optionally
        ``treatment, notes`` (extra columns are kept).
    source
        File name used in error messages (``<DataFrame>`` if None).

    Returns
    -------
    pandas.DataFrame
        Copy with ``patient`` (str), ``week`` (float), ``pasi`` (float),
        ``treatment`` and ``notes`` (str, empty when absent), sorted by patient
        and week.

    Raises
    ------
    ClinicalDataError
        Missing columns, missing patient ids, non-numeric week or PASI, PASI
        outside 0-72, duplicate (patient, week) visits, or a patient without a
        baseline (week 0) visit.
    """
    src = _source_name(source) if source is not None else "<DataFrame>"
    df = _standardize_columns(df).reset_index(drop=True)
    _require_columns(df, CLINICAL_REQUIRED, src, "clinical table")
    if df.empty:
        raise ClinicalDataError(f"{src}: clinical table has no rows.")

    df["patient"] = _normalize_ids(df["patient"])
    if df["patient"].isna().any():
        pos = np.flatnonzero(df["patient"].isna().to_numpy())
        raise ClinicalDataError(
            f"{src}: missing patient id at line(s) {_line_numbers(pos, _lines)}."
        )

    df["week"] = _normalize_weeks(df["week"], src, lines=_lines)

    pasi = pd.to_numeric(df["pasi"], errors="coerce")
    bad = pasi.isna()
    if bad.any():
        pos = np.flatnonzero(bad.to_numpy())
        rows = "; ".join(
            f"line {_line_numbers([i], _lines)} (patient {df.at[i, 'patient']}, "
            f"week {df.at[i, 'week']:g}): {df.at[i, 'pasi']!r}"
            for i in pos[:10]
        )
        raise ClinicalDataError(f"{src}: PASI is missing or non-numeric at {rows}.")
    out_of_range = (pasi < 0) | (pasi > PASI_MAX)
    if out_of_range.any():
        pos = np.flatnonzero(out_of_range.to_numpy())
        rows = "; ".join(
            f"line {_line_numbers([i], _lines)} (patient {df.at[i, 'patient']}, "
            f"week {df.at[i, 'week']:g}): PASI {pasi.iloc[i]:g}"
            for i in pos[:10]
        )
        raise ClinicalDataError(
            f"{src}: PASI out of range 0-{PASI_MAX:g} at {rows}."
        )
    df["pasi"] = pasi.astype(float)

    dup = df.duplicated(["patient", "week"], keep=False)
    if dup.any():
        parts = []
        for (pat, wk), grp in df[dup].groupby(["patient", "week"], sort=True):
            parts.append(f"patient {pat} week {wk:g} (lines {_line_numbers(grp.index, _lines)})")
        raise ClinicalDataError(f"{src}: duplicate visit(s): {'; '.join(parts)}.")

    has_baseline = df.groupby("patient")["week"].apply(lambda w: bool((w == 0).any()))
    no_base = sorted(has_baseline.index[~has_baseline])
    if no_base:
        raise ClinicalDataError(
            f"{src}: missing baseline (week 0) visit for patient(s) {no_base}; "
            "change from baseline cannot be computed."
        )

    return _with_treatment_columns(df)


def _with_treatment_columns(df: pd.DataFrame) -> pd.DataFrame:
    """Optional text columns filled, ``period`` derived, rows sorted by patient and week."""
    for col in (*CLINICAL_OPTIONAL, *CLINICAL_EXTRA):
        if col not in df.columns:
            df[col] = ""
        df[col] = df[col].fillna("").astype(str).str.strip()
    first = list(CLINICAL_REQUIRED) + list(CLINICAL_OPTIONAL)
    df = df[first + [c for c in df.columns if c not in first]]
    df = df.sort_values(["patient", "week"], kind="stable").reset_index(drop=True)
    df["period"] = treatment_periods(df)
    is_period = df["treatment"].str.lower().isin([p.lower() for p in PERIODS])
    if (df["event"] == "").all() and not is_period.all():  # older files: events were written in `treatment`
        df["event"] = df["treatment"].where(~is_period, "")
    return df


def treatment_periods(clinical: pd.DataFrame) -> pd.Series:
    """The treatment period of every visit (one of :data:`PERIODS`).

    When ``treatment`` already holds period names (the current clinical
    format) they are used as given (case-insensitive).  Otherwise (older files
    whose ``treatment`` marks events such as ``UC-MSC infusion`` or
    ``biologic restart``) the period is derived per patient in week order:
    every visit is in the MSC window until a visit whose ``treatment`` or
    ``event`` mentions a restart/resumption (``biologic resumed``) or a
    switch/new biologic (``new biologic``); that visit and all later ones
    belong to the new period.

    Parameters
    ----------
    clinical
        Table with ``patient, week`` and optionally ``treatment, event``.

    Returns
    -------
    pandas.Series
        Period names aligned with ``clinical``'s index.
    """
    def col(name: str) -> pd.Series:
        if name not in clinical.columns:
            return pd.Series("", index=clinical.index)
        return clinical[name].fillna("").astype(str).str.strip()

    treatment = col("treatment")
    known = {p.lower(): p for p in PERIODS}
    given = treatment.str.lower().map(known)
    if (treatment != "").any() and given[treatment != ""].notna().all():  # periods as data; blanks continue one
        order = clinical.sort_values("week", kind="stable").index
        filled = given.loc[order].groupby(clinical.loc[order, "patient"]).ffill()
        return filled.reindex(clinical.index).fillna(MSC_PERIOD).rename("period")
    text = treatment + " " + col("event")
    period = pd.Series(MSC_PERIOD, index=clinical.index, name="period")
    for _, idx in clinical.sort_values("week", kind="stable").groupby("patient", sort=False).groups.items():
        current = MSC_PERIOD
        for i in idx:
            for name, pattern in _PERIOD_PATTERNS:
                if re.search(pattern, text[i], flags=re.IGNORECASE):
                    current = name
                    break
            period[i] = current
    return period


def read_clinical(path: PathLike) -> pd.DataFrame:
    """Read and validate a clinical CSV (``patient,week,pasi[,treatment,notes]``).

    Parameters
    ----------
    path
        CSV file.

    Returns
    -------
    pandas.DataFrame
        Validated table, see :func:`validate_clinical`.

    Raises
    ------
    ClinicalDataError
        If the file is missing/unreadable or fails validation; the message
        names the file, the offending line(s) or patient(s), and the problem.
    """
    df, lines = _read_csv(path, "clinical")
    return validate_clinical(df, source=path, _lines=lines)


def _as_clinical(clinical: pd.DataFrame | PathLike) -> pd.DataFrame:
    if isinstance(clinical, pd.DataFrame):
        return validate_clinical(clinical)
    return read_clinical(clinical)


# --------------------------------------------------------------------------- samples


def validate_sample_sheet(
    df: pd.DataFrame, source: PathLike | None = None, _lines: Sequence[int] | None = None
) -> pd.DataFrame:
    """Validate and normalise sample metadata.

    Parameters
    ----------
    df
        Table with ``sample_id`` (or ``file``, whose stem becomes the
        sample id), ``patient`` and ``week``; optionally ``panel`` and ``file``.
    source
        File name used in error messages.

    Returns
    -------
    pandas.DataFrame
        Columns ``sample_id, patient, week`` followed by ``panel`` and
        ``file`` when present.

    Raises
    ------
    ClinicalDataError
        Missing columns, missing ids/patients, non-numeric weeks or duplicate
        sample ids.
    """
    src = _source_name(source) if source is not None else "<DataFrame>"
    df = _standardize_columns(df).reset_index(drop=True)
    if "sample_id" not in df.columns:
        if "file" not in df.columns:
            raise ClinicalDataError(
                f"{src}: sample sheet needs a 'sample_id' or 'file' column; "
                f"found {list(df.columns)}."
            )
        df["sample_id"] = [
            Path(str(f).strip()).stem if isinstance(f, str) and f.strip() else np.nan
            for f in df["file"]
        ]
    _require_columns(df, SAMPLE_REQUIRED, src, "sample sheet")
    if df.empty:
        raise ClinicalDataError(f"{src}: sample sheet has no rows.")

    for col in ("sample_id", "patient"):
        df[col] = _normalize_ids(df[col])
        if df[col].isna().any():
            pos = np.flatnonzero(df[col].isna().to_numpy())
            raise ClinicalDataError(
                f"{src}: missing {col} at line(s) {_line_numbers(pos, _lines)}."
            )
    df["week"] = _normalize_weeks(df["week"], src, lines=_lines)

    dup = df.duplicated("sample_id", keep=False)
    if dup.any():
        parts = [
            f"{sid} (lines {_line_numbers(g.index, _lines)})"
            for sid, g in df[dup].groupby("sample_id", sort=True)
        ]
        raise ClinicalDataError(f"{src}: duplicate sample_id(s): {'; '.join(parts)}.")

    cols = ["sample_id", "patient", "week"]
    for opt in ("panel", "file", "role"):
        if opt in df.columns:
            df[opt] = df[opt].fillna("").astype(str).str.strip()
            cols.append(opt)
    return df[cols].reset_index(drop=True)


def read_sample_sheet(path: PathLike) -> pd.DataFrame:
    """Read a sample sheet CSV (``file,sample_id,patient,week,panel``).

    Parameters
    ----------
    path
        CSV file.

    Returns
    -------
    pandas.DataFrame
        ``sample_id, patient, week[, panel, file]``; see
        :func:`validate_sample_sheet`.
    """
    df, lines = _read_csv(path, "sample sheet")
    return validate_sample_sheet(df, source=path, _lines=lines)


def _fcs_keyword(text: dict, key: str) -> str | None:
    """Look up an FCS TEXT keyword; flowio lower-cases keys and strips ``$``."""
    wanted = key.strip().lstrip("$").lower()
    for k, v in text.items():
        if str(k).strip().lstrip("$").lower() == wanted:
            return None if v is None else str(v).strip()
    return None


def _fcs_metadata_row(f: Path, patient_key: str, week_key: str, panel_key: str | None) -> dict[str, object]:
    """``sample_id, patient, week, file[, panel]`` of one FCS file, from its TEXT keywords."""
    import flowio

    try:
        text = flowio.FlowData(str(f), only_text=True).text
    except Exception as exc:  # flowio raises a variety of exceptions
        raise ClinicalDataError(f"{f}: cannot read FCS TEXT segment: {exc}") from exc
    patient = _fcs_keyword(text, patient_key)
    week = _fcs_keyword(text, week_key)
    missing = [k for k, v in ((patient_key, patient), (week_key, week)) if not v]
    if missing:
        raise ClinicalDataError(
            f"{f}: FCS keyword(s) {missing} missing or empty; cannot assign sample "
            "metadata (use a sample sheet instead)."
        )
    wk = _parse_week_value(week)
    if not np.isfinite(wk) or wk < 0:
        raise ClinicalDataError(f"{f}: FCS keyword {week_key}={week!r} is not a valid week.")
    row: dict[str, object] = {"sample_id": f.stem, "patient": patient, "week": wk, "file": str(f)}
    if panel_key:
        row["panel"] = _fcs_keyword(text, panel_key)
    return row


def sample_metadata_from_fcs(
    paths: PathLike | Iterable[PathLike],
    patient_key: str = "PATIENT",
    week_key: str = "WEEK",
    panel_key: str | None = "PANEL",
) -> pd.DataFrame:
    """Build sample metadata from FCS TEXT keywords.

    Only the TEXT segment is parsed (``flowio.FlowData(path, only_text=True)``).

    Parameters
    ----------
    paths
        FCS file(s), or a directory whose ``*.fcs`` files are used.
    patient_key, week_key
        Keyword names (case-insensitive, leading ``$`` ignored).
    panel_key
        Optional keyword for the panel; the column is added when at least one
        file carries it.  ``None`` disables it.

    Returns
    -------
    pandas.DataFrame
        ``sample_id`` (file stem), ``patient``, ``week``[, ``panel``], ``file``.

    Raises
    ------
    ClinicalDataError
        If a file lacks the patient or week keyword, cannot be read, or the
        week is not numeric.
    """
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        files = sorted(p.glob("*.fcs")) + sorted(p.glob("*.FCS")) if p.is_dir() else [p]
    else:
        files = [Path(p) for p in paths]
    if not files:
        raise ClinicalDataError(f"{paths}: no FCS files given.")

    rows = [_fcs_metadata_row(f, patient_key, week_key, panel_key) for f in files]

    df = pd.DataFrame(rows)
    if "panel" in df.columns and df["panel"].isna().all():
        df = df.drop(columns="panel")
    src = ", ".join(str(f) for f in files[:3]) + (" ..." if len(files) > 3 else "")
    return validate_sample_sheet(df, source=f"FCS keywords ({src})")


def _as_samples(samples: pd.DataFrame | PathLike | Iterable[PathLike]) -> pd.DataFrame:
    if isinstance(samples, pd.DataFrame):
        return validate_sample_sheet(samples)
    if isinstance(samples, (str, Path)):
        p = Path(samples)
        if p.is_dir() or p.suffix.lower() == ".fcs":
            return sample_metadata_from_fcs(p)
        return read_sample_sheet(p)
    return sample_metadata_from_fcs(samples)


# --------------------------------------------------------------------------- populations


def _read_table(source: pd.DataFrame | PathLike, kind: str) -> tuple[pd.DataFrame, str]:
    """A copy of a DataFrame, or a CSV / Parquet (``.parquet``, ``.pq``) file, with its name for messages."""
    if isinstance(source, pd.DataFrame):
        return source.copy(), "<DataFrame>"
    p = Path(source)
    if not p.exists():
        raise ClinicalDataError(f"{p}: {kind} not found.")
    return (pd.read_parquet(p) if p.suffix.lower() in {".parquet", ".pq"} else pd.read_csv(p)), str(p)


def read_populations(populations: pd.DataFrame | PathLike) -> pd.DataFrame:
    """Load a population table from a DataFrame, CSV or Parquet file.

    Parameters
    ----------
    populations
        DataFrame, or path ending in ``.parquet``/``.pq`` (Parquet) or
        anything else (CSV).

    Returns
    -------
    pandas.DataFrame
        Copy with ``sample_id`` and ``population`` as strings and
        ``pct_parent`` numeric.

    Raises
    ------
    ClinicalDataError
        Missing file or required columns (``sample_id, population, pct_parent``).
    """
    df, src = _read_table(populations, "population table")
    _require_columns(df, POPULATION_REQUIRED, src, "population table")
    df["sample_id"] = df["sample_id"].astype(str).str.strip()
    df["population"] = df["population"].astype(str)
    df["pct_parent"] = pd.to_numeric(df["pct_parent"], errors="coerce")
    return df


# --------------------------------------------------------------------------- joining


def _split_sample_meta(pops: pd.DataFrame, samples: pd.DataFrame | PathLike | Iterable[PathLike] | None
                       ) -> tuple[pd.DataFrame, pd.DataFrame, str]:
    """The population table without sample metadata, the metadata (sample sheet) and where it came from.

    With ``samples=None`` the metadata are the population table's own ``patient``/``week``
    (``panel``) columns; they are never guessed from file names.
    """
    if samples is None:
        missing = [c for c in SAMPLE_REQUIRED if c not in pops.columns]
        if missing:
            raise ClinicalDataError(
                f"population table has no {missing} column(s) and no sample sheet / FCS "
                "metadata was given; sample metadata is never guessed from file names."
            )
        meta_cols = ["patient", "week"] + (["panel"] if "panel" in pops.columns else [])
        meta = validate_sample_sheet(
            pops[["sample_id", *meta_cols]].drop_duplicates("sample_id")
        )
        return pops.drop(columns=meta_cols), meta, "population table"
    meta = _as_samples(samples)
    samp_src = _source_name(samples) if isinstance(samples, (str, Path)) else "sample metadata"
    overlap = [c for c in ("patient", "week", "panel", "file") if c in pops.columns]
    return pops.drop(columns=overlap), meta, samp_src


def _check_patients(pop_patients: set, clin_patients: set, clin_src: str) -> None:
    """Every patient of the population table must be in the clinical table; extra clinical ones warn."""
    not_in_clin = sorted(pop_patients - clin_patients)
    not_in_pops = sorted(clin_patients - pop_patients)
    if not_in_clin:
        raise ClinicalDataError(
            f"{clin_src}: patient(s) {not_in_clin} present in the population table are "
            f"absent from the clinical table (clinical patients: {sorted(clin_patients)})."
        )
    if not_in_pops:
        warnings.warn(
            f"{clin_src}: patient(s) {not_in_pops} in the clinical table have no samples "
            "in the population table; they are ignored.",
            UserWarning,
            stacklevel=3,  # the caller of join_clinical
        )


def join_clinical(
    populations: pd.DataFrame | PathLike,
    samples: pd.DataFrame | PathLike | Iterable[PathLike] | None,
    clinical: pd.DataFrame | PathLike,
) -> pd.DataFrame:
    """Attach patient, week and PASI to every sample x population row.

    Parameters
    ----------
    populations
        Population table (DataFrame, CSV or Parquet path).
    samples
        Sample metadata: DataFrame, sample-sheet CSV, FCS file(s) or a
        directory of FCS files (keywords), or ``None`` if ``populations``
        already has ``patient`` and ``week`` columns.
    clinical
        Clinical table (DataFrame or CSV path).

    Returns
    -------
    pandas.DataFrame
        Long table: population columns plus ``patient, week[, panel], pasi,
        baseline_pasi, treatment``.  Rows whose visit has no PASI keep
        ``pasi = NaN`` (with a warning).

    Raises
    ------
    ClinicalDataError
        Samples in the population table without metadata, or patients in the
        population table that are absent from the clinical table.

    Warns
    -----
    UserWarning
        Patients in the clinical table without any population data, or sample
        visits without a matching clinical visit.
    """
    pops = read_populations(populations)
    clin = _as_clinical(clinical)
    clin_src = _source_name(clinical)
    pops, meta, samp_src = _split_sample_meta(pops, samples)

    unknown = sorted(set(pops["sample_id"]) - set(meta["sample_id"]))
    if unknown:
        shown = unknown[:20]
        more = f" (+{len(unknown) - 20} more)" if len(unknown) > 20 else ""
        raise ClinicalDataError(
            f"{samp_src}: no patient/week metadata for sample_id(s) {shown}{more} "
            "found in the population table."
        )

    meta_cols = [c for c in ("sample_id", "patient", "week", "panel") if c in meta.columns]
    joined = pops.merge(meta[meta_cols], on="sample_id", how="left", validate="many_to_one")
    _check_patients(set(joined["patient"]), set(clin["patient"]), clin_src)

    baseline = clin.loc[clin["week"] == 0, ["patient", "pasi"]].rename(
        columns={"pasi": "baseline_pasi"}
    )
    clin_cols = clin[["patient", "week", "pasi", "treatment", "period", "cotherapy"]]
    joined = joined.merge(clin_cols, on=["patient", "week"], how="left", validate="many_to_one")
    joined = joined.merge(baseline, on="patient", how="left", validate="many_to_one")

    no_visit = joined.loc[joined["pasi"].isna(), ["patient", "week"]].drop_duplicates()
    if not no_visit.empty:
        visits = ", ".join(f"{p} W{w:g}" for p, w in no_visit.itertuples(index=False))
        warnings.warn(
            f"{clin_src}: no clinical visit (PASI) for sample visit(s) {visits}; "
            "their PASI is left missing.",
            UserWarning,
            stacklevel=2,
        )
    joined["treatment"] = joined["treatment"].fillna("")
    joined["cotherapy"] = joined["cotherapy"].fillna("")
    joined["period"] = joined["period"].fillna("")

    lead = ["sample_id", "patient", "week"] + (["panel"] if "panel" in joined.columns else [])
    return joined[lead + [c for c in joined.columns if c not in lead]].sort_values(
        ["patient", "week", "sample_id", "population"], kind="stable"
    ).reset_index(drop=True)


# --------------------------------------------------------------------------- changes


def pasi_response(clinical: pd.DataFrame | PathLike) -> pd.DataFrame:
    """PASI improvement from baseline and PASI50/75/90 per patient visit.

    Parameters
    ----------
    clinical
        Clinical table (DataFrame or CSV path); validated.

    Returns
    -------
    pandas.DataFrame
        ``patient, week, pasi, baseline_pasi, delta_pasi`` (pasi - baseline),
        ``pasi_improvement_pct`` (100 * (baseline - pasi) / baseline; NaN when
        baseline PASI is 0), ``pasi50, pasi75, pasi90`` (improvement >= 50/75/90
        %, nullable booleans, NA when undefined) and ``treatment``.
    """
    clin = _as_clinical(clinical)
    base = clin.loc[clin["week"] == 0].set_index("patient")["pasi"]
    out = clin[["patient", "week", "pasi", "treatment"]].copy()
    out["baseline_pasi"] = out["patient"].map(base).astype(float)
    out["delta_pasi"] = out["pasi"] - out["baseline_pasi"]
    with np.errstate(divide="ignore", invalid="ignore"):
        imp = 100.0 * (out["baseline_pasi"] - out["pasi"]) / out["baseline_pasi"]
    imp = imp.where(out["baseline_pasi"] > 0)
    out["pasi_improvement_pct"] = imp
    for thr in (50, 75, 90):
        # small tolerance so that e.g. 75.0000000001 vs 74.99999999 float noise is irrelevant
        flag = (imp >= thr - 1e-9).astype("boolean")
        out[f"pasi{thr}"] = flag.mask(imp.isna())
    cols = ["patient", "week", "pasi", "baseline_pasi", "delta_pasi", "pasi_improvement_pct",
            "pasi50", "pasi75", "pasi90", "treatment"]
    return out[cols].reset_index(drop=True)


def _feature_keys(df: pd.DataFrame) -> list[str]:
    """Grouping keys identifying one measured subset (population, plus panel if present)."""
    return ["population", "panel"] if "panel" in df.columns else ["population"]


def select_populations(table: pd.DataFrame, populations: Sequence[str]) -> pd.DataFrame:
    """The rows of ``table`` for ``populations``; a ``ValueError`` names any that it lacks."""
    wanted = list(populations)
    absent = sorted(set(wanted) - set(table["population"]))
    if absent:
        raise ValueError(f"population(s) {absent} not found in the table")
    return table[table["population"].isin(wanted)]


def subset_changes(
    joined: pd.DataFrame,
    value: str = "pct_parent",
    pseudocount: float = DEFAULT_PSEUDOCOUNT,
) -> pd.DataFrame:
    """Per patient x population x week change of a subset from baseline (week 0).

    Parameters
    ----------
    joined
        Output of :func:`join_clinical`.
    value
        Column to compare with baseline (percentages, default ``pct_parent``).
    pseudocount
        Added to both visit and baseline value before the log2 ratio:
        ``log2fc = log2((v + pseudocount) / (v_baseline + pseudocount))``.
        Default 0.1 percentage points (:data:`DEFAULT_PSEUDOCOUNT`).

    Returns
    -------
    pandas.DataFrame
        ``patient, population[, panel], week, <value>, baseline_<value>,
        delta_<value>`` (percentage points), ``log2fc_<value>``, ``pasi,
        baseline_pasi, delta_pasi, pasi_improvement_pct, is_baseline``
        (plus ``treatment`` when available).

    Raises
    ------
    ClinicalDataError
        If a patient has more than one sample for the same population and
        week (and panel), which would make the change ambiguous.

    Warns
    -----
    UserWarning
        When a patient x population has no baseline measurement (its changes
        are NaN).
    """
    if pseudocount < 0:
        raise ValueError("pseudocount must be >= 0")
    needed = ["patient", "week", "population", value, "pasi"]
    missing = [c for c in needed if c not in joined.columns]
    if missing:
        raise ClinicalDataError(
            f"subset_changes: joined table lacks column(s) {missing}; run join_clinical first."
        )
    df = joined.copy()
    feats = _feature_keys(df)
    if "panel" in df.columns:
        df["panel"] = df["panel"].fillna("").astype(str)
    keys = ["patient", *feats]
    df[value] = pd.to_numeric(df[value], errors="coerce")

    dup = df.duplicated([*keys, "week"], keep=False)
    if dup.any():
        ex = df.loc[dup, [*keys, "week", "sample_id"] if "sample_id" in df else [*keys, "week"]]
        raise ClinicalDataError(
            "subset_changes: more than one sample per patient/population/week:\n"
            f"{ex.head(10).to_string(index=False)}"
        )

    base = df.loc[df["week"] == 0, [*keys, value]].rename(columns={value: f"baseline_{value}"})
    out = df.merge(base, on=keys, how="left")
    if "baseline_pasi" not in out.columns:
        bp = df.loc[df["week"] == 0].groupby("patient")["pasi"].first().rename("baseline_pasi")
        out = out.merge(bp, left_on="patient", right_index=True, how="left")

    no_base = out.loc[out[f"baseline_{value}"].isna() & out[value].notna(), keys].drop_duplicates()
    if not no_base.empty:
        items = ", ".join("/".join(str(v) for v in r) for r in no_base.itertuples(index=False))
        warnings.warn(
            f"subset_changes: no baseline (week 0) {value} for {items}; changes set to NaN.",
            UserWarning,
            stacklevel=2,
        )

    out[f"delta_{value}"] = out[value] - out[f"baseline_{value}"]
    with np.errstate(divide="ignore", invalid="ignore"):
        out[f"log2fc_{value}"] = np.log2(
            (out[value] + pseudocount) / (out[f"baseline_{value}"] + pseudocount)
        )
    out[f"log2fc_{value}"] = out[f"log2fc_{value}"].where(np.isfinite(out[f"log2fc_{value}"]))
    out["delta_pasi"] = out["pasi"] - out["baseline_pasi"]
    with np.errstate(divide="ignore", invalid="ignore"):
        imp = 100.0 * (out["baseline_pasi"] - out["pasi"]) / out["baseline_pasi"]
    out["pasi_improvement_pct"] = imp.where(out["baseline_pasi"] > 0)
    out["is_baseline"] = out["week"] == 0

    cols = [*keys, "week", value, f"baseline_{value}", f"delta_{value}", f"log2fc_{value}",
            "pasi", "baseline_pasi", "delta_pasi", "pasi_improvement_pct", "is_baseline"]
    if "treatment" in out.columns:
        cols.append("treatment")
    if "sample_id" in out.columns:
        cols.insert(len(keys) + 1, "sample_id")
    return out[cols].sort_values([*feats, "patient", "week"], kind="stable").reset_index(drop=True)
