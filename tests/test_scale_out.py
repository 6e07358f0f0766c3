"""Gating many files on Dask distributed, per-file parts, and resuming an interrupted run.

The truth for every distributed or resumed run is the serial, in-process run of
the same files (itself checked against FlowKit in test_engine.py and
test_pipeline.py): tables must be identical, row for row and bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from immuneprofile import gate_files, load_template
from immuneprofile.exceptions import ResumeError
from immuneprofile.study import simulate

NAMES = ("tcell_skin_homing", "treg", "monocytes")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Six simulated full-panel files (different seeds and sizes) and one broken file."""
    d = tmp_path_factory.mktemp("scale")
    paths = []
    for i in range(6):
        p = d / f"S{i}.fcs"
        simulate.write_fcs(p, simulate.simulate_sample("full", 8_000 + 1_000 * i, rng=100 + i))
        paths.append(str(p))
    bad = d / "broken.fcs"
    bad.write_bytes(Path(paths[0]).read_bytes()[:2_000])
    return paths[:3] + [str(bad)] + paths[3:]


@pytest.fixture(scope="module")
def templates():
    return [load_template(n) for n in NAMES]


@pytest.fixture(scope="module")
def serial(files, templates):
    return gate_files(files, templates)


@pytest.fixture(scope="module")
def client():
    from distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="1GiB",
                           dashboard_address=None)
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


def _same(a, b) -> None:
    pd.testing.assert_frame_equal(a.table, b.table)
    pd.testing.assert_frame_equal(a.thresholds, b.thresholds)
    assert a.errors == b.errors


def test_dask_client_gives_the_serial_tables(files, templates, serial, client):
    batch = gate_files(files, templates, scheduler=client)
    assert list(batch.errors) == [files[3]] and "broken.fcs" in batch.errors[files[3]]
    assert len(batch.gated) == 6 and not serial.table.empty
    _same(batch, serial)
    assert [r.counts for r in batch.results] == [r.counts for r in serial.results]
    assert all(r.data is None for r in batch.results)  # the events stay on the workers


def test_dask_scheduler_address_with_parts(files, templates, serial, client, tmp_path):
    batch = gate_files(files, templates, scheduler=client.scheduler.address, parts=tmp_path / "parts")
    _same(batch, serial)
    assert len(list((tmp_path / "parts").glob("*.populations.parquet"))) == 6  # the broken file has none
    assert not list((tmp_path / "parts").glob(".*.tmp"))


def test_batch_scope_threshold_on_dask_equals_serial(files, client):
    from immuneprofile.template.parse import parse_template

    t = parse_template({
        "name": "pooled", "transforms": {"default": "logicle"},
        "thresholds": {"FoxP3": {"pos": {"method": "quantile", "q": 0.9, "scope": "batch"}}},
        "populations": [{"name": "FoxP3+", "gate": {"type": "threshold", "markers": {"FoxP3": "+"}}}],
    })
    ok = [f for f in files if "broken" not in f]
    a, b = gate_files(ok, t), gate_files(ok, t, scheduler=client)
    _same(a, b)
    assert a.thresholds.value.nunique() == 1 and "pooled over 6 file(s)" in a.thresholds.note[0]


def test_interrupted_run_resumes_without_regating(files, templates, serial, tmp_path):
    parts = tmp_path / "parts"
    seen: list[str] = []

    def stop_after_three(path, error):
        seen.append(path)
        if len(seen) == 3:
            raise KeyboardInterrupt  # the user's Ctrl-C, between two files

    with pytest.raises(KeyboardInterrupt):
        gate_files(files, templates, parts=parts, progress=stop_after_three)
    done = sorted(parts.glob("*.populations.parquet"))
    assert len(done) == 3  # S0, S1, S2 gated and saved, then stopped
    for p in done:
        assert len(pd.read_parquet(p)) == sum(len(t.populations) for t in templates)
    again: list[str] = []
    batch = gate_files(files, templates, parts=parts, resume=True, progress=lambda p, e: again.append(p))
    assert sorted(again) == sorted(files[3:])  # S0, S1 and S2 were not gated again (a file failing in pass 1 reports first)
    assert batch.gated == [f for f in files if "broken" not in f]
    _same(batch, serial)
    with pytest.raises(ResumeError, match="other templates"):
        gate_files(files, templates[:1], parts=parts, resume=True)


