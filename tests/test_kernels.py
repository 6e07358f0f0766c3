"""The compiled gating kernels compute exactly what FlowUtils / the NumPy arithmetic compute.

No timing here: only bit-for-bit agreement, edge cases included (points on
vertices and edges, horizontal edges, self-intersecting polygons, NaN/inf,
values within the exact-comparison tolerance of a boundary).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from immuneprofile import gating, gate_sample, load_fcs, parse_template

flowutils_gating = pytest.importorskip("flowutils.gating")
K = gating._kernels()
pytestmark = pytest.mark.skipif(not K, reason="numba not installed")

NO_IDX = np.empty(0, dtype=np.int64)


def reference_pip(vertices, px, py):
    """FlowUtils' own C implementation."""
    return flowutils_gating.points_in_polygon(np.asarray(vertices, dtype=np.float64), np.column_stack([px, py]))


def compiled_pip(vertices, px, py):
    v = np.asarray(vertices, dtype=np.float64)
    out = np.empty(px.size, dtype=bool)
    return K.pip_gather(np.ascontiguousarray(v[:, 0]), np.ascontiguousarray(v[:, 1]),
                        np.asarray(px, dtype=np.float64), np.asarray(py, dtype=np.float64), NO_IDX, True, out)


def compiled_pip_gather(vertices, colx, coly, idx):
    v = np.asarray(vertices, dtype=np.float64)
    out = np.empty(idx.size, dtype=bool)
    return K.pip_gather(np.ascontiguousarray(v[:, 0]), np.ascontiguousarray(v[:, 1]), colx, coly, idx, False, out)


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
    pts = [rng.uniform(lo - 0.1 * span, hi + 0.1 * span, size=(n, 2)), v, v + np.array([0.0, 0.0])]
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
def test_polygon_kernel_matches_flowutils(kind, seed):
    rng = np.random.default_rng(seed)
    v = random_polygon(rng, kind)
    px, py = adversarial_points(rng, v)
    want = reference_pip(v, px, py)
    np.testing.assert_array_equal(compiled_pip(v, px, py), want)
    np.testing.assert_array_equal(gating.points_in_polygon(v, px, py), want)
    np.testing.assert_array_equal(gating._points_in_polygon_numpy(v, px, py), want)


@pytest.mark.parametrize("seed", range(10))
def test_polygon_gather_matches_flowutils(seed):
    """The fused gather kernel, on a strided column view and on a subset of indices."""
    rng = np.random.default_rng(100 + seed)
    v = random_polygon(rng, ["convex-ish", "self-intersecting", "grid"][seed % 3])
    px, py = adversarial_points(rng, v)
    matrix = np.column_stack([rng.normal(size=px.size), px, rng.normal(size=px.size), py])
    idx = np.flatnonzero(rng.random(px.size) < 0.6).astype(np.int64)
    want = reference_pip(v, px, py)
    np.testing.assert_array_equal(compiled_pip_gather(v, matrix[:, 1], matrix[:, 3], idx), want[idx])
    full = np.empty(px.size, dtype=bool)
    K.pip_gather(np.ascontiguousarray(v[:, 0]), np.ascontiguousarray(v[:, 1]), px, py, NO_IDX, True, full)
    np.testing.assert_array_equal(full, want)


def test_polygon_block_boundaries():
    """Sizes around the kernel's block length."""
    rng = np.random.default_rng(7)
    v = random_polygon(rng, "self-intersecting")
    for n in (0, 1, gating._PIP_BLOCK - 1, gating._PIP_BLOCK, gating._PIP_BLOCK + 1, 3 * gating._PIP_BLOCK + 5):
        px, py = rng.uniform(-3e5, 3e5, n), rng.uniform(-3e5, 3e5, n)
        np.testing.assert_array_equal(compiled_pip(v, px, py), reference_pip(v, px, py) if n else np.zeros(0, bool))


def test_polygon_kernel_has_no_fused_multiply_add():
    """``is_left`` must round after each product, as FlowUtils' C does (no FMA contraction).

    Cached kernels cannot be inspected, so the same source is compiled afresh
    with the same options (no fastmath) for this machine and its assembly read.
    """
    from numba import njit

    kern = njit(nogil=True)(gating._pip_block)
    n = 8
    out = np.empty(n, dtype=bool)
    kern(np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, 1.0]), np.full(n, 0.2), np.full(n, 0.2), n,
         np.empty(n, dtype=np.int32), out, 0)
    assert out.all()
    asm = kern.inspect_asm(kern.signatures[0]).lower()
    assert "vcmp" in asm or "cmp" in asm  # real assembly, not a placeholder
    for op in ("vfmadd", "vfmsub", "vfnmadd", "vfnmsub"):
        assert op not in asm


def reference_rect_status(vals, status, lo, hi):
    """Status update of one rectangle dimension, from the NumPy ``_cmp`` arithmetic."""
    status = status.copy()
    alive = status != 0
    und = np.zeros(vals.size, dtype=bool)
    with np.errstate(invalid="ignore"):
        for xb, ge in ((lo, True), (hi, False)):
            if xb is None:
                continue
            tol = gating._REL_TOL * (1.0 + abs(xb))
            unsure = np.abs(vals - xb) <= tol
            ok = vals > xb if ge else vals < xb
            alive &= ok | unsure
            und |= unsure
    out = np.where(alive, np.where(und, 2, status), 0).astype(np.int8)
    return out


