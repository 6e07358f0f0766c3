"""Reference-sample quality control and golden regression tables.

Labs run one reference sample (a frozen PBMC aliquot of one donor) in every
batch. This module keeps its population frequencies, batch after batch, in a
small SQLite study database (created on first use) and checks a new batch
against that history with Westgard-style rules::

    from immuneprofile.qc.reference import add_reference, check_reference, levey_jennings
    add_reference("study.sqlite", "B01", table, sample="REF_treg", date="2024-03-04")
    result = check_reference("study.sqlite", new_table, sample="REF_treg")
    result[result.status == "fail"]
    levey_jennings("study.sqlite", "Treg", check=result).savefig("treg_lj.png")

Rules (judged on ``pct_parent``, against the mean and sample SD of the stored
history batches):

- ``1-3s``: the value is more than 3 SD from the mean (reject);
- ``2-2s``: the value and the previous batch's value are both more than 2 SD from
  the mean on the same side (reject);
- ``1-2s``: more than 2 SD from the mean — a warning only (``warning`` column).

A population passes when no rejection rule is violated, and has status
``insufficient-history`` when fewer than ``min_history`` earlier batches carry it.

The second half of the module runs the project's own regression test: every
``example_data/*.fcs`` file is gated with its panel's template and the counts are
compared with ``tests/golden/populations_<template>.csv``. After a deliberate
change to the engine or the example data, regenerate those files with::

    python -m immuneprofile.reference --regenerate-golden [--root PROJECT_DIR]
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import sqlite3
from collections.abc import Iterable, Sequence
from contextlib import closing
from pathlib import Path
from typing import Any, Union

import numpy as np
import pandas as pd

from immuneprofile._pyplot import pyplot
from immuneprofile.exceptions import DuplicateBatchError, ReferenceDBError

__all__ = [
    "ReferenceDBError",
    "DuplicateBatchError",
    "CHECK_COLUMNS",
    "add_reference",
    "remove_batch",
    "list_batches",
    "history",
    "check_reference",
    "select_reference",
    "read_population_table",
    "levey_jennings",
    "write_levey_jennings",
    "GOLDEN_COLUMNS",
    "golden_tables",
    "regenerate_golden",
    "compare_golden",
]

PathLike = Union[str, "os.PathLike[str]"]

CHECK_COLUMNS = ["template", "population", "sample_id", "value", "n_history", "mean", "sd", "z",
                 "previous_z", "rules", "warning", "status"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS batches (
    seq      INTEGER PRIMARY KEY AUTOINCREMENT,
    batch_id TEXT NOT NULL UNIQUE,
    date     TEXT NOT NULL,
    note     TEXT NOT NULL DEFAULT '',
    added    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reference_values (
    batch_id     TEXT NOT NULL REFERENCES batches(batch_id) ON DELETE CASCADE,
    sample_id    TEXT NOT NULL,
    template     TEXT NOT NULL,
    population   TEXT NOT NULL,
    parent       TEXT,
    pct_parent   REAL,
    count        INTEGER NOT NULL,
    parent_count INTEGER,
    PRIMARY KEY (batch_id, template, population)
);
"""


# --------------------------------------------------------------------------- database


def _connect(db: PathLike, create: bool = True) -> sqlite3.Connection:
    path = Path(os.fspath(db))
    if not create and not path.exists():
        raise ReferenceDBError(f"{path}: reference database not found; add a first batch with "
                               f"`immuneprofile reference add --db {path} ...`")
    if create:
        path.parent.mkdir(parents=True, exist_ok=True)
    try:
        con = sqlite3.connect(str(path))
        con.execute("PRAGMA foreign_keys = ON")
        con.executescript(_SCHEMA)
    except sqlite3.DatabaseError as exc:
        raise ReferenceDBError(f"{path}: not a usable SQLite reference database ({exc})") from exc
    return con


def read_population_table(table: pd.DataFrame | PathLike) -> pd.DataFrame:
    """A population table given as a DataFrame or a ``.csv``/``.parquet`` path (from ``immuneprofile gate``).

    Read with :func:`immuneprofile.study.read_populations` (the one reader), which
    also checks ``sample_id``, ``population`` and ``pct_parent``; the reference
    store also needs ``count``, and reads a missing ``template`` as ``""``.
    """
    from immuneprofile.exceptions import ClinicalDataError
    from immuneprofile.study.clinical import read_populations

    try:
        df = read_populations(table)
    except ClinicalDataError as exc:
        raise ReferenceDBError(f"{exc} Use the populations.csv written by `immuneprofile gate`.") from None
    if "count" not in df.columns:
        raise ReferenceDBError("population table lacks column(s) ['count']; "
                               "use the populations.csv written by `immuneprofile gate`")
    if "template" not in df.columns:
        df["template"] = ""
    df["template"] = df["template"].fillna("").astype(str)
    return df


