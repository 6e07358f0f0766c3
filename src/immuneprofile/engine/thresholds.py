"""Data-driven thresholds for "+"/"-"/"hi"/"lo" populations.

Each rule is fitted on the transformed values of one population (per sample, or
pooled over a batch) and returns the cut point it chose, so the choice can be
audited; a rule that cannot find what it looks for falls back, with a warning,
to the number the template gives as ``fallback``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from immuneprofile.exceptions import ThresholdError, ThresholdWarning

__all__ = ["THRESHOLD_METHODS", "fit_threshold", "ThresholdWarning", "ThresholdError", "density_peaks", "find_peaks"]

#: Density rules are fitted on at most this many events (the engine passes a systematic subsample;
#: larger inputs are subsampled at random with a fixed seed).
MAX_FIT_EVENTS = 20_000
_GRID = 512


def _subsample(values: np.ndarray, seed: int = 0) -> np.ndarray:
    v = np.asarray(values, dtype=float)
    finite = np.isfinite(v)
    if not finite.all():
        v = v[finite]
    if v.size > MAX_FIT_EVENTS:
        v = np.random.default_rng(seed).choice(v, MAX_FIT_EVENTS, replace=False)
    return v


def _kde(v: np.ndarray, bw: Any = None) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian kernel density of ``v`` on a regular grid, by binning and convolution.

    The bandwidth follows :class:`scipy.stats.gaussian_kde`: ``bw`` is the factor
    multiplying the sample standard deviation (default Scott's ``n**(-1/5)``).
    Binning makes a fit cost microseconds instead of the O(n x grid) exact sum;
    at 1024 bins the density is indistinguishable from the exact one at the
    scale thresholds are read.
    """
    from immuneprofile.engine._kernels import kernels_for

    v = np.ascontiguousarray(v, dtype=float)
    K = kernels_for(v.size)
    n, vmin, vmax, sd = K.moments(v)
    factor = n ** (-1 / 5) if bw in (None, "scott") else (
        (n * 3 / 4) ** (-1 / 5) if bw == "silverman" else float(bw))
    sigma = factor * float(sd) if n > 1 else 1.0
    if not sigma > 0:
        sigma = 1e-3
    lo, hi = float(vmin) - 3 * sigma, float(vmax) + 3 * sigma
    edges = np.linspace(lo, hi, 2 * _GRID + 1)
    counts = np.zeros(2 * _GRID, dtype=np.int64)
    K.bin_counts(v, edges, counts)  # as np.histogram(v, bins=2 * _GRID, range=(lo, hi)), without its temporaries
    grid = 0.5 * (edges[:-1] + edges[1:])
    step = grid[1] - grid[0]
    half = int(np.ceil(4 * sigma / step))
    k = np.exp(-0.5 * (np.arange(-half, half + 1) * step / sigma) ** 2)
    dens = np.convolve(counts, k, mode="same")[: grid.size] if half < grid.size else \
        np.convolve(counts, k)[half: half + grid.size]
    dens = dens / (n * sigma * np.sqrt(2 * np.pi))
    return grid, dens


def density_peaks(values: np.ndarray, *, min_height: float = 0.05, min_depth: float = 0.5, bw: Any = None):
    """Grid, density and indices of the distinct peaks of a 1-D kernel density.

    A peak counts if it is at least ``min_height`` x the highest density and is
    separated from any higher peak by a dip of at least ``min_depth`` x its own
    height (its topographic prominence). The depth criterion keeps a real, well
    separated positive population however rare it is, and discards the lumps of
    a broad negative population however tall they are.
    """
    v = _subsample(values)
    grid, dens = _kde(v, bw)
    peaks, prominences = find_peaks(dens, min_height * dens.max())
    peaks = peaks[prominences >= min_depth * dens[peaks]]
    return grid, dens, peaks


def find_peaks(x: np.ndarray, height: float) -> tuple[np.ndarray, np.ndarray]:
    """Peaks of ``x`` at least ``height`` high, and their prominences.

    ``scipy.signal.find_peaks(x, height=height, prominence=0.0)`` (its peaks and
    ``"prominences"``) without importing :mod:`scipy.signal` and :mod:`scipy.stats`
    (0.6 s): the same rules, so the same numbers. A peak is a local maximum (the
    middle of a flat top, rounded down, not at either end); its prominence is its
    height above the higher of the lowest points on either side before a higher value.
    """
    x = np.asarray(x, dtype=float)
    steps = np.flatnonzero(np.diff(x))  # x[i] != x[i + 1]
    rise = x[steps + 1] > x[steps]
    top = rise[:-1] & ~rise[1:]  # a rise followed by a fall: a peak between them
    peaks = (steps[:-1][top] + 1 + steps[1:][top]) // 2
    peaks = peaks[x[peaks] >= height]
    prominences = np.empty(peaks.size)
    for k, p in enumerate(peaks):
        higher_left, higher_right = np.flatnonzero(x[:p] > x[p]), np.flatnonzero(x[p + 1:] > x[p])
        lo = higher_left[-1] + 1 if higher_left.size else 0
        hi = p + 1 + higher_right[0] if higher_right.size else x.size
        prominences[k] = x[p] - max(x[lo:p + 1].min(), x[p:hi].min())
    return peaks, prominences


