"""Plots for the clinical-correlation workflow (seaborn / matplotlib).

Every function returns the :class:`matplotlib.figure.Figure` and optionally
saves it (``save=path``).  When no display is available and no backend was
chosen (``MPLBACKEND``), the non-interactive Agg backend is selected on import.

Plot elements carry a ``gid`` so they can be identified programmatically:
``patient:<id>`` (trajectory lines), ``infusion`` (infusion visits),
``restart:<id>`` (biologic restart of one patient), ``pasi75`` (PASI75
reference on the improvement panel) and ``pasi75:<id>`` (per-patient PASI75
threshold, 25 % of baseline PASI, on the absolute panel); on the per-patient
panels ``period:<name>`` (shaded treatment period), ``event:<text>`` (a
clinical event) and ``reference:<readout>`` (a literature reference range).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from immuneprofile._pyplot import pyplot

plt = pyplot()  # the backend switch (Agg without a display), before pyplot is first used

import matplotlib.patches  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.artist import Artist  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

__all__ = [
    "patient_palette",
    "plot_pasi_trajectories",
    "plot_subset_trajectories",
    "plot_association_heatmap",
    "plot_patient_panels",
    "plot_fold_changes",
    "REFERENCE_RANGES",
    "PERIOD_COLORS",
]

PathLike = str | Path

INFUSION_PATTERN = r"infusion"
RESTART_PATTERN = r"restart"

METHOD_LABELS = {
    "spearman_delta": "Spearman\n(Δ subset vs Δ PASI)",
    "rmcorr": "rmcorr\n(within patient)",
    "lmm": "LMM slope\n(standardised)",
}


def patient_palette(patients: Sequence[str]) -> dict[str, tuple]:
    """Stable colour per patient (seaborn ``colorblind`` palette, sorted ids)."""
    ids = sorted(dict.fromkeys(str(p) for p in patients))
    colors = sns.color_palette("colorblind", max(len(ids), 1))
    return {p: colors[i % len(colors)] for i, p in enumerate(ids)}


def _save(fig: Figure, save: PathLike | None, dpi: int) -> None:
    if save is not None:
        path = Path(save)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi, bbox_inches="tight")


def _week_label(w: float) -> str:
    return f"W{w:g}"


def _set_week_ticks(ax, weeks: Sequence[float]) -> None:
    weeks = sorted(set(float(w) for w in weeks))
    span = (weeks[-1] - weeks[0]) if len(weeks) > 1 else 1.0
    crowded = len(weeks) > 1 and float(np.min(np.diff(weeks))) < 0.06 * span
    ax.set_xticks(weeks)
    ax.set_xticklabels([_week_label(w) for w in weeks], fontsize=8,
                       rotation=90 if crowded else 0)
    ax.set_xlabel("Week")


def _treatment_marks(
    table: pd.DataFrame | None,
    infusion_pattern: str,
    restart_pattern: str,
) -> tuple[list[float], dict[str, list[float]]]:
    """Infusion weeks (all patients) and restart weeks per patient from ``treatment``."""
    if table is None or "treatment" not in table.columns:
        return [], {}
    t = table[["patient", "week", "treatment"]].drop_duplicates()
    txt = t["treatment"].fillna("").astype(str)
    inf = sorted(set(t.loc[txt.str.contains(infusion_pattern, flags=re.I, regex=True), "week"]))
    restart: dict[str, list[float]] = {}
    for pat, wk in t.loc[txt.str.contains(restart_pattern, flags=re.I, regex=True),
                         ["patient", "week"]].itertuples(index=False):
        restart.setdefault(str(pat), []).append(float(wk))
    return [float(w) for w in inf], restart


def _draw_infusions(ax, weeks: Sequence[float], label: bool) -> None:
    for i, w in enumerate(weeks):
        line = ax.axvline(w, color="0.45", ls="--", lw=1, zorder=0,
                          label="UC-MSC infusion" if (label and i == 0) else "_nolegend_")
        line.set_gid("infusion")


def _draw_restarts(ax, restarts: dict[str, list[float]], colors: dict[str, tuple],
                   label: bool) -> None:
    first = True
    for pat, weeks in sorted(restarts.items()):
        for w in weeks:
            line = ax.axvline(w, color=colors.get(pat, "k"), ls="-.", lw=1.2, zorder=0,
                              label="biologic restart" if (label and first) else "_nolegend_")
            line.set_gid(f"restart:{pat}")
            first = False


def plot_pasi_trajectories(
    clinical: pd.DataFrame,
    *,
    panels: Sequence[str] = ("absolute", "improvement"),
    infusion_pattern: str = INFUSION_PATTERN,
    restart_pattern: str = RESTART_PATTERN,
    save: PathLike | None = None,
    dpi: int = 150,
    figsize: tuple[float, float] | None = None,
) -> Figure:
    """PASI over weeks, one line per patient, with treatment marks.

    Parameters
    ----------
    clinical
        Validated clinical table (:func:`immuneprofile.clinical.read_clinical`)
        with ``patient, week, pasi[, treatment]``.
    panels
        ``"absolute"`` (PASI; dotted per-patient PASI75 thresholds at 25 % of
        baseline) and/or ``"improvement"`` (% improvement from baseline with a
        horizontal PASI75 line at 75 %).
    infusion_pattern, restart_pattern
        Case-insensitive regular expressions matched against ``treatment``:
        visits matching ``infusion_pattern`` get a grey dashed vertical line
        (gid ``infusion``), visits matching ``restart_pattern`` a dash-dot line
        in the patient's colour (gid ``restart:<patient>``) and an ``X`` marker.
    save
        Optional output path.
    dpi
        Resolution when saving.
    figsize
        Figure size; default scales with the number of panels.

    Returns
    -------
    matplotlib.figure.Figure
    """
    from immuneprofile.study.clinical import pasi_response

    panels = tuple(panels)
    bad = [p for p in panels if p not in ("absolute", "improvement")]
    if bad or not panels:
        raise ValueError(f"panels must be a non-empty subset of ('absolute', 'improvement'); got {panels}")
    resp = pasi_response(clinical)
    colors = patient_palette(resp["patient"])
    infusions, restarts = _treatment_marks(resp, infusion_pattern, restart_pattern)

    fig, axes = plt.subplots(
        1, len(panels), figsize=figsize or (5.2 * len(panels), 3.8), squeeze=False
    )
    for ax, panel in zip(axes[0], panels):
        ycol = "pasi" if panel == "absolute" else "pasi_improvement_pct"
        _draw_infusions(ax, infusions, label=True)
        _draw_restarts(ax, restarts, colors, label=True)
        for pat, g in resp.groupby("patient", sort=True):
            g = g.sort_values("week")
            (line,) = ax.plot(g["week"], g[ycol], marker="o", ms=4, lw=1.8,
                              color=colors[pat], label=str(pat))
            line.set_gid(f"patient:{pat}")
            for w in restarts.get(str(pat), []):
                pt = g[g["week"] == w]
                if not pt.empty:
                    ax.scatter(pt["week"], pt[ycol], marker="X", s=70, color=colors[pat],
                               edgecolor="k", zorder=5)
            if panel == "absolute":
                thr = 0.25 * float(g["baseline_pasi"].iloc[0])
                ref = ax.axhline(thr, color=colors[pat], ls=":", lw=1,
                                 label="PASI75 threshold (25% of baseline)"
                                 if pat == min(colors) else "_nolegend_")
                ref.set_gid(f"pasi75:{pat}")
        if panel == "absolute":
            ax.set_ylabel("PASI")
            ax.set_ylim(bottom=0)
            ax.set_title("PASI per patient")
        else:
            ref = ax.axhline(75, color="k", ls=":", lw=1.2, label="PASI75")
            ref.set_gid("pasi75")
            ax.set_ylabel("PASI improvement from baseline (%)")
            ax.set_title("PASI response")
        _set_week_ticks(ax, resp["week"])
        ax.legend(fontsize=7, frameon=False, loc="best")
    fig.tight_layout()
    _save(fig, save, dpi)
    return fig


def _facet_label(key: tuple, feats: list[str]) -> str:
    d = dict(zip(feats, key))
    pop = str(d["population"])
    panel = d.get("panel")
    return f"{pop} [{panel}]" if panel else pop


def _trajectory_facets(joined: pd.DataFrame, populations: Sequence[str] | None
                       ) -> tuple[pd.DataFrame, list[str], list[tuple]]:
    """The table to draw, its facet columns and the facet keys (in ``populations`` order, else sorted)."""
    df = joined.copy()
    feats = ["population", "panel"] if "panel" in df.columns else ["population"]
    if "panel" in df.columns:
        df["panel"] = df["panel"].fillna("").astype(str)
    if populations is not None:
        from immuneprofile.study.clinical import select_populations

        populations = list(populations)
        df = select_populations(df, populations)
        order = {p: i for i, p in enumerate(populations)}
        keys = sorted(df[feats].drop_duplicates().itertuples(index=False, name=None),
                      key=lambda k: (order[k[0]], k[1:]))
    else:
        keys = sorted(df[feats].drop_duplicates().itertuples(index=False, name=None))
    if not keys:
        raise ValueError("no populations to plot")
    return df, feats, keys


def _draw_patient_lines(ax, g: pd.DataFrame, value: str, colors: dict[str, tuple]) -> None:
    """One line (gid ``patient:<id>``) per patient of ``g``: ``value`` over weeks."""
    for pat, gp in g.groupby("patient", sort=True):
        gp = gp.sort_values("week")
        (line,) = ax.plot(gp["week"], gp[value], marker="o", ms=3.5, lw=1.5,
                          color=colors[str(pat)], label=str(pat))
        line.set_gid(f"patient:{pat}")


def _trajectory_handles(colors: dict[str, tuple], infusions: bool, restarts: bool) -> list[Artist]:
    """Legend entries: one per patient, then the treatment marks drawn."""
    handles: list[Artist] = [Line2D([], [], color=c, marker="o", label=p) for p, c in colors.items()]
    if infusions:
        handles.append(Line2D([], [], color="0.45", ls="--", label="UC-MSC infusion"))
    if restarts:
        handles.append(Line2D([], [], color="k", ls="-.", label="biologic restart"))
    return handles


def plot_subset_trajectories(
    joined: pd.DataFrame,
    populations: Sequence[str] | None = None,
    *,
    value: str = "pct_parent",
    clinical: pd.DataFrame | None = None,
    col_wrap: int = 3,
    sharey: bool = False,
    infusion_pattern: str = INFUSION_PATTERN,
    restart_pattern: str = RESTART_PATTERN,
    save: PathLike | None = None,
    dpi: int = 150,
) -> Figure:
    """Subset frequency over weeks per patient, one facet per population.

    Parameters
    ----------
    joined
        Output of :func:`immuneprofile.clinical.join_clinical` (or
        :func:`~immuneprofile.clinical.subset_changes`).
    populations
        Populations to draw, in this order (default: all, sorted).  When the
        table has a ``panel`` column each population x panel is one facet.
    value
        Column on the y axis (default ``pct_parent``).
    clinical
        Optional clinical table for treatment marks; otherwise the
        ``treatment`` column of ``joined`` is used when present.
    col_wrap
        Facets per row.
    sharey
        Share the y axis across facets.
    infusion_pattern, restart_pattern
        See :func:`plot_pasi_trajectories`.
    save, dpi
        Optional output path and resolution.

    Returns
    -------
    matplotlib.figure.Figure
        One visible axes per facet, one line (gid ``patient:<id>``) per patient.
    """
    if value not in joined.columns:
        raise ValueError(f"column {value!r} not in table")
    df, feats, keys = _trajectory_facets(joined, populations)
    colors = patient_palette(df["patient"])
    marks_src = clinical if clinical is not None else (df if "treatment" in df.columns else None)
    if marks_src is not None and clinical is not None:
        marks_src = marks_src[marks_src["patient"].astype(str).isin(colors)]
    infusions, restarts = _treatment_marks(marks_src, infusion_pattern, restart_pattern)

    n = len(keys)
    ncols = max(1, min(col_wrap, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.0 * ncols, 3.0 * nrows),
                             squeeze=False, sharey=sharey)
    flat = axes.ravel()
    grouped = {k if isinstance(k, tuple) else (k,): g for k, g in df.groupby(feats, sort=False)}
    weeks = sorted(df["week"].unique())
    for ax, key in zip(flat, keys):
        _draw_infusions(ax, infusions, label=False)
        _draw_restarts(ax, restarts, colors, label=False)
        _draw_patient_lines(ax, grouped[key], value, colors)
        ax.set_title(_facet_label(key, feats), fontsize=9)
        ax.set_ylabel(value.replace("_", " "))
        _set_week_ticks(ax, weeks)
    for ax in flat[n:]:
        fig.delaxes(ax)

    handles = _trajectory_handles(colors, bool(infusions), bool(restarts))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.93 if nrows == 1 else 0.96))
    _save(fig, save, dpi)
    return fig


def plot_association_heatmap(
    assoc: pd.DataFrame,
    *,
    value: str = "std_coef",
    p_col: str = "p_value",
    annotate: bool = True,
    save: PathLike | None = None,
    dpi: int = 150,
    title: str | None = None,
) -> Figure:
    """Heatmap of association coefficients, populations x methods.

    Parameters
    ----------
    assoc
        Output of :func:`immuneprofile.association.associate`.
    value
        Coefficient column coloured on a -1..1 scale (default ``std_coef``:
        Spearman rho, rmcorr r and the standardised LMM slope).
    p_col
        Ignored; kept for backward compatibility.  No significance stars are
        drawn: with a handful of patients every p-value is exploratory.
    annotate
        Write the coefficient (2 decimals) in each cell; not-estimable cells
        are left blank.
    save, dpi
        Optional output path and resolution.
    title
        Figure title; the default mentions the number of patients and flags
        small cohorts.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if assoc.empty:
        raise ValueError("association table is empty")
    df = assoc.copy()
    if "panel" in df.columns:
        panel = df["panel"].fillna("").astype(str)
        df["row"] = np.where(panel != "", df["population"].astype(str) + " [" + panel + "]",
                             df["population"].astype(str))
    else:
        df["row"] = df["population"].astype(str)
    methods = list(dict.fromkeys(df["method"]))
    rows = sorted(df["row"].unique())
    mat = df.pivot_table(index="row", columns="method", values=value, aggfunc="first",
                         dropna=False).reindex(index=rows, columns=methods)
    annot_arr = None
    if annotate:
        annot_arr = np.empty(mat.shape, dtype=object)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                v = mat.iat[i, j]
                annot_arr[i, j] = f"{v:.2f}" if pd.notna(v) else ""
    vals = mat.to_numpy(dtype=float)
    fig, ax = plt.subplots(figsize=(1.9 * len(methods) + 2.5, 0.45 * len(rows) + 1.8))
    sns.heatmap(
        pd.DataFrame(vals, index=rows, columns=[METHOD_LABELS.get(m, m) for m in methods]),
        ax=ax, cmap="RdBu_r", vmin=-1, vmax=1, mask=~np.isfinite(vals),
        annot=annot_arr if annotate else False, fmt="", annot_kws={"fontsize": 8},
        linewidths=0.5, linecolor="white", cbar_kws={"label": value.replace("_", " ")},
    )
    ax.set_xlabel("")
    ax.set_ylabel("")
    ax.tick_params(axis="x", labelsize=8, rotation=0)
    ax.tick_params(axis="y", labelsize=8)
    if title is None:
        n_pat = int(df["n_patients"].max()) if "n_patients" in df.columns else None
        title = "Association with PASI"
        if n_pat is not None:
            title += f" (n = {n_pat} patients"
            has_warn = "warning" in df.columns and df["warning"].astype(str).str.contains(
                "too small").any()
            title += ", exploratory)" if has_warn else ")"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    _save(fig, save, dpi)
    return fig