def select_reference(table: pd.DataFrame | PathLike, sample: str | Sequence[str] | None = None) -> pd.DataFrame:
    """The rows of the reference sample(s): one sample per template.

    ``sample`` names the reference sample id(s) (one per panel/template when the
    reference aliquot is stained with several panels). Without it the table must
    hold exactly one sample per template.
    """
    df = read_population_table(table)
    if sample is not None:
        wanted = [sample] if isinstance(sample, str) else list(sample)
        absent = [s for s in wanted if s not in set(df["sample_id"])]
        if absent:
            have = sorted(set(df["sample_id"]))
            raise ReferenceDBError(f"reference sample(s) {absent} not in the population table; "
                                   f"it has {have[:20]}{' ...' if len(have) > 20 else ''}")
        df = df[df["sample_id"].isin(wanted)]
    if df.empty:
        raise ReferenceDBError("the population table has no rows")
    per = df.groupby("template")["sample_id"].nunique()
    many = per[per > 1]
    if len(many):
        t = many.index[0]
        ids = sorted(set(df.loc[df["template"] == t, "sample_id"]))
        raise ReferenceDBError(f"template {t!r}: {len(ids)} samples in the table ({ids[:10]}); "
                               "name the reference sample with --sample (sample=...)")
    dup = df.duplicated(["template", "population"])
    if dup.any():
        raise ReferenceDBError(f"population {df.loc[dup, 'population'].iloc[0]!r} appears twice for one sample")
    return df.reset_index(drop=True)


def add_reference(
    db: PathLike,
    batch_id: str,
    table: pd.DataFrame | PathLike,
    *,
    sample: str | Sequence[str] | None = None,
    date: str | _dt.date | None = None,
    note: str = "",
) -> pd.DataFrame:
    """Store the reference sample's population frequencies of one batch.

    Parameters
    ----------
    db
        SQLite file (created on first use).
    batch_id
        Unique batch identifier; a batch id already stored raises :class:`DuplicateBatchError`.
    table
        Population table of the batch (DataFrame or populations.csv/.parquet).
    sample
        Reference sample id(s); needed when the table holds more than one sample per template.
    date
        Batch date (ISO ``YYYY-MM-DD``; default today). Batches are ordered by date, then by
        the order they were added.
    note
        Free text.

    Returns
    -------
    pandas.DataFrame
        The rows stored.
    """
    batch_id = str(batch_id).strip()
    if not batch_id:
        raise ReferenceDBError("batch id must not be empty")
    rows = select_reference(table, sample)
    if isinstance(date, _dt.date):
        date = date.isoformat()
    date = str(date or _dt.date.today().isoformat())
    try:
        _dt.date.fromisoformat(date)
    except ValueError:
        raise ReferenceDBError(f"batch date {date!r} is not an ISO date (YYYY-MM-DD)") from None
    with closing(_connect(db)) as con:
        old = con.execute("SELECT date, added FROM batches WHERE batch_id = ?", (batch_id,)).fetchone()
        if old:
            raise DuplicateBatchError(
                f"{os.fspath(db)}: batch {batch_id!r} is already stored (date {old[0]}, added {old[1]}); "
                "use a new batch id, or remove the stored one first (`immuneprofile reference remove`)")
        with con:
            con.execute("INSERT INTO batches (batch_id, date, note, added) VALUES (?, ?, ?, ?)",
                        (batch_id, date, note, _dt.datetime.now().isoformat(timespec="seconds")))
            con.executemany(
                "INSERT INTO reference_values VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [(batch_id, r.sample_id, r.template, str(r.population),
                  None if "parent" not in rows.columns else str(r.parent),
                  None if pd.isna(r.pct_parent) else float(r.pct_parent), int(r.count),
                  None if "parent_count" not in rows.columns or pd.isna(r.parent_count) else int(r.parent_count))
                 for r in rows.itertuples(index=False)])
    return rows


def remove_batch(db: PathLike, batch_id: str) -> None:
    """Delete a stored batch and its values."""
    with closing(_connect(db, create=False)) as con, con:
        cur = con.execute("DELETE FROM batches WHERE batch_id = ?", (str(batch_id),))
        if cur.rowcount == 0:
            raise ReferenceDBError(f"{os.fspath(db)}: no batch {batch_id!r}")


def list_batches(db: PathLike) -> pd.DataFrame:
    """Stored batches in order: ``batch_id, date, note, added``."""
    with closing(_connect(db, create=False)) as con:
        return pd.read_sql_query("SELECT batch_id, date, note, added FROM batches ORDER BY date, seq", con)


