"""Reference-sample QC (study database, Westgard rules, Levey-Jennings) and the golden regression tables."""

from __future__ import annotations

import sqlite3
import warnings

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import EXAMPLE, ROOT
from golden.regenerate import compare_golden, golden_tables
from immuneprofile.cli import main
from immuneprofile.qc.reference import (
    CHECK_COLUMNS,
    DuplicateBatchError,
    ReferenceDBError,
    add_reference,
    check_reference,
    history,
    levey_jennings,
    list_batches,
    remove_batch,
    select_reference,
)

GOLDEN = ROOT / "tests" / "golden"


def ref_table(values: dict[str, float], sample: str = "REF", template: str = "treg", extra_samples=()) -> pd.DataFrame:
    """A population table whose reference sample has the given pct_parent values."""
    rows = []
    for sid in (sample, *extra_samples):
        for pop, pct in values.items():
            pc = 10_000
            cnt = 0 if pct != pct else int(round(pct * pc / 100))
            rows.append({"sample_id": sid, "template": template, "population": pop, "parent": "root",
                         "count": cnt, "parent_count": pc, "pct_parent": pct, "pct_total": pct})
    return pd.DataFrame(rows)


HIST_A = [10.0, 11.0, 9.0, 10.5, 9.5]          # mean 10, sd 0.7906
HIST_B = [50.0, 52.0, 48.0, 51.0, 49.0]


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "study" / "ref.sqlite"
    for i, (a, b) in enumerate(zip(HIST_A, HIST_B)):
        add_reference(path, f"B{i + 1:02d}", ref_table({"A": a, "B": b}), date=f"2024-0{i + 1}-15")
    return path


def test_database_schema_order_and_duplicates(db, tmp_path):
    assert db.exists()
    con = sqlite3.connect(db)
    tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"batches", "reference_values"} <= tables
    n = con.execute("SELECT COUNT(*) FROM reference_values").fetchone()[0]
    con.close()
    assert n == 10
    # a back-dated batch added last sorts by its date
    add_reference(db, "B00", ref_table({"A": 10.0, "B": 50.0}), date="2023-12-01", note="pilot")
    batches = list_batches(db)
    assert batches["batch_id"].tolist() == ["B00", "B01", "B02", "B03", "B04", "B05"]
    assert batches.loc[0, "note"] == "pilot"
    with pytest.raises(DuplicateBatchError, match="B03.*already stored"):
        add_reference(db, "B03", ref_table({"A": 1.0}))
    # nothing of the rejected batch was written
    assert len(history(db, "A")) == 6
    with pytest.raises(ReferenceDBError, match="ISO date"):
        add_reference(db, "B99", ref_table({"A": 1.0}), date="15/01/2024")
    remove_batch(db, "B00")
    assert "B00" not in list_batches(db)["batch_id"].tolist()
    with pytest.raises(ReferenceDBError, match="no batch"):
        remove_batch(db, "B00")


def test_reference_sample_selection():
    t = ref_table({"A": 10.0}, sample="REF", extra_samples=("P1", "P2"))
    with pytest.raises(ReferenceDBError, match="3 samples.*--sample"):
        select_reference(t)
    with pytest.raises(ReferenceDBError, match="not in the population table"):
        select_reference(t, "REF2")
    sel = select_reference(t, "REF")
    assert set(sel["sample_id"]) == {"REF"} and len(sel) == 1
    # one reference sample per template (the aliquot stained with two panels)
    both = pd.concat([ref_table({"A": 1.0}, "REF_treg", "treg"), ref_table({"A": 2.0}, "REF_mono", "monocytes"),
                      ref_table({"A": 3.0}, "P1_mono", "monocytes")])
    sel = select_reference(both, ["REF_treg", "REF_mono"])
    assert sorted(sel["sample_id"]) == ["REF_mono", "REF_treg"]


