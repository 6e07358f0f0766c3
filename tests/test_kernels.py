"""The engine's kernels compute exactly what FlowUtils / plain NumPy compute.

No timing here: only bit-for-bit agreement, edge cases included (points on
vertices and edges, horizontal edges, self-intersecting polygons, NaN/inf,
values on a bound, event counts that are not a multiple of 64), between the
compiled kernels, their NumPy twins and an independent reference (FlowUtils'
C point-in-polygon, NumPy comparisons).
"""

from __future__ import annotations

import flowutils.gating as flowutils_gating
import numpy as np
import pandas as pd
import pytest

from immuneprofile import gate_sample, load_fcs, parse_template
from immuneprofile.engine import _kernels, gating

COMPILED = _kernels.kernels()
TWINS = _kernels.kernels(compiled=False)


def test_kernels_are_compiled():
    """numba is a required dependency: the engine must run its compiled kernels."""
    assert COMPILED.compiled


def reference_pip(vertices, px, py):
    """FlowUtils' own C implementation."""
    return flowutils_gating.points_in_polygon(np.asarray(vertices, dtype=np.float64), np.column_stack([px, py]))


def winding(K, vertices, px, py, tuples=True):
    v = np.asarray(vertices, dtype=np.float64)
    vx, vy = (tuple(map(float, v[:, 0])), tuple(map(float, v[:, 1]))) if tuples else (
        np.ascontiguousarray(v[:, 0]), np.ascontiguousarray(v[:, 1]))
    out = _kernels.full_bits(px.size)
    K.winding_bits(vx, vy, np.ascontiguousarray(px), np.ascontiguousarray(py), out)
    return _kernels.unpack(out, px.size)


def random_polygon(rng, kind):
    n = int(rng.integers(3, 12))
    if kind == "grid":  # integer vertices: many points exactly on edges and vertices
        return rng.integers(-5, 6, size=(n, 2)).astype(float)
    ang = np.sort(rng.uniform(0, 2 * np.pi, n))
    rad = rng.uniform(0.2, 1.0, n)
    if kind == "self-intersecting":
        ang = rng.permutation(ang)
    v = np.column_stack([rad * np.cos(ang), rad * np.sin(ang)]) * rng.uniform(0.5, 3e5)
    if kind == "degenerate":  # repeated vertex, horizontal and vertical edges
        v = np.vstack([v, v[:1], [[v[0, 0], v[1, 1]]], [[v[2, 0], v[2, 1]]]])
    return v


def adversarial_points(rng, v, n=4000):
    """Uniform points plus vertices, points on edges, on vertex rows/columns, NaN and inf."""
    lo, hi = v.min(axis=0), v.max(axis=0)
    span = np.maximum(hi - lo, 1.0)
    pts = [rng.uniform(lo - 0.1 * span, hi + 0.1 * span, size=(n, 2)), v]
    nxt = np.roll(v, -1, axis=0)
    for t in (0.0, 0.25, 0.5, 1.0 / 3.0, 0.75, 1.0):
        pts.append(v + t * (nxt - v))  # on (or within rounding of) each edge
    pts.append(np.column_stack([rng.uniform(lo[0], hi[0], v.shape[0]), v[:, 1]]))  # rows through vertices
    pts.append(np.column_stack([v[:, 0], rng.uniform(lo[1], hi[1], v.shape[0])]))  # columns through vertices
    pts.append(np.column_stack([np.nextafter(v[:, 0], np.inf), np.nextafter(v[:, 1], -np.inf)]))
    if np.all(v == np.round(v)):  # integer grid over the box: exact hits everywhere
        gx, gy = np.meshgrid(np.arange(lo[0] - 1, hi[0] + 2, 0.5), np.arange(lo[1] - 1, hi[1] + 2, 0.5))
        pts.append(np.column_stack([gx.ravel(), gy.ravel()]))
    special = np.array([[np.nan, 0.0], [0.0, np.nan], [np.nan, np.nan], [np.inf, 0.0], [-np.inf, 0.0],
                        [0.0, np.inf], [0.0, -np.inf], [lo[0], np.nan], [np.nan, lo[1]]])
    pts.append(special)
    p = np.vstack(pts)
    return np.ascontiguousarray(p[:, 0]), np.ascontiguousarray(p[:, 1])


