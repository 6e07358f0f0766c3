"""Kernels of the gating engine (:mod:`immuneprofile.gating`), compiled and in NumPy.

Populations are bit sets: ``uint64`` words, bit ``j`` of word ``w`` for event
``64 w + j``, bits past the last event zero (:func:`pack`, :func:`unpack`). A
population of a million events is 125 kB, so making one costs about one read
of the columns it tests; boolean masks would be 1 MB of fresh pages per
population, and on a virtual machine the page faults alone cost more than the
gating.

Each kernel makes one pass over whole columns (contiguous blocks of the
column-major event matrix :func:`immuneprofile.load_fcs` gives) and ANDs what
it finds into bit sets that the caller initialises. The compiled kernels
(``numba.njit(cache=True, nogil=True)``, no fastmath: IEEE arithmetic in the
order written, no fused multiply-add) test 64 events at a time, branch-free,
into one word. :func:`kernels` returns them, or their NumPy twins (same
signatures, same results: tests/test_kernels.py) when numba is unavailable
or ``compiled=False``.

Comparisons against raw-scale bounds use closed intervals (an absent bound
is ``-inf``/``+inf``); NaN is in none, as FlowKit's ``>=``/``<`` comparisons
leave it out.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

__all__ = ["COMPILE_FROM", "TUPLE_VERTICES", "convex_edges", "full_bits", "kernels", "kernels_for", "nwords", "pack",
           "unpack"]

#: Polygons with at most this many vertices get kernels compiled for their vertex count.
TUPLE_VERTICES = 16
_LE = np.dtype("<u8")  # the words' bytes, bit j of byte k = event 8 k + j, whatever the machine


def nwords(n: int) -> int:
    """Words of a bit set of ``n`` events."""
    return (n + 63) >> 6


def full_bits(n: int) -> np.ndarray:
    """The bit set of every one of ``n`` events."""
    out = np.full(nwords(n), np.uint64(0xFFFFFFFFFFFFFFFF), dtype=np.uint64)
    if n & 63:
        out[-1] = np.uint64((1 << (n & 63)) - 1)
    return out


def pack(mask: np.ndarray) -> np.ndarray:
    """The bit set of a boolean membership."""
    b = np.packbits(np.asarray(mask, dtype=bool), bitorder="little")
    words = np.zeros(nwords(len(mask)) * 8, dtype=np.uint8)
    words[:b.size] = b
    return words.view(_LE).astype(np.uint64, copy=False)


def unpack(bits: np.ndarray, n: int) -> np.ndarray:
    """Boolean membership of ``n`` events from their bit set."""
    return np.unpackbits(np.asarray(bits, dtype=_LE).view(np.uint8), count=n, bitorder="little").view(bool)


# ----------------------------------------------------------------------------- compiled
def _interval_bits(col, lo1, hi1, lo2, hi2, out1, out2):  # pragma: no cover - compiled
    """``out1 &= bits(lo1 <= col <= hi1)``, ``out2 &= bits(lo2 <= col <= hi2)``."""
    n = col.shape[0]
    for w in range((n + 63) >> 6):
        start = w << 6
        seg = col[start:min(start + 64, n)]  # a slice, not col[start + j]: only then does LLVM vectorise
        a = np.uint64(0)
        b = np.uint64(0)
        for j in range(seg.shape[0]):
            v = seg[j]
            a |= np.uint64((v >= lo1) & (v <= hi1)) << np.uint64(j)
            b |= np.uint64((v >= lo2) & (v <= hi2)) << np.uint64(j)
        out1[w] &= a
        out2[w] &= b


def _winding_bits(vx, vy, colx, coly, out):  # pragma: no cover - compiled
    """``out &= bits((colx, coly) inside the polygon)``, FlowUtils' arithmetic.

    FlowUtils' ``points_in_polygon``: points outside the vertices' bounding box
    (``x < min_x || x > max_x || y < min_y || y > max_y``) are out; the others
    get Sunday's winding count, edge ``a -> b`` by edge (the last edge closes
    the polygon): an upward crossing (``ay <= y && y < by``) counts +1 if
    ``is_left > 0``, a downward one (else-branch: ``by <= y``) -1 if
    ``is_left < 0``, with ``is_left = ((bx - ax) * (y - ay)) - ((x - ax) * (by - ay))``;
    odd count = inside. Branch-free (with the vertices as tuples the edge loop
    unrolls); ``ay > y`` stands for FlowUtils' else-branch: they differ only
    when ``y`` or ``ay`` is NaN, where ``is_left`` is NaN and nothing is counted
    either way.
    """
    nv = len(vx)
    min_x = vx[0]
    max_x = vx[0]
    min_y = vy[0]
    max_y = vy[0]
    for i in range(1, nv):
        min_x = min(min_x, vx[i])
        max_x = max(max_x, vx[i])
        min_y = min(min_y, vy[i])
        max_y = max(max_y, vy[i])
    n = colx.shape[0]
    for wd in range((n + 63) >> 6):
        start = wd << 6
        xs = colx[start:min(start + 64, n)]
        ys = coly[start:min(start + 64, n)]
        word = np.uint64(0)
        for j in range(xs.shape[0]):
            x = xs[j]
            y = ys[j]
            w = 0
            for i in range(nv):
                ax = vx[i]
                ay = vy[i]
                k = 0 if i >= nv - 1 else i + 1
                dx = vx[k] - ax
                dy = vy[k] - ay
                by = vy[k]
                is_left = (dx * (y - ay)) - ((x - ax) * dy)
                up = (ay <= y) & (y < by) & (is_left > 0)
                down = (ay > y) & (by <= y) & (is_left < 0)
                w += np.int32(up) - np.int32(down)  # type: ignore[assignment]  # numba: int32 arithmetic
            outside = (x < min_x) | (x > max_x) | (y < min_y) | (y > max_y)
            word |= np.uint64((not outside) & (w % 2 != 0)) << np.uint64(j)
        out[wd] &= word


def _convex_bits(ax, ay, dx, dy, eps, box, colx, coly, sure, near):  # pragma: no cover - compiled
    """A strictly convex polygon by half-planes: ``sure &=`` surely inside, ``near &=`` undecided.

    ``ax, ay, dx, dy, eps`` are tuples, one entry per edge (:func:`convex_edges`):
    start vertex, direction (oriented so that the inside is on the positive
    side of ``is_left``) and a bound of ``is_left``'s rounding error for points
    in the bounding box ``box = (min_x, max_x, min_y, max_y)``. A point of the
    box more than ``eps`` inside every edge is inside, and FlowUtils' winding
    count says so too (none of the signs it computes can be wrong); a point
    more than ``eps`` outside some edge and within ``eps`` of none is outside,
    likewise. The others in the box are undecided: the engine gives them the
    winding test. Outside the box nothing is inside (as in FlowUtils; NaN too).
    """
    n = colx.shape[0]
    ne = len(ax)
    min_x, max_x, min_y, max_y = box
    for wd in range((n + 63) >> 6):
        start = wd << 6
        xs = colx[start:min(start + 64, n)]
        ys = coly[start:min(start + 64, n)]
        ws = np.uint64(0)
        wn = np.uint64(0)
        for j in range(xs.shape[0]):
            x = xs[j]
            y = ys[j]
            live = (x >= min_x) & (x <= max_x) & (y >= min_y) & (y <= max_y)
            inside = live
            close = False
            for i in range(ne):
                il = (dx[i] * (y - ay[i])) - ((x - ax[i]) * dy[i])
                inside = inside & (il > eps[i])
                close = close | (abs(il) <= eps[i])
            ws |= np.uint64(inside) << np.uint64(j)
            wn |= np.uint64(live & close & (not inside)) << np.uint64(j)
        sure[wd] &= ws
        near[wd] &= wn


def _strided_values(bits, step, col, out):  # pragma: no cover - compiled
    """``col[e]`` of the events ``e = 0, step, 2 step, ...`` in the bit set, in order, into ``out`` (while it has room).

    Returns how many. The members are found first (a branch-free pass over the
    bits), then only their values are read.
    """
    limit = out.shape[0]
    pos = np.empty(limit, dtype=np.int64)
    k = 0
    for e in range(0, col.shape[0], step):
        if k >= limit:
            break
        pos[k] = e
        k += (bits[e >> 6] >> np.uint64(e & 63)) & np.uint64(1)
    for i in range(k):
        out[i] = col[pos[i]]
    return k


def _octave_lookup(x, e0, per, pos_tab, neg_tab, out):  # pragma: no cover - compiled
    """Interpolate a function tabulated per octave (see :func:`immuneprofile.transforms.density_transform`).

    ``pos_tab[(o - e0) * per + k]`` is its value at ``2**o * (1 + k / per)``
    (``neg_tab`` at minus that); between ``-2**e0`` and ``2**e0`` it is taken as
    linear. Values beyond the tables, and NaN, give NaN; returns their count.
    ``per`` is a power of two: octave and knot come straight from the bits of
    the float (exponent, top mantissa bits), the fraction from the others.
    """
    x0 = 2.0 ** e0
    x1 = 2.0 ** (e0 + (pos_tab.shape[0] - 1) // per)
    shift = 52 - int(np.log2(per))
    low = (np.int64(1) << shift) - 1
    scale = 1.0 / float(np.int64(1) << shift)
    bits = x.view(np.int64)
    far = 0
    for i in range(x.shape[0]):
        v = x[i]
        a = abs(v)
        if a < x0:
            out[i] = neg_tab[0] + (v + x0) / (2.0 * x0) * (pos_tab[0] - neg_tab[0])
            continue
        if not (a < x1):  # beyond the table, or NaN
            out[i] = np.nan
            far += 1
            continue
        b = bits[i]
        octave = ((b >> 52) & 0x7FF) - 1023  # a = 2**octave * (1 + mantissa / 2**52)
        mant = b & ((np.int64(1) << 52) - 1)
        idx = (octave - e0) * per + (mant >> shift)
        frac = float(mant & low) * scale
        tab = pos_tab if v > 0 else neg_tab
        out[i] = tab[idx] + frac * (tab[idx + 1] - tab[idx])
    return far


def _moments(v):  # pragma: no cover - compiled
    """``(count, min, max, standard deviation with ddof=1)`` of the finite values of ``v``."""
    n = 0
    mn = np.inf
    mx = -np.inf
    total = 0.0
    for x in v:
        if np.isfinite(x):
            n += 1
            mn = min(mn, x)
            mx = max(mx, x)
            total += x
    if n < 2:
        return n, mn, mx, np.nan
    mean = total / n
    ss = 0.0
    for x in v:
        if np.isfinite(x):
            ss += (x - mean) * (x - mean)
    return n, mn, mx, np.sqrt(ss / (n - 1))


def _bin_counts(v, edges, counts):  # pragma: no cover - compiled
    """``counts += np.histogram(v, bins=len(edges) - 1, range=(edges[0], edges[-1]))[0]``, same arithmetic.

    ``edges`` are ``np.linspace(lo, hi, nbins + 1)``; NumPy's equal-bin path: the
    index from ``(v - lo) / (hi - lo) * nbins``, then moved by one where ``v``
    falls the other side of an edge; the last bin includes ``hi``.
    """
    nb = edges.shape[0] - 1
    lo = edges[0]
    hi = edges[nb]
    denom = hi - lo
    for x in v:
        if not ((x >= lo) & (x <= hi)):
            continue
        i = int(((x - lo) / denom) * nb)
        if i == nb:
            i -= 1
        if x < edges[i]:
            i -= 1
        if (x >= edges[i + 1]) & (i != nb - 1):
            i += 1
        counts[i] += 1


#: Populations of at least this many events get :func:`_radix_median`; smaller ones a selection.
_RADIX_FROM = 1 << 13


def _median_with(gather, radix_median):
    """The ``median_of`` kernel from its compiled parts.

    ``median_of(col, idx, m, buf, hist)`` is ``np.median(col[idx[:m]])`` (NaN if
    ``m == 0`` or any value is NaN): :func:`_gather` copies the values into
    ``buf`` (float64 scratch, one per event), :func:`_radix_median` takes the median
    (``hist``: int64 scratch of 65,536 bins). It holds no state, so threads may call it
    at once, each with its own ``buf`` and ``hist``.
    """

    def median_of(col, idx, m, buf, hist):
        nan = gather(col, idx, m, buf)
        if m == 0 or nan:
            return np.nan
        return float(radix_median(buf, m, hist))

    return median_of


def _medians_with(members, median_of):
    """``out[c] = np.median(ev[members, chans[c]])`` for the events in the bit set, one channel after another.

    :func:`_members` lists the members' indices once into ``idx`` (int64 scratch, one
    per event); ``median_of`` (:func:`_median_with`) takes each channel.
    """

    def medians(ev, chans, bits, idx, buf, hist, out):
        m = members(bits, ev.shape[0], idx)
        for c in range(chans.shape[0]):
            out[c] = median_of(ev[:, chans[c]], idx, m, buf, hist)

    return medians


def _members(bits, n, idx):  # pragma: no cover - compiled
    """List the indices of the events in the bit set into ``idx``; return how many."""
    m = np.int64(0)
    for w in range(bits.shape[0]):
        word = bits[w]
        if word == 0:
            continue
        base = w << 6
        for j in range(min(64, n - base)):
            idx[m] = base + j
            m += np.int64((word >> np.uint64(j)) & np.uint64(1))
    return m


def _gather(col, idx, m, buf):  # pragma: no cover - compiled
    """Copy ``col[idx[:m]]`` into ``buf``; whether any of the values is NaN."""
    nan = False
    for i in range(m):
        x = col[idx[i]]
        buf[i] = x
        nan |= x != x
    return nan


def _radix_median(buf, m, hist):  # pragma: no cover - compiled
    """``np.median(buf[:m])`` (no NaN, ``m > 0``), reordering ``buf``.

    Under :data:`_RADIX_FROM` values, a selection (``np.partition``). Above, the two
    middle order statistics are found by one radix pass (``hist``: 65,536 bins of the
    top 16 bits of an order-preserving integer key, i.e. 1/16 of an octave) and a
    selection among the values in their bins only: ``np.median``'s result, the middle
    value or the mean of the two middle values.
    """
    k1 = (m - 1) // 2
    if m < _RADIX_FROM:  # small populations: a selection beats clearing and scanning 65,536 bins
        part = np.partition(buf[:m], k1)
        return (part[k1] + part[k1 + 1:].min()) / 2.0 if m % 2 == 0 else part[k1]
    u = buf.view(np.uint64)
    sign = np.uint64(1) << np.uint64(63)
    ones = ~np.uint64(0)
    sh = np.uint64(48)
    hist[:] = 0
    for i in range(m):
        key = u[i] ^ (ones if u[i] & sign else sign)  # order-preserving: negatives flipped, positives offset
        hist[key >> sh] += 1
    k2 = m // 2
    cum = 0
    b1 = -1
    b2 = -1
    base1 = 0
    for b in range(hist.shape[0]):
        h = hist[b]
        if b1 < 0 and cum + h > k1:
            b1 = b
            base1 = cum
        if cum + h > k2:
            b2 = b
            break
        cum += h
    first = np.uint64(b1)
    span = np.uint64(b2 - b1)
    kept = 0
    for i in range(m):  # branch-free: every value is written, the kept ones advance (kept <= i: in place)
        x = u[i]
        u[kept] = x
        kept += ((x ^ (ones if x & sign else sign)) >> sh) - first <= span
    # a selection, not a sort: a tight population puts a large share of its events in the middle bins
    part = np.partition(buf[:kept], k1 - base1)
    lower = part[k1 - base1]
    return (lower + part[k1 - base1 + 1:].min()) / 2.0 if k1 != k2 else lower


# ----------------------------------------------------------------------------- NumPy twins
def _interval_bits_np(col, lo1, hi1, lo2, hi2, out1, out2):
    with np.errstate(invalid="ignore"):
        out1 &= pack((col >= lo1) & (col <= hi1))
        out2 &= pack((col >= lo2) & (col <= hi2))


def _pip_numpy(vertices: np.ndarray, px: np.ndarray, py: np.ndarray) -> np.ndarray:
    """FlowUtils' winding-number test in NumPy (edge by edge over all points); boolean."""
    v = np.asarray(vertices, dtype=np.float64)
    px = np.asarray(px, dtype=np.float64)
    py = np.asarray(py, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        inside_box = ~((px < v[:, 0].min()) | (px > v[:, 0].max()) | (py < v[:, 1].min()) | (py > v[:, 1].max()))
        idx = np.flatnonzero(inside_box)
        x, y = px[idx], py[idx]
        wind = np.zeros(idx.size, dtype=np.int64)
        nv = len(v)
        for i in range(nv):
            ax, ay = v[i]
            bx, by = v[(i + 1) % nv]
            up = (ay <= y) & (y < by)
            down = (ay > y) & (by <= y)
            cand = np.flatnonzero(up | down)
            if cand.size == 0:
                continue
            is_left = (bx - ax) * (y[cand] - ay) - (x[cand] - ax) * (by - ay)
            wind[cand] += (up[cand] & (is_left > 0)).astype(np.int64)
            wind[cand] -= (down[cand] & (is_left < 0)).astype(np.int64)
    out = np.zeros(px.size, dtype=bool)
    out[idx] = wind % 2 != 0
    return out


def _winding_bits_np(vx, vy, colx, coly, out):
    out &= pack(_pip_numpy(np.column_stack([vx, vy]), colx, coly))


def _convex_bits_np(ax, ay, dx, dy, eps, box, colx, coly, sure, near):
    min_x, max_x, min_y, max_y = box
    with np.errstate(invalid="ignore"):
        live = (colx >= min_x) & (colx <= max_x) & (coly >= min_y) & (coly <= max_y)
        inside = live.copy()
        close = np.zeros(colx.shape[0], dtype=bool)
        for i in range(len(ax)):
            il = (dx[i] * (coly - ay[i])) - ((colx - ax[i]) * dy[i])
            inside &= il > eps[i]
            close |= np.abs(il) <= eps[i]
    sure &= pack(inside)
    near &= pack(live & close & ~inside)


def _strided_values_np(bits, step, col, out):
    pos = np.arange(0, col.shape[0], step)
    pos = pos[unpack(bits, col.shape[0])[pos]][:out.shape[0]]
    out[:pos.size] = col[pos]
    return pos.size


def _octave_lookup_np(x, e0, per, pos_tab, neg_tab, out):
    x0 = 2.0 ** e0
    x1 = 2.0 ** (e0 + (pos_tab.shape[0] - 1) // per)
    a = np.abs(x)
    small = a < x0
    with np.errstate(invalid="ignore"):
        ok = ~small & (a < x1)
    m, e = np.frexp(np.where(ok, a, 1.0))
    f = (2.0 * m - 1.0) * per
    j = f.astype(np.int64)
    idx = (e.astype(np.int64) - 1 - e0) * per + j
    out[:] = np.nan
    tab = np.where(x > 0, 1, 0)
    for sign, t in ((1, pos_tab), (0, neg_tab)):
        sel = ok & (tab == sign)
        k = idx[sel]
        out[sel] = t[k] + (f[sel] - j[sel]) * (t[k + 1] - t[k])
    out[small] = neg_tab[0] + (x[small] + x0) / (2.0 * x0) * (pos_tab[0] - neg_tab[0])
    return int(np.count_nonzero(np.isnan(out)))


def _moments_np(v):
    f = v[np.isfinite(v)]
    if f.size < 2:
        return f.size, (f.min() if f.size else np.inf), (f.max() if f.size else -np.inf), np.nan
    return f.size, float(f.min()), float(f.max()), float(np.std(f, ddof=1))


def _bin_counts_np(v, edges, counts):
    counts += np.histogram(v, bins=edges.shape[0] - 1, range=(edges[0], edges[-1]))[0]


def _members_np(bits, n, idx):
    where = np.flatnonzero(unpack(bits, n))
    idx[:where.size] = where
    return where.size


def _median_of_np(col, idx, m, buf, hist):
    return float(np.median(col[idx[:m]])) if m else np.nan


_COMPILED: Any = None


def kernels(compiled: bool = True):
    """The kernels (a namespace): compiled with numba, or the NumPy twins (no numba, or ``compiled=False``)."""
    global _COMPILED
    if compiled and _COMPILED is None:
        try:
            from numba import njit
        except ImportError:  # pragma: no cover - numba is a dependency
            _COMPILED = False
        else:
            from types import SimpleNamespace

            jit = njit(cache=True, nogil=True)
            _COMPILED = SimpleNamespace(interval_bits=jit(_interval_bits), winding_bits=jit(_winding_bits),
                                        convex_bits=jit(_convex_bits),
                                        strided_values=jit(_strided_values), octave_lookup=jit(_octave_lookup),
                                        moments=jit(_moments), bin_counts=jit(_bin_counts), members=jit(_members),
                                        median_of=_median_with(jit(_gather), jit(_radix_median)),
                                        compiled=True)
            _COMPILED.medians = _medians_with(_COMPILED.members, _COMPILED.median_of)
    if compiled and _COMPILED:
        return _COMPILED
    from types import SimpleNamespace

    return SimpleNamespace(interval_bits=_interval_bits_np, winding_bits=_winding_bits_np, convex_bits=_convex_bits_np,
                           strided_values=_strided_values_np, octave_lookup=_octave_lookup_np,
                           moments=_moments_np, bin_counts=_bin_counts_np, members=_members_np,
                           median_of=_median_of_np, medians=_medians_with(_members_np, _median_of_np), compiled=False)


#: Events from which a sample is worth loading the compiled kernels for (about 0.5-1 s once per process,
#: from numba's cache); smaller samples use the NumPy twins (same results) unless they are loaded already.
COMPILE_FROM = 20_000


def kernels_for(n_events: int):
    """The kernels for a sample of ``n_events``: compiled if already loaded or worth loading, else the NumPy twins.

    A command that gates one small file thus never imports numba (see :data:`COMPILE_FROM`).
    """
    return kernels(compiled=bool(_COMPILED) or n_events >= COMPILE_FROM)


@lru_cache(maxsize=256)
def convex_edges(vertices: tuple[tuple[float, float], ...]):
    """Edges of a strictly convex polygon for :func:`_convex_bits`, or ``None`` if it is not one.

    Strictly convex: at most :data:`TUPLE_VERTICES` vertices, no zero-length
    edge, every turn the same way (no straight angle) and one full turn in all
    (which rules out stars). Returns tuples ``(ax, ay, dx, dy, eps, box)``, each
    edge oriented so that the inside is on the positive side of ``is_left``,
    ``eps`` bounding its rounding error (about 200x the worst case) for points
    of the bounding box ``box``.
    """
    v = np.asarray(vertices, dtype=np.float64)
    if len(v) < 3 or len(v) > TUPLE_VERTICES or not np.all(np.isfinite(v)):
        return None
    d = np.roll(v, -1, axis=0) - v
    if np.any((d[:, 0] == 0) & (d[:, 1] == 0)):
        return None
    nxt = np.roll(d, -1, axis=0)
    cross = d[:, 0] * nxt[:, 1] - d[:, 1] * nxt[:, 0]
    if not (np.all(cross > 0) or np.all(cross < 0)):
        return None
    if abs(abs(np.sum(np.arctan2(cross, np.sum(d * nxt, axis=1)))) - 2 * np.pi) > 1e-6:
        return None
    s = 1.0 if cross[0] > 0 else -1.0
    # |is_left| = |dx (y - ay) - (x - ax) dy| <= |dx| h + |dy| w in the box; each of its four roundings errs by
    # at most 2**-53 of what it rounds, so 1e-13 of that bound is ~200x the worst case
    w, h = float(np.ptp(v[:, 0])), float(np.ptp(v[:, 1]))
    eps = 1e-13 * (np.abs(d[:, 0]) * h + np.abs(d[:, 1]) * w)

    def tup(a) -> tuple[float, ...]:
        return tuple(float(x) for x in a)

    box = (float(v[:, 0].min()), float(v[:, 0].max()), float(v[:, 1].min()), float(v[:, 1].max()))
    return tup(v[:, 0]), tup(v[:, 1]), tup(s * d[:, 0]), tup(s * d[:, 1]), tup(eps), box
