"""Plots for the clinical-correlation workflow (seaborn / matplotlib).

Every function returns the :class:`matplotlib.figure.Figure` and optionally
saves it (``save=path``).  When no display is available and no backend was
chosen (``MPLBACKEND``), the non-interactive Agg backend is selected on import.

Plot elements carry a ``gid`` so they can be identified programmatically:
``patient:<id>`` (trajectory lines), ``infusion`` (infusion visits),
``restart:<id>`` (biologic restart of one patient), ``pasi75`` (PASI75
reference on the improvement panel) and ``pasi75:<id>`` (per-patient PASI75
threshold, 25 % of baseline PASI, on the absolute panel).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path

from immuneprofile._pyplot import pyplot

plt = pyplot()  # the backend switch (Agg without a display), before pyplot is first used

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402

__all__ = [
    "patient_palette",
    "plot_pasi_trajectories",
    "plot_subset_trajectories",
    "plot_association_heatmap",
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
        g = grouped[key]
        _draw_infusions(ax, infusions, label=False)
        _draw_restarts(ax, restarts, colors, label=False)
        for pat, gp in g.groupby("patient", sort=True):
            gp = gp.sort_values("week")
            (line,) = ax.plot(gp["week"], gp[value], marker="o", ms=3.5, lw=1.5,
                              color=colors[str(pat)], label=str(pat))
            line.set_gid(f"patient:{pat}")
        ax.set_title(_facet_label(key, feats), fontsize=9)
        ax.set_ylabel(value.replace("_", " "))
        _set_week_ticks(ax, weeks)
    for ax in flat[n:]:
        fig.delaxes(ax)

    handles = [Line2D([], [], color=c, marker="o", label=p) for p, c in colors.items()]
    if infusions:
        handles.append(Line2D([], [], color="0.45", ls="--", label="UC-MSC infusion"))
    if restarts:
        handles.append(Line2D([], [], color="k", ls="-.", label="biologic restart"))
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=8,
               frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.93 if nrows == 1 else 0.96))
    _save(fig, save, dpi)
    return fig


def _stars(p: float) -> str:
    if not np.isfinite(p):
        return ""
    return "***" if p < 0.001 else "**" if p < 0.01 else "*" if p < 0.05 else ""


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
        p-value column for significance stars (``*`` < .05, ``**`` < .01,
        ``***`` < .001); ``None`` disables stars.
    annotate
        Write the coefficient (2 decimals, plus stars) in each cell;
        not-estimable cells are left blank.
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
        pv = (df.pivot_table(index="row", columns="method", values=p_col, aggfunc="first",
                             dropna=False).reindex(index=rows, columns=methods)
              if p_col else None)
        annot_arr = np.empty(mat.shape, dtype=object)
        for i in range(mat.shape[0]):
            for j in range(mat.shape[1]):
                v = mat.iat[i, j]
                p = float(pv.iat[i, j]) if pv is not None and pd.notna(pv.iat[i, j]) else np.nan
                annot_arr[i, j] = f"{v:.2f}{_stars(p)}" if pd.notna(v) else ""
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