@pytest.mark.parametrize("kind", ["convex-ish", "self-intersecting", "grid", "degenerate"])
@pytest.mark.parametrize("seed", range(25))
def test_polygon_kernels_match_flowutils(kind, seed):
    rng = np.random.default_rng(seed)
    v = random_polygon(rng, kind)
    px, py = adversarial_points(rng, v)
    want = reference_pip(v, px, py)
    np.testing.assert_array_equal(winding(COMPILED, v, px, py), want)
    np.testing.assert_array_equal(winding(COMPILED, v, px, py, tuples=False), want)  # many-vertex form
    np.testing.assert_array_equal(winding(TWINS, v, px, py), want)
    np.testing.assert_array_equal(gating.points_in_polygon(v, px, py), want)


def test_polygon_kernel_on_a_column_view_and_any_length():
    """Columns of a column-major matrix, and lengths around the 64-event word."""
    rng = np.random.default_rng(7)
    v = random_polygon(rng, "self-intersecting")
    for n in (0, 1, 63, 64, 65, 127, 128, 1000):
        m = np.asfortranarray(rng.uniform(-3e5, 3e5, size=(n, 3)))
        got = winding(COMPILED, v, m[:, 0], m[:, 2])
        np.testing.assert_array_equal(got, reference_pip(v, m[:, 0], m[:, 2]) if n else np.zeros(0, bool))


def test_polygon_kernel_has_no_fused_multiply_add():
    """``is_left`` must round after each product, as FlowUtils' C does (no FMA contraction).

    Cached kernels cannot be inspected, so the same source is compiled afresh
    with the same options (no fastmath) for this machine and its assembly read.
    """
    from numba import njit

    kern = njit(nogil=True)(_kernels._winding_bits)
    out = _kernels.full_bits(8)
    kern((0.0, 1.0, 0.0), (0.0, 0.0, 1.0), np.full(8, 0.2), np.full(8, 0.2), out)
    assert _kernels.unpack(out, 8).all()
    asm = kern.inspect_asm(kern.signatures[0]).lower()
    assert "cmp" in asm  # real assembly, not a placeholder
    for op in ("vfmadd", "vfmsub", "vfnmadd", "vfnmsub"):
        assert op not in asm


@pytest.mark.parametrize("seed", range(10))
def test_interval_kernel_matches_numpy_comparisons(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 3000))
    lo = float(rng.normal() * 10 ** rng.integers(0, 6))
    hi = lo + abs(float(rng.normal())) * 10 ** rng.integers(0, 6)
    vals = rng.normal(lo, abs(hi - lo) + 1.0, n)
    for x in (lo, hi):  # on each bound and one ulp either side
        vals[rng.integers(0, n, 20)] = x
        vals[rng.integers(0, n, 20)] = np.nextafter(x, np.inf)
        vals[rng.integers(0, n, 20)] = np.nextafter(x, -np.inf)
    vals[rng.integers(0, n, 10)] = rng.choice([np.nan, np.inf, -np.inf], 10)
    col = np.asfortranarray(np.column_stack([rng.normal(size=n), vals]))[:, 1]  # a column view
    for lo1, hi1, lo2, hi2 in ((lo, hi, -np.inf, lo), (lo, np.inf, -np.inf, hi), (-np.inf, np.inf, hi, hi)):
        init1, init2 = _kernels.pack(rng.random(n) < 0.8), _kernels.pack(rng.random(n) < 0.8)
        with np.errstate(invalid="ignore"):
            want1 = _kernels.unpack(init1, n) & (vals >= lo1) & (vals <= hi1)
            want2 = _kernels.unpack(init2, n) & (vals >= lo2) & (vals <= hi2)
        for K in (COMPILED, TWINS):
            out1, out2 = init1.copy(), init2.copy()
            K.interval_bits(col, lo1, hi1, lo2, hi2, out1, out2)
            np.testing.assert_array_equal(_kernels.unpack(out1, n), want1)
            np.testing.assert_array_equal(_kernels.unpack(out2, n), want2)
            assert np.array_equal(out1, _kernels.pack(want1))  # bits past the last event stay zero


