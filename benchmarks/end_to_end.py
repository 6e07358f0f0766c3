#!/usr/bin/env python
"""Benchmark: what a user sees, end to end, against FlowKit and against the engine alone.

Usage::

    python benchmarks/end_to_end.py                       # every part (~15 min on the 2-core VM)
    python benchmarks/end_to_end.py --parts cli batch     # some parts
    python benchmarks/end_to_end.py --files 40 --json out.json

Parts (each side by side in one run, interleaved and repeated, medians; files
written by the simulator, panel ``"full"``: 18 channels, ``$SPILLOVER``
compensated on load, into a temporary folder removed at the end):

* ``e2e``: 1M events: FlowKit (``fk.Sample`` + ``GatingStrategy.gate_sample`` for
  each of the three templates, whose ``GatingResults`` hold FlowKit's report table)
  against immuneprofile (``load_fcs`` + ``gate_sample`` of the three templates +
  ``population_table``: with FlowKit's statistics, counts and percentages, and with
  the medians FlowKit does not compute), alternating, memberships compared
  population by population.
* ``cli``: wall time of ``immuneprofile gate -t treg FILE -o OUT`` on a 3,000-event
  file (fresh processes, like hyperfine), interleaved with ``python -c pass`` and
  with ``python -c "import flowkit"`` (what the loader in ``io/`` still imports);
  and numba's cache from the CLI on a 100k-event file in a fresh install
  (``pip install --no-deps --target``): first run (compiles) against the next runs.
* ``batch``: ``gate_files(paths, templates, keep_data=False)`` (one process) per file against
  ``load_fcs`` + ``gate_sample`` per file, and against load + gate + table, on
  the same 100k-event files, interleaved (wall and CPU time; also ``gate_files``
  re-reading the files in each pass, ``cache_bytes=0``); peak memory (tracemalloc, separate
  process) of ``gate_files`` on one 5M-event file against the event matrix.
* ``scale``: ``--files`` (200) files of 100k events with ``gate_files`` on a Dask
  ``LocalCluster`` of 1 and of 2 single-threaded workers (clusters started before
  timing, alternated, two rounds), in-process serial, and FlowKit serial on a
  subset (``--flowkit-files``, extrapolated per file; said so in the output).

Exit status 1 if any membership or table differs.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gating_vs_flowkit import load_templates, median, memberships, strategies_for  # noqa: E402

PANEL = "full"


def make_files(folder: Path, n_events: int, count: int, seed: int = 7) -> list[str]:
    """``count`` simulated full-panel files of ``n_events`` (distinct seeds) in ``folder``."""
    from immuneprofile.study import simulate

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        p = folder / f"{PANEL}_{n_events}_{i:03d}.fcs"
        if not p.exists():
            simulate.write_fcs(p, simulate.simulate_sample(PANEL, n_events, rng=seed + i))
        out.append(str(p))
    return out


def timed(fn, *args, **kw) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args, **kw)
    return time.perf_counter() - t0, out


# ----------------------------------------------------------------------------- end to end
def part_e2e(tmp: Path, reps: int) -> dict:
    import flowkit as fk

    from immuneprofile import gate_sample, load_fcs, population_table
    from immuneprofile.interop.flowkit import flowkit_gate_path

    templates = load_templates()
    path = make_files(tmp / "e2e", 1_000_000, 1)[0]
    warm = make_files(tmp / "warm", 100_000, 1)[0]
    population_table(gate_sample(load_fcs(warm), templates))
    strategies = strategies_for(path, templates)  # the user's gating definition: untimed
    for gs in strategies_for(warm, templates):
        gs.gate_sample(fk.Sample(warm))
    parts: dict[str, list[float]] = {"load": [], "gate": [], "counts": [], "table": []}
    fk_parts: dict[str, list[float]] = {"flowkit_load": [], "flowkit_gate": []}

    def ours_once():
        t0 = time.perf_counter()
        data = load_fcs(path)
        t1 = time.perf_counter()
        res = gate_sample(data, templates)
        t2 = time.perf_counter()
        population_table(res, medians=False)  # FlowKit's statistics: counts and percentages
        t3 = time.perf_counter()
        table = population_table(res)  # and the medians FlowKit does not compute
        for k, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3)):
            parts[k].append(dt)
        return data, res, table

    def flowkit_once():
        t0 = time.perf_counter()
        sample = fk.Sample(path)
        t1 = time.perf_counter()
        out = [gs.gate_sample(sample) for gs in strategies]  # each GatingResults holds its report table
        fk_parts["flowkit_load"].append(t1 - t0)
        fk_parts["flowkit_gate"].append(time.perf_counter() - t1)
        return out

    ours, theirs = [], []
    for _ in range(reps):
        t, (data, res, table) = timed(ours_once)
        ours.append(t)
        t, fk_res = timed(flowkit_once)
        theirs.append(t)
    same = memberships(templates, res, lambda t, r, n: r.mask(n)) == memberships(
        templates, fk_res, lambda t, r, n: r.get_gate_membership(n, gate_path=flowkit_gate_path(t, n)))
    counts_run = [lo + g + c for lo, g, c in zip(parts["load"], parts["gate"], parts["counts"])]
    full_run = [lo + g + tb for lo, g, tb in zip(parts["load"], parts["gate"], parts["table"])]
    out = dict(n_events=data.n_events, n_channels=len(data.channels), populations=len(table),
               flowkit_s=median(theirs), immuneprofile_s=median(full_run), immuneprofile_counts_s=median(counts_run),
               identical=same, **{f"{k}_s": median(v) for k, v in {**parts, **fk_parts}.items()})
    out["ratio"] = out["flowkit_s"] / out["immuneprofile_s"]
    out["ratio_counts"] = out["flowkit_s"] / out["immuneprofile_counts_s"]
    print(f"e2e {out['n_events']:,} events x {out['n_channels']} channels, 3 templates, {len(table)} populations: "
          f"FlowKit {out['flowkit_s']:.2f} s (Sample {out['flowkit_load_s']:.2f} s, gating + report "
          f"{out['flowkit_gate_s']:.2f} s); memberships identical: {same}\n"
          f"  immuneprofile, FlowKit's statistics (counts, %): {out['immuneprofile_counts_s']:.3f} s -> "
          f"{out['ratio_counts']:.1f}x (load {out['load_s']:.3f} s, gate {out['gate_s']:.3f} s, "
          f"table {out['counts_s']:.3f} s)\n"
          f"  immuneprofile, with the medians of {len(table)} populations x their templates' markers: "
          f"{out['immuneprofile_s']:.3f} s -> {out['ratio']:.1f}x (table {out['table_s']:.3f} s)", flush=True)
    return out


# ----------------------------------------------------------------------------- CLI
_CPU: list[float] = []  # CPU seconds (user + system) of each command _wall ran, in order


def _wall(cmd: list[str], env: dict | None = None) -> float:
    """Wall seconds of a command; its CPU seconds are appended to ``_CPU`` (on a loaded machine
    the wall time is mostly waiting for a core, the CPU time is what the command costs)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    dt = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    _CPU.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    if r.returncode != 0:
        raise SystemExit(f"{cmd} failed:\n{r.stderr}")
    return dt