# --------------------------------------------------------------------------- per-patient panels

#: Literature reference values drawn on the per-patient panels, keyed by
#: readout name; drawn only when the readout's denominator (``of``) matches.
REFERENCE_RANGES: dict[str, dict] = {
    "Treg": {"low": 6.35 - 0.26, "high": 6.35 + 0.26, "mean": 6.35, "of": "CD4+",
             "label": "healthy donors 6.35 ± 0.26 % of CD4+ (Seddiki 2006 J Exp Med 203:1693)"},
    "non-classical": {"low": None, "high": None, "mean": 9.0, "of": "monocytes",
                      "label": "healthy donors ≈ 9 % of monocytes (Ziegler-Heitbrock 2015 Front Immunol 6:423)"},
}

#: Shading of the treatment periods.
PERIOD_COLORS: dict[str, str] = {"MSC": "#d9ecd0", "biologic resumed": "#f6dcc2", "new biologic": "#e3d7ee"}


def _period_spans(visits: pd.DataFrame) -> list[tuple[str, float, float]]:
    """``(period, start week, end week)`` runs of one patient's visits in week order."""
    v = visits.sort_values("week")
    spans: list[tuple[str, float, float]] = []
    for period, week in zip(v["period"].astype(str), v["week"].astype(float)):
        if spans and spans[-1][0] == period:
            spans[-1] = (period, spans[-1][1], week)
        else:
            if spans:
                spans[-1] = (spans[-1][0], spans[-1][1], week)
            spans.append((period, week, week))
    return spans