def test_bit_sets_round_trip():
    rng = np.random.default_rng(3)
    for n in (0, 1, 8, 63, 64, 65, 1000):
        m = rng.random(n) < 0.5
        b = _kernels.pack(m)
        assert b.dtype == np.uint64 and b.size == _kernels.nwords(n)
        np.testing.assert_array_equal(_kernels.unpack(b, n), m)
        np.testing.assert_array_equal(_kernels.unpack(_kernels.full_bits(n), n), np.ones(n, bool))
        assert int(np.bitwise_count(_kernels.full_bits(n)).sum()) == n


@pytest.mark.parametrize("step", [1, 3, 64, 1000])
def test_strided_values(step):
    rng = np.random.default_rng(step)
    n = 10_001
    m = rng.random(n) < 0.3
    col = rng.normal(size=n)
    want = np.arange(0, n, step)
    want = col[want[m[want]]]
    for K in (COMPILED, TWINS):
        for limit in (5, n):
            out = np.empty(limit)
            k = K.strided_values(_kernels.pack(m), step, col, out)
            np.testing.assert_array_equal(out[:k], want[:limit])


def test_moments_and_bin_counts_match_numpy():
    rng = np.random.default_rng(8)
    for t in range(60):
        v = rng.normal(rng.normal(), abs(rng.normal()) + 1e-3, int(rng.integers(2, 3000)))
        if t % 3 == 0:
            v[rng.integers(0, v.size, 5)] = rng.choice([np.nan, np.inf, -np.inf], 5)
        f = v[np.isfinite(v)]
        edges = np.linspace(f.min() - rng.random(), f.max() + rng.random(), 1025)
        v[:2] = edges[[1, -1]]  # values on an inner edge and on the last edge
        f = v[np.isfinite(v)]
        want = np.histogram(v, bins=1024, range=(edges[0], edges[-1]))[0]
        for K in (COMPILED, TWINS):
            counts = np.zeros(1024, dtype=np.int64)
            K.bin_counts(v, edges, counts)
            np.testing.assert_array_equal(counts, want)
            n, lo, hi, sd = K.moments(v)
            assert (n, lo, hi) == (f.size, f.min(), f.max())
            assert sd == pytest.approx(np.std(f, ddof=1), rel=1e-12)


def test_octave_table_kernels_agree():
    from immuneprofile.engine.transforms import density_transform, make_transform, normalize_spec

    spec = normalize_spec("logicle")
    x = np.concatenate([-np.logspace(-12, 14, 5000), np.logspace(-12, 14, 5000), [np.nan, np.inf, -np.inf, 0.0]])
    exact = np.asarray(make_transform(spec).apply(x.reshape(-1, 1))).ravel()
    fast = density_transform(spec)(x)
    assert np.array_equal(np.isnan(fast), np.isnan(exact))
    ok = np.isfinite(exact)
    assert np.max(np.abs(fast[ok] - exact[ok])) < 2e-8
    e0, e1 = -30, 40
    knots = np.append(np.ldexp(1.0 + np.arange(64) / 64, np.arange(e0, e1)[:, None]).ravel(), 2.0 ** e1)
    tabs = np.log1p(knots), -np.log1p(knots)
    outs = []
    for K in (COMPILED, TWINS):
        out = np.empty(x.size)
        K.octave_lookup(x, e0, 64, *tabs, out)
        outs.append(out)
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-12, equal_nan=True)


