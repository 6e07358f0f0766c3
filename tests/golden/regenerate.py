"""The golden regression tables: every example file gated, counts compared with ``populations_<template>.csv``.

Any change to the engine (or to the example data / templates) must reproduce the
counts in this folder exactly (``tests/test_reference.py`` checks it). After a
deliberate change, regenerate them from the project directory::

    python tests/golden/regenerate.py --regenerate-golden
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pandas as pd

PathLike = str | os.PathLike
ROOT = Path(__file__).resolve().parents[2]

GOLDEN_COLUMNS = ["sample_id", "population", "parent", "count", "parent_count"]


def golden_tables(root: PathLike = ROOT, *, jobs: int = 1) -> dict[str, pd.DataFrame]:
    """Gate every ``example_data/*.fcs`` with its panel's template(s); ``{template: counts table}``.

    The panel of each file comes from ``example_data/samples.csv`` (``file, sample_id, ..., panel``);
    panel ``tcell`` uses ``gating/tcell_skin_homing.yaml``, ``treg`` ``gating/treg.yaml`` and
    ``monocyte`` ``gating/monocytes.yaml``. Any file that fails to gate raises.
    """
    from immuneprofile.batch import gate_files
    from immuneprofile.template.parse import load_template

    root = Path(os.fspath(root))
    sheet_path = root / "example_data" / "samples.csv"
    if not sheet_path.exists():
        raise FileNotFoundError(f"{sheet_path} not found: generate the example data first")
    sheet = pd.read_csv(sheet_path)
    from immuneprofile.template.shipped import PANEL_TEMPLATES as panels

    files: dict[str, list[str]] = {}
    for r in sheet.itertuples(index=False):
        if str(r.panel) not in panels:
            raise ValueError(f"{sheet_path}: unknown panel {r.panel!r} for {r.file}")
        for t in panels[str(r.panel)]:
            files.setdefault(t, []).append(str(root / "example_data" / str(r.file)))
    out = {}
    for t, paths in files.items():
        batch = gate_files(sorted(paths), load_template(t), jobs=jobs)
        if batch.errors:
            raise RuntimeError(f"template {t}: files failed to gate: {batch.errors}")
        tab = batch.table[GOLDEN_COLUMNS].copy()
        tab["count"] = tab["count"].astype("int64")
        tab["parent_count"] = tab["parent_count"].astype("int64")
        out[t] = tab.sort_values(["sample_id"], kind="stable").reset_index(drop=True)
    return out


def regenerate_golden(root: PathLike = ROOT, *, jobs: int = 0) -> list[Path]:
    """Rewrite ``tests/golden/populations_<template>.csv`` from the current engine and example data."""
    root = Path(os.fspath(root))
    gdir = root / "tests" / "golden"
    gdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for t, tab in golden_tables(root, jobs=jobs).items():
        p = gdir / f"populations_{t}.csv"
        tab.to_csv(p, index=False, lineterminator="\n")
        paths.append(p)
    return paths


def compare_golden(got: pd.DataFrame, want: pd.DataFrame) -> list[str]:
    """Differences between a counts table and its golden file (empty list: identical)."""
    keys = ["sample_id", "population"]
    g = got[GOLDEN_COLUMNS].astype({"sample_id": str, "population": str})
    w = want[GOLDEN_COLUMNS].astype({"sample_id": str, "population": str})
    m = g.merge(w, on=keys, how="outer", suffixes=("_got", "_golden"), indicator=True)
    out = []
    for r in m[m["_merge"] == "left_only"].itertuples(index=False):
        out.append(f"{r.sample_id} / {r.population}: not in the golden table")
    for r in m[m["_merge"] == "right_only"].itertuples(index=False):
        out.append(f"{r.sample_id} / {r.population}: in the golden table but not gated")
    both = m[m["_merge"] == "both"]
    for col in ("count", "parent_count", "parent"):
        kind = str if col == "parent" else "int64"
        a, b = both[f"{col}_got"].astype(kind), both[f"{col}_golden"].astype(kind)
        for i in np.flatnonzero((a != b).to_numpy()):
            r = both.iloc[i]
            out.append(f"{r['sample_id']} / {r['population']}: {col} {a.iloc[i]} != golden {b.iloc[i]}")
    return out


def _main(argv: Iterable[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python tests/golden/regenerate.py",
                                 description="Regenerate the golden population tables (tests/golden).")
    ap.add_argument("--regenerate-golden", action="store_true",
                    help="gate example_data/*.fcs and rewrite tests/golden/populations_<template>.csv")
    ap.add_argument("--root", default=str(ROOT), help="project directory (default: this checkout)")
    ap.add_argument("-j", "--jobs", type=int, default=0, help="worker processes (0 = all cores)")
    args = ap.parse_args(None if argv is None else list(argv))
    if not args.regenerate_golden:
        ap.print_help()
        return 2
    for p in regenerate_golden(args.root, jobs=args.jobs):
        print(p)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(_main())
