"""A batch reads each file once: the batch fits (pass 1) and gating (pass 2) share the loaded samples.

The truth is the re-reading path (``cache_bytes=0``: every pass, every round
reads the files again, as before): its tables, thresholds and memberships must
be identical; the loader is spied on to count the reads.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from immuneprofile import gate_files, load_template, parse_template
from immuneprofile.study import simulate

# a batch-fitted singlet band (fit2d.fit_batch: one visit per item), then two rounds of batch thresholds
# (CD4's is fitted on CD3+, gated with CD3's batch threshold)
DOC = {
    "name": "pooled_everything",
    "transforms": {"default": "logicle", "scatter": "none"},
    "thresholds": {"CD3": {"pos": {"method": "valley", "scope": "batch", "fallback": 0.5}},
                   "CD4": {"pos": {"method": "quantile", "q": 0.4, "scope": "batch"}}},
    "populations": [
        {"name": "lymphocytes", "gate": {"type": "cluster", "x": "FSC-A", "y": "SSC-A", "target": [0.4, 0.3],
                                         "components": 5, "q": 0.99}},
        {"name": "singlets", "parent": "lymphocytes", "gate": {"type": "singlet", "k": 4, "scope": "batch"}},
        {"name": "CD3+", "parent": "singlets", "gate": {"type": "threshold", "markers": {"CD3": "+"}}},
        {"name": "CD4+", "parent": "CD3+", "gate": {"type": "threshold", "markers": {"CD4": "+"}}},
    ],
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Four simulated full-panel files (different seeds and sizes) and one broken file."""
    d = tmp_path_factory.mktemp("read_once")
    paths = [str(simulate.write_fcs(d / f"R{i}.fcs", simulate.simulate_sample("full", 6_000 + 1_500 * i, rng=300 + i)))
             for i in range(4)]
    bad = d / "broken.fcs"
    bad.write_bytes(Path(paths[0]).read_bytes()[:2_000])
    return paths[:2] + [str(bad)] + paths[2:]


@pytest.fixture(scope="module")
def templates():
    return [parse_template(DOC), *(load_template(n) for n in ("tcell_skin_homing", "treg", "monocytes"))]


@pytest.fixture
def reads(monkeypatch):
    """``Counter`` of the files read by the loader during the test."""
    fcs = sys.modules["immuneprofile.io.fcs"]
    real, seen = fcs.load_fcs, Counter()

    def spy(path, *args, **kwargs):
        seen[str(path)] += 1
        return real(path, *args, **kwargs)

    monkeypatch.setattr(fcs, "load_fcs", spy)
    return seen


def _same(a, b) -> None:
    pd.testing.assert_frame_equal(a.table, b.table)
    pd.testing.assert_frame_equal(a.thresholds, b.thresholds)
    assert a.errors == b.errors and a.gated == b.gated
    assert len(a.results) == len(b.results)
    for ra, rb in zip(a.results, b.results):
        assert ra.counts == rb.counts and ra.bits.keys() == rb.bits.keys()
        for k in ra.bits:
            assert np.array_equal(ra.bits[k], rb.bits[k]), k


@pytest.fixture(scope="module")
def reread(files, templates):
    """The truth: every pass and round reads the files again."""
    return gate_files(files, templates, cache_bytes=0)


def test_rereading_path_reads_every_file_in_every_pass(files, templates, reads):
    """The spy sees what it should: without a budget, pass 1 reads each file once per batch item and round."""
    gate_files(files, templates, cache_bytes=0, keep_data=False)
    ok = [f for f in files if "broken" not in f]
    # the singlet band, 2 threshold rounds of the first template, one of tcell_skin_homing's, the gating pass
    assert all(reads[f] == 5 for f in ok), reads


def test_each_file_read_once_under_the_budget(files, templates, reread, reads):
    batch = gate_files(files, templates)  # default budget: a quarter of the available memory
    _same(batch, reread)
    assert list(batch.errors) == [files[2]] and "broken.fcs" in batch.errors[files[2]]
    ok = [f for f in files if "broken" not in f]
    assert all(reads[f] == 1 for f in ok), reads
    assert not batch.table.empty and batch.thresholds.note.str.contains("pooled over 4").any()


def test_a_small_budget_keeps_what_fits_and_rereads_the_rest(files, templates, reread, reads):
    from immuneprofile.io.fcs import load_fcs

    one = load_fcs(files[0]).events.nbytes  # the smallest file: only it fits
    reads.clear()
    batch = gate_files(files, templates, cache_bytes=one, keep_data=False)
    pd.testing.assert_frame_equal(batch.table, reread.table)
    pd.testing.assert_frame_equal(batch.thresholds, reread.thresholds)
    assert reads[files[0]] == 1 and all(reads[f] > 1 for f in files[3:]), reads


def test_one_template_without_batch_fits_reads_once(files, reads):
    batch = gate_files(files, load_template("treg"), cache_bytes=0)
    assert len(batch.gated) == 4 and all(reads[f] == 1 for f in batch.gated), reads