def shade_periods(ax, clinical_patient: pd.DataFrame, *, events: bool = True) -> None:
    """Shade one patient's treatment periods on ``ax`` and mark the clinical events.

    Parameters
    ----------
    ax
        Matplotlib axes with weeks on x.
    clinical_patient
        One patient's clinical rows (``week, period[, event]``).
    events
        Also draw a vertical line (gid ``event:<text>``) at every visit with an event.
    """
    for period, start, end in _period_spans(clinical_patient):
        patch = ax.axvspan(start, end if end > start else start + 0.5, color=PERIOD_COLORS.get(period, "0.9"),
                           alpha=0.6, lw=0, zorder=0)
        patch.set_gid(f"period:{period}")
    if not events or "event" not in clinical_patient.columns:
        return
    for week, text in clinical_patient[["week", "event"]].itertuples(index=False):
        if isinstance(text, str) and text.strip():
            line = ax.axvline(float(week), color="0.35", ls="--", lw=0.8, zorder=1)
            line.set_gid(f"event:{text.strip()}")
            ax.annotate(text.strip(), (float(week), 1.0), xycoords=("data", "axes fraction"), rotation=90,
                        fontsize=6, va="top", ha="right", color="0.3")


def _draw_reference(ax, readout: str, of: str | None) -> None:
    ref = REFERENCE_RANGES.get(readout)
    if ref is None or (of is not None and of.replace(" ", "") != ref["of"].replace(" ", "")):
        return
    if ref["low"] is not None:
        band = ax.axhspan(ref["low"], ref["high"], color="0.6", alpha=0.35, lw=0, zorder=1)
        band.set_gid(f"reference:{readout}")
    line = ax.axhline(ref["mean"], color="0.4", ls=":", lw=1, zorder=1)
    line.set_gid(f"reference:{readout}")


