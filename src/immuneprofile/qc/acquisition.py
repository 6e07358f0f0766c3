"""Acquisition QC: remove time segments where the flow went wrong, and margin events.

What flowAI and PeacoQC do from the Time channel, with NumPy:

1. the events, in time order, are cut into bins of equal event count;
2. per bin: the log event rate (events per unit of Time) and the mean of every
   signal channel's ``asinh(x / 150)`` (log-like for bright values);
3. a bin is an outlier when any of these is more than ``k`` noise SDs from its
   median over the bins (clogs, bubbles: abrupt), or when it lies in a stretch
   of bins whose level has shifted (drift: the series is segmented at its mean
   shifts, as ``ruptures``' binary segmentation does, and off-level segments are
   removed whole; :func:`flag_bins`);
4. runs of good bins shorter than ``min_run`` between outlier bins are removed too
   (an acquisition does not recover for a moment in the middle of a fault);
5. margin events: any channel at or above its ``$PnR - 1`` (piled on the
   detector's maximum), on the raw (uncompensated) values.

:func:`acquisition_qc` returns a :class:`QCResult`; a template's ``qc:`` step
(:func:`qc_populations`) makes it a ``qc_pass`` population that every top-level
population of the template descends from, and its complement ``qc_removed``, so
removed events are counted per file in the population table and in the
thresholds table (method ``acquisition-qc``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from immuneprofile.exceptions import TemplateError

__all__ = ["QCResult", "QC_OPTIONS", "QC_POPULATION", "QC_POPULATIONS", "QC_REMOVED", "acquisition_qc",
           "check_qc_options", "flag_bins", "qc_populations"]

#: Options of a template's ``qc:`` step and their defaults.
QC_OPTIONS: dict[str, Any] = {"time": True, "margins": True, "bin_events": None, "k": 6.0, "shift": 0.04,
                              "min_run": 3, "channels": None}
#: The time course is checked only when the events make at least this many bins (statistics over the bins).
MIN_BINS = 50
#: Names of the populations of the events QC keeps and removes.
QC_POPULATION, QC_REMOVED = "qc_pass", "qc_removed"
QC_POPULATIONS = (QC_POPULATION, QC_REMOVED)


@dataclass
class QCResult:
    """What acquisition QC removed from one sample.

    Attributes
    ----------
    keep
        Boolean per event (file order): kept.
    segments
        ``[(t0, t1)]`` Time intervals removed (inclusive).
    margins
        ``{channel: limit}``: events at or above ``limit`` on that raw channel were removed.
    removed_time, removed_margin
        Events removed by each rule (an event may be counted by both).
    n_bins, bin_events
        The binning used.
    note
        Why a check was not made (no Time channel, too few events), else empty.
    """

    keep: np.ndarray
    segments: list[tuple[float, float]] = field(default_factory=list)
    margins: dict[str, float] = field(default_factory=dict)
    removed_time: int = 0
    removed_margin: int = 0
    n_bins: int = 0
    bin_events: int = 0
    note: str = ""

    @property
    def removed(self) -> int:
        return int((~self.keep).sum())


def check_qc_options(qc: Any, source: str) -> dict[str, Any]:
    """Validate a template's ``qc:`` section (``true`` = defaults); returns the options with defaults."""
    if qc is True or qc == {}:
        qc = {}
    if not isinstance(qc, Mapping):
        raise TemplateError(f"{source}: 'qc' must be true or a mapping of options. Fix: write `qc: {{k: 6}}` "
                            f"with options {sorted(QC_OPTIONS)}")
    unknown = set(qc) - set(QC_OPTIONS)
    if unknown:
        raise TemplateError(f"{source}: qc has unknown option(s) {sorted(map(str, unknown))}. "
                            f"Fix: use {sorted(QC_OPTIONS)}")
    out = {**QC_OPTIONS, **qc}
    be = out["bin_events"]
    ok = (all(isinstance(out[x], (int, float)) and out[x] > 0 for x in ("k", "shift"))
          and isinstance(out["min_run"], int) and out["min_run"] >= 0
          and (be is None or isinstance(be, int) and be >= 20)
          and (out["channels"] is None or isinstance(out["channels"], list)))
    if not ok:
        raise TemplateError(f"{source}: qc options out of range: {dict(qc)}. Fix: k > 0, shift > 0, "
                            "min_run >= 0 (integers), bin_events >= 20, channels a list of channel names")
    return out


def _standardize(s: np.ndarray) -> np.ndarray:
    """Bin statistics in units of their bin-to-bin noise, centred on their median over the bins.

    The noise is estimated from successive differences (1.4826 MAD of the
    differences / sqrt 2), which level shifts and drifts barely affect.
    """
    med = np.median(s, axis=0)
    d = np.diff(s, axis=0) if s.shape[0] > 2 else s - med
    noise = 1.4826 * np.median(np.abs(d - np.median(d, axis=0)), axis=0) / np.sqrt(2)
    noise[~(noise > 0)] = np.inf  # a constant statistic tells nothing
    return (s - med) / noise