@pytest.mark.parametrize("seed", range(12))
def test_engine_kernels_match_numpy_engine(comp_data, seed, monkeypatch):
    """The whole engine with the compiled kernels and with their NumPy twins: the same populations."""
    from test_flowkit_equivalence import random_template

    t = parse_template(random_template(np.random.default_rng(1000 + seed), comp_data), f"random-{seed}")
    fast = gate_sample(comp_data, t)
    monkeypatch.setattr(_kernels, "_COMPILED", False)
    slow = gate_sample(comp_data, t)
    for pop in t.populations:
        np.testing.assert_array_equal(fast.mask(pop.name), slow.mask(pop.name), err_msg=pop.name)


def test_case_series_templates_with_and_without_kernels(monkeypatch, tmp_path):
    """The real templates on a simulated full-panel sample: compiled and NumPy engines agree."""
    from conftest import GATING
    from immuneprofile import load_template
    from immuneprofile.study import simulate

    path = simulate.write_fcs(tmp_path / "full.fcs", simulate.simulate_sample("full", 20000, rng=5))
    data = load_fcs(path)
    templates = [load_template(GATING / f"{n}.yaml") for n in ("tcell_skin_homing", "treg", "monocytes")]
    fast = gate_sample(data, templates)
    monkeypatch.setattr(_kernels, "_COMPILED", False)
    slow = [gate_sample(data, t, threads=1) for t in templates]
    for f, s in zip(fast, slow):
        assert f.counts == s.counts
        for name in f.bits:
            np.testing.assert_array_equal(f.mask(name), s.mask(name), err_msg=name)


def convex_polygon(rng, kind):
    if kind == "rectangle":
        (x0, x1), (y0, y1) = np.sort(rng.uniform(-1e5, 3e5, 2)), np.sort(rng.uniform(-1e5, 3e5, 2))
        return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]])
    if kind == "grid":  # integer vertices: points exactly on edges and vertices
        return np.array([[0, 0], [4, 0], [6, 3], [3, 5], [-1, 2]], dtype=float) * rng.integers(1, 4)
    ang = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 12))))
    v = np.column_stack([np.cos(ang), np.sin(ang)]) * rng.uniform(1, 3e5) + rng.uniform(-1e5, 1e5, 2)
    return v[::-1] if kind == "clockwise" else v


@pytest.mark.parametrize("kind", ["ellipse-ish", "clockwise", "rectangle", "grid"])
@pytest.mark.parametrize("seed", range(15))
def test_convex_kernel_and_winding_fallback_match_flowutils(kind, seed):
    """Half-planes decide the points far from every edge; the winding count the rest: FlowUtils' answer."""
    rng = np.random.default_rng(500 + seed)
    v = convex_polygon(rng, kind)
    edges = _kernels.convex_edges(tuple(map(tuple, v)))
    assert edges is not None
    px, py = adversarial_points(rng, v)
    want = reference_pip(v, px, py)
    for K in (COMPILED, TWINS):
        sure, near = _kernels.full_bits(px.size), _kernels.full_bits(px.size)
        K.convex_bits(*edges, px, py, sure, near)
        got, undecided = _kernels.unpack(sure, px.size).copy(), _kernels.unpack(near, px.size)
        assert not (got & undecided).any()
        assert np.array_equal(got[~undecided], want[~undecided])  # decided: FlowUtils' answer
        got[undecided] = winding(K, v, px[undecided], py[undecided])
        np.testing.assert_array_equal(got, want)
    assert _kernels.unpack(near, px.size).sum() < 0.5 * px.size  # most points are decided by half-planes


def test_convex_edges_rejects_what_is_not_strictly_convex():
    square = [(0.0, 0.0), (1.0, 0.0), (1.0, 1.0), (0.0, 1.0)]
    assert _kernels.convex_edges(tuple(square)) is not None
    assert _kernels.convex_edges(tuple(square[:2] + [(2.0, 0.0)] + square[2:])) is None  # straight angle
    assert _kernels.convex_edges(tuple(square + [square[0]])) is None  # closing vertex repeated
    assert _kernels.convex_edges(((0.0, 0.0), (2.0, 2.0), (2.0, 0.0), (0.0, 2.0))) is None  # bow tie
    star = [(np.cos(a), np.sin(a)) for a in np.arange(5) * 4 * np.pi / 5]  # pentagram: turns one way, twice
    assert _kernels.convex_edges(tuple(star)) is None


