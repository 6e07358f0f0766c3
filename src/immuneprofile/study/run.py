"""A whole study in one call: a sample sheet, one template per panel, one population table.

This is what ``immuneprofile study`` runs: every FCS file listed in the sample
sheet is gated with its panel's template; the tables are concatenated (with
the sheet's patient/week/panel columns) and, given a clinical table, related
to PASI with :func:`immuneprofile.association.correlate`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Mapping

import pandas as pd

from immuneprofile.batch import gate_files
from immuneprofile.stats import to_anndata, write_tables
from immuneprofile.template.parse import Template, TemplateError, load_template
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

    Returns
    -------
    dict
        ``table`` (population table with sheet metadata), ``errors`` (path -> message),
        ``files`` (name -> path written) and, with ``clinical``, ``correlation``.
    """
    from immuneprofile.study.clinical import read_sample_sheet

    sheet_path = Path(sample_sheet)
    sheet = read_sample_sheet(sheet_path)
    if "file" not in sheet.columns or "panel" not in sheet.columns:
        raise TemplateError(f"{sheet_path}: the sample sheet needs `file` and `panel` columns to run a study")
    tmpl = _resolve_templates(templates or DEFAULT_TEMPLATES, None if gating_dir is None else Path(gating_dir))
    unknown = sorted(set(sheet["panel"]) - set(tmpl))
    if unknown:
        raise TemplateError(f"{sheet_path}: panel(s) {unknown} have no template; "
                            f"known panels: {sorted(tmpl)} (pass templates={{panel: path}})")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables, ths, errors, files = [], [], {}, {}
    for panel, rows in sheet.groupby("panel", sort=False):
        paths = [str((sheet_path.parent / f) if not Path(f).is_absolute() else Path(f)) for f in rows["file"]]
        batch = gate_files(paths, tmpl[panel], compensation=compensation, jobs=jobs, scheduler=scheduler,
                           parts=out / "parts" / str(panel), resume=resume, progress=progress)
        errors.update(batch.errors)
        if batch.gated:
            tables.append(batch.table)
            ths.append(batch.thresholds)
            if anndata and jobs == 1 and scheduler is None and len(batch.results) == len(batch.gated):
                f = out / f"events_{panel}.h5ad"
                to_anndata(batch.results).write_h5ad(f)
                files[f"events_{panel}"] = f
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if not table.empty:
        meta = sheet[[c for c in ("sample_id", "patient", "week", "panel") if c in sheet.columns]]
        table = table.merge(meta, on="sample_id", how="left")
    files.update(write_tables(out, table, pd.concat(ths, ignore_index=True) if ths else None, errors))
    result: dict[str, Any] = {"table": table, "errors": errors, "files": files}
    if clinical is not None and not table.empty:
        from immuneprofile.study.association import correlate

        corr = correlate(table, clinical, sheet, out)
        result["correlation"] = corr
        files.update(corr["files"])
    return result