def _whiten(z: np.ndarray) -> np.ndarray:
    """``z`` decorrelated with the covariance of its bin-to-bin differences (outlying differences left out)."""
    if z.shape[0] < 3 * z.shape[1]:
        return z
    dz = np.diff(z, axis=0) / np.sqrt(2)
    ok = (np.abs(dz) < 4).all(axis=1)
    if ok.sum() <= z.shape[1]:
        return z
    cov = np.cov(dz[ok].T) + 1e-9 * np.eye(z.shape[1])
    try:
        return np.linalg.solve(np.linalg.cholesky(cov), z.T).T
    except np.linalg.LinAlgError:
        return z


def _changepoints(z: np.ndarray, penalty: float, min_size: int = 2) -> list[tuple[int, int]]:
    """Segments ``[(start, stop)]`` of a multichannel series by binary segmentation (mean shifts, L2 cost)."""
    out, todo = [], [(0, z.shape[0])]
    while todo:
        a, b = todo.pop()
        seg = z[a:b]
        n = b - a
        if n < 2 * min_size:
            out.append((a, b))
            continue
        c = np.cumsum(seg, axis=0)
        tot = c[-1]
        i = np.arange(min_size, n - min_size + 1)
        left = c[i - 1]
        gain = ((left ** 2) / i[:, None] + ((tot - left) ** 2) / (n - i)[:, None] - tot ** 2 / n).sum(axis=1)
        j = int(np.argmax(gain))
        if gain[j] > penalty:
            todo += [(a, a + int(i[j])), (a + int(i[j]), b)]
        else:
            out.append((a, b))
    return sorted(out)


def flag_bins(stats: np.ndarray, *, k: float = 6.0, shift: float = 0.5, min_run: int = 3) -> np.ndarray:
    """Outlier bins of a ``(bins, statistics)`` table (boolean per bin), as described in the module.

    Abrupt faults: a bin more than ``k`` noise SDs from the median level. Slow ones
    (drift): the series is segmented at its mean shifts (binary segmentation, BIC-like
    penalty); a segment whose mean is off the level of the longest segment by more
    than ``shift`` noise SDs on some statistic, and significantly so on all together
    (a chi-square as unlikely as ``k`` SDs), is removed whole.
    """
    from scipy.stats import chi2, norm

    z = _standardize(np.asarray(stats, dtype=float))
    z = z[:, np.isfinite(z).all(axis=0)]
    bad = (np.abs(z) > k).any(axis=1)
    w = _whiten(z)  # the statistics move together with the cell mix of a bin: test them jointly
    nb, d = w.shape
    limit = chi2.isf(2 * norm.sf(k), d)  # as unlikely, for d statistics together, as k SDs for one
    segs = _changepoints(w, penalty=d * np.log(max(nb, 2)))  # BIC
    ra, rb = max(segs, key=lambda ab: ab[1] - ab[0])  # the reference level: the longest stable stretch
    for a, b in segs:
        dz = z[a:b].mean(axis=0) - z[ra:rb].mean(axis=0)
        dw = w[a:b].mean(axis=0) - w[ra:rb].mean(axis=0)
        if np.abs(dz).max() > shift and float(dw @ dw) / (1 / (b - a) + 1 / (rb - ra)) > limit:
            bad[a:b] = True
    return _fill_short_runs(bad, min_run)


def _fill_short_runs(bad: np.ndarray, min_run: int) -> np.ndarray:
    """Mark as bad the runs of good bins shorter than ``min_run`` that lie between bad bins."""
    bad = bad.copy()
    idx = np.flatnonzero(bad)
    for a, b in zip(idx[:-1], idx[1:]):
        if 1 < b - a <= min_run:
            bad[a:b] = True
    return bad


def _bin_stats(time: np.ndarray, values: np.ndarray, edges: np.ndarray, tick: float) -> np.ndarray:
    """Per bin: log event rate and each column's mean (``values``: asinh-scaled, in time order).

    Means, not medians: the median of a bimodal marker jumps between its modes from
    bin to bin; the mean of its asinh values moves only with the mix and the gain.
    """
    starts, stops = edges[:-1], edges[1:]
    dur = np.maximum(time[stops - 1] - time[starts], tick)
    rate = np.log((stops - starts) / dur)
    sums = np.add.reduceat(values, starts, axis=0)
    return np.column_stack([rate, sums / (stops - starts)[:, None]])


