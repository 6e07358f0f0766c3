"""The engine must give exactly the events FlowKit's own GatingStrategy gives."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import COMP_FCS, SHARED, flowkit_sample
from immuneprofile import gate_sample, load_fcs, parse_template
from immuneprofile.engine.transforms import make_transform, normalize_spec
from immuneprofile.interop.flowkit import flowkit_gate_path, to_gating_strategy

MARKERS = ["pStat3", "CD33", "CD20", "CD3", "pp38", "CD4"]
TRANSFORMS = [
    {"type": "logicle", "T": 262144, "W": 0.5, "M": 4.5, "A": 0},
    {"type": "logicle", "T": 262144, "W": 1.0, "M": 4.5, "A": 1},
    {"type": "asinh", "cofactor": 150},
    {"type": "hyperlog", "T": 262144, "W": 0.5, "M": 4.5, "A": 0},
    {"type": "linear", "T": 262144, "A": 0},
    {"type": "log", "T": 262144, "M": 4.5},
]


def assert_same_as_flowkit(data, template, path=COMP_FCS, thresholds=None):
    res = gate_sample(data, template)
    fitted = {(f.marker, f.cut): f.value for f in res.thresholds}
    gs = to_gating_strategy(template, data, thresholds or fitted)
    fk_res = gs.gate_sample(flowkit_sample(path))
    for pop in template.populations:
        want = fk_res.get_gate_membership(pop.name, gate_path=flowkit_gate_path(template, pop.name))
        got = res.mask(pop.name)
        diff = np.flatnonzero(want != got)
        assert diff.size == 0, f"{pop.name}: {diff.size} events differ from FlowKit (first {diff[:5]})"
    return res


def _transformed(data, marker, spec):
    col = data.column(data.find_channel(marker))
    return np.asarray(make_transform(normalize_spec(spec)).apply(col.reshape(-1, 1))).ravel()


def random_template(rng: np.random.Generator, data) -> dict:
    """A random nested template: every gate type, transforms, complements, thresholds."""
    spec = TRANSFORMS[rng.integers(len(TRANSFORMS))]
    chans = {m: spec if rng.random() < 0.5 else TRANSFORMS[0] for m in MARKERS}
    doc = {"transforms": {"default": TRANSFORMS[0], "channels": chans}, "thresholds": {}, "populations": []}
    pops = doc["populations"]

    def q(m, lo, hi):  # quantiles of the transformed marker (on its own transform) -> plausible cuts
        v = _transformed(data, m, chans[m])
        v = v[np.isfinite(v)]
        return float(np.quantile(v, rng.uniform(lo, hi)))

    fsc = data.column(data.find_channel("FSC-A"))
    ssc = data.column(data.find_channel("SSC-A"))
    cx, cy = np.quantile(fsc, 0.5), np.quantile(ssc, 0.5)
    ang = np.sort(rng.uniform(0, 2 * np.pi, rng.integers(3, 9)))
    rad = rng.uniform(0.3, 1.0, ang.size)
    verts = [[float(cx + r * cx * np.cos(a)), float(cy + r * cy * np.sin(a))] for a, r in zip(ang, rad)]
    pops.append({"name": "cells", "gate": {"type": "polygon", "x": "FSC-A", "y": "SSC-A", "vertices": verts,
                                           "complement": bool(rng.random() < 0.15)}})
    names = ["cells"]
    for i in range(8):
        parent = names[rng.integers(len(names))]
        kind = rng.choice(["range", "rectangle", "threshold", "polygon", "ellipse", "quadrant", "boolean"])
        mx, my = rng.choice(MARKERS, 2, replace=False)
        name = f"p{i}_{kind}"
        if kind == "range":
            lo, hi = sorted([q(mx, 0.05, 0.6), q(mx, 0.5, 0.99)])
            g = {"type": "range", "marker": str(mx), "min": lo if rng.random() < 0.8 else None, "max": hi}
        elif kind == "rectangle":
            g = {"type": "rectangle", "x": str(mx), "y": str(my), "xmin": q(mx, 0.05, 0.5), "ymax": q(my, 0.5, 0.95),
                 "complement": bool(rng.random() < 0.2)}
        elif kind == "threshold":
            doc["thresholds"].setdefault(str(mx), {})["pos"] = q(mx, 0.2, 0.8)
            doc["thresholds"].setdefault(str(my), {})["hi"] = q(my, 0.2, 0.8)
            g = {"type": "threshold", "markers": {str(mx): str(rng.choice(["+", "-"])), str(my): str(rng.choice(["hi", "lo"]))}}
        elif kind == "polygon":
            px, py = q(mx, 0.3, 0.7), q(my, 0.3, 0.7)
            n = rng.integers(3, 10)
            a = np.sort(rng.uniform(0, 2 * np.pi, n))
            r = rng.uniform(0.05, 0.4, n)
            if rng.random() < 0.3:  # self-intersecting
                a = rng.permutation(a)
            g = {"type": "polygon", "x": str(mx), "y": str(my),
                 "vertices": [[float(px + ri * np.cos(ai)), float(py + ri * np.sin(ai))] for ai, ri in zip(a, r)]}
        elif kind == "ellipse":
            sx, sy = rng.uniform(0.002, 0.03, 2)
            c = rng.uniform(-0.8, 0.8) * np.sqrt(sx * sy)
            g = {"type": "ellipse", "x": str(mx), "y": str(my), "center": [q(mx, 0.3, 0.7), q(my, 0.3, 0.7)],
                 "covariance": [[float(sx), float(c)], [float(c), float(sy)]], "distance_square": float(rng.uniform(0.5, 4))}
        elif kind == "quadrant":
            g = {"type": "quadrant", "x": str(mx), "y": str(my), "x_cut": q(mx, 0.2, 0.8), "y_cut": q(my, 0.2, 0.8),
                 "names": {k: f"{name}{k}" for k in ("++", "+-", "-+", "--")}}
        else:
            if len(names) < 2:
                continue
            ops = rng.choice(names, 2, replace=False)
            op = str(rng.choice(["and", "or", "not"]))
            of = [str(ops[0])] if op == "not" else [("!" if rng.random() < 0.3 else "") + str(o) for o in ops]
            g = {"type": "boolean", "op": op, "of": of}
        pops.append({"name": name, "parent": parent, "gate": g})
        names.extend([f"{name}{k}" for k in ("++", "+-", "-+", "--")] if kind == "quadrant" else [name])
    return doc


@pytest.mark.parametrize("seed", range(40))
def test_random_templates_match_flowkit(comp_data, seed):
    rng = np.random.default_rng(seed)
    doc = random_template(rng, comp_data)
    t = parse_template(doc, f"random-{seed}")
    res = assert_same_as_flowkit(comp_data, t)
    assert res.count("cells") > 0


def test_boundaries_exactly_on_events(comp_data):
    """Cuts and vertices placed exactly on transformed event values hit the exact-comparison path."""
    logicle = TRANSFORMS[0]
    x = _transformed(comp_data, "CD4", logicle)
    y = _transformed(comp_data, "CD3", logicle)
    order = np.argsort(x)
    cut_x = float(x[order[len(x) // 2]])  # an event lies exactly on this cut
    cut_y = float(np.sort(y)[len(y) // 3])
    # polygon whose vertices are events (boundary points)
    vi = order[[len(x) // 4, len(x) // 2, 3 * len(x) // 4]]
    verts = [[float(x[i]), float(y[i])] for i in vi]
    doc = {
        "thresholds": {"CD4": {"pos": cut_x}, "CD3": {"pos": cut_y}},
        "populations": [
            {"name": "ge", "gate": {"type": "range", "marker": "CD4", "min": cut_x}},
            {"name": "lt", "gate": {"type": "range", "marker": "CD4", "max": cut_x}},
            {"name": "dp", "gate": {"type": "threshold", "markers": {"CD4": "+", "CD3": "+"}}},
            {"name": "poly", "gate": {"type": "polygon", "x": "CD4", "y": "CD3", "vertices": verts}},
        ],
    }
    t = parse_template(doc, "boundaries")
    res = assert_same_as_flowkit(comp_data, t)
    assert res.count("ge") + res.count("lt") == comp_data.n_events
    # the event sitting on the cut is included by >= and excluded by <
    on_cut = order[len(x) // 2]
    assert res.mask("ge")[on_cut] and not res.mask("lt")[on_cut]


def test_uncompensated_file_matches_flowkit():
    """A file without spillover (the Gating-ML data set) is gated uncompensated, as FlowKit does."""
    path = SHARED / "gatingml2_compliance" / "data1.fcs"
    data = load_fcs(path)
    assert data.compensation is None
    doc = {
        "transforms": {"default": {"type": "logicle", "T": 1024, "W": 0.5, "M": 4.5, "A": 0}},
        "populations": [
            {"name": "lymph", "gate": {"type": "rectangle", "x": "FSC-H", "y": "SSC-H", "xmin": 200, "xmax": 700, "ymax": 400}},
            {"name": "CD4", "parent": "lymph", "gate": {"type": "range", "marker": "CD4", "min": 0.55}},
            {"name": "q", "parent": "lymph", "gate": {"type": "quadrant", "x": "CD3", "y": "CD8 B", "x_cut": 0.5, "y_cut": 0.5,
                                                      "names": {"++": "a", "+-": "b", "-+": "c", "--": "d"}}},
        ],
    }
    assert_same_as_flowkit(data, parse_template(doc, "data1"), path=path)
