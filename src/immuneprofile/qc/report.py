"""HTML batch report: gating plots, population tables, reference check, warnings.

::

    from immuneprofile import gate_files, load_template
    from immuneprofile.qc.report import build_report
    batch = gate_files(files, load_template("gating/treg.yaml"))   # in-process: keeps the events
    build_report(batch, "report/", reference_db="study.sqlite", reference_sample="REF_treg")

The report is one self-contained ``report.html`` (PNG images embedded as base64)
with, per sample, the gating hierarchy drawn as 2-D density plots of each
population's parent with its gate overlaid (1-D gates: histograms with the cut
lines), the population table, the reference-sample check (if a reference
database is given) with Levey-Jennings charts, and warnings: samples with few
events, populations under 100 events, thresholds that fell back, files that
failed. ``populations.csv`` (and ``reference_check.csv``) are written beside it.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import math
import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Union, cast

import numpy as np
import pandas as pd

from immuneprofile._pyplot import pyplot
from immuneprofile.batch import Batch
from immuneprofile.engine.gating import GatingResult
from immuneprofile.engine.values import EventValues, gate_compensation
from immuneprofile.template.model import (
    BooleanGate,
    Dim,
    EllipseGate,
    PolygonGate,
    Population,
    QCGate,
    RectGate,
    Template,
    ThresholdRef,
)

__all__ = ["gate_figure", "gate_panels", "panel_events", "report_warnings", "build_report", "make_report",
           "MAX_POINTS", "MIN_POPULATION_EVENTS", "MIN_SAMPLE_EVENTS"]

PathLike = Union[str, "os.PathLike[str]"]

MAX_POINTS = 20_000
MIN_POPULATION_EVENTS = 100
MIN_SAMPLE_EVENTS = 10_000
GATE_COLOR = "#d62728"


# --------------------------------------------------------------------------- gate plots


def gate_panels(template: Template) -> list[list[Population]]:
    """Populations to draw, one list per plot: quadrants share one plot; boolean and QC gates are not drawn."""
    panels: list[list[Population]] = []
    groups: dict[str, list[Population]] = {}
    for pop in template.populations:
        g = pop.gate
        if isinstance(g, (BooleanGate, QCGate)):  # QC: a line of the report's warnings
            continue
        if isinstance(g, RectGate) and g.kind == "quadrant" and g.quadrant:
            key = g.quadrant[0]
            if key not in groups:
                groups[key] = []
                panels.append(groups[key])
            groups[key].append(pop)
            continue
        panels.append([pop])
    return panels


def _axis_label(dim: Dim) -> str:
    t = dim.transform["type"] if dim.transform else "linear"
    return f"{dim.marker} ({t})"


def _limits(vals: np.ndarray, extra: Iterable[float]) -> tuple[float, float]:
    fin = vals[np.isfinite(vals)]
    pts = [float(x) for x in extra if x is not None and np.isfinite(x)]
    if fin.size:
        lo, hi = np.quantile(fin, [0.001, 0.999])
        pts += [float(lo), float(hi)]
    if not pts:
        return 0.0, 1.0
    lo, hi = min(pts), max(pts)
    pad = 0.05 * (hi - lo) if hi > lo else max(abs(lo) * 0.05, 0.05)
    return lo - pad, hi + pad


def _fmt_pct(n: int, d: int) -> str:
    return f"{100.0 * n / d:.1f}%" if d else "n/a"


def panel_events(result: GatingResult, pop: Population, values: EventValues, max_points: int,
                 rng: np.random.Generator) -> tuple[np.ndarray, int, list[np.ndarray]]:
    """The events a panel draws: ``(event indices, parent size, values of the gate's first two dimensions)``.

    The indices are the parent's events (a fixed random subsample of at most
    ``max_points``); the values are the ones the engine gates on
    (:class:`~immuneprofile.engine.EventValues`, with the gate's compensation).
    """
    idx = np.arange(result.n_events) if pop.parent is None else result.indices[pop.parent]
    parent_n = int(idx.size)
    if idx.size > max_points:
        idx = np.sort(rng.choice(idx, max_points, replace=False))
    g: Any = pop.gate  # a drawn gate: not boolean
    comp = gate_compensation(g)
    return idx, parent_n, [values.transformed(d, idx, comp, pop.name) for d in g.dims[:2]]


def _resolved_bounds(g: Any, th: dict, notes: list[str]) -> list[tuple[Any, Any]]:
    """A rectangle's bounds with thresholds resolved (noted when unresolved, or beyond the drawn two axes)."""
    if not isinstance(g, RectGate):
        if len(g.dims) > 2:
            notes.append(f"{len(g.dims)}-D gate: first two dimensions shown")
        return []

    def bound(b):
        if not isinstance(b, ThresholdRef):
            return b
        v = th.get((b.marker, b.cut))
        if v is None:
            notes.append(f"{b} unresolved")
        return v

    bounds = [(bound(lo), bound(hi)) for lo, hi in g.bounds]
    for d, (lo, hi) in zip(g.dims[2:], bounds[2:]):
        parts = ([f">= {lo:.3g}"] if lo is not None else []) + ([f"< {hi:.3g}"] if hi is not None else [])
        notes.append(f"and {d.marker} {' & '.join(parts)}")
    return bounds


def _panel_title(ax, res: GatingResult, pops: list[Population], parent_n: int) -> None:
    pop, g = pops[0], cast(Any, pops[0].gate)
    parent_name = pop.parent or "all events"
    if len(pops) == 1:
        n = res.count(pop.name)
        comp_txt = " (complement)" if getattr(g, "complement", False) else ""
        ax.set_title(f"{pop.name}{comp_txt}\n{n:,} events, {_fmt_pct(n, parent_n)} of {parent_name}", fontsize=8)
    else:
        group = g.quadrant[0] if getattr(g, "quadrant", None) else pop.name
        ax.set_title(f"{group}\nof {parent_name} ({parent_n:,} events)", fontsize=8)


def _draw_histogram(ax, pop: Population, x: np.ndarray, bounds: tuple[Any, Any], ls: str) -> None:
    """A 1-D gate: the parent's histogram, the gated range shaded, its cuts as lines."""
    lo, hi = bounds
    xl = _limits(x, [lo, hi])
    fin = x[np.isfinite(x)]
    if fin.size:
        ax.hist(np.clip(fin, *xl), bins=128, range=xl, color="#4c72b0", alpha=0.8, histtype="stepfilled")
    ax.set_xlim(*xl)
    ax.axvspan(xl[0] if lo is None else lo, xl[1] if hi is None else hi, color=GATE_COLOR, alpha=0.12,
               gid=f"gate:{pop.name}")
    for b in (lo, hi):
        if b is not None:
            ax.axvline(b, color=GATE_COLOR, lw=1.2, ls=ls, gid=f"cut:{pop.name}")
    ax.set_xlabel(_axis_label(cast(Any, pop.gate).dims[0]), fontsize=7)
    ax.set_ylabel("events", fontsize=7)


def _rect_extent(g: RectGate, bounds) -> tuple[list, list]:
    return list(bounds[0]), list(bounds[1])


def _polygon_extent(g: PolygonGate, bounds) -> tuple[list, list]:
    return [v[0] for v in g.vertices], [v[1] for v in g.vertices]


def _ellipse_extent(g: EllipseGate, bounds) -> tuple[list, list]:
    c, cov = np.asarray(g.center[:2]), np.asarray(g.covariance)[:2, :2]
    half = np.sqrt(np.abs(np.diag(cov)) * g.distance_square)
    return [c[0] - half[0], c[0] + half[0]], [c[1] - half[1], c[1] + half[1]]


def _draw_quadrant(ax, res: GatingResult, pops: list[Population], bounds, parent_n: int) -> None:
    xc = bounds[0][0] if bounds[0][0] is not None else bounds[0][1]
    yc = bounds[1][0] if bounds[1][0] is not None else bounds[1][1]
    g = cast(RectGate, pops[0].gate)
    grp = g.quadrant[0] if g.quadrant else pops[0].name
    if xc is not None:
        ax.axvline(xc, color=GATE_COLOR, lw=1.2, gid=f"gate:{grp}")
    if yc is not None:
        ax.axhline(yc, color=GATE_COLOR, lw=1.2, gid=f"gate:{grp}")
    for q in pops:
        (qlo, _), (ylo, _) = cast(RectGate, q.gate).bounds[:2]
        right, top = qlo is not None, ylo is not None
        qn = res.count(q.name)
        ax.text(0.98 if right else 0.02, 0.97 if top else 0.03, f"{q.name}\n{qn:,} ({_fmt_pct(qn, parent_n)})",
                transform=ax.transAxes, ha="right" if right else "left", va="top" if top else "bottom",
                fontsize=6, color="black", bbox={"facecolor": "white", "alpha": 0.7, "lw": 0, "pad": 1})


def _draw_rect(ax, g: RectGate, name: str, bounds, xl, yl, ls: str) -> None:
    from matplotlib.patches import Rectangle

    (x0, x1), (y0, y1) = bounds[0], bounds[1]
    far_x, far_y = 1e9 * (xl[1] - xl[0]), 1e9 * (yl[1] - yl[0])
    x0 = xl[0] - far_x if x0 is None else x0
    x1 = xl[1] + far_x if x1 is None else x1
    y0 = yl[0] - far_y if y0 is None else y0
    y1 = yl[1] + far_y if y1 is None else y1
    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=GATE_COLOR, lw=1.3, ls=ls, gid=f"gate:{name}"))