def acquisition_qc(data, *, time: bool = True, margins: bool = True, bin_events: int | None = None,
                   k: float = 6.0, shift: float = 0.04, min_run: int = 3,
                   channels: list[str] | None = None) -> QCResult:
    """Flag the events acquired while the flow was unstable, and the margin events, of one sample.

    Parameters
    ----------
    data
        A loaded sample (:func:`immuneprofile.load_fcs`).
    time
        Check the Time course (needs a ``Time`` channel; skipped, with nothing removed, without one).
    margins
        Remove events at or above ``$PnR - 1`` on any checked channel (raw values).
    bin_events
        Events per bin (default: ``max(50, n / 200)``); the time course is checked only if
        the events make at least :data:`MIN_BINS` (50) bins, so from 2,500 events by default.
    k, shift, min_run
        See :func:`flag_bins`: the outlier threshold (noise SDs of a bin's statistic), the
        smallest level shift removed, in SDs of one event's value (``0.04``: 0.4 noise SDs of
        a 100-event bin's mean), and the longest run of good bins filled between outlier bins.
    channels
        Channels (``$PnN`` or markers) checked; default every channel but Time.
    """
    n = data.n_events
    tcol = _time_index(data)
    chans = [data.find_channel(c) for c in channels] if channels else \
        [j for j in range(len(data.channels)) if j != tcol]
    res = QCResult(keep=np.ones(n, dtype=bool))
    if margins:
        from immuneprofile.engine.values import EventValues

        cols = EventValues(data, None)  # the raw (uncompensated) columns, read as the engine reads them
        for j in chans:
            limit = _range_of(data, j) - 1
            hit = cols.base(j, False) >= limit
            if hit.any():
                res.margins[data.channels[j]] = limit
                res.keep &= ~hit
        res.removed_margin = int((~res.keep).sum())
    size = int(bin_events or max(50, n // 200))
    if time and tcol is not None and n // size >= MIN_BINS:
        rule = dict(k=k, shift=shift * np.sqrt(size), min_run=min_run)  # shift: per event -> per bin mean
        bad_ev = _time_segments(data, tcol, chans, res, size, rule)
        res.removed_time = int(bad_ev.sum())
        res.keep &= ~bad_ev
    elif time:
        res.note = ("no Time channel: time course not checked" if tcol is None else
                    f"{n} events make fewer than {MIN_BINS} bins of {size}: time course not checked")
    return res


def _time_segments(data, tcol: int, chans: list[int], res: QCResult, size: int, rule: dict) -> np.ndarray:
    """Events in the outlier time segments (boolean, file order); fills ``res.segments`` and the binning."""
    n = data.n_events
    t = np.asarray(data.column(tcol), dtype=float)
    order = np.argsort(t, kind="stable")
    ts = t[order]
    nb = max(1, n // size)
    edges = np.linspace(0, n, nb + 1).astype(int)
    vals = np.arcsinh(np.asarray(data.events[:, chans], dtype=float)[order] / 150.0)
    steps = np.diff(np.unique(ts))
    tick = float(steps.min()) if steps.size else 1.0
    bad_bins = flag_bins(_bin_stats(ts, vals, edges, tick), **rule)
    res.n_bins, res.bin_events = nb, size
    bad = np.zeros(n, dtype=bool)
    for b in np.flatnonzero(bad_bins):  # a bin's Time span (events of equal Time go together)
        bad |= (t >= ts[edges[b]]) & (t <= ts[edges[b + 1] - 1])
    res.segments = _merge([(float(ts[edges[b]]), float(ts[edges[b + 1] - 1])) for b in np.flatnonzero(bad_bins)])
    return bad


def _merge(segments: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(segments):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _time_index(data) -> int | None:
    for j, c in enumerate(data.channels):
        if c.strip().lower() == "time":
            return j
    return None


def _range_of(data, j: int) -> float:
    """``$PnR`` of channel ``j`` (FlowKit's metadata keys are lower case, without ``$``)."""
    v = data.metadata.get(f"p{j + 1}r")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("inf")


def qc_populations(data, template, options: Mapping[str, Any]):
    """Run acquisition QC on ``data`` and put its verdict into ``template``.

    Returns the template with ``qc_pass`` (a :class:`~immuneprofile.template.parse.QCGate`)
    as the parent of its top-level populations and ``qc_removed`` (its complement,
    a boolean gate) beside it, and the :class:`QCResult`.
    """
    from dataclasses import replace

    from immuneprofile.template.model import BooleanGate, Population, QCGate

    opts = {k: v for k, v in options.items() if k in QC_OPTIONS}
    res = acquisition_qc(data, **opts)
    tcol = _time_index(data)
    gate = QCGate(None if tcol is None else data.channels[tcol], tuple(res.segments), tuple(res.margins.items()))
    pops = [Population(QC_POPULATION, None, gate), Population(QC_REMOVED, None, BooleanGate("not", ((QC_POPULATION, False),)))]
    pops += [replace(p, parent=QC_POPULATION) if p.parent is None else p for p in template.populations]
    return replace(template, populations=pops), res
