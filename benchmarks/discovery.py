#!/usr/bin/env python
"""Benchmark: embedding and clustering time of ``immuneprofile.tl`` for 50k and 200k events.

Usage::

    python benchmarks/discovery.py                    # 50k and 200k events, 15 markers
    python benchmarks/discovery.py --quick            # 5k events (smoke test)
    python benchmarks/discovery.py --sizes 50000 --repeats 3 --json out.json

Data: the simulator's ``"full"`` panel (15 fluorescence markers + FSC-A, FSC-H, SSC-A),
one file per size written to ``benchmarks/_data/`` on first use, gated with the shipped
``tcell_skin_homing`` template and exported with ``to_anndata`` (logicle-transformed);
every event of the file is analysed on the 15 markers.

Timed steps, each on a fresh copy of the events, all with ``seed=0`` (reproducible
results; umap-learn is then single-threaded):

* ``neighbors``: the kNN graph (``scanpy.pp.neighbors``, 15 neighbours; pynndescent
  above 8,192 events, exact below) — the first half of ``tl.embed``;
* ``umap``: ``scanpy.tl.umap`` on that graph — the second half of ``tl.embed``;
* ``leiden``: ``tl.cluster(method="leiden")`` on that graph (resolution 0.5);
* ``flowsom``: ``tl.cluster(method="flowsom")`` (10x10 SOM, 10 metaclusters; no graph needed).

One warm-up run on 10,000 events first (numba compilation of umap-learn, pynndescent and
FlowSOM is excluded). Sizes are interleaved across repeats; medians are reported, and the
ratio of the largest size's time to the smallest's (same run) shows how each step scales.
The figures are wall-clock seconds on whatever else the machine runs at the time.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE / "_data"
PANEL = "full"
TEMPLATE = "tcell_skin_homing"
SEED = 2025
STEPS = ("neighbors", "umap", "leiden", "flowsom")
WARMUP = 10_000  # above scanpy's exact-kNN limit (8,192), so that pynndescent is compiled too


def events(n: int):
    """The AnnData of one simulated ``full``-panel file of ``n`` events (written on first use)."""
    import immuneprofile as ip
    from immuneprofile.study.simulate import simulate_sample, write_fcs

    DATA.mkdir(exist_ok=True)
    path = DATA / f"discovery_{PANEL}_{n}.fcs"
    if not path.exists():
        write_fcs(path, simulate_sample(PANEL, n, rng=SEED))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ip.to_anndata(ip.gate_sample(ip.load_fcs(path), ip.load_template(TEMPLATE)))


def time_steps(adata) -> dict[str, float]:
    """Seconds of each step on a fresh copy of ``adata``."""
    import scanpy as sc

    from immuneprofile import tl

    out = {}
    a = adata.copy()
    t = time.perf_counter()
    tl._ensure_neighbors(a, None, 15, 0)
    out["neighbors"] = time.perf_counter() - t
    t = time.perf_counter()
    sc.tl.umap(a, random_state=0)
    out["umap"] = time.perf_counter() - t
    t = time.perf_counter()
    tl.cluster(a, "leiden", seed=0)
    out["leiden"] = time.perf_counter() - t
    out["leiden_clusters"] = a.obs["cluster"].nunique()
    b = adata.copy()
    t = time.perf_counter()
    tl.cluster(b, "flowsom", seed=0)
    out["flowsom"] = time.perf_counter() - t
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[50_000, 200_000])
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="5,000 events only")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    sizes = [5_000] if args.quick else args.sizes

    from immuneprofile import tl

    data = {n: events(n) for n in sizes}
    n_markers = len(tl.marker_names(data[sizes[0]]))
    print(f"warm-up ({WARMUP:,} events, {n_markers} markers) ...", file=sys.stderr)
    time_steps(events(WARMUP))
    runs: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
    for r in range(args.repeats):
        for n in (sizes if r % 2 == 0 else sizes[::-1]):  # interleaved
            runs[n].append(time_steps(data[n]))
            print(f"  repeat {r + 1}, {n:,} events: " + ", ".join(f"{s} {runs[n][-1][s]:.1f} s" for s in STEPS),
                  file=sys.stderr)

    med = {n: {s: statistics.median(x[s] for x in runs[n]) for s in (*STEPS, "leiden_clusters")} for n in sizes}
    print(f"\nMachine: {platform.machine()}, Python {platform.python_version()}; "
          f"{args.repeats} repeat(s), medians; wall-clock seconds on a shared machine (noisy).\n")
    print("| events | markers | kNN graph (s) | UMAP layout (s) | embed total (s) | Leiden (s) | Leiden clusters "
          "| FlowSOM (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        m = med[n]
        print(f"| {n:,} | {n_markers} | {m['neighbors']:.1f} | {m['umap']:.1f} | {m['neighbors'] + m['umap']:.1f} "
              f"| {m['leiden']:.1f} | {m['leiden_clusters']:.0f} | {m['flowsom']:.1f} |")
    if len(sizes) > 1:
        lo, hi = sizes[0], sizes[-1]
        print(f"\nscaling, {hi:,} / {lo:,} events ({hi / lo:.0f}x the events), same run: "
              + ", ".join(f"{s} {med[hi][s] / med[lo][s]:.1f}x" for s in STEPS))
    if args.json:
        args.json.write_text(json.dumps({"markers": n_markers, "medians": med, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
