#!/usr/bin/env python
"""Benchmark: ``load_fcs`` against the raw-read floor and against FlowKit, side by side in one run.

Usage::

    python benchmarks/load_vs_floor.py                 # 1M and 5M events x 18 channels
    python benchmarks/load_vs_floor.py --sizes 100000  # quick

Data: the simulator's ``"full"`` panel (18 channels, float32, ``$SPILLOVER`` over the
15 fluorescence channels), written to ``benchmarks/_data/`` on first use (the files
``gating_vs_flowkit.py`` uses).

Timed, interleaved (floor, immuneprofile, FlowKit, floor, ...) and repeated, medians
reported (the VM drifts by +-20 %; the files are in the page cache after a first untimed
read, so every side reads from memory):

* **floor**: read the DATA segment (``np.fromfile`` of ``$TOT x $PAR`` little-endian
  float32 values) and write the column-major float64 event matrix from it: the least
  any loader must do.
* **immuneprofile**: ``load_fcs(path)`` (HEADER/TEXT parse, DATA read, ``$SPILLOVER``
  compensation).
* **floor + solve**: the floor, then FlowUtils' ``np.linalg.solve`` on the whole matrix's
  fluorescence columns: the least a loader giving FlowKit's compensated values bit for bit must do.
* **FlowKit**: ``flowkit.Sample(path)`` plus ``apply_compensation`` with the file's own
  ``$SPILLOVER`` (the same result).

Peak memory: each loader once more in its own subprocess, ``tracemalloc`` peak (NumPy
reports its buffers to it) as a multiple of the event matrix (``events x channels x 8``
bytes), and the subprocess's peak resident set size (``VmHWM``, interpreter and imports included).

Checked: ``load_fcs``'s compensated events equal FlowKit's bit for bit (exit status 1 if not).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gating_vs_flowkit import ensure_sample  # noqa: E402  (the shared simulated files)


def floor_read(path: str) -> np.ndarray:
    """Read the DATA segment and write the column-major float64 matrix: nothing more."""
    from immuneprofile.io.reader import read_fcs

    raw = read_fcs(path, only_text=True)
    n, p = raw.n_events, len(raw.channels)
    kind = {"F": "f", "D": "f", "I": "u"}[raw.text["datatype"].upper()]  # the file's stored type, as written
    width = int(raw.text["p1b"]) // 8
    order = "<" if raw.text.get("byteord", "1,2").startswith("1") else ">"
    values = np.fromfile(path, dtype=f"{order}{kind}{width}", count=n * p, offset=int(raw.text["begindata"]))
    out = np.empty((n, p), dtype=np.float64, order="F")
    out[...] = values.reshape(n, p)
    return out


def floor_solve(path: str) -> np.ndarray:
    """The floor plus FlowUtils' compensation solve on the whole matrix (the arithmetic FlowKit's values need)."""
    from immuneprofile.io.fcs import _spill_from_text, _spill_keyword
    from immuneprofile.io.reader import read_fcs

    raw = read_fcs(path, only_text=True)
    out = floor_read(path)
    spill = _spill_from_text(_spill_keyword(raw.text), raw.channels)
    idx = [raw.channels.index(d) for d in spill.detectors]
    out[:, idx] = np.linalg.solve(spill.matrix.T, out[:, idx].T).T
    return out


def ours(path: str) -> np.ndarray:
    from immuneprofile import load_fcs

    return load_fcs(path).events


def flowkit(path: str) -> np.ndarray:
    import flowkit as fk

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = fk.Sample(path, subsample=0)
        s.apply_compensation(s.metadata["spill"] if "spill" in s.metadata else s.metadata["spillover"])
    return s.get_events(source="comp")


LOADERS = {"floor": floor_read, "floor_solve": floor_solve, "immuneprofile": ours, "flowkit": flowkit}


def peak_memory(name: str, path: str) -> dict:
    """tracemalloc peak and max RSS of one load, in a fresh subprocess."""
    code = "\n".join([
        "import json, sys, tracemalloc",
        f"sys.path.insert(0, {str(HERE)!r})",
        "import flowkit" if name == "flowkit" else "import immuneprofile.io.fcs",  # imports are not the load's
        "from load_vs_floor import LOADERS",
        "tracemalloc.start()",
        f"ev = LOADERS[{name!r}]({path!r})",
        "cur, peak = tracemalloc.get_traced_memory()",
        "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0]",
        "rss = int(hwm.split()[1]) * 1024",
        "print(json.dumps({'peak': peak, 'rss': rss, 'matrix': ev.nbytes}))",
    ])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(n: int, reps: int, flowkit_reps: int) -> dict:
    path = str(ensure_sample(n))
    for f in LOADERS.values():  # warm: imports, page cache
        f(path)
    times: dict[str, list[float]] = {k: [] for k in LOADERS}
    for r in range(reps):
        for name, f in LOADERS.items():
            if name == "flowkit" and r >= flowkit_reps:
                continue
            t0 = time.perf_counter()
            ev = f(path)
            times[name].append(time.perf_counter() - t0)
            del ev
    same = bool(np.array_equal(ours(path), flowkit(path)))
    mem = {k: peak_memory(k, path) for k in ("floor", "immuneprofile", "flowkit")}
    med = {k: float(np.median(v)) for k, v in times.items()}
    return {"events": n, "channels": 18, "median_s": med, "runs": {k: len(v) for k, v in times.items()},
            "memory": mem, "identical": same}


def table(rows: list[dict]) -> str:
    out = [
        "| events | channels | floor (s) | floor + solve (s) | immuneprofile (s) | FlowKit (s) | ours / floor "
        "| ours / (floor + solve) | FlowKit / ours | peak ours (x matrix) | peak FlowKit (x matrix) "
        "| peak RSS ours | peak RSS FlowKit | identical |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:-:|",
    ]
    for r in rows:
        m, mem = r["median_s"], r["memory"]
        x = {k: mem[k]["peak"] / mem[k]["matrix"] for k in mem}
        out.append(
            f"| {r['events']:,} | {r['channels']} | {m['floor']:.3f} | {m['floor_solve']:.3f} | "
            f"{m['immuneprofile']:.3f} | {m['flowkit']:.3f} | **{m['immuneprofile'] / m['floor']:.2f}x** | "
            f"{m['immuneprofile'] / m['floor_solve']:.2f}x | {m['flowkit'] / m['immuneprofile']:.1f}x | "
            f"{mem['immuneprofile']['peak'] / 1e6:.0f} MB (**{x['immuneprofile']:.2f}x**) | "
            f"{mem['flowkit']['peak'] / 1e6:.0f} MB ({x['flowkit']:.2f}x) | {mem['immuneprofile']['rss'] / 1e6:.0f} MB | "
            f"{mem['flowkit']['rss'] / 1e6:.0f} MB | {'yes' if r['identical'] else 'NO'} |"
        )
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    for n in args.sizes:
        reps = args.reps if n <= 1_000_000 else max(3, args.reps // 2)
        rows.append(run(n, reps, flowkit_reps=max(3, reps // 3)))
        print(json.dumps(rows[-1]), flush=True)
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