def part_cli(tmp: Path, reps: int) -> dict:
    small = make_files(tmp / "cli", 3_000, 1)[0]
    exe = shutil.which("immuneprofile") or "immuneprofile"
    gate = [exe, "gate", "-t", "treg", small, "-o", str(tmp / "cli_out"), "--no-anndata"]
    traced = [sys.executable, "-X", "importtime", "-m", "immuneprofile.cli", *gate[1:]]
    bare = [sys.executable, "-c", "pass"]
    _wall(gate)  # warm the OS file cache
    runs: dict[str, list[float]] = {"gate": [], "gate_cpu": [], "python": [], "flowkit_import_in_gate": []}
    for _ in range(reps):
        runs["gate"].append(_wall(gate))
        runs["gate_cpu"].append(_CPU[-1])
        runs["python"].append(_wall(bare))
        runs["flowkit_import_in_gate"].append(_flowkit_import_share(traced))
    out = {k: median(v) for k, v in runs.items()}
    out["gate_without_flowkit_import"] = median([g - f for g, f in zip(runs["gate"], runs["flowkit_import_in_gate"])])
    out["gate_cpu_without_flowkit_import"] = median([g - f for g, f in zip(runs["gate_cpu"],
                                                                            runs["flowkit_import_in_gate"])])
    print(f"cli gate, 3,000 events x 18 channels: {out['gate']:.2f} s wall, {out['gate_cpu']:.2f} s CPU "
          f"(python start {out['python']:.2f} s; FlowKit's import inside it, by io/: "
          f"{out['flowkit_import_in_gate']:.2f} s -> {out['gate_without_flowkit_import']:.2f} s wall, "
          f"{out['gate_cpu_without_flowkit_import']:.2f} s CPU without it)", flush=True)
    out.update(_numba_cache(tmp, reps))
    return out


