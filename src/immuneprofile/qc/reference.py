"""Reference-sample quality control: a study database of reference-sample values, Westgard rules.

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
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import sqlite3
from collections.abc import Sequence
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
    hist, table = _history_before(db, table, batch_id)
    cur = select_reference(table, sample)
    by_key = {(r.template, r.population): r for r in cur.itertuples(index=False)}
    groups = {k: g for k, g in hist.groupby(["template", "population"], sort=False)}
    rows = []
    for key in _checked_keys(cur, hist):
        r = by_key.get(key)
        value = float("nan") if r is None or pd.isna(r.pct_parent) else float(r.pct_parent)
        h = groups.get(key)
        vals = np.array([], float) if h is None else h["pct_parent"].to_numpy(dtype=float)
        row = _westgard(value, vals[np.isfinite(vals)], min_history)
        rows.append({"template": key[0], "population": key[1], "sample_id": "" if r is None else r.sample_id,
                     "value": value, **row})
    return pd.DataFrame(rows, columns=CHECK_COLUMNS)


def _history_before(db: PathLike, table: pd.DataFrame | PathLike | None,
                    batch_id: str | None) -> tuple[pd.DataFrame, pd.DataFrame | PathLike]:
    """The stored history before ``batch_id`` (all of it if it is not stored), and the table to check."""
    hist = history(db)
    order = list(dict.fromkeys(hist["batch_id"]))
    if batch_id is not None and str(batch_id) in order:
        if table is None:
            table = hist[hist["batch_id"] == str(batch_id)]
        hist = hist[hist["order"] < order.index(str(batch_id))]
    elif table is None:
        raise ReferenceDBError(f"batch {batch_id!r} is not stored; give its population table")
    return hist, table


def _checked_keys(cur: pd.DataFrame, hist: pd.DataFrame) -> list[tuple[str, str]]:
    """``(template, population)`` to check: the new table's, then the stored ones of its templates it lacks."""
    keys = list(dict.fromkeys(zip(cur["template"], cur["population"])))
    templates = set(cur["template"])
    for key in dict.fromkeys(zip(hist["template"], hist["population"])):
        if key[0] in templates and key not in keys:
            keys.append(key)
    return keys


def _violations(z: float, pz: float) -> list[str]:
    """Westgard rejection rules violated by a z-score (``pz``: the previous batch's)."""
    if not math.isfinite(z):
        return []
    rules = ["1-3s"] if abs(z) > 3 else []
    if abs(z) > 2 and abs(pz) > 2 and np.sign(z) == np.sign(pz):
        rules.append("2-2s")
    return rules


def _westgard(value: float, vals: np.ndarray, min_history: int) -> dict[str, Any]:
    """The check of one value against its (finite) history: statistics, rules, warning and status."""
    n = int(vals.size)
    mean = float(vals.mean()) if n else float("nan")
    sd = float(vals.std(ddof=1)) if n > 1 else float("nan")
    z = _z(value, mean, sd) if n > 1 else float("nan")
    pz = _z(float(vals[-1]), mean, sd) if n > 1 else float("nan")
    enough = n >= max(min_history, 2)
    rules = ([] if math.isfinite(value) else ["no-value"]) + (_violations(z, pz) if enough else [])
    warning = "1-2s" if enough and math.isfinite(z) and abs(z) > 2 else ""
    status = "fail" if rules else ("pass" if enough else "insufficient-history")
    return {"n_history": n, "mean": mean, "sd": sd, "z": z, "previous_z": pz, "rules": ",".join(rules),
            "warning": warning, "status": status}


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
    h, template = _population_history(db, population, template)
    row = None
    if check is not None:
        sel = check[(check["population"] == population) & (check["template"] == template)]
        row = sel.iloc[0] if len(sel) else None
    vals = h["pct_parent"].to_numpy(dtype=float)
    labels = h["batch_id"].tolist()
    mean, sd = _mean_sd(vals) if row is None else (float(row["mean"]), float(row["sd"]))
    if ax is None:
        fig, ax = plt.subplots(figsize=(max(5.0, 0.35 * (len(vals) + 2) + 3), 3.2))
    else:
        fig = ax.figure
    x = np.arange(len(vals))
    ax.plot(x, vals, "-o", color="#333333", ms=4, lw=1, gid="values", label="reference")
    if math.isfinite(sd) and sd > 0:
        bad = np.abs((vals - mean) / sd) > 3
        ax.plot(x[bad], vals[bad], "o", color="red", ms=6, gid="out-of-control")
    _control_lines(ax, mean, sd)
    if row is not None and math.isfinite(float(row["value"])):
        ax.plot([len(vals)], [float(row["value"])], "D", color="red" if row["status"] == "fail" else "tab:blue",
                ms=7, gid="current", label=f"{batch_label}: {row['status']}")
        labels = labels + [batch_label]
    ax.set_xticks(np.arange(len(labels)))
    ax.set_xticklabels(labels, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel("% of parent")
    ax.set_title(f"{population} ({template})" if template else population, fontsize=10)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def _population_history(db: PathLike, population: str, template: str | None) -> tuple[pd.DataFrame, str]:
    """The stored values of one population, and its template (which must be unique)."""
    h = history(db, population, template)
    if h.empty:
        raise ReferenceDBError(f"{os.fspath(db)}: no stored values for population {population!r}"
                               + (f" of template {template!r}" if template else ""))
    ts = sorted(set(h["template"]))
    if len(ts) > 1:
        raise ReferenceDBError(f"population {population!r} exists in templates {ts}; pass template=...")
    return h, ts[0]


def _mean_sd(vals: np.ndarray) -> tuple[float, float]:
    fin = vals[np.isfinite(vals)]
    return (float(fin.mean()) if fin.size else float("nan"),
            float(fin.std(ddof=1)) if fin.size > 1 else float("nan"))


def _control_lines(ax: Any, mean: float, sd: float) -> None:
    """The mean and the ±1/2/3 SD limits."""
    if not math.isfinite(mean):
        return
    ax.axhline(mean, color="green", lw=1.2, gid="mean", label=f"mean {mean:.2f}")
    if not math.isfinite(sd):
        return
    for k, ls, col in ((1, ":", "#888888"), (2, "--", "orange"), (3, "-", "red")):
        for s in (1, -1):
            ax.axhline(mean + s * k * sd, color=col, ls=ls, lw=0.9, gid=f"{'+' if s > 0 else '-'}{k}sd",
                       label=f"±{k} SD" if s > 0 else None)


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