def _panel(ax, g: pd.DataFrame, y: str, color, err: str | None = None) -> None:
    g = g.sort_values("week")
    (line,) = ax.plot(g["week"], g[y], color=color, lw=1.5, marker="o", ms=3.5, zorder=3)
    line.set_gid(f"patient:{g['patient'].iloc[0]}")
    if err is not None and err in g.columns:
        ax.errorbar(g["week"], g[y], yerr=g[err], fmt="none", ecolor=color, elinewidth=0.8, zorder=3)
    if "low_count" in g.columns and g["low_count"].any():
        low = g[g["low_count"]]
        ax.scatter(low["week"], low[y], facecolor="white", edgecolor="red", s=30, zorder=4,
                   label="below minimum events")


def _readout_cell(ax, name: str, g: pd.DataFrame, color) -> None:
    """One patient's values of one readout, with its literature reference where the denominator matches."""
    if g.empty:
        return
    _panel(ax, g, "pct", color, err="se_pct")
    if name not in REFERENCE_RANGES and "population" in g.columns:
        name = str(g["population"].iloc[0])  # a readout named otherwise, of a population with a reference
    _draw_reference(ax, name, str(g["of"].iloc[0]) if "of" in g.columns else None)


def _panel_legend(changes: pd.DataFrame, clinical: pd.DataFrame, readouts: Sequence[str]) -> list:
    """Legend of the per-patient panels: the periods present, the cited reference ranges drawn, low counts."""
    handles: list = [matplotlib.patches.Patch(color=c, alpha=0.6, label=f"{p} period")
                     for p, c in PERIOD_COLORS.items() if p in set(clinical.get("period", []))]
    shown = set(readouts)
    if "population" in changes.columns:
        shown |= set(changes.loc[changes["readout"].isin(readouts), "population"])
    handles += [Line2D([], [], color="0.4", ls=":", label=r["label"]) for k, r in REFERENCE_RANGES.items() if k in shown]
    handles.append(Line2D([], [], ls="", marker="o", mfc="white", mec="red", label="below minimum events"))
    return handles