def history(db: PathLike, population: str | None = None, template: str | None = None) -> pd.DataFrame:
    """Stored reference values in batch order (columns of the ``reference_values`` table plus ``date``, ``order``)."""
    q = ("SELECT b.batch_id, b.date, v.sample_id, v.template, v.population, v.parent, v.pct_parent, "
         "v.count, v.parent_count FROM reference_values v JOIN batches b USING (batch_id)")
    where, args = [], []
    if population is not None:
        where.append("v.population = ?")
        args.append(population)
    if template is not None:
        where.append("v.template = ?")
        args.append(template)
    if where:
        q += " WHERE " + " AND ".join(where)
    with closing(_connect(db, create=False)) as con:
        order = pd.read_sql_query("SELECT batch_id FROM batches ORDER BY date, seq", con)["batch_id"].tolist()
        df = pd.read_sql_query(q, con, params=args)
    rank = {b: i for i, b in enumerate(order)}
    df["order"] = df["batch_id"].map(rank)
    return df.sort_values(["order", "template", "population"], kind="stable").reset_index(drop=True)


# --------------------------------------------------------------------------- checking


def _z(value: float, mean: float, sd: float) -> float:
    if not (math.isfinite(value) and math.isfinite(mean)):
        return float("nan")
    if sd > 0:
        return (value - mean) / sd
    return 0.0 if value == mean else math.copysign(math.inf, value - mean)


def check_reference(
    db: PathLike,
    table: pd.DataFrame | PathLike | None,
    *,
    batch_id: str | None = None,
    sample: str | Sequence[str] | None = None,
    min_history: int = 3,
) -> pd.DataFrame:
    """Check a batch's reference sample against the stored history.

    Parameters
    ----------
    db
        The reference database.
    table
        Population table of the batch to check. ``None`` re-checks the stored values of ``batch_id``.
    batch_id
        The batch being checked. If it is stored, only the batches before it form the history
        (so a batch can be checked after it was added); otherwise every stored batch does.
    sample
        Reference sample id(s), as for :func:`add_reference`.
    min_history
        Fewer earlier batches than this carrying a population -> ``insufficient-history``.

    Returns
    -------
    pandas.DataFrame
        One row per reference population: ``template, population, sample_id, value``
        (pct_parent), ``n_history, mean, sd`` (sample SD of the history), ``z``,
        ``previous_z`` (the previous batch against the same mean and SD), ``rules``
        (violated rejection rules, ``"1-3s"``, ``"2-2s"``, comma-separated; ``"no-value"``
        when the population is empty or absent), ``warning`` (``"1-2s"`` or ``""``) and
        ``status`` (``pass``, ``fail`` or ``insufficient-history``).
    """
    hist = history(db)
    order = list(dict.fromkeys(hist["batch_id"]))
    if batch_id is not None and str(batch_id) in order:
        hist = hist[hist["order"] < order.index(str(batch_id))]
        if table is None:
            stored = history(db)
            table = stored[stored["batch_id"] == str(batch_id)]
    elif table is None:
        raise ReferenceDBError(f"batch {batch_id!r} is not stored; give its population table")
    cur = select_reference(table, sample)
    # the stored populations must all be checked, even if the new table lacks them
    keys = list(dict.fromkeys(zip(cur["template"], cur["population"])))
    tmpl = set(cur["template"])
    for t, p in dict.fromkeys(zip(hist["template"], hist["population"])):
        if t in tmpl and (t, p) not in keys:
            keys.append((t, p))
    by_key = {(r.template, r.population): r for r in cur.itertuples(index=False)}
    groups = {k: g for k, g in hist.groupby(["template", "population"], sort=False)}
    rows = []
    for key in keys:
        r = by_key.get(key)
        value = float("nan") if r is None or pd.isna(r.pct_parent) else float(r.pct_parent)
        sid = "" if r is None else r.sample_id
        h = groups.get(key)
        vals = np.array([], float) if h is None else h["pct_parent"].to_numpy(dtype=float)
        vals = vals[np.isfinite(vals)]
        n = int(vals.size)
        mean = float(vals.mean()) if n else float("nan")
        sd = float(vals.std(ddof=1)) if n > 1 else float("nan")
        z = _z(value, mean, sd) if n > 1 else float("nan")
        pz = _z(float(vals[-1]), mean, sd) if n > 1 else float("nan")
        rules: list[str] = []
        warning = ""
        if not math.isfinite(value):
            rules.append("no-value")
        if n >= max(min_history, 2) and math.isfinite(z):
            if abs(z) > 3:
                rules.append("1-3s")
            if abs(z) > 2 and abs(pz) > 2 and np.sign(z) == np.sign(pz):
                rules.append("2-2s")
            if abs(z) > 2:
                warning = "1-2s"
        if rules:
            status = "fail"
        elif n < max(min_history, 2):
            status = "insufficient-history"
        else:
            status = "pass"
        rows.append({"template": key[0], "population": key[1], "sample_id": sid, "value": value,
                     "n_history": n, "mean": mean, "sd": sd, "z": z, "previous_z": pz,
                     "rules": ",".join(rules), "warning": warning, "status": status})
    return pd.DataFrame(rows, columns=CHECK_COLUMNS)