@pytest.mark.parametrize("seed", range(20))
def test_rect_kernel_matches_cmp(seed):
    rng = np.random.default_rng(seed)
    n = 3000
    lo = float(rng.normal() * 10 ** rng.integers(0, 6))
    hi = lo + abs(float(rng.normal())) * 10 ** rng.integers(0, 6)
    vals = rng.normal(lo, abs(hi - lo) + 1.0, n)
    for xb in (lo, hi):  # values on, and within / just beyond the tolerance of, each boundary
        tol = gating._REL_TOL * (1.0 + abs(xb))
        vals[rng.integers(0, n, 50)] = xb
        vals[rng.integers(0, n, 50)] = xb + rng.uniform(-tol, tol, 50)
        vals[rng.integers(0, n, 20)] = xb + tol
        vals[rng.integers(0, n, 20)] = np.nextafter(xb + tol, np.inf)
        vals[rng.integers(0, n, 20)] = np.nextafter(xb - tol, -np.inf)
    vals[:6] = [np.nan, np.inf, -np.inf, np.nan, lo, hi]
    status0 = rng.choice(np.array([0, 1, 2], dtype=np.int8), n, p=[0.2, 0.6, 0.2])
    matrix = np.column_stack([rng.normal(size=n), vals])
    idx = np.flatnonzero(rng.random(n) < 0.7).astype(np.int64)
    for has_lo, has_hi in ((True, True), (True, False), (False, True)):
        xlo, xhi = (lo if has_lo else 0.0), (hi if has_hi else 0.0)
        args = (has_lo, xlo, gating._REL_TOL * (1.0 + abs(xlo)), has_hi, xhi, gating._REL_TOL * (1.0 + abs(xhi)))
        want = reference_rect_status(vals, status0, lo if has_lo else None, hi if has_hi else None)
        got = K.rect_dim(matrix[:, 1], NO_IDX, True, *args, status0.copy())
        np.testing.assert_array_equal(got, want)
        got = K.rect_dim(np.ascontiguousarray(vals), idx, False, *args, status0[idx].copy())
        np.testing.assert_array_equal(got, want[idx])


def test_range_kernel_matches_numpy():
    rng = np.random.default_rng(3)
    vals = rng.normal(size=5000)
    vals[:4] = [np.nan, np.inf, -np.inf, 0.5]
    idx = np.flatnonzero(rng.random(vals.size) < 0.5).astype(np.int64)
    mask0 = rng.random(idx.size) < 0.8
    with np.errstate(invalid="ignore"):
        want = mask0 & (vals[idx] >= -0.5) & (vals[idx] <= 0.5)
    np.testing.assert_array_equal(K.range_and(vals, idx, False, -0.5, 0.5, mask0.copy()), want)


def test_take_columns_is_a_copy_of_the_columns():
    rng = np.random.default_rng(4)
    ev = rng.normal(size=(1001, 7))
    ev[3, 2] = np.nan
    cols = np.array([5, 0, 2], dtype=np.int64)
    out = np.empty((3, ev.shape[0]))
    K.take_columns(ev, cols, out)
    for k, c in enumerate(cols):
        np.testing.assert_array_equal(out[k], ev[:, c])


@pytest.fixture(scope="module")
def comp_data():
    from test_flowkit_equivalence import COMP_FCS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_fcs(COMP_FCS)


@pytest.mark.parametrize("seed", range(12))
def test_engine_kernels_match_numpy_engine(comp_data, seed, monkeypatch):
    """The whole engine with and without numba gives the same populations (random templates)."""
    from test_flowkit_equivalence import random_template

    t = parse_template(random_template(np.random.default_rng(1000 + seed), comp_data), f"random-{seed}")
    fast = gate_sample(comp_data, t)
    monkeypatch.setattr(gating, "_KERNELS", False)
    slow = gate_sample(comp_data, t)
    for pop in t.populations:
        np.testing.assert_array_equal(fast.indices[pop.name], slow.indices[pop.name], err_msg=pop.name)


def test_case_series_templates_with_and_without_kernels(monkeypatch, tmp_path):
    """The real templates on a simulated full-panel sample: compiled and NumPy engines agree."""
    simulate = pytest.importorskip("immuneprofile.simulate")
    from conftest import GATING
    from immuneprofile import load_template

    path = simulate.write_fcs(tmp_path / "full.fcs", simulate.simulate_sample("full", 20000, rng=5))
    data = load_fcs(path)
    templates = [load_template(GATING / f"{n}.yaml") for n in ("tcell_skin_homing", "treg", "monocytes")]
    fast = [gate_sample(data, t) for t in templates]
    monkeypatch.setattr(gating, "_KERNELS", False)
    data._columns.clear()
    slow = [gate_sample(data, t) for t in templates]
    for f, s in zip(fast, slow):
        for name in f.indices:
            np.testing.assert_array_equal(f.indices[name], s.indices[name], err_msg=name)