def fit_threshold(values: np.ndarray, rule: Mapping[str, Any], *, label: str = "threshold") -> tuple[float, bool, str]:
    """Fit one data-driven threshold.

    Parameters
    ----------
    values
        Transformed intensities of the population the threshold is fitted on.
    rule
        ``{method: valley|tail|quantile|gmm, ...}``; options: ``fraction`` and ``side``
        (tail: where the dominant peak's density falls to ``fraction`` of its height, on its
        ``upper`` (default) or ``lower`` side),
        ``q`` (quantile, default 0.95), ``min_height`` and ``min_depth`` (valley/gmm peak
        detection, defaults 0.05 and 0.5, see :func:`density_peaks`),
        ``bw`` (KDE bandwidth), ``fallback`` (number used, with a :class:`ThresholdWarning`,
        when the rule finds no answer).
    label
        Names the sample and threshold in warnings and errors.

    Returns
    -------
    value, fell_back, note
    """
    method = rule["method"]
    fit = _METHODS.get(method)
    if fit is None:
        raise ThresholdError(f"{label}: unknown method {method!r}")
    v = _subsample(values)
    value: float | None
    if v.size < 20:
        value, note = None, f"only {v.size} events to fit on"
    else:
        value, note = fit(values, v, rule, label)
    if value is not None and np.isfinite(value):
        return value, False, note
    if "fallback" not in rule:
        raise ThresholdError(f"{label}: {method} threshold failed ({note}) and the template gives no `fallback`; "
                             f"add `fallback: <value>` to the rule")
    fb = float(rule["fallback"])
    warnings.warn(f"{label}: {method} threshold failed ({note}); using fallback {fb}", ThresholdWarning, stacklevel=2)
    return fb, True, note


# one function per method: (all values, their subsample, rule, label) -> (value or None, note)
_Fit = Callable[[np.ndarray, np.ndarray, Mapping[str, Any], str], "tuple[float | None, str]"]


def _quantile(values: np.ndarray, v: np.ndarray, rule: Mapping[str, Any], label: str) -> tuple[float | None, str]:
    """On every value, not the subsample, so that it is exact."""
    allv = np.asarray(values, dtype=float)
    return float(np.quantile(allv[np.isfinite(allv)], float(rule.get("q", 0.95)))), ""


def _tail(values: np.ndarray, v: np.ndarray, rule: Mapping[str, Any], label: str) -> tuple[float | None, str]:
    grid, dens = _kde(v, rule.get("bw"))
    top = int(np.argmax(dens))
    frac = float(rule.get("fraction", 0.05))
    side = str(rule.get("side", "upper"))
    if side not in ("upper", "lower"):
        raise ThresholdError(f"{label}: tail side must be 'upper' or 'lower', got {side!r}")
    if side == "upper":
        below = np.flatnonzero(dens[top:] < frac * dens[top])
        pos = top + below[0] if below.size else None
    else:
        below = np.flatnonzero(dens[:top + 1] < frac * dens[top])
        pos = below[-1] if below.size else None
    if pos is None:
        return None, f"density never falls to {frac} of its peak on its {side} side"
    return float(grid[pos]), ""


def _two_peaks(v: np.ndarray, rule: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Grid, density and the two highest peaks (sorted; ``None`` if there are fewer)."""
    grid, dens, peaks = density_peaks(v, min_height=float(rule.get("min_height", 0.05)),
                                      min_depth=float(rule.get("min_depth", 0.5)), bw=rule.get("bw"))
    if peaks.size < 2:
        return grid, dens, None
    return grid, dens, np.sort(peaks[np.argsort(dens[peaks])[-2:]])


def _valley(values: np.ndarray, v: np.ndarray, rule: Mapping[str, Any], label: str) -> tuple[float | None, str]:
    grid, dens, two = _two_peaks(v, rule)
    if two is None:
        return None, "no second peak in the density"
    seg = slice(two[0], two[1] + 1)
    return float(grid[seg][np.argmin(dens[seg])]), ""


def _gmm(values: np.ndarray, v: np.ndarray, rule: Mapping[str, Any], label: str) -> tuple[float | None, str]:
    from sklearn.mixture import GaussianMixture

    grid, _, two = _two_peaks(v, rule)
    if two is None:
        return None, "no second peak in the density"
    gm = GaussianMixture(2, random_state=0, means_init=grid[two].reshape(-1, 1)).fit(v.reshape(-1, 1))
    lo_c, hi_c = np.argsort(gm.means_.ravel())
    xs = np.linspace(gm.means_.ravel()[lo_c], gm.means_.ravel()[hi_c], 2001)
    post = gm.predict_proba(xs.reshape(-1, 1))
    switch = np.flatnonzero(post[:, hi_c] >= post[:, lo_c])
    if not switch.size:
        return None, "mixture components do not separate"
    return float(xs[switch[0]]), ""


_METHODS: dict[str, _Fit] = {"quantile": _quantile, "tail": _tail, "valley": _valley, "gmm": _gmm}

#: The data-driven threshold methods a template may name (``{method: ...}``).
THRESHOLD_METHODS = frozenset(_METHODS)