def test_cli_run_killed_part_way_then_resumed(files, tmp_path):
    """A real ``immuneprofile gate`` process, SIGKILLed once some files are done, then ``--resume``d."""
    ok = [f for f in files if "broken" not in f] * 4  # 24 files: long enough to be killed part-way
    d = tmp_path / "in"
    d.mkdir()
    inputs = []
    for i, f in enumerate(ok):
        (d / f"F{i:02d}.fcs").symlink_to(f)
        inputs.append(str(d / f"F{i:02d}.fcs"))
    exe = [sys.executable, "-m", "immuneprofile.cli", "gate", "-t", "treg", "-t", "monocytes", "--no-anndata"]
    full = subprocess.run([*exe, *inputs, "-o", str(tmp_path / "full")], capture_output=True, text=True)
    assert full.returncode == 0, full.stderr

    out = tmp_path / "killed"
    proc = subprocess.Popen([*exe, *inputs, "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    parts = out / "parts"
    t0 = time.monotonic()
    while len(list(parts.glob("*.populations.parquet"))) < 2 and proc.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = {p: p.stat().st_mtime_ns for p in parts.glob("*.populations.parquet")}
    assert 2 <= len(done) < len(inputs), "the run was not killed part-way"
    assert not (out / "populations.csv").exists()
    for p in done:  # every finished file's tables are readable
        assert not pd.read_parquet(p).empty and pd.read_parquet(str(p).replace("populations", "thresholds")) is not None

    res = subprocess.run([*exe, *inputs, "-o", str(out), "--resume"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert {p: p.stat().st_mtime_ns for p in done} == done  # not gated again
    for name in ("populations.csv", "thresholds.csv"):
        pd.testing.assert_frame_equal(pd.read_csv(out / name), pd.read_csv(tmp_path / "full" / name))
    assert not list(out.rglob(".*.tmp"))


def test_cli_scheduler_option(files, serial, client, tmp_path):
    from click.testing import CliRunner

    from immuneprofile.cli import main

    args = ["gate", *(a for n in NAMES for a in ("-t", n)), *files, "-o", str(tmp_path), "--scheduler",
            client.scheduler.address]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1 and "6 file(s) gated, 1 failed" in r.output  # the broken file
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "populations.parquet"), serial.table)
    assert list(pd.read_csv(tmp_path / "errors.csv")["file"]) == [files[3]]


def test_study_on_dask_equals_serial(tmp_path, client):
    from immuneprofile.study.run import run_study

    info = simulate.simulate_study(tmp_path / "sim", n_events=3_000, weeks=(0, 4))
    sheet = tmp_path / "sim" / "samples.csv"
    a = run_study(sheet, tmp_path / "serial")
    b = run_study(sheet, tmp_path / "dask", scheduler=client)
    assert not a["errors"] and len(a["table"]) > 0
    pd.testing.assert_frame_equal(a["table"], b["table"])
    c = run_study(sheet, tmp_path / "dask", scheduler=client, resume=True)  # everything taken over from the parts
    pd.testing.assert_frame_equal(a["table"], c["table"])
    assert info is not None


def test_write_tables_is_atomic_and_describes_this_run(tmp_path):
    from immuneprofile.stats import write_tables

    table = pd.DataFrame({"sample_id": ["a"], "count": [1]})
    write_tables(tmp_path, table, table, {"x.fcs": "broken"})
    assert (tmp_path / "errors.csv").exists()
    files = write_tables(tmp_path, table, table, {})
    assert not (tmp_path / "errors.csv").exists()  # an earlier run's errors are not this run's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["populations.csv", "populations.parquet", "thresholds.csv"]
    assert set(files) == {"populations", "thresholds"}


def test_workers_can_unpickle_templates_first_and_small_files_skip_numba(files):
    """A Dask worker may unpickle a template before anything else is imported (a fresh interpreter);
    gating a small file does not load numba's compiled kernels (the NumPy twins serve)."""
    import pickle

    import immuneprofile as ip

    code = ("import pickle, sys; t = pickle.loads(sys.stdin.buffer.read()); import immuneprofile as ip; "
            "[getattr(ip, n) for n in ip.__all__]; "
            f"r = ip.gate_sample(ip.load_fcs({files[0]!r}), t); "
            "print(t.name, r.count('Treg') > 0, 'numba' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], input=pickle.dumps(ip.load_template("treg")),
                       capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    assert r.stdout.decode().split() == ["treg", "True", "False"]


def test_keep_data_false_frees_events_with_the_same_tables(files, templates, serial):
    batch = gate_files(files, templates, keep_data=False)
    _same(batch, serial)
    assert all(r.data is None for r in batch.results) and all(r.data is not None for r in serial.results)