def plot_patient_panels(
    changes: pd.DataFrame,
    clinical: pd.DataFrame,
    readouts: Sequence[str] | None = None,
    *,
    save: PathLike | None = None,
    dpi: int = 120,
) -> Figure:
    """Per-patient panels: PASI and each readout over weeks, treatment periods shaded, events marked.

    Parameters
    ----------
    changes
        Output of :func:`immuneprofile.study.readouts.describe_changes`
        (``patient, readout, week, pct, se_pct, low_count[, of]``).
    clinical
        Validated clinical table (``patient, week, pasi, period[, event]``).
    readouts
        Readouts to draw, in order (default: all, sorted).
    save, dpi
        Optional output path and resolution.

    Returns
    -------
    matplotlib.figure.Figure
        One column per patient; the first row is PASI, then one row per
        readout (% of its denominator, error bars = binomial SE; hollow red
        points: below the minimum event count).  Literature reference ranges
        (:data:`REFERENCE_RANGES`) are drawn where the denominator matches,
        with their citation in the legend.
    """
    readouts = list(readouts) if readouts is not None else sorted(changes["readout"].unique())
    patients = sorted(clinical["patient"].astype(str).unique())
    colors = patient_palette(patients)
    fig, axes = plt.subplots(len(readouts) + 1, len(patients), squeeze=False, sharex="col",
                             figsize=(3.4 * len(patients), 1.9 * (len(readouts) + 1)))
    by_readout = {k: g for k, g in changes.groupby("readout")}
    for j, pat in enumerate(patients):
        clin_p = clinical[clinical["patient"].astype(str) == pat]
        shade_periods(axes[0, j], clin_p)
        _panel(axes[0, j], clin_p.assign(patient=pat), "pasi", colors[pat])
        axes[0, j].set_title(pat, fontsize=10)
        axes[0, j].set_ylim(bottom=0)
        for i, name in enumerate(readouts, start=1):
            shade_periods(axes[i, j], clin_p, events=False)
            g = by_readout.get(name, pd.DataFrame(columns=["patient"]))
            _readout_cell(axes[i, j], name, g[g["patient"].astype(str) == pat], colors[pat])
        _set_week_ticks(axes[-1, j], clin_p["week"])
    for i, name in enumerate(["PASI", *readouts]):
        of = by_readout[name]["of"].iloc[0] if name in by_readout and "of" in by_readout[name].columns else None
        axes[i, 0].set_ylabel(name + (f"\n% of {of}" if i and of is not None else ""), fontsize=8)
    for ax in axes.ravel():
        ax.tick_params(labelsize=7)
    fig.legend(handles=_panel_legend(changes, clinical, readouts), loc="upper center", ncol=2, fontsize=7,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.9 / fig.get_figheight()))
    _save(fig, save, dpi)
    return fig