def _draw_polygon(ax, g: PolygonGate, name: str, bounds, xl, yl, ls: str) -> None:
    from matplotlib.patches import Polygon

    ax.add_patch(Polygon(np.asarray(g.vertices), closed=True, fill=False, ec=GATE_COLOR, lw=1.3, ls=ls,
                         gid=f"gate:{name}"))


def _draw_ellipse(ax, g: EllipseGate, name: str, bounds, xl, yl, ls: str) -> None:
    from matplotlib.patches import Ellipse

    c, cov = np.asarray(g.center[:2]), np.asarray(g.covariance)[:2, :2]
    w, v = np.linalg.eigh(cov)
    angle = math.degrees(math.atan2(v[1, 1], v[0, 1]))
    ax.add_patch(Ellipse(tuple(c), 2 * math.sqrt(g.distance_square * w[1]), 2 * math.sqrt(g.distance_square * w[0]),
                         angle=angle, fill=False, ec=GATE_COLOR, lw=1.3, gid=f"gate:{name}"))


#: per drawable gate type: (its extent on the two axes drawn, how to draw its outline)
_GATE_DRAWING: dict[type, tuple[Callable, Callable]] = {
    RectGate: (_rect_extent, _draw_rect),
    PolygonGate: (_polygon_extent, _draw_polygon),
    EllipseGate: (_ellipse_extent, _draw_ellipse),
}