def test_load_warnings_shown_when_each_file_is_gated(files, tmp_path):
    """A kept file's load warnings come out when it is gated, as when it is read again."""
    import warnings

    from immuneprofile.exceptions import ImmuneProfileWarning

    bad_spill = []
    for i in range(2):  # a $SPILLOVER naming no channel of the file: loaded uncompensated, with a warning
        p = tmp_path / f"W{i}.fcs"
        simulate.write_fcs(p, simulate.simulate_sample("full", 4_000, rng=50 + i),
                           metadata={"$SPILLOVER": "2,NOPE1,NOPE2,1,0,0,1"})
        bad_spill.append(str(p))
    out = {}
    for budget in (0, None):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            b = gate_files(bad_spill + files[:1], load_template("tcell_skin_homing"), cache_bytes=budget)
        assert not b.errors
        out[budget] = sorted(str(w.message) for w in caught if issubclass(w.category, ImmuneProfileWarning))
    assert out[0] == out[None]
    assert [sum("$SPILLOVER" in m and p in m for m in out[None]) for p in bad_spill] == [1, 1]


def test_study_batches_by_patient_read_each_file_once(tmp_path, reads):
    from immuneprofile.study.run import run_study

    simulate.simulate_study(tmp_path / "sim", n_events=3_000, weeks=(0, 4))
    sheet = tmp_path / "sim" / "samples.csv"
    res = run_study(sheet, tmp_path / "out", batch_by="patient")
    assert not res["errors"] and len(res["table"]) > 0
    listed = pd.read_csv(sheet)["file"]
    assert len(reads) == len(listed) and set(reads.values()) == {1}, reads


def test_each_2d_gate_fitted_once_per_file(files, monkeypatch):
    """Pass 2 reuses the gates pass 1 fitted on a kept sample, and templates share identical gates even when
    given different batch thresholds (tcell_skin_homing's CLA/CD103 cuts are not above its lymphocyte gates)."""
    from immuneprofile.engine import fit2d

    real, calls = fit2d._fit_gate, Counter()

    def spy(pop, *args, **kwargs):
        calls[pop.name] += 1
        return real(pop, *args, **kwargs)

    monkeypatch.setattr(fit2d, "_fit_gate", spy)
    shipped = [load_template(n) for n in ("tcell_skin_homing", "treg", "monocytes")]
    once = gate_files(files, shipped, keep_data=False)
    n = len(once.gated)
    # tcell_skin_homing and treg define the same lymphocytes and singlets gates; monocytes its own singlets
    assert n == 4 and calls == Counter({"lymphocytes": n, "singlets": 2 * n}), calls
    calls.clear()
    again = gate_files(files, shipped, keep_data=False, cache_bytes=0)
    assert calls["lymphocytes"] == 2 * n  # pass 1 (tcell_skin_homing's CD4 memory cells), then pass 2
    pd.testing.assert_frame_equal(once.table, again.table)
    pd.testing.assert_frame_equal(once.thresholds, again.thresholds)


def test_dask_workers_keep_what_they_read_for_gating(files, reread):
    """On Dask, a file's gating task goes to the worker that read it for the batch fits, which kept it:
    one read per file over all workers; the same tables as the re-reading path; nothing left on the workers."""
    from distributed import Client, LocalCluster

    def spy_on_loader():
        from collections import Counter

        import immuneprofile.io.fcs as fcs

        if not hasattr(fcs, "_test_reads"):
            real, fcs._test_reads = fcs.load_fcs, Counter()

            def spy(path, *args, **kwargs):
                fcs._test_reads[str(path)] += 1
                return real(path, *args, **kwargs)

            fcs.load_fcs = spy
        fcs._test_reads.clear()

    def worker_state():
        import immuneprofile.batch as b
        import immuneprofile.io.fcs as fcs

        return dict(fcs._test_reads), len(b._WORKER_READS)

    ok = [f for f in files if "broken" not in f]
    skin = load_template("tcell_skin_homing")  # scope: batch CLA and CD103 cuts: a pass 1 on the workers
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, memory_limit="1GiB",
                      dashboard_address=None) as cluster, Client(cluster) as client:
        client.run(spy_on_loader)
        batch = gate_files(ok, skin, scheduler=client)
        state = client.run(worker_state)
        client.run(spy_on_loader)
        again = gate_files(ok, skin, scheduler=client, cache_bytes=0)
        state0 = client.run(worker_state)
        # a worker's budget is a quarter of its memory limit, known once a task runs (not when its
        # arguments are unpickled, outside any task)
        from immuneprofile.batch import _drop_worker_reads, _Reads

        budget = client.submit(lambda r, p: (r.load(p), r.budget)[1], _Reads("auto", None, "t-budget"), ok[0],
                               pure=False).result()
        client.run(_drop_worker_reads, "t-budget")
    assert budget == 2**30 // 4
    total = sum((Counter(r) for r, _ in state.values()), Counter())
    assert total == Counter(dict.fromkeys(ok, 1)), state
    assert all(n == 0 for _, n in state.values())  # released at the end of the batch
    assert sum((Counter(r) for r, _ in state0.values()), Counter()) == Counter(dict.fromkeys(ok, 2))
    truth = gate_files(ok, skin, cache_bytes=0)
    for b in (batch, again):
        pd.testing.assert_frame_equal(b.table, truth.table)
        pd.testing.assert_frame_equal(b.thresholds, truth.thresholds)