def test_check_pass_and_1_3s(db):
    mean, sd = np.mean(HIST_A), np.std(HIST_A, ddof=1)
    res = check_reference(db, ref_table({"A": 10.4, "B": 50.0 + 4 * np.std(HIST_B, ddof=1)}))
    assert list(res.columns) == CHECK_COLUMNS
    a = res.set_index("population").loc["A"]
    assert a["status"] == "pass" and a["rules"] == "" and a["n_history"] == 5
    assert a["mean"] == pytest.approx(mean) and a["sd"] == pytest.approx(sd)
    assert a["z"] == pytest.approx((10.4 - mean) / sd)
    b = res.set_index("population").loc["B"]
    assert b["status"] == "fail" and "1-3s" in b["rules"] and b["z"] == pytest.approx(4.0)
    # just inside 3 SD: not a 1-3s failure, but a 1-2s warning (previous batch is in control)
    res = check_reference(db, ref_table({"A": mean - 2.9 * sd, "B": 50.0}))
    a = res.set_index("population").loc["A"]
    assert a["status"] == "pass" and a["warning"] == "1-2s" and a["rules"] == ""


def test_check_2_2s(tmp_path):
    db = tmp_path / "ref.sqlite"
    hist = [10.0, 10.2, 9.8, 10.1, 9.9, 10.0, 9.8, 10.2, 11.2]
    for i, v in enumerate(hist):
        add_reference(db, f"B{i}", ref_table({"A": v}), date=f"2024-01-{i + 10}")
    mean, sd = np.mean(hist), np.std(hist, ddof=1)
    assert (hist[-1] - mean) / sd > 2  # precondition: the previous batch is beyond +2 SD
    high = mean + 2.5 * sd
    res = check_reference(db, ref_table({"A": high})).iloc[0]
    assert res["status"] == "fail" and res["rules"] == "2-2s"
    assert res["previous_z"] > 2 and res["z"] == pytest.approx(2.5)
    # the opposite side is not a 2-2s violation (only a 1-2s warning)
    low = check_reference(db, ref_table({"A": mean - 2.5 * sd})).iloc[0]
    assert low["status"] == "pass" and low["rules"] == "" and low["warning"] == "1-2s"
    # within 2 SD: fine although the previous batch was high
    ok = check_reference(db, ref_table({"A": mean + 1.5 * sd})).iloc[0]
    assert ok["status"] == "pass" and ok["warning"] == ""
    # checking the stored last batch uses only the batches before it as history
    again = check_reference(db, None, batch_id="B8").iloc[0]
    assert again["n_history"] == 8 and again["value"] == pytest.approx(11.2)
    assert again["mean"] == pytest.approx(np.mean(hist[:-1]))
    assert again["status"] == "fail" and "1-3s" in again["rules"]


def test_insufficient_history_missing_values_and_new_populations(tmp_path, db):
    small = tmp_path / "small.sqlite"
    for i in range(2):
        add_reference(small, f"B{i}", ref_table({"A": 10.0 + i}))
    res = check_reference(small, ref_table({"A": 30.0}), min_history=3).iloc[0]
    assert res["status"] == "insufficient-history" and res["n_history"] == 2
    assert check_reference(small, ref_table({"A": 30.0}), min_history=2).iloc[0]["status"] == "fail"
    # a population absent from the new table, one empty (NaN %), one never seen before
    res = check_reference(db, ref_table({"A": float("nan"), "C": 5.0})).set_index("population")
    assert set(res.index) == {"A", "B", "C"}
    assert res.loc["A", "status"] == "fail" and res.loc["A", "rules"] == "no-value"
    assert res.loc["B", "status"] == "fail" and res.loc["B", "rules"] == "no-value"
    assert res.loc["C", "status"] == "insufficient-history" and res.loc["C", "n_history"] == 0


def test_levey_jennings(db):
    import matplotlib.pyplot as plt

    check = check_reference(db, ref_table({"A": 14.0, "B": 50.0}))
    fig = levey_jennings(db, "A", check=check, batch_label="B06")
    ax = fig.axes[0]
    lines = {ln.get_gid(): ln for ln in ax.get_lines() if ln.get_gid()}
    mean, sd = np.mean(HIST_A), np.std(HIST_A, ddof=1)
    assert lines["mean"].get_ydata()[0] == pytest.approx(mean)
    for k in (1, 2, 3):
        assert lines[f"+{k}sd"].get_ydata()[0] == pytest.approx(mean + k * sd)
        assert lines[f"-{k}sd"].get_ydata()[0] == pytest.approx(mean - k * sd)
    assert list(lines["values"].get_ydata()) == HIST_A
    assert lines["current"].get_ydata()[0] == 14.0 and lines["current"].get_xdata()[0] == 5
    assert [t.get_text() for t in ax.get_xticklabels()] == ["B01", "B02", "B03", "B04", "B05", "B06"]
    plt.close(fig)
    with pytest.raises(ReferenceDBError, match="no stored values"):
        levey_jennings(db, "nope")