@pytest.mark.parametrize("tight", [False, True], ids=["wide", "tight-with-ties"])
@pytest.mark.parametrize("n", [0, 1, 700, _kernels._RADIX_FROM - 1, _kernels._RADIX_FROM * 3,
                               _kernels._RADIX_FROM * 3 + 1])
def test_medians_kernel_is_numpy_median(n, tight):
    """Both paths (selection below _RADIX_FROM members, radix pass above) and the twin give np.median.

    ``tight``: integer values in a narrow range (a scatter channel of 16-bit data), so that the
    middle bins hold most of the values and many of them are equal.
    """
    rng = np.random.default_rng(n)
    if tight:
        ev = np.asfortranarray(np.round(rng.normal(50000, 800, (n + 50, 4))))
    else:
        ev = np.asfortranarray(rng.lognormal(5, 2, (n + 50, 4)) * rng.choice([-1.0, 1.0], (n + 50, 4)))
    ev[rng.integers(0, n + 50, 5), 3] = np.nan
    mask = np.zeros(n + 50, dtype=bool)
    mask[rng.choice(n + 50, n, replace=False)] = True
    chans = np.array([0, 2, 3], dtype=np.int64)
    want = [np.median(ev[mask, c]) if mask.any() else np.nan for c in chans]
    for K in (COMPILED, TWINS):
        out = np.empty(3)
        K.medians(ev, chans, _kernels.pack(mask), np.empty(n + 50, np.int64), np.empty(n + 50),
                  np.zeros(1 << 16, np.int64), out)
        np.testing.assert_array_equal(out, want)


def test_population_table_medians_with_populations_shared_by_templates(tmp_path):
    """Templates share populations (one bit set); each median is still np.median of that population."""
    from conftest import GATING
    from immuneprofile import load_template, population_table
    from immuneprofile.study import simulate

    path = simulate.write_fcs(tmp_path / "full.fcs", simulate.simulate_sample("full", 30000, rng=8))
    data = load_fcs(path)
    results = gate_sample(data, [load_template(GATING / f"{n}.yaml") for n in ("tcell_skin_homing", "treg")])
    assert results[0].bits["CD3+"] is results[1].bits["CD3+"]
    table = population_table(results)
    for row, (res, pop) in zip(table.itertuples(), [(r, p) for r in results for p in r.template.populations]):
        m = res.mask(pop.name)
        for marker in res.template.markers:
            want = np.median(data.events[m, data.find_channel(marker)]) if m.any() else np.nan
            np.testing.assert_array_equal(table.loc[row.Index, f"median_{marker}"], want)


def test_population_table_medians_on_threads_are_numpy_medians(tmp_path):
    """A large population's medians are split between threads; each is still np.median of its population."""
    from conftest import GATING
    from immuneprofile import load_template, population_table
    from immuneprofile.stats import _THREADED_MEDIANS_FROM
    from immuneprofile.study import simulate

    n = 8 * _THREADED_MEDIANS_FROM
    data = load_fcs(simulate.write_fcs(tmp_path / "big.fcs", simulate.simulate_sample("full", n, rng=9)))
    results = gate_sample(data, [load_template(GATING / f"{t}.yaml") for t in ("tcell_skin_homing", "monocytes")])
    sizes = [r.count(p.name) for r in results for p in r.template.populations]
    assert max(sizes) >= _THREADED_MEDIANS_FROM > min(sizes)  # both paths
    threaded, serial = population_table(results, threads=2), population_table(results, threads=1)
    pd.testing.assert_frame_equal(threaded, serial)
    pops = [(r, p) for r in results for p in r.template.populations]
    for i in range(0, len(pops), 5):  # every fifth population, each marker
        res, pop = pops[i]
        m = res.mask(pop.name)
        for marker in res.template.markers:
            want = np.median(data.events[m, data.find_channel(marker)]) if m.any() else np.nan
            np.testing.assert_array_equal(threaded.loc[i, f"median_{marker}"], want)