def plot_fold_changes(
    changes: pd.DataFrame,
    *,
    save: PathLike | None = None,
    dpi: int = 120,
) -> Figure:
    """log2 fold change from baseline of every readout, per patient and visit, against assay variation.

    Parameters
    ----------
    changes
        Output of :func:`immuneprofile.study.readouts.describe_changes`.
    save, dpi
        Optional output path and resolution.

    Returns
    -------
    matplotlib.figure.Figure
        Readouts on y, log2 fold change on x; one point per patient x
        post-baseline visit (filled: MSC window, hollow: later periods; a cross
        marks visits below the minimum event count).  The grey band of each
        readout is ±2 x its assay CV: changes inside it are within assay noise.
    """
    post = changes[~changes["is_baseline"]]
    readouts = sorted(post["readout"].unique())
    colors = patient_palette(post["patient"].astype(str))
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(readouts) + 1.6))
    ypos = {r: i for i, r in enumerate(readouts)}
    cv = post.groupby("readout")["assay_cv"].first()
    for r, i in ypos.items():
        lo, hi = np.log2(max(1 - 2 * cv[r], 1e-3)), np.log2(1 + 2 * cv[r])
        band = ax.fill_betweenx([i - 0.4, i + 0.4], lo, hi, color="0.85", lw=0, zorder=0)
        band.set_gid(f"assay:{r}")
    offsets = {p: (k - (len(colors) - 1) / 2) * 0.18 for k, p in enumerate(colors)}
    for (pat, msc, low), g in post.assign(msc=post["period"] == "MSC").groupby(
            ["patient", "msc", "low_count"]):
        y = g["readout"].map(ypos) + offsets[str(pat)]
        ax.scatter(g["log2fc"], y, s=22, marker="x" if low else "o", color=colors[str(pat)],
                   facecolor=colors[str(pat)] if (msc or low) else "none", zorder=3,
                   gid=f"patient:{pat}")
    ax.axvline(0, color="0.3", lw=0.8)
    ax.set_yticks(range(len(readouts)), readouts, fontsize=8)
    ax.set_xlabel("log2 fold change from baseline")
    handles: list[Artist] = [Line2D([], [], ls="", marker="o", color=c, label=p) for p, c in colors.items()]
    handles += [Line2D([], [], ls="", marker="o", mfc="none", mec="0.3", label="later period"),
                Line2D([], [], ls="", marker="x", color="0.3", label="below minimum events"),
                matplotlib.patches.Patch(color="0.85", label="±2 × assay CV")]
    ax.legend(handles=handles, fontsize=7, frameon=False, loc="center left", bbox_to_anchor=(1.0, 0.5))
    ax.set_title("Change from baseline per patient and visit (description, n = "
                 f"{post['patient'].nunique()})", fontsize=10)
    fig.tight_layout()
    _save(fig, save, dpi)
    return fig
