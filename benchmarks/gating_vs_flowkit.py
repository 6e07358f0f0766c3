#!/usr/bin/env python
"""Benchmark: FlowKit's own gating vs the immuneprofile engine, on the same simulated files.

Usage::

    python benchmarks/gating_vs_flowkit.py            # 100k, 1M and 5M events + a 50-file batch
    python benchmarks/gating_vs_flowkit.py --quick    # 100k only, no batch (CI smoke test)
    python benchmarks/gating_vs_flowkit.py --sizes 1000000 --no-batch

Data: the simulator's ``"full"`` panel (18 channels, every marker of the three
case-series templates), written to ``benchmarks/_data/`` on first use.
Templates: ``gating/tcell_skin_homing.yaml``, ``gating/treg.yaml`` and
``gating/monocytes.yaml``, all three gated on every sample.

For each size, each side runs in its own subprocess (so that peak memory is its own):

* FlowKit: ``fk.Sample(path)`` plus ``GatingStrategy.gate_sample(sample)`` for each
  template (the strategies are built beforehand with
  :func:`immuneprofile.interop.to_gating_strategy`: they are the user's gating definition).
* immuneprofile: ``load_fcs(path)`` plus ``gate_sample(data, templates)`` (the three templates in one
  call: populations they define identically, such as lymphocytes -> singlets -> live -> CD3+ in two of
  them, are computed once).

Reported: median seconds over several runs (load and gating separately, and
their sum), the ratio, events per second, the engine alone on loaded data
(all cores, and one thread) against the floor of merely reading the touched
columns once (one pass over each contiguous column of the column-major
matrix), peak memory (tracemalloc, in a separate untimed run; also as a
multiple of the event matrix, ``events x channels x 8`` bytes) and whether
every population's membership is identical. The batch part gates 50 files of
100k events with ``gate_files(paths, templates, jobs=1)`` and ``jobs=0`` (all
cores).

Exit status: 0 if every membership is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATA = HERE / "_data"
TEMPLATES = ("tcell_skin_homing", "treg", "monocytes")
PANEL = "full"
SEED = 2025
SETUP_EVENTS = 100_000  # the file used to build strategies and warm up both sides


# ----------------------------------------------------------------------------- data
def sample_path(n: int, tag: str = "") -> Path:
    return DATA / f"{PANEL}_{n}{tag}.fcs"


def ensure_sample(n: int, seed: int = SEED, tag: str = "") -> Path:
    """Write a simulated full-panel file of ``n`` events unless it exists."""
    path = sample_path(n, tag)
    if not path.exists():
        from immuneprofile.study import simulate

        DATA.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        tmp = path.with_suffix(".tmp")
        simulate.write_fcs(tmp, simulate.simulate_sample(PANEL, n, rng=seed))
        os.replace(tmp, path)
        print(f"  wrote {path.relative_to(ROOT)} ({n:,} events) in {time.perf_counter() - t0:.1f} s", flush=True)
    return path


def load_templates():
    from immuneprofile import load_template

    return [load_template(ROOT / "gating" / f"{name}.yaml") for name in TEMPLATES]


def digest(mask: np.ndarray) -> str:
    return hashlib.sha1(np.packbits(np.asarray(mask, dtype=bool)).tobytes()).hexdigest()[:16]


def memberships(templates, results, membership) -> dict:
    """``{template/population: [count, digest]}``; ``membership(template, result, name)`` -> bool mask."""
    out = {}
    for t, res in zip(templates, results):
        for pop in t.populations:
            m = membership(t, res, pop.name)
            out[f"{t.name}/{pop.name}"] = [int(np.count_nonzero(m)), digest(m)]
    return out


def median(xs):
    return float(np.median(xs)) if xs else float("nan")


# ----------------------------------------------------------------------------- workers
def strategies_for(path, templates) -> list:
    """FlowKit strategies equivalent to the templates for this file (untimed: the user's gating definition).

    Data-driven thresholds are fitted per file; FlowKit gets the values the
    engine fitted on the same file, as fixed cuts.
    """
    from immuneprofile import gate_sample, load_fcs
    from immuneprofile.interop.flowkit import to_gating_strategy

    data = load_fcs(path)
    out = []
    for t in templates:
        fitted = {(f.marker, f.cut): f.value for f in gate_sample(data, t).thresholds}
        out.append(to_gating_strategy(t, data, fitted))
    return out


def worker_flowkit(path: str, reps: int) -> dict:
    import tracemalloc

    import flowkit as fk

    from immuneprofile.interop.flowkit import flowkit_gate_path

    templates = load_templates()
    setup = str(sample_path(SETUP_EVENTS))
    s = fk.Sample(setup)  # warm-up (imports, caches) on the small file
    for gs in strategies_for(setup, templates):
        gs.gate_sample(s)
    del s
    strategies = strategies_for(path, templates)

    loads, gates = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        sample = fk.Sample(path)
        t1 = time.perf_counter()
        results = [gs.gate_sample(sample) for gs in strategies]
        t2 = time.perf_counter()
        loads.append(t1 - t0)
        gates.append(t2 - t1)
    members = memberships(templates, results,
                          lambda t, res, name: res.get_gate_membership(name, gate_path=flowkit_gate_path(t, name)))
    n_events, n_channels = sample.event_count, len(sample.pnn_labels)
    del sample, results

    tracemalloc.start()
    sample = fk.Sample(path)
    _results = [gs.gate_sample(sample) for gs in strategies]  # kept alive until the peak is read
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return dict(side="flowkit", n_events=n_events, n_channels=n_channels, load=loads, gate=gates,
                peak_bytes=peak, members=members)


def worker_immuneprofile(path: str, reps: int) -> dict:
    import tracemalloc

    from immuneprofile import gate_sample, load_fcs

    templates = load_templates()
    warm = load_fcs(str(sample_path(SETUP_EVENTS)))  # warm-up: imports, compiled kernels
    gate_sample(warm, templates)
    del warm

    loads, gates = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        data = load_fcs(path)
        t1 = time.perf_counter()
        results = gate_sample(data, templates)
        t2 = time.perf_counter()
        loads.append(t1 - t0)
        gates.append(t2 - t1)
    members = memberships(templates, results, lambda t, res, name: res.mask(name))
    del results

    # the engine alone on loaded data vs the floor, interleaved (the machine's speed drifts)
    touched = sorted({data.find_channel(m) for t in templates for m in t.markers})
    engine, engine1, floor = [], [], []
    for _ in range(max(reps, 9)):
        t0 = time.perf_counter()
        gate_sample(data, templates)
        engine.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        gate_sample(data, templates, threads=1)
        engine1.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        # one pass over each touched column (a sum: every value is read once, nothing written);
        # the event matrix is column-major, so a column is a contiguous block
        checksum = sum(float(np.add.reduce(data.events[:, j])) for j in touched)
        floor.append(time.perf_counter() - t0)
        del checksum
    n_events, n_channels = data.n_events, len(data.channels)
    del data

    tracemalloc.start()
    data = load_fcs(path)
    loaded = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    results = gate_sample(data, templates)
    engine_peak = tracemalloc.get_traced_memory()[1] - loaded
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # the whole pipeline's peak: the loader's transient peak may exceed the engine's
    del results, data
    tracemalloc.start()
    _data = load_fcs(path)  # kept alive until the peak is read
    load_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return dict(side="immuneprofile", n_events=n_events, n_channels=n_channels, load=loads, gate=gates,
                engine=engine, engine1=engine1, floor=floor, touched=len(touched), peak_bytes=max(peak, load_peak),
                engine_peak_bytes=engine_peak, loaded_bytes=loaded, members=members)


def run_worker(side: str, path: Path, reps: int) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--path", str(path), "--reps", str(reps)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"{side} worker failed on {path}")
    rss = None
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            res = json.loads(line[7:])
        if line.startswith("MAXRSS "):
            rss = int(line.split()[1])
    res["maxrss_bytes"] = rss
    return res


# ----------------------------------------------------------------------------- batch
def run_batch(n_files: int, n_events: int) -> dict:
    from immuneprofile import gate_files

    paths = [ensure_sample(n_events, seed=SEED + 1000 + i, tag=f"_batch{i:02d}") for i in range(n_files)]
    templates = load_templates()
    gate_files(paths[:2], templates, jobs=1)  # warm-up
    out = {"files": n_files, "events": n_events, "cores": os.cpu_count() or 1}
    tables = {}
    for label, jobs in (("serial", 1), ("parallel", 0)):
        t0 = time.perf_counter()
        batch = gate_files(paths, templates, jobs=jobs)
        out[label] = time.perf_counter() - t0
        if batch.errors:
            raise SystemExit(f"batch ({label}) errors: {batch.errors}")
        tables[label] = batch.table
    same = tables["serial"].equals(tables["parallel"])
    out["identical"] = bool(same)
    return out


def run_batch_flowkit(n_files: int, n_events: int) -> float:
    import flowkit as fk

    paths = [sample_path(n_events, f"_batch{i:02d}") for i in range(n_files)]
    templates = load_templates()
    strategies = {p: strategies_for(p, templates) for p in paths}
    t0 = time.perf_counter()
    for p in paths:
        s = fk.Sample(str(p))
        for gs in strategies[p]:
            gs.gate_sample(s)
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- report
def mb(b):
    return b / 2**20


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="100k events only, no batch (CI smoke test)")
    ap.add_argument("--sizes", default="100000,1000000,5000000", help="comma-separated event counts")
    ap.add_argument("--no-batch", action="store_true", help="skip the 50-file batch")
    ap.add_argument("--batch-files", type=int, default=50)
    ap.add_argument("--batch-events", type=int, default=100_000)
    ap.add_argument("--no-batch-flowkit", action="store_true", help="skip FlowKit's serial batch")
    ap.add_argument("--reps", type=int, default=None, help="runs per side (default: by size)")
    ap.add_argument("--json", default=None, help="also write all figures to this JSON file")
    ap.add_argument("--worker", choices=["flowkit", "immuneprofile"], help=argparse.SUPPRESS)
    ap.add_argument("--path", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")

    if args.worker:
        fn = worker_flowkit if args.worker == "flowkit" else worker_immuneprofile
        res = fn(args.path, args.reps)
        import resource

        print("RESULT " + json.dumps(res))
        print(f"MAXRSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}")
        return 0

    sizes = [100_000] if args.quick else [int(s) for s in args.sizes.split(",") if s]
    import flowkit
    import numba

    import immuneprofile

    print(f"immuneprofile {immuneprofile.__version__}, FlowKit {flowkit.__version__}, numba {numba.__version__}, "
          f"NumPy {np.__version__}, Python {sys.version.split()[0]}, {os.cpu_count()} cores")
    print("data:", DATA.relative_to(ROOT), "| templates:", ", ".join(TEMPLATES), flush=True)
    ensure_sample(SETUP_EVENTS)
    rows, ok = [], True
    for n in sizes:
        path = ensure_sample(n)
        reps_fk = args.reps or (5 if n <= 200_000 else 3 if n <= 2_000_000 else 1)
        reps_ip = args.reps or (7 if n <= 2_000_000 else 3)
        print(f"  {n:>9,} events: FlowKit x{reps_fk} ...", end="", flush=True)
        fk_res = run_worker("flowkit", path, reps_fk)
        print(f" immuneprofile x{reps_ip} ...", end="", flush=True)
        ip_res = run_worker("immuneprofile", path, reps_ip)
        same = fk_res["members"] == ip_res["members"]
        if not same:
            ok = False
            bad = [k for k in fk_res["members"] if fk_res["members"][k] != ip_res["members"].get(k)]
            print(f"\n  MEMBERSHIP DIFFERS at {n} events: {bad}", flush=True)
        print(" done", flush=True)
        rows.append(dict(n=n, fk=fk_res, ip=ip_res, identical=same))

    print()
    print("Gating the three case-series templates (34 populations) on one sample; median seconds")
    hdr = (f"{'events':>9} {'ch':>3} {'pops':>4} | {'FlowKit':>8} {'(load':>7} {'gate)':>7} | {'ours':>7} "
           f"{'(load':>6} {'gate)':>6} | {'ratio':>6} {'gate ratio':>10} | {'FK ev/s':>8} {'our ev/s':>8} | "
           f"{'engine':>7} {'1 thr':>6} {'floor':>6} {'x':>5} {'1 thr x':>7} | {'FK peak':>12} {'our peak':>12} {'engine':>11} | same")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        fk_res, ip_res, n = r["fk"], r["ip"], r["n"]
        matrix = n * ip_res["n_channels"] * 8
        fk_l, fk_g = median(fk_res["load"]), median(fk_res["gate"])
        ip_l, ip_g = median(ip_res["load"]), median(ip_res["gate"])
        fk_t = median([a + b for a, b in zip(fk_res["load"], fk_res["gate"])])
        ip_t = median([a + b for a, b in zip(ip_res["load"], ip_res["gate"])])
        eng, eng1, flo = median(ip_res["engine"]), median(ip_res["engine1"]), median(ip_res["floor"])
        r.update(fk_total=fk_t, ip_total=ip_t, fk_load=fk_l, fk_gate=fk_g, ip_load=ip_l, ip_gate=ip_g,
                 engine=eng, engine1=eng1, floor=flo, matrix_bytes=matrix)
        pops = len(fk_res["members"])
        print(f"{n:>9,} {ip_res['n_channels']:>3} {pops:>4} | {fk_t:8.3f} {fk_l:7.3f} {fk_g:7.3f} | {ip_t:7.3f} "
              f"{ip_l:6.3f} {ip_g:6.3f} | {fk_t / ip_t:5.1f}x {fk_g / eng:9.1f}x | {n / fk_t:8.2e} {n / ip_t:8.2e} | "
              f"{eng:7.4f} {eng1:6.4f} {flo:6.4f} {eng / flo:4.1f}x {eng1 / flo:6.1f}x | {mb(fk_res['peak_bytes']):6.0f}MB {fk_res['peak_bytes'] / matrix:3.1f}x "
              f"{mb(ip_res['peak_bytes']):6.0f}MB {ip_res['peak_bytes'] / matrix:3.1f}x "
              f"{mb(ip_res['engine_peak_bytes']):5.0f}MB {ip_res['engine_peak_bytes'] / matrix:3.1f}x | "
              f"{'yes' if r['identical'] else 'NO'}")
    print()
    print("ratio: FlowKit (load + gate) / ours (load + gate); gate ratio: FlowKit gating / our engine alone;")
    print("engine: our gating of the three templates on loaded data (all cores; '1 thr': threads=1), data-driven")
    print("thresholds fitted included; floor: reading each touched column once (one pass over each contiguous")
    print("column of the column-major matrix load_fcs gives), x = engine / floor; peaks: tracemalloc, x = multiple")
    print("of the event matrix; engine peak: memory the engine adds to the loaded sample.")

    batch = None
    if not (args.quick or args.no_batch):
        print(f"\nBatch: {args.batch_files} files x {args.batch_events:,} events, three templates ...", flush=True)
        batch = run_batch(args.batch_files, args.batch_events)
        if not args.no_batch_flowkit:
            batch["flowkit_serial"] = run_batch_flowkit(args.batch_files, args.batch_events)
        ok &= batch["identical"]
        files = batch["files"]
        print(f"  immuneprofile gate_files jobs=1: {batch['serial']:.2f} s ({batch['serial'] / files * 1000:.0f} ms/file)")
        print(f"  immuneprofile gate_files jobs=0 ({batch['cores']} cores): {batch['parallel']:.2f} s "
              f"({batch['parallel'] / files * 1000:.0f} ms/file), speed-up {batch['serial'] / batch['parallel']:.2f}x")
        if "flowkit_serial" in batch:
            print(f"  FlowKit serial: {batch['flowkit_serial']:.2f} s ({batch['flowkit_serial'] / files * 1000:.0f} ms/file), "
                  f"{batch['flowkit_serial'] / batch['serial']:.1f}x our serial")
        print(f"  serial and parallel tables identical: {'yes' if batch['identical'] else 'NO'}")

    if args.json:
        Path(args.json).write_text(json.dumps(dict(rows=rows, batch=batch), indent=1, default=str))
    print("\nmemberships identical:", "yes" if ok else "NO")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