def _flowkit_import_share(cmd: list[str]) -> float:
    """Seconds the command spends importing flowkit (``-X importtime``, cumulative, all its dependencies)."""
    r = subprocess.run(cmd, capture_output=True, text=True)
    us = [int(line.split("|")[1]) for line in r.stderr.splitlines()
          if line.startswith("import time:") and line.split("|")[2].strip() == "flowkit"]
    return sum(us) / 1e6


def _numba_cache(tmp: Path, reps: int) -> dict:
    """The CLI on a 100k-event file from a fresh (non-editable) install: compile once, then cache hits."""
    target = tmp / "fresh_install"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(HERE.parent)],
                   check=True, capture_output=True)
    env = {**os.environ, "PYTHONPATH": str(target)}
    f = make_files(tmp / "cli", 100_000, 1)[0]
    cmd = [sys.executable, "-m", "immuneprofile.cli", "gate", "-t", "treg", f, "-o", str(tmp / "cli_out2"),
           "--no-anndata"]
    first = _wall(cmd, env)
    first_cpu = _CPU[-1]
    cached = sorted(p.name for p in (target / "immuneprofile" / "engine" / "__pycache__").glob("*.nbi"))
    again, again_cpu = [], []
    for _ in range(max(3, reps // 2)):
        again.append(_wall(cmd, env))
        again_cpu.append(_CPU[-1])
    out = dict(fresh_install_first_s=first, fresh_install_first_cpu_s=first_cpu, fresh_install_next_s=median(again),
               fresh_install_next_cpu_s=median(again_cpu), numba_index_files=len(cached))
    print(f"cli gate, 100,000 events, fresh install: first run {first:.2f} s wall, {first_cpu:.2f} s CPU (compiles, "
          f"writes {len(cached)} cache indexes next to the installed module), next runs {median(again):.2f} s wall, "
          f"{median(again_cpu):.2f} s CPU (cache hits)", flush=True)
    return out


# ----------------------------------------------------------------------------- batch
def part_batch(tmp: Path, n_files: int, reps: int, big: int) -> dict:
    from immuneprofile import gate_files, gate_sample, load_fcs, population_table

    templates = load_templates()
    paths = make_files(tmp / "batch", 100_000, n_files, seed=500)
    gate_files(paths[:2], templates)
    runs = {  # interleaved below; "batch_reread": every pass reads the files again (cache_bytes=0)
        "batch": lambda: gate_files(paths, templates, keep_data=False),
        "batch_reread": lambda: gate_files(paths, templates, keep_data=False, cache_bytes=0),
        "load_gate": lambda: [gate_sample(load_fcs(p), templates) for p in paths],
        "load_gate_table": lambda: [population_table(gate_sample(load_fcs(p), templates)) for p in paths],
    }
    wall: dict[str, list[float]] = {k: [] for k in runs}
    cpu: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(reps):
        for k, fn in runs.items():
            c0 = time.process_time()
            wall[k].append(timed(fn)[0] / n_files)
            cpu[k].append((time.process_time() - c0) / n_files)
    out = dict(n_files=n_files, n_events=100_000, **{f"{k}_ms": 1e3 * median(v) for k, v in wall.items()},
               **{f"{k}_cpu_ms": 1e3 * median(v) for k, v in cpu.items()})
    out["ratio"] = out["batch_ms"] / out["load_gate_ms"]
    out["ratio_cpu"] = out["batch_cpu_ms"] / out["load_gate_cpu_ms"]
    print(f"batch {n_files} files x 100,000 events x 18 channels: gate_files {out['batch_ms']:.0f} ms/file "
          f"(re-reading each pass: {out['batch_reread_ms']:.0f} ms), load+gate {out['load_gate_ms']:.0f} ms "
          f"({out['ratio']:.2f}x), load+gate+table {out['load_gate_table_ms']:.0f} ms; CPU ms/file: "
          f"{out['batch_cpu_ms']:.0f} ({out['batch_reread_cpu_ms']:.0f} re-reading), load+gate "
          f"{out['load_gate_cpu_ms']:.0f} ({out['ratio_cpu']:.2f}x), load+gate+table {out['load_gate_table_cpu_ms']:.0f}",
          flush=True)
    big_path = make_files(tmp / "big", big, 1)[0]
    r = subprocess.run([sys.executable, __file__, "--peak", big_path], capture_output=True, text=True, check=True)
    peak = json.loads(r.stdout.strip().splitlines()[-1])
    out.update(peak)
    print(f"batch peak memory, {peak['n_events']:,} events x {peak['n_channels']} channels: "
          f"{peak['peak_bytes'] / 1e9:.2f} GB = {peak['peak_x']:.2f}x the event matrix "
          f"({peak['matrix_bytes'] / 1e9:.2f} GB)", flush=True)
    return out


def peak_worker(path: str) -> None:
    import tracemalloc

    from immuneprofile import gate_files, load_fcs

    templates = load_templates()
    d = load_fcs(path)
    n, c = d.n_events, len(d.channels)
    del d
    gate_files(make_files(Path(path).parent.parent / "warm", 100_000, 1), templates)  # imports, kernels
    tracemalloc.start()
    b = gate_files([path], templates, keep_data=False)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert not b.errors
    print(json.dumps(dict(n_events=n, n_channels=c, peak_bytes=peak, matrix_bytes=n * c * 8,
                          peak_x=peak / (n * c * 8))))


# ----------------------------------------------------------------------------- scale-out
def part_scale(tmp: Path, n_files: int, fk_files: int, rounds: int) -> dict:
    from distributed import Client, LocalCluster

    from immuneprofile import gate_files

    templates = load_templates()
    paths = make_files(tmp / "scale", 100_000, n_files, seed=2000)
    clients = {}
    for w in (1, 2):
        clients[w] = Client(LocalCluster(n_workers=w, threads_per_worker=1, processes=True,
                                         dashboard_address=None, memory_limit="4GiB"))
        gate_files(paths[:2 * w], templates, scheduler=clients[w])  # workers import and load kernels
    times: dict[str, list[float]] = {"1 worker": [], "2 workers": [], "in-process": []}
    cpu: dict[int, list[float]] = {1: [], 2: []}
    tables = {}
    for _ in range(rounds):
        for w in (1, 2):
            before = _workers_cpu(clients[w])
            t, b = timed(gate_files, paths, templates, scheduler=clients[w])
            cpu[w].append(_workers_cpu(clients[w]) - before)
            times[f"{w} worker{'s' * (w > 1)}"].append(t)
            tables[w] = b.table
        t, b = timed(gate_files, paths, templates, keep_data=False)
        times["in-process"].append(t)
        tables[0] = b.table
    for c in clients.values():
        cluster = c.cluster
        c.close()
        cluster.close()
    same = all(tables[0].equals(tables[w]) for w in (1, 2))
    fk_per_file = _flowkit_serial(paths[:fk_files], templates)
    out = {k: median(v) for k, v in times.items()}
    out.update(n_files=n_files, n_events=100_000, speedup_2_workers=out["1 worker"] / out["2 workers"],
               flowkit_per_file_s=fk_per_file, flowkit_files=fk_files, identical=same)
    out["flowkit_extrapolated_s"] = fk_per_file * n_files
    out["workers_cpu_s"] = {w: median(v) for w, v in cpu.items()}
    for k in ("1 worker", "2 workers", "in-process"):
        print(f"scale {n_files} files x 100,000 events x 18 channels, {k}: {out[k]:.1f} s "
              f"({1e3 * out[k] / n_files:.0f} ms/file, {n_files / out[k]:.1f} files/s)", flush=True)
    print(f"  2 workers / 1 worker: {out['speedup_2_workers']:.2f}x; FlowKit serial {1e3 * fk_per_file:.0f} ms/file "
          f"(measured on {fk_files} files, extrapolated: {out['flowkit_extrapolated_s']:.0f} s for {n_files}) -> "
          f"{out['flowkit_extrapolated_s'] / out['2 workers']:.1f}x with 2 workers; tables identical: {same}",
          flush=True)
    print(f"  CPU seconds of the workers (all of them): {out['workers_cpu_s'][1]:.1f} with 1 worker, "
          f"{out['workers_cpu_s'][2]:.1f} with 2 ({1e3 * out['workers_cpu_s'][1] / n_files:.0f} ms CPU per file)",
          flush=True)
    return out


def _workers_cpu(client) -> float:
    """CPU seconds (user + system) the cluster's worker processes have used so far."""
    def used() -> float:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    return float(sum(client.run(used).values()))


def _flowkit_serial(paths: list[str], templates) -> float:
    import flowkit as fk

    strategies = strategies_for(paths[0], templates)  # same cuts for every file: timing only
    for gs in strategies:
        gs.gate_sample(fk.Sample(paths[0]))
    t0 = time.perf_counter()
    for p in paths:
        s = fk.Sample(p)
        for gs in strategies:
            gs.gate_sample(s)
    return (time.perf_counter() - t0) / len(paths)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", default=["e2e", "cli", "batch", "scale"],
                    choices=["e2e", "cli", "batch", "scale"])
    ap.add_argument("--files", type=int, default=200, help="files of the scale-out part")
    ap.add_argument("--batch-files", type=int, default=20)
    ap.add_argument("--flowkit-files", type=int, default=10)
    ap.add_argument("--big", type=int, default=5_000_000, help="events of the peak-memory file")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--peak", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.peak:
        peak_worker(args.peak)
        return 0
    warnings.simplefilter("ignore")
    tmp = Path(tempfile.mkdtemp(prefix="ip_bench_"))
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f} "
          f"(other users of the machine make every figure noisy)", flush=True)
    results: dict = {}
    try:
        if "e2e" in args.parts:
            results["e2e"] = part_e2e(tmp, max(3, args.reps // 2))
        if "cli" in args.parts:
            results["cli"] = part_cli(tmp, args.reps * 2)
        if "batch" in args.parts:
            results["batch"] = part_batch(tmp, args.batch_files, args.reps, args.big)
        if "scale" in args.parts:
            results["scale"] = part_scale(tmp, args.files, args.flowkit_files, 2)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    ok = all(r.get("identical", True) for r in results.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