def _draw_density(ax, res: GatingResult, pops: list[Population], xy: list[np.ndarray], bounds, parent_n: int,
                  ls: str) -> None:
    """A 2-D gate: the parent's density on the gate's first two axes, the gate's outline over it."""
    from matplotlib.colors import LogNorm

    g: Any = pops[0].gate
    extent, draw = _GATE_DRAWING[type(g)]
    gx, gy = extent(g, bounds)
    x, y = xy
    xl, yl = _limits(x, gx), _limits(y, gy)
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.any():
        ax.hist2d(np.clip(x[ok], *xl), np.clip(y[ok], *yl), bins=128, range=[xl, yl], cmap="viridis",
                  norm=LogNorm(), cmin=1, rasterized=True)
    ax.set_xlim(*xl)
    ax.set_ylim(*yl)
    if isinstance(g, RectGate) and g.kind == "quadrant":
        _draw_quadrant(ax, res, pops, bounds, parent_n)
    else:
        draw(ax, g, pops[0].name, bounds, xl, yl, ls)
    ax.set_xlabel(_axis_label(g.dims[0]), fontsize=7)
    ax.set_ylabel(_axis_label(g.dims[1]), fontsize=7)


def _draw_panel(ax, res: GatingResult, pops: list[Population], vals: EventValues, th: dict, max_points: int,
                rng: np.random.Generator) -> None:
    pop = pops[0]
    g: Any = pop.gate
    _, parent_n, xy = panel_events(res, pop, vals, max_points, rng)
    notes: list[str] = []
    bounds = _resolved_bounds(g, th, notes)
    _panel_title(ax, res, pops, parent_n)
    ls = "--" if getattr(g, "complement", False) else "-"
    if len(g.dims) == 1:
        _draw_histogram(ax, pop, xy[0], bounds[0], ls)
    else:
        _draw_density(ax, res, pops, xy, bounds, parent_n, ls)
    if notes:
        ax.text(0.5, -0.32 if len(g.dims) > 1 else -0.3, "; ".join(notes), transform=ax.transAxes, ha="center",
                va="top", fontsize=6, color="#555555")
    ax.tick_params(labelsize=6)
    ax.ticklabel_format(axis="both", style="sci", scilimits=(-3, 4))
    ax.xaxis.get_offset_text().set_fontsize(6)
    ax.yaxis.get_offset_text().set_fontsize(6)