def test_cli_add_check(tmp_path):
    runner = CliRunner()
    dbp = tmp_path / "study.sqlite"
    for i, (a, b) in enumerate(zip(HIST_A, HIST_B)):
        csv = tmp_path / f"b{i}.csv"
        ref_table({"A": a, "B": b}, extra_samples=("P1",)).to_csv(csv, index=False)
        r = runner.invoke(main, ["reference", "add", "--db", str(dbp), "--batch", f"B{i}",
                                 "--populations", str(csv), "--sample", "REF", "--date", f"2024-02-0{i + 1}"])
        assert r.exit_code == 0, r.output
    r = runner.invoke(main, ["reference", "add", "--db", str(dbp), "--batch", "B1", "--populations",
                             str(tmp_path / "b0.csv"), "--sample", "REF"])
    assert r.exit_code != 0 and "already stored" in r.output
    r = runner.invoke(main, ["reference", "add", "--db", str(dbp), "--batch", "BX", "--populations",
                             str(tmp_path / "b0.csv")])
    assert r.exit_code != 0 and "--sample" in r.output

    good, bad = tmp_path / "good.csv", tmp_path / "bad.csv"
    ref_table({"A": 10.2, "B": 50.5}, extra_samples=("P7",)).to_csv(good, index=False)
    ref_table({"A": 10.2, "B": 70.0}, extra_samples=("P7",)).to_csv(bad, index=False)
    r = runner.invoke(main, ["reference", "check", "--db", str(dbp), "--populations", str(good), "--sample", "REF"])
    assert r.exit_code == 0, r.output
    assert "PASS" in r.output and "fail" not in r.output.lower()
    plots, out_csv = tmp_path / "lj", tmp_path / "check.csv"
    r = runner.invoke(main, ["reference", "check", "--db", str(dbp), "--populations", str(bad), "--sample", "REF",
                             "--plots", str(plots), "--out", str(out_csv)])
    assert r.exit_code == 1, r.output
    assert "FAIL: 1 population" in r.output
    res = pd.read_csv(out_csv).set_index("population")
    assert res.loc["B", "status"] == "fail" and res.loc["A", "status"] == "pass"
    pngs = sorted(p.name for p in plots.glob("*.png"))
    assert pngs == ["lj_treg_A.png", "lj_treg_B.png"]
    assert all((plots / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


# --------------------------------------------------------------------------- golden regression tables
# Any change to the engine (or to the example data / templates) must reproduce these counts exactly.
# After a deliberate change, regenerate them:  python tests/golden/regenerate.py --regenerate-golden


def test_golden_population_tables():
    if not (EXAMPLE / "samples.csv").exists():
        pytest.fail(f"{EXAMPLE}/samples.csv missing: the example data set is part of the project")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = golden_tables(ROOT, jobs=1)
    sheet = pd.read_csv(EXAMPLE / "samples.csv")
    assert set(got) == {"tcell_skin_homing", "treg", "monocytes"}
    assert sum(t["sample_id"].nunique() for t in got.values()) == len(sheet)
    for template, table in got.items():
        path = GOLDEN / f"populations_{template}.csv"
        assert path.exists(), f"{path} missing: run `python tests/golden/regenerate.py --regenerate-golden`"
        want = pd.read_csv(path)
        diffs = compare_golden(table, want)
        assert not diffs, (f"{template}: {len(diffs)} difference(s) from {path.name} (if intended, regenerate with "
                           "`python tests/golden/regenerate.py --regenerate-golden`):\n" + "\n".join(diffs[:20]))


def test_compare_golden_detects_changes():
    want = pd.DataFrame({"sample_id": ["S1", "S1"], "population": ["a", "b"], "parent": ["root", "a"],
                         "count": [100, 40], "parent_count": [1000, 100]})
    assert compare_golden(want.copy(), want) == []
    got = want.copy()
    got.loc[1, "count"] = 41
    assert compare_golden(got, want) == ["S1 / b: count 41 != golden 40"]
    extra = pd.concat([want, want.iloc[[0]].assign(population="c")], ignore_index=True)
    assert compare_golden(extra, want) == ["S1 / c: not in the golden table"]
    assert compare_golden(want.iloc[[0]], want) == ["S1 / b: in the golden table but not gated"]
