"""What the data-driven scatter gates cost: the shipped templates vs the same templates with fixed polygons.

The shipped templates fit their scatter gates per sample (``engine/fit2d.py``: a
Gaussian mixture for lymphocytes, a robust line for singlets, a density valley for
debris); the fixed variant replaces those gates by the absolute-unit polygons they
had before. Both are gated on the same loaded sample (panel ``full``, 18 channels,
compensated), interleaved, repeated; medians and their ratio are printed, with
the fitting time alone (``fit_template``) and the events the fits read.

    python benchmarks/fit2d_cost.py [--events 1000000] [--reps 7]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import yaml

FIXED = {
    "lymphocytes": {"type": "polygon", "x": "FSC-A", "y": "SSC-A",
                    "vertices": [[38000, 4000], [82000, 4000], [86000, 26000], [76000, 36000], [38000, 30000]]},
    "cells": {"type": "polygon", "x": "FSC-A", "y": "SSC-A",
              "vertices": [[38000, 0], [270000, 0], [270000, 270000], [38000, 270000]]},
    "singlets": {"type": "polygon", "x": "FSC-A", "y": "FSC-H",
                 "vertices": [[5000, 3800], [270000, 205000], [270000, 280000], [5000, 6000]]},
}
NAMES = ("tcell_skin_homing", "treg", "monocytes")


def templates(fixed: bool):
    import immuneprofile as ip
    from immuneprofile.template.shipped import resolve_template

    out = []
    for n in NAMES:
        doc = yaml.safe_load(Path(resolve_template(n)).read_text())
        if fixed:
            for p in doc["populations"]:
                p["gate"] = FIXED.get(p["name"], p["gate"])
            doc["thresholds"].pop("FSC-A", None)
        out.append(ip.parse_template(doc, f"{n}{'-fixed' if fixed else ''}"))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--reps", type=int, default=7)
    args = ap.parse_args()
    import immuneprofile as ip
    from immuneprofile.engine.fit2d import fit_template
    from immuneprofile.study.simulate import simulate_sample, write_fcs

    warnings.simplefilter("ignore")
    with tempfile.TemporaryDirectory() as tmp:
        path = write_fcs(Path(tmp) / "full.fcs", simulate_sample("full", args.events, rng=0))
        data = ip.load_fcs(path)
    fixed, fitted = templates(True), templates(False)
    ip.gate_sample(data, fixed), ip.gate_sample(data, fitted)  # warm-up (numba, imports)
    t_fixed, t_fitted, t_fit = [], [], []
    for _ in range(args.reps):  # interleaved: the VM's speed drifts
        t0 = time.perf_counter()
        ip.gate_sample(data, fixed)
        t1 = time.perf_counter()
        ip.gate_sample(data, fitted)
        t2 = time.perf_counter()
        for t in fitted:
            fit_template(data, t, gate=ip.gate_sample)
        t3 = time.perf_counter()
        t_fixed.append(t1 - t0), t_fitted.append(t2 - t1), t_fit.append(t3 - t2)
    fits = [f for r in ip.gate_sample(data, fitted) for f in r.fits]
    med = {k: statistics.median(v) * 1e3 for k, v in (("fixed", t_fixed), ("fitted", t_fitted), ("fit", t_fit))}
    print(f"{data.n_events:,} events x {len(data.channels)} channels; 3 templates; medians of {args.reps}")
    print(f"  fixed scatter polygons : {med['fixed']:9.1f} ms")
    print(f"  data-driven (shipped)  : {med['fitted']:9.1f} ms  = {med['fitted'] / med['fixed']:.1f}x fixed")
    print(f"  fit_template alone     : {med['fit']:9.1f} ms  (the 3 templates one by one, no fit shared; "
          f"{len(fits)} fits read <= {max(f.n_events for f in fits):,} parent events, models <= 5,000)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