def gate_figure(result: GatingResult, *, max_points: int = MAX_POINTS, ncols: int = 4, seed: int = 0):
    """The gating hierarchy of one sample: one density plot per gate, gate geometry overlaid.

    Each non-boolean population is drawn on its parent's events (at most ``max_points``,
    a fixed random subsample) in the gate's dimensions, on the template's transformed
    axes; threshold bounds are the values used for this sample. Gate artists carry
    ``gid="gate:<population>"`` (quadrants: ``gate:<quadrant group>``). Axes follow the
    template order; ``fig.axes[i]`` shows ``gate_panels(template)[i]``.

    Returns
    -------
    matplotlib.figure.Figure
    """
    if result.data is None:
        raise ValueError(f"{result.path}: result carries no event data (gate in-process, jobs=1)")
    plt = pyplot()
    panels = gate_panels(result.template)
    n = max(1, len(panels))
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.1 * ncols, 3.0 * nrows), squeeze=False)
    th = {(f.marker, f.cut): f.value for f in result.thresholds}
    vals = EventValues(result.data, result.template)
    rng = np.random.default_rng(seed)
    flat = list(axes.ravel())
    for ax, pops in zip(flat, panels):
        _draw_panel(ax, result, pops, vals, th, max_points, rng)
    for ax in flat[len(panels):]:
        fig.delaxes(ax)
    fig.suptitle(f"{result.sample_id} — {result.template.name} ({result.n_events:,} events)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return fig


def _png(fig, dpi: int = 72) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- warnings


def report_warnings(batch: Batch, *, min_sample_events: int = MIN_SAMPLE_EVENTS,
                    min_population_events: int = MIN_POPULATION_EVENTS,
                    check: pd.DataFrame | None = None) -> list[str]:
    """Human-readable warnings for a batch (and its reference check)."""
    out = [f"file failed: {msg}" for msg in batch.errors.values()]
    for res in batch.results:
        out += _sample_warnings(res, min_sample_events, min_population_events)
    if check is not None and len(check):
        for r in check[check["status"] == "fail"].itertuples(index=False):
            out.append(f"reference {r.sample_id or '?'}: {r.population} ({r.template}) FAILED {r.rules}: "
                       f"{r.value:.2f}% vs mean {r.mean:.2f} ± {r.sd:.2f}")
        for r in check[(check["status"] == "pass") & (check["warning"] != "")].itertuples(index=False):
            out.append(f"reference {r.sample_id}: {r.population} ({r.template}) {r.warning} warning, z = {r.z:.2f}")
    return out


def _sample_warnings(res: GatingResult, min_sample_events: int, min_population_events: int) -> list[str]:
    out = []
    if res.n_events < min_sample_events:
        out.append(f"{res.sample_id}: low event count, {res.n_events:,} events (< {min_sample_events:,})")
    small = [(p.name, res.count(p.name)) for p in res.template.populations if res.count(p.name) < min_population_events]
    if small:
        out.append(f"{res.sample_id}: {len(small)} population(s) under {min_population_events} events: "
                   + ", ".join(f"{n} ({c})" for n, c in small))
    out += _qc_warnings(res)
    for f in res.thresholds:
        if f.fallback:
            out.append(f"{res.sample_id}: threshold {f.marker}.{f.cut} fell back to {f.value:.3g}"
                       + (f" ({f.note})" if f.note else ""))
    return out


def _qc_warnings(res: GatingResult) -> list[str]:
    """What acquisition QC removed from a sample (one line, or none)."""
    return [f"{res.sample_id}: acquisition QC removed {f.params['removed']:,} event(s) "
            f"({_fmt_pct(f.params['removed'], res.n_events)}: {f.params['removed_time']:,} in "
            f"{len(f.params['segments'])} time segment(s), {f.params['removed_margin']:,} margin)"
            for f in res.fits if f.kind == "qc" and f.params["removed"]]


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.5em} h2{font-size:1.2em;border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.82em;margin:.6em 0} th,td{border:1px solid #ddd;padding:2px 6px}
th{background:#f3f3f3;text-align:left} td.num{text-align:right;font-variant-numeric:tabular-nums}
tr.low td{background:#fff3cd} tr.status-fail td{background:#f8d7da} tr.status-pass td.status{color:#137333}
tr.status-insufficient-history td.status{color:#8a6d3b}
.warnings li{color:#8a4b00} .ok{color:#137333} img{max-width:100%;height:auto;border:1px solid #eee}
.lj{display:flex;flex-wrap:wrap;gap:6px} .lj img{width:420px}
.meta{color:#666;font-size:.85em}
"""

_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = document.querySelectorAll('img');
  var ok = 0, bad = [];
  imgs.forEach(function (im) {
    if (im.complete && im.naturalWidth > 0) { ok++; } else { bad.push(im.getAttribute('alt')); }
  });
  var el = document.getElementById('image-check');
  el.setAttribute('data-total', imgs.length);
  el.setAttribute('data-decoded', ok);
  el.setAttribute('data-failed', bad.join('|'));
  el.textContent = ok + ' of ' + imgs.length + ' images decoded';
});
"""


def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _slug(s: str) -> str:
    return re.sub(r"[^0-9A-Za-z_-]+", "-", s).strip("-") or "x"


def _num(v: Any, fmt: str) -> str:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return _e(v)
    return "" if not math.isfinite(f) else format(f, fmt)


def _population_rows(res: GatingResult, table: pd.DataFrame, min_population_events: int) -> str:
    rows = []
    sub = table[table["sample_id"] == res.sample_id]
    for r in sub.itertuples(index=False):
        low = int(r.count) < min_population_events
        cls = ' class="low"' if low else ""
        rows.append(
            f'<tr data-population="{_e(r.population)}"{cls}>'
            f"<td>{_e(r.population)}</td><td>{_e(r.parent)}</td><td class=\"num\">{int(r.count):,}</td>"
            f"<td class=\"num\">{int(r.parent_count):,}</td><td class=\"num\">{_num(r.pct_parent, '.2f')}</td>"
            f"<td class=\"num\">{_num(r.pct_total, '.3f')}</td></tr>")
    return ("<table class=\"populations\" data-sample-id=\"{}\"><thead><tr><th>population</th><th>parent</th>"
            "<th>count</th><th>parent count</th><th>% parent</th><th>% total</th></tr></thead><tbody>{}"
            "</tbody></table>").format(_e(res.sample_id), "".join(rows))


def _summary_table(table: pd.DataFrame) -> str:
    if table.empty:
        return "<p>No sample gated.</p>"
    pops = list(dict.fromkeys(table["population"]))
    samples = list(dict.fromkeys(table["sample_id"]))
    pv = table.pivot_table(index="population", columns="sample_id", values="pct_parent", aggfunc="first")
    head = "".join(f"<th>{_e(s)}</th>" for s in samples)
    body = []
    for p in pops:
        cells = "".join(f"<td class=\"num\">{_num(pv.at[p, s] if s in pv.columns else float('nan'), '.2f')}</td>"
                        for s in samples)
        body.append(f'<tr data-population="{_e(p)}"><td>{_e(p)}</td>{cells}</tr>')
    return (f"<table class=\"summary\"><thead><tr><th>% of parent</th>{head}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>")


def _check_table(check: pd.DataFrame) -> str:
    body = []
    for r in check.itertuples(index=False):
        body.append(
            f'<tr class="status-{_e(r.status)}" data-population="{_e(r.population)}">'
            f"<td>{_e(r.template)}</td><td>{_e(r.population)}</td><td>{_e(r.sample_id)}</td>"
            f"<td class=\"num\">{_num(r.value, '.2f')}</td><td class=\"num\">{r.n_history}</td>"
            f"<td class=\"num\">{_num(r.mean, '.2f')}</td><td class=\"num\">{_num(r.sd, '.2f')}</td>"
            f"<td class=\"num\">{_num(r.z, '.2f')}</td><td>{_e(r.rules)}</td><td>{_e(r.warning)}</td>"
            f"<td class=\"status\">{_e(r.status)}</td></tr>")
    return ("<table class=\"reference-check\"><thead><tr><th>template</th><th>population</th><th>sample</th>"
            "<th>% parent</th><th>n history</th><th>mean</th><th>SD</th><th>z</th><th>rules violated</th>"
            f"<th>warning</th><th>status</th></tr></thead><tbody>{''.join(body)}</tbody></table>")


def _find_reference_samples(table: pd.DataFrame) -> list[str] | None:
    ids = sorted(set(table["sample_id"].astype(str)))
    refs = [s for s in ids if re.search(r"(^|[^a-z])ref", s.lower())]
    return refs or None


def build_report(
    batch: Batch,
    out_dir: PathLike,
    *,
    reference_db: PathLike | None = None,
    reference_sample: str | Sequence[str] | None = None,
    min_history: int = 3,
    min_sample_events: int = MIN_SAMPLE_EVENTS,
    min_population_events: int = MIN_POPULATION_EVENTS,
    max_points: int = MAX_POINTS,
    title: str | None = None,
    dpi: int = 90,
) -> Path:
    """Write ``out_dir/report.html`` (self-contained) plus ``populations.csv`` for a gated batch.

    Parameters
    ----------
    batch
        From :func:`immuneprofile.gate_files` run in-process (``jobs=1``), so results keep their events.
    reference_db
        Reference database (:mod:`immuneprofile.qc.reference`); the batch's reference sample is checked
        against it (read-only: nothing is added).
    reference_sample
        The reference sample id(s) in this batch; default: the sample ids containing ``ref``.
    min_history, min_sample_events, min_population_events, max_points
        Reference-check history needed; warning limits; points per density plot.

    Returns
    -------
    pathlib.Path
        The report file.
    """
    out = Path(os.fspath(out_dir))
    out.mkdir(parents=True, exist_ok=True)
    table = batch.table if batch.table is not None else pd.DataFrame()
    if not table.empty:
        table.to_csv(out / "populations.csv", index=False)
    templates = list(dict.fromkeys(r.template.name for r in batch.results))
    check: pd.DataFrame | None = None
    lj_imgs: list[tuple[str, str]] = []
    extra: list[str] = []
    if reference_db is not None:
        check, lj_imgs, extra = _reference_check(table, out, reference_db, reference_sample, min_history, dpi)
    warns = extra + report_warnings(batch, min_sample_events=min_sample_events,
                                    min_population_events=min_population_events, check=check)
    title = title or f"immuneprofile batch report — {', '.join(templates) or 'no samples'}"
    parts = _head(title, batch, templates) + _warnings_section(warns)
    if reference_db is not None:
        parts += _reference_section(check, lj_imgs)
    parts.append(f"<section id=\"summary\"><h2>Population frequencies</h2>{_summary_table(table)}</section>")
    parts += [_sample_section(res, table, min_population_events, max_points, dpi) for res in batch.results]
    if batch.errors:
        parts.append("<section id=\"errors\"><h2>Files that failed</h2><ul>" + "".join(
            f"<li><code>{_e(p)}</code>: {_e(m)}</li>" for p, m in batch.errors.items()) + "</ul></section>")
    parts.append(f"<script>{_SCRIPT}</script></body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _reference_check(table: pd.DataFrame, out: Path, reference_db: PathLike,
                     reference_sample: str | Sequence[str] | None, min_history: int,
                     dpi: int) -> tuple[pd.DataFrame | None, list[tuple[str, str]], list[str]]:
    """The reference check of the batch (read-only), its Levey-Jennings images, and why it was skipped."""
    from immuneprofile.qc.reference import ReferenceDBError, check_reference, levey_jennings

    refs = reference_sample if reference_sample is not None else (
        _find_reference_samples(table) if not table.empty else None)
    if not Path(os.fspath(reference_db)).exists():
        return None, [], [f"reference database {os.fspath(reference_db)} not found: reference check skipped"]
    if refs is None:
        return None, [], ["no reference sample identified in this batch (no sample id contains 'ref'); "
                          "name it with --reference-sample: reference check skipped"]
    try:
        check = check_reference(reference_db, table, sample=refs, min_history=min_history)
    except ReferenceDBError as exc:
        return None, [], [f"reference check skipped: {exc}"]
    check.to_csv(out / "reference_check.csv", index=False)
    lj_imgs = []
    for r in check.itertuples(index=False):
        if r.n_history == 0:
            continue
        fig = levey_jennings(reference_db, r.population, template=r.template, check=check, batch_label="this batch")
        lj_imgs.append((f"Levey-Jennings {r.template} {r.population}", _png(fig, dpi)))
    return check, lj_imgs, []


def _head(title: str, batch: Batch, templates: list[str]) -> list[str]:
    from immuneprofile import __version__

    return [
        "<!DOCTYPE html>", "<html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        f"<p class=\"meta\">Generated {_dt.datetime.now().isoformat(timespec='seconds')} by immuneprofile "
        f"{_e(__version__)}; {len(batch.results)} sample(s) gated, {len(batch.errors)} failed; "
        f"template(s): {_e(', '.join(templates))}.</p>",
        "<p id=\"image-check\" class=\"meta\" data-total=\"\" data-decoded=\"\"></p>",
    ]


def _warnings_section(warns: list[str]) -> list[str]:
    if warns:
        body = "<ul class=\"warnings\">" + "".join(f"<li class=\"warning\">{_e(w)}</li>" for w in warns) + "</ul>"
    else:
        body = "<p class=\"ok\">No warnings.</p>"
    return ["<section id=\"warnings\"><h2>Warnings</h2>", body, "</section>"]


def _reference_section(check: pd.DataFrame | None, lj_imgs: list[tuple[str, str]]) -> list[str]:
    parts = ["<section id=\"reference\"><h2>Reference sample check</h2>"]
    if check is None:
        parts.append("<p>Not checked (see warnings).</p>")
    else:
        n_fail = int((check["status"] == "fail").sum())
        verdict = (f"<p class=\"verdict fail\"><strong>FAIL</strong>: {n_fail} population(s) out of control</p>"
                   if n_fail else "<p class=\"verdict pass ok\"><strong>PASS</strong></p>")
        parts.append(verdict + _check_table(check))
        if lj_imgs:
            parts.append("<div class=\"lj\">" + "".join(
                f"<img class=\"levey-jennings\" alt=\"{_e(a)}\" src=\"data:image/png;base64,{b}\">"
                for a, b in lj_imgs) + "</div>")
    parts.append("</section>")
    return parts


def _sample_section(res: GatingResult, table: pd.DataFrame, min_population_events: int, max_points: int,
                    dpi: int) -> str:
    head = (f"<section class=\"sample\" id=\"sample-{_slug(res.sample_id)}\" "
            f"data-sample-id=\"{_e(res.sample_id)}\"><h2>{_e(res.sample_id)}</h2>"
            f"<p class=\"meta\">{_e(res.path)} — template {_e(res.template.name)}, "
            f"{res.n_events:,} events</p>")
    if res.data is not None:
        fig = gate_figure(res, max_points=max_points)
        plots = (f"<img class=\"gating\" alt=\"gating {_e(res.sample_id)}\" "
                 f"src=\"data:image/png;base64,{_png(fig, dpi)}\">")
    else:
        plots = "<p>No event data (gated in a worker process): no plots.</p>"
    return "\n".join([head, plots, _population_rows(res, table, min_population_events) + "</section>"])


def make_report(template: Template | PathLike, files: Sequence[PathLike], out_dir: PathLike, *,
                compensation: Any = "auto", **kwargs: Any) -> tuple[Path, Batch]:
    """Gate ``files`` with ``template`` (in-process) and write the report; returns ``(report path, batch)``."""
    from immuneprofile.batch import gate_files
    from immuneprofile.template.parse import load_template

    if not isinstance(template, Template):
        template = load_template(template)
    batch = gate_files([os.fspath(f) for f in files], template, compensation=compensation, jobs=1)
    return build_report(batch, out_dir, **kwargs), batch
