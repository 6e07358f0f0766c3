"""The CLI prints user text literally, has one exit-code rule, and a run's outputs are that run's."""

from __future__ import annotations

import shutil

import pandas as pd
from click.testing import CliRunner

from conftest import EXAMPLE, GATING
from immuneprofile.cli import main

TREG = str(GATING / "treg.yaml")
GOOD = EXAMPLE / "P1_W00_treg.fcs"


def _gate(*args):
    return CliRunner().invoke(main, ["gate", "-t", TREG, *map(str, args)])


def test_markup_like_file_names_are_printed_literally(tmp_path):
    odd = tmp_path / "[bold]run [" / "red] [x, y].fcs"  # the path holds "[/red]"
    odd.parent.mkdir()
    odd.write_bytes(GOOD.read_bytes()[:3000])  # truncated: its error names the file
    shutil.copy(GOOD, tmp_path / "ok [a, b].fcs")
    r = _gate(odd, tmp_path / "ok [a, b].fcs", "-o", tmp_path / "out")
    assert r.exit_code == 1, r.output
    assert "[bold]run [/red] [x, y].fcs" in r.output.replace("\n", "")
    tab = pd.read_csv(tmp_path / "out" / "populations.csv")
    assert list(tab["sample_id"].unique()) == ["ok [a, b]"]


def test_directory_among_files_is_reported_and_skipped(tmp_path):
    r = _gate(GOOD, tmp_path, "-o", tmp_path / "out")
    assert r.exit_code == 1, r.output
    assert "is a directory, not an FCS file" in r.output
    errs = pd.read_csv(tmp_path / "out" / "errors.csv")
    assert list(errs["file"]) == [str(tmp_path)]
    assert pd.read_csv(tmp_path / "out" / "populations.csv")["sample_id"].unique().tolist() == ["P1_W00_treg"]


def test_rerun_into_the_same_folder_leaves_no_stale_outputs(tmp_path):
    out = tmp_path / "out"
    bad = tmp_path / "cut.fcs"
    bad.write_bytes(GOOD.read_bytes()[:3000])
    assert _gate(GOOD, bad, "-o", out).exit_code == 1
    assert (out / "errors.csv").exists() and (out / "events.h5ad").exists()
    r = _gate(GOOD, "-o", out)  # a clean run: no errors.csv from the earlier one
    assert r.exit_code == 0, r.output
    assert not (out / "errors.csv").exists()
    r = _gate(bad, "-o", out)  # every file fails: no populations or events of the earlier run
    assert r.exit_code == 1, r.output
    assert sorted(p.name for p in out.iterdir()) == ["errors.csv", "parts"]
    # the per-file parts (--resume) are this run's too: none of the earlier runs' files
    assert [p.name for p in (out / "parts").iterdir()] == ["manifest.json"]


def test_zero_event_file_fails_with_its_reason(tmp_path):
    import flowio

    empty = tmp_path / "zero.fcs"
    with open(empty, "wb") as fh:
        flowio.create_fcs(fh, [], ["FSC-A", "CD3"])
    r = _gate(empty, "-o", tmp_path / "out")
    assert r.exit_code == 1, r.output
    assert "zero.fcs: $TOT is 0: the file holds no events" in r.output.replace("\n", "")
    assert "offset" not in r.output


def test_every_immuneprofile_error_is_one_red_line_and_exit_2(tmp_path):
    junk = tmp_path / "junk [x].csv"
    junk.write_text("a,b\n1,2\n")
    r = CliRunner().invoke(main, ["correlate", "--populations", str(junk), "--clinical", str(junk),
                                  "-o", str(tmp_path / "o")])
    assert r.exit_code == 2, r.output
    assert r.output.startswith("error: ") and "Traceback" not in r.output and "junk [x].csv" in r.output
    t = tmp_path / "typo [x].yaml"
    t.write_text("populations:\n  - {name: a, parent: nowhere, gate: {type: range, marker: CD3, min: 0.4}}\n")
    r = CliRunner().invoke(main, ["gate", "-t", str(t), str(GOOD), "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "typo [x].yaml" in r.output and r.output.startswith("error: ")


def test_gating_a_small_file_imports_only_what_its_fits_need(tmp_path):
    """``gate --no-anndata`` on a small file: the fits' narrow modules, none of the heavy stacks.

    The treg template fits a cluster (scikit-learn), a singlet band (statsmodels' RLM) and
    valley thresholds (their peaks without scipy.signal); ``statsmodels.api`` would also import
    statsmodels' time-series and graphics stacks, FlowKit its plotting stack, and none of them
    is needed to gate.
    """
    import subprocess
    import sys

    heavy = ("statsmodels.api", "statsmodels.tsa", "statsmodels.graphics.api", "scipy.signal", "flowkit", "bokeh",
             "matplotlib", "anndata", "scanpy", "dask", "distributed", "numba")
    used = ("sklearn.mixture", "statsmodels.robust.robust_linear_model")  # the fits did run
    code = ("import runpy, sys\n"
            "sys.argv = ['immuneprofile', *sys.argv[1:]]\n"
            "try:\n    runpy.run_module('immuneprofile.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    assert not e.code, e.code\n"
            f"print(sorted(m for m in {heavy + used!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, "gate", "-t", "treg", str(GOOD), "-o", str(tmp_path),
                          "--no-anndata"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[-2] == str(sorted(used))
    assert (tmp_path / "populations.csv").exists()