# --------------------------------------------------------------------------- Levey-Jennings


def levey_jennings(
    db: PathLike,
    population: str,
    *,
    template: str | None = None,
    check: pd.DataFrame | None = None,
    batch_label: str = "new",
    ax: Any = None,
):
    """Levey-Jennings chart of one reference population over the stored batches.

    The centre line is the mean and the dotted/dashed/solid lines the ±1/2/3 SD limits
    (of the stored history, or of ``check``'s row when given, in which case the checked
    value is added as the last point, labelled ``batch_label``). Points that violate a
    rejection rule are drawn in red.

    Lines carry a ``gid`` (``mean``, ``+1sd``, ``-1sd``, ``+2sd``, ..., ``values``, ``current``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    plt = pyplot()
    h = history(db, population, template)
    if h.empty:
        raise ReferenceDBError(f"{os.fspath(db)}: no stored values for population {population!r}"
                               + (f" of template {template!r}" if template else ""))
    ts = sorted(set(h["template"]))
    if len(ts) > 1:
        raise ReferenceDBError(f"population {population!r} exists in templates {ts}; pass template=...")
    template = ts[0]
    row = None
    if check is not None:
        sel = check[(check["population"] == population) & (check["template"] == template)]
        row = sel.iloc[0] if len(sel) else None
    vals = h["pct_parent"].to_numpy(dtype=float)
    labels = h["batch_id"].tolist()
    if row is not None:
        mean, sd = float(row["mean"]), float(row["sd"])
    else:
        fin = vals[np.isfinite(vals)]
        mean = float(fin.mean()) if fin.size else float("nan")
        sd = float(fin.std(ddof=1)) if fin.size > 1 else float("nan")
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * (len(vals) + 2) + 3), 3.2))
    else:
        fig = ax.figure
    x = np.arange(len(vals))
    ax.plot(x, vals, "-o", color="#333333", ms=4, lw=1, gid="values", label="reference")
    if math.isfinite(sd) and sd > 0:
        z = (vals - mean) / sd
        bad = np.abs(z) > 3
        ax.plot(x[bad], vals[bad], "o", color="red", ms=6, gid="out-of-control")
    if math.isfinite(mean):
        ax.axhline(mean, color="green", lw=1.2, gid="mean", label=f"mean {mean:.2f}")
        if math.isfinite(sd):
            for k, ls, col in ((1, ":", "#888888"), (2, "--", "orange"), (3, "-", "red")):
                for s in (1, -1):
                    ax.axhline(mean + s * k * sd, color=col, ls=ls, lw=0.9, gid=f"{'+' if s > 0 else '-'}{k}sd",
                               label=f"±{k} SD" if s > 0 else None)
    if row is not None and math.isfinite(float(row["value"])):
        xn = len(vals)
        failed = row["status"] == "fail"
        ax.plot([xn], [float(row["value"])], "D", color="red" if failed else "tab:blue", ms=7, gid="current",
                label=f"{batch_label}: {row['status']}")
        labels = labels + [batch_label]
    ax.set_xticks(np.arange(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("% of parent")
    ax.set_title(f"{population} ({template})" if template else population, fontsize=10)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def write_levey_jennings(db: PathLike, check: pd.DataFrame, out_dir: PathLike, *, dpi: int = 100) -> list[Path]:
    """One Levey-Jennings PNG per checked population (``lj_<template>_<population>.png``)."""
    import re

    plt = pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in check.itertuples(index=False):
        if r.n_history == 0:
            continue
        fig = levey_jennings(db, r.population, template=r.template, check=check)
        slug = re.sub(r"[^0-9A-Za-z+-]+", "_", f"{r.template}_{r.population}").strip("_")
        slug = slug.replace("+", "pos")
        p = out / f"lj_{slug}.png"
        fig.savefig(p, dpi=dpi)
        plt.close(fig)
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- golden tables

GOLDEN_COLUMNS = ["sample_id", "population", "parent", "count", "parent_count"]


def golden_tables(root: PathLike = ".", *, jobs: int = 1) -> dict[str, pd.DataFrame]:
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


def regenerate_golden(root: PathLike = ".", *, jobs: int = 0) -> list[Path]:
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

    ap = argparse.ArgumentParser(prog="python -m immuneprofile.reference",
                                 description="Regenerate the golden population tables (tests/golden).")
    ap.add_argument("--regenerate-golden", action="store_true",
                    help="gate example_data/*.fcs and rewrite tests/golden/populations_<template>.csv")
    ap.add_argument("--root", default=".", help="project directory (default: current directory)")
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
