"""A whole study in one call: a sample sheet, one template per panel, one population table.

This is what ``immuneprofile study`` runs: every FCS file listed in the sample
sheet is gated with its panel's template; the tables are concatenated (with
the sheet's patient/week/panel columns) and, given a clinical table, related
to PASI with :func:`immuneprofile.association.correlate`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from immuneprofile.batch import gate_files
from immuneprofile.exceptions import ClinicalDataError
from immuneprofile.stats import readout_table, to_anndata, write_tables
from immuneprofile.template.model import Template
from immuneprofile.template.parse import TemplateError, load_template
from immuneprofile.template.shipped import PANEL_TEMPLATES

__all__ = ["DEFAULT_TEMPLATES", "run_study"]

#: Panel name -> shipped template (by name, see :func:`immuneprofile.load_template`).
DEFAULT_TEMPLATES: dict[str, str] = {panel: names[0] for panel, names in PANEL_TEMPLATES.items() if len(names) == 1}


def _resolve_templates(templates: Mapping[str, str | os.PathLike | Template],
                       gating_dir: Path | None) -> dict[str, Template]:
    out = {}
    for panel, t in templates.items():
        if isinstance(t, Template):
            out[panel] = t
            continue
        p = Path(t)
        if gating_dir is not None and not p.is_absolute() and not p.exists():
            cand = gating_dir / (p if p.suffix else p.with_suffix(".yaml"))
            p = cand if cand.exists() else p
        out[panel] = load_template(p)
    return out


def run_study(
    sample_sheet: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    templates: Mapping[str, str | os.PathLike | Template] | None = None,
    gating_dir: str | os.PathLike | None = None,
    clinical: str | os.PathLike | None = None,
    compensation: Any = "auto",
    jobs: int = 1,
    scheduler: Any = None,
    resume: bool = False,
    anndata: bool = False,
    batch_by: str | None = "patient",
    progress: Callable[[str, str | None], None] | None = None,
) -> dict[str, Any]:
    """Gate every sample of a sample sheet with its panel's template, then correlate with PASI.

    Parameters
    ----------
    sample_sheet
        CSV with ``file, sample_id, patient, week, panel`` (``file`` relative to the sheet).
    out_dir
        Where ``populations.csv``/``.parquet``, ``thresholds.csv``, ``errors.csv`` and,
        with ``clinical``, the correlation outputs are written.
    templates
        Panel -> template (path, shipped template name or :class:`Template`); defaults to
        :data:`DEFAULT_TEMPLATES`, the shipped templates.
    gating_dir
        A folder where relative template names are looked up first (default: none).
    clinical
        Clinical CSV (``patient, week, pasi[, treatment]``); if given, run
        :func:`immuneprofile.association.correlate` on the gated table.
    compensation, jobs, scheduler
        As for :func:`immuneprofile.gate_files` (``scheduler``: a Dask scheduler address or client).
    resume
        Take over the files an interrupted run into the same ``out_dir`` already gated
        (each panel's per-file tables are kept in ``out_dir/parts/<panel>``).
    anndata
        Also write ``events_<panel>.h5ad`` per panel (in-process gating only).
    batch_by
        Sample-sheet column whose groups are gated as separate batches, so that a template's
        ``scope: batch`` thresholds (e.g. the CLA/CD103 cuts) are fitted once per group - by
        default on each patient's pooled files, and on the reference samples' pooled files -
        and held fixed across that patient's visits. ``None``: one batch per panel.

    Returns
    -------
    dict
        ``table`` (population table with sheet metadata), ``readouts`` (the templates' declared
        readouts, :func:`immuneprofile.stats.readout_table`, with the sheet's ``patient, week,
        panel, role``; also written as ``readouts.csv``), ``errors`` (path -> message),
        ``files`` (name -> path written) and, with ``clinical``, ``correlation``.
    """
    from immuneprofile.study.clinical import read_sample_sheet

    sheet_path = Path(sample_sheet)
    sheet = _with_extra_columns(read_sample_sheet(sheet_path), sheet_path)
    tmpl = _resolve_templates(templates or DEFAULT_TEMPLATES, None if gating_dir is None else Path(gating_dir))
    _check_sheet(sheet, sheet_path, tmpl)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables, ths, errors, files = _gate_panels(sheet, sheet_path, tmpl, out, batch_by=batch_by, anndata=anndata,
                                              compensation=compensation, jobs=jobs, scheduler=scheduler,
                                              resume=resume, progress=progress)
    table = _with_meta(pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(), sheet)
    files.update(write_tables(out, table, pd.concat(ths, ignore_index=True) if ths else None, errors))
    readouts = _readouts(table, tmpl, sheet)
    if not readouts.empty:
        readouts.to_csv(out / "readouts.csv", index=False)
        files["readouts"] = out / "readouts.csv"
    result: dict[str, Any] = {"table": table, "readouts": readouts, "errors": errors, "files": files}
    if clinical is not None and not table.empty:
        corr = _correlate(table, readouts, clinical, sheet, out)
        result["correlation"] = corr
        files.update(corr["files"])
    return result


def _check_sheet(sheet: pd.DataFrame, sheet_path: Path, tmpl: Mapping[str, Template]) -> None:
    """A study's sample sheet names a file and a panel with a template for every sample."""
    if "file" not in sheet.columns or "panel" not in sheet.columns:
        raise ClinicalDataError(f"{sheet_path}: the sample sheet needs `file` and `panel` columns to run a study")
    unknown = sorted(set(sheet["panel"]) - set(tmpl))
    if unknown:
        raise TemplateError(f"{sheet_path}: panel(s) {unknown} have no template; "
                            f"known panels: {sorted(tmpl)} (pass templates={{panel: path}})")


def _with_extra_columns(sheet: pd.DataFrame, path: Path) -> pd.DataFrame:
    """The validated sheet plus the columns validation does not keep (``role``, ``batch``, cell counts)."""
    raw = pd.read_csv(path)
    raw.columns = [str(c).strip() for c in raw.columns]
    key = "file" if "file" in raw.columns and "file" in sheet.columns else "sample_id"
    extra = [c for c in raw.columns if c not in sheet.columns]
    if not extra or key not in raw.columns or raw[key].duplicated().any():
        return sheet
    raw[key] = raw[key].astype(str).str.strip()
    return sheet.merge(raw[[key, *extra]], on=key, how="left")


def _batches(rows: pd.DataFrame, batch_by: str | None):
    """Groups of sample-sheet rows gated together (one group when ``batch_by`` is None or absent)."""
    if batch_by is None or batch_by not in rows.columns:
        return [(None, rows)]
    return list(rows.groupby(rows[batch_by].astype(str), sort=False))


def _gate_panels(sheet: pd.DataFrame, sheet_path: Path, tmpl: Mapping[str, Template], out: Path, *,
                 batch_by: str | None, anndata: bool, compensation: Any, jobs: int, scheduler: Any, resume: bool,
                 progress) -> tuple:
    """Gate every panel's files, batch by batch: ``(tables, thresholds, errors, files)``.

    Each batch's per-file tables are kept in ``out/parts/<panel>[/<batch>]`` (``resume``).
    """
    tables, ths, errors, files = [], [], {}, {}
    for panel, rows in sheet.groupby("panel", sort=False):
        results, complete = [], True
        for key, group in _batches(rows, batch_by):
            parts = out / "parts" / str(panel) / (str(key) if key is not None else "")
            batch = gate_files(_paths(group, sheet_path), tmpl[panel], compensation=compensation, jobs=jobs,
                               scheduler=scheduler, parts=parts, resume=resume, progress=progress)
            errors.update(batch.errors)
            if batch.gated:
                tables.append(batch.table)
                ths.append(batch.thresholds)
                results.extend(batch.results)
                complete &= len(batch.results) == len(batch.gated)  # resumed files come back without events
        if anndata and jobs == 1 and scheduler is None and results and complete:
            f = out / f"events_{panel}.h5ad"
            to_anndata(results).write_h5ad(f)
            files[f"events_{panel}"] = f
    return tables, ths, errors, files


def _paths(rows: pd.DataFrame, sheet_path: Path) -> list[str]:
    """The sheet's files, relative to the sheet's folder unless absolute."""
    return [str((sheet_path.parent / f) if not Path(f).is_absolute() else Path(f)) for f in rows["file"]]


def _meta(sheet: pd.DataFrame) -> pd.DataFrame:
    return sheet[[c for c in ("sample_id", "patient", "week", "panel", "role") if c in sheet.columns]]


def _with_meta(table: pd.DataFrame, sheet: pd.DataFrame) -> pd.DataFrame:
    """The population table with the sheet's patient, week and panel."""
    if table.empty:
        return table
    return table.merge(_meta(sheet).drop(columns="role", errors="ignore"), on="sample_id", how="left")


def _readouts(table: pd.DataFrame, tmpl: Mapping[str, Template], sheet: pd.DataFrame) -> pd.DataFrame:
    """The declared readouts of every gated sample, with the sheet's metadata."""
    if table.empty:
        return pd.DataFrame()
    unique = {t.name: t for t in tmpl.values()}
    counts = sheet if any(t.absolute is not None for t in unique.values()) else None
    ro = readout_table(table, list(unique.values()), cell_counts=counts)
    if counts is not None and ro["per_uL"].isna().all():
        ro = ro.drop(columns="per_uL")
    return ro.merge(_meta(sheet), on="sample_id", how="left")


def _correlate(table: pd.DataFrame, readouts: pd.DataFrame, clinical, sheet: pd.DataFrame, out: Path):
    """The association step, on the templates' declared readouts."""
    from immuneprofile.study.association import correlate

    return correlate(table, clinical, sheet, out, readouts=readouts if not readouts.empty else None)
