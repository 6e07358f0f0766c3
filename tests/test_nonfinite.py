"""Two silent wrong answers fixed in the engine: NaN/inf events, and transform cache keys."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import GATING, flowkit_sample
from immuneprofile import gate_sample, load_fcs, load_template, parse_template
from immuneprofile.engine.transforms import transform_key
from immuneprofile.interop.flowkit import flowkit_gate_path, to_gating_strategy
from immuneprofile.study import simulate

NAMES = ("tcell_skin_homing", "treg", "monocytes")


@pytest.fixture(scope="module")
def odd_file(tmp_path_factory):
    """A full-panel sample where 3 % of events carry NaN, +inf or -inf in a fluorescence channel."""
    sim = simulate.simulate_sample("full", 20_000, rng=5)
    rng = np.random.default_rng(1)
    ev = sim.events
    fluor = [j for j, (c, _) in enumerate(sim.channels) if not c.startswith(("FSC", "SSC", "Time"))]
    rows = rng.choice(ev.shape[0], 600, replace=False)
    ev[rows, rng.choice(fluor, 600)] = rng.choice([np.nan, np.inf, -np.inf], 600)
    return simulate.write_fcs(tmp_path_factory.mktemp("odd") / "odd.fcs", sim)


def test_nonfinite_events_follow_flowkits_rule(odd_file):
    """The documented rule is FlowKit's: logicle/hyperlog map NaN and +-inf to -1.0; the engine agrees."""
    data = load_fcs(odd_file, compensation=None)
    assert (~np.isfinite(data.events)).any(axis=1).sum() == 600
    sample = flowkit_sample(odd_file)
    templates = [load_template(GATING / f"{n}.yaml") for n in NAMES]
    for t, res in zip(templates, gate_sample(data, templates)):
        fitted = {(f.marker, f.cut): f.value for f in res.thresholds}
        gs = to_gating_strategy(t, data, fitted)
        fk_res = gs.gate_sample(sample)
        for pop in t.populations:
            want = fk_res.get_gate_membership(pop.name, gate_path=flowkit_gate_path(t, pop.name))
            assert np.array_equal(want, res.mask(pop.name)), (t.name, pop.name)


def test_transform_keys_are_exact():
    a = {"type": "logicle", "T": 262144.0, "W": 0.5, "M": 4.5, "A": 0.0}
    b = dict(a, W=0.5000001)
    assert transform_key(a) != transform_key(b)
    assert transform_key(a) == transform_key(dict(a))


def test_transforms_differing_beyond_six_digits_are_not_shared(odd_file):
    """Gating two templates together must give each its own transform (not the other's, cached)."""
    data = load_fcs(odd_file)

    def template(w):
        return parse_template({
            "name": f"w{w}",
            "transforms": {"default": {"type": "logicle", "T": 262144, "W": w, "M": 4.5, "A": 0}},
            "populations": [{"name": "cd3", "gate": {"type": "range", "marker": "CD3", "min": 0.3}}],
        })

    from immuneprofile.engine.transforms import make_transform

    one, two = template(0.5), template(0.5000049)  # the same key with "%g"
    x1, x2 = (float(make_transform(t.transform_for("CD3", False)).inverse(np.array([[0.3]]))[0, 0])
              for t in (one, two))
    assert x1 != x2
    data.events[:50, data.find_channel("CD3")] = (x1 + x2) / 2  # between the two cuts: the transform decides
    together = gate_sample(data, [one, two])
    alone = [gate_sample(data, one), gate_sample(data, two)]
    assert [r.count("cd3") for r in together] == [r.count("cd3") for r in alone]
    assert alone[0].count("cd3") != alone[1].count("cd3")
