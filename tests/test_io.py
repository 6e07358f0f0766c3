"""FCS reading: every real instrument file loads with FlowKit's values, broken ones fail clearly."""

from __future__ import annotations

import warnings
from array import array
from pathlib import Path

import numpy as np
import pytest

from conftest import COMP_FCS, SHARED, flowkit_sample
from immuneprofile import FCSError, load_fcs
from immuneprofile.exceptions import FCSWarning, MarkerError

INSTRUMENTS = SHARED / "instruments"
ALL_FILES = sorted(p for p in INSTRUMENTS.rglob("*") if p.suffix.lower() in (".fcs", ".lmd"))
#: broken files and the (specific) problem their error must name
BROKEN = {
    "corrupted/corrupted.fcs": r"corrupted\.fcs: not an FCS file: HEADER starts b'oi21j0'",
    "cytek-nl-2000/sample_header.fcs": r"sample_header\.fcs: corrupt or truncated FCS file: its DATA segment "
                                       r"should span bytes 5912-2165911, but the file ends at byte 3931",
}
#: files FlowKit (FlowIO) cannot read at all; checked against other truths below
NOT_FLOWKIT = {"Cytek_xP5/Cytek_xP5.fcs", "GuavaMuse/Guava Muse.fcs", "fake_large_fcs/fake_large_fcs.fcs"}


def _rel(p: Path) -> str:
    return p.relative_to(INSTRUMENTS).as_posix()


def _flowkit_events(sample, spill_text: str | None) -> np.ndarray:
    """FlowKit's compensated events over the channels the file's own matrix names (raw where it has none)."""
    import flowkit as fk
    from flowutils.compensate import get_spill

    if not spill_text:
        return sample.get_events(source="raw")
    _, labels = get_spill(spill_text)
    detectors = [c for c in sample.pnn_labels if c in labels]
    return fk.Matrix(spill_text, detectors).apply(sample)


def test_the_instrument_zoo_is_there():
    assert len(ALL_FILES) == 17


@pytest.mark.parametrize("threads", [1, 2], ids=["serial", "threaded"])
@pytest.mark.parametrize("path", ALL_FILES, ids=_rel)
def test_every_instrument_file_loads_or_fails_specifically(path, threads, monkeypatch):
    """Serial, and on two threads in small blocks (every file, whatever its size): FlowKit's events."""
    from immuneprofile.io import reader

    if threads > 1:
        monkeypatch.setattr(reader, "_THREADS_FROM", 0)
        monkeypatch.setattr(reader, "_BLOCK_BYTES", 1 << 12)
    rel = _rel(path)
    if rel in BROKEN:
        with pytest.raises(FCSError, match=BROKEN[rel]):
            load_fcs(path, threads=threads)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FCSWarning)
        data = load_fcs(path, threads=threads)
    assert data.events.flags.f_contiguous and data.events.dtype == np.float64
    assert data.n_events == int(data.metadata["tot"]) > 0
    if rel in NOT_FLOWKIT:
        return
    sample = flowkit_sample(path)
    spill = data.metadata.get("spillover") or data.metadata.get("spill")
    if spill and data.compensation is None:  # a malformed keyword (Miltenyi: labels without values)
        assert len(spill.split(",")) == 1 + int(spill.split(",")[0])
        spill = None
    assert data.channels == sample.pnn_labels
    assert np.array_equal(data.events, _flowkit_events(sample, spill), equal_nan=True)


def test_large_file_convention_reads_the_offsets_in_text():
    """fake_large_fcs is the Fortessa file with blank HEADER offsets: the same events."""
    big = load_fcs(INSTRUMENTS / "fake_large_fcs" / "fake_large_fcs.fcs")
    ref = load_fcs(INSTRUMENTS / "Fortessa" / "FCS_3.0_Fortessa_PBS_Specimen_001_A1_A01.fcs")
    with open(big.path, "rb") as fh:
        assert fh.read(58)[26:42].strip() == b""  # HEADER DATA offsets blank
    assert big.channels == ref.channels and np.array_equal(big.events, ref.events)


def test_several_data_sets_first_with_a_note_or_the_one_asked():
    import flowio
    import flowkit as fk

    path = INSTRUMENTS / "GuavaMuse" / "Guava Muse.fcs"
    with pytest.warns(FCSWarning, match="holds 4 data sets"):
        first = load_fcs(path)
    sets = flowio.read_multiple_data_sets(str(path))
    assert first.dataset == 0 and "4 data sets" in first.notes[0]
    offset = 0
    for k, fd in enumerate(sets):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FCSWarning)  # naming the data set: no note
            d = load_fcs(path, dataset=k)
        truth = fk.Sample(flowio.FlowData(str(path), nextdata_offset=offset), subsample=0).get_events(source="raw")
        assert np.array_equal(d.events, truth) and d.n_events == fd.event_count
        offset += int(fd.text["nextdata"])
    with pytest.raises(FCSError, match="dataset=4 asked, but the file holds 4"):
        load_fcs(path, dataset=4)


def test_24_bit_integers_decoded_and_masked_like_the_standard():
    """Cytek xP5 stores 24-bit big-endian integers (FlowIO cannot): decode a few events by hand."""
    data = load_fcs(INSTRUMENTS / "Cytek_xP5" / "Cytek_xP5.fcs")
    md = data.metadata
    start, par = int(md["begindata"]), int(md["par"])
    with open(data.path, "rb") as fh:
        fh.seek(start)
        blob = fh.read(3 * par * 50)
    vals = np.array([int.from_bytes(blob[3 * k:3 * k + 3], "big") for k in range(par * 50)]).reshape(50, par)
    rng = np.array([int(md[f"p{n}r"]) for n in range(1, par + 1)])
    mask = np.array([(1 << (int(r) - 1).bit_length()) - 1 for r in rng])
    expect = (vals & mask).astype(float)
    for i in range(par):  # $PnE log amplification / $PnG, as FCS 3.0 defines them
        dec, log0 = (float(x) for x in md[f"p{i + 1}e"].split(","))
        if dec > 0:
            expect[:, i] = 10 ** (dec * expect[:, i] / rng[i]) * (log0 or 1.0)
        gain = float(md.get(f"p{i + 1}g", 1) or 1)
        if gain not in (0.0, 1.0) and data.channels[i].lower() != "time":
            expect[:, i] = expect[:, i] / gain
    expect[:, 0] *= float(md["timestep"])  # TIME in units of $TIMESTEP
    assert data.channels[0] == "TIME"
    assert np.allclose(data.events[:50], expect, rtol=1e-12)
    assert (data.events[:, data.channels.index("TIME")] >= 0).all()


def test_off_by_one_names_the_discrepancy():
    path = INSTRUMENTS / "MiltenyiBiotec" / "FCS3.1" / "EY_2013-07-19_PBS_FCS_3.1_Well_A1.001.fcs"
    with pytest.warns(FCSWarning, match=r"off by one byte: the DATA end offset 887605 is one byte past the data "
                                        r"\(760000 bytes = \$TOT 10000 x 76 bytes per event\)"):
        load_fcs(path)


def test_malformed_spillover_left_uncompensated_with_a_warning():
    path = INSTRUMENTS / "MiltenyiBiotec" / "FCS3.1" / "EY_2013-07-19_PBS_FCS_3.1_Well_A1.001.fcs"
    with pytest.warns(FCSWarning, match=r"\$SPILLOVER keyword: it names 6 detectors but holds 0 values"):
        d = load_fcs(path)
    assert d.compensation is None and d.compensated == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FCSWarning)
        with pytest.raises(FCSError, match="names 6 detectors but holds 0 values"):
            load_fcs(path, compensation="fcs")


# ------------------------------------------------- BD: $SPILLOVER naming only some channels


def _write(path: Path, channels, events, spill: str | None, markers=None, extra=None) -> Path:
    import flowio

    meta = {"$SPILLOVER": spill} if spill else {}
    meta.update(extra or {})
    buf = array("f")
    buf.frombytes(np.ascontiguousarray(events, dtype="<f4").tobytes())
    with open(path, "wb") as fh:
        flowio.create_fcs(fh, buf, channels, opt_channel_names=markers, metadata_dict=meta)
    return path


BD_CHANNELS = ["FSC-A", "FSC-H", "SSC-A", "FITC-A", "FITC-H", "PE-A", "PE-H", "APC-A", "APC-H", "Time"]


@pytest.fixture
def bd_events():
    rng = np.random.default_rng(7)
    ev = rng.lognormal(6, 1.5, size=(3000, len(BD_CHANNELS))).astype(np.float32)
    ev[:, -1] = np.arange(3000)
    return ev


@pytest.mark.parametrize("detectors", [["FITC-A", "PE-A", "APC-A"], ["PE-A", "FITC-A"]],
                         ids=["only -A", "only those in use"])
def test_spillover_naming_some_channels_compensates_those(tmp_path, bd_events, detectors):
    import flowkit as fk

    k = len(detectors)
    m = np.eye(k) + 0.07 * np.arange(1, k * k + 1).reshape(k, k) % 0.31 * (1 - np.eye(k))
    spill = ",".join([str(k), *detectors, *(repr(float(v)) for v in m.ravel())])
    path = _write(tmp_path / "bd.fcs", BD_CHANNELS, bd_events, spill)
    data = load_fcs(path)
    sample = flowkit_sample(path)
    assert data.compensation == "FCS"
    assert data.compensated == [c for c in BD_CHANNELS if c in detectors]  # file order
    truth = fk.Matrix(spill, data.compensated).apply(sample)
    assert np.array_equal(data.events, truth)
    raw = sample.get_events(source="raw")
    for j, c in enumerate(BD_CHANNELS):
        same = np.array_equal(data.events[:, j], raw[:, j])
        assert same == (c not in detectors), c


def test_spillover_naming_a_channel_the_file_lacks(tmp_path, bd_events):
    spill = "2,FITC-A,BV421-A,1,0.1,0.2,1"
    path = _write(tmp_path / "bd.fcs", BD_CHANNELS, bd_events, spill)
    with pytest.raises(FCSError, match=r"bd\.fcs: cannot compensate with its \$SPILLOVER keyword: it names "
                                       r"'BV421-A', not fluorescence channels of this file"):
        load_fcs(path, compensation="fcs")


def test_malformed_csv_matrix_is_named(tmp_path, bd_events):
    path = _write(tmp_path / "bd.fcs", BD_CHANNELS, bd_events, None)
    csv = tmp_path / "m.csv"
    csv.write_text("FITC-A,PE-A\n1,0.1\n0.2\n")
    with pytest.raises(FCSError, match=r"m\.csv.*needs 2 rows of 2 values after its header, found \[2, 1\]"):
        load_fcs(path, compensation=csv)
    csv.write_text("Foo,Bar\n1,0\n0,1\n")
    with pytest.raises(FCSError, match=r"m\.csv.*no header row naming channels of this file"):
        load_fcs(path, compensation=csv)


def test_csv_matrix_naming_some_channels(tmp_path, bd_events):
    import flowkit as fk

    path = _write(tmp_path / "bd.fcs", BD_CHANNELS, bd_events, None)
    csv = tmp_path / "m.csv"
    csv.write_text("PE-A,FITC-A\n1,0.2\n0.05,1\n")
    data = load_fcs(path, compensation=csv)
    assert data.compensated == ["FITC-A", "PE-A"] and data.compensation == "custom"
    truth = fk.Matrix(np.array([[1, 0.05], [0.2, 1]]), ["FITC-A", "PE-A"]).apply(flowkit_sample(path))
    assert np.array_equal(data.events, truth)


# ----------------------------------------------------------------- TEXT and DATA consistency


def _patch(path: Path, old: bytes, new: bytes) -> Path:
    blob = path.read_bytes()
    assert blob.count(old) == 1 and len(old) == len(new)
    path.write_bytes(blob.replace(old, new))
    return path


def test_corrupt_text_segment_missing_channels(tmp_path, bd_events):
    path = _write(tmp_path / "t.fcs", BD_CHANNELS, bd_events, None)
    _patch(path, b"$P7N", b"$X7N")
    with pytest.raises(FCSError, match=r"t\.fcs: \$PAR says 10 channels but the TEXT segment names 9 "
                                       r"\(missing \$P7N\)"):
        load_fcs(path)


def test_tot_contradicting_the_data(tmp_path, bd_events):
    path = _write(tmp_path / "t.fcs", BD_CHANNELS, bd_events, None)
    _patch(path, b"$TOT/3000/", b"$TOT/2999/")
    with pytest.raises(FCSError, match=r"t\.fcs: \$TOT says 2999 events .* but the DATA segment holds 120000 bytes"):
        load_fcs(path)


def test_zero_event_file(tmp_path):
    path = _write(tmp_path / "zero.fcs", BD_CHANNELS, np.zeros((0, len(BD_CHANNELS))), None)
    with pytest.raises(FCSError, match=r"zero\.fcs: \$TOT is 0: the file holds no events"):
        load_fcs(path)


def test_directory_is_not_a_file(tmp_path):
    with pytest.raises(FCSError, match="is a directory, not an FCS file"):
        load_fcs(tmp_path)


# ------------------------------------------------------------------------ marker labels


def test_semicolon_and_dump_channel_labels(tmp_path, bd_events):
    markers = ["", "", "", "CD21;FITC;B cells", "", "VIVID / CD14", "", "CD3 APC", "", ""]
    path = _write(tmp_path / "m.fcs", BD_CHANNELS, bd_events, None, markers=markers)
    d = load_fcs(path)
    assert d.channels[d.find_channel("CD21")] == "FITC-A"
    assert d.channels[d.find_channel("CD14")] == "PE-A"
    assert d.channels[d.find_channel("Vivid")] == "PE-A"
    assert d.channels[d.find_channel("LiveDead")] == "PE-A"  # Vivid is a viability dye
    assert d.channels[d.find_channel("CD3")] == "APC-A"
    with pytest.raises(MarkerError, match="'CD19'.*not in this file"):
        d.find_channel("CD19")


def test_compensation_in_blocks_is_flowkits_bit_for_bit():
    """Blocks of events solved separately give the whole-matrix solve's values (FlowUtils' arithmetic)."""
    from immuneprofile.io import fcs as fcsmod

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = load_fcs(COMP_FCS, compensation=SHARED / "fcs" / "comp_complete_example.csv")
    old = fcsmod._COMP_ROWS
    try:
        fcsmod._COMP_ROWS = 997  # many blocks, the last one short
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            blocks = load_fcs(COMP_FCS, compensation=SHARED / "fcs" / "comp_complete_example.csv")
    finally:
        fcsmod._COMP_ROWS = old
    assert np.array_equal(whole.events, blocks.events)
    assert np.array_equal(blocks.events, blocks.spill.apply(blocks.sample))


# ------------------------------------------------------------------------------ inspect


def test_inspect_reports_channels_compensation_and_template_needs(tmp_path, bd_events):
    import json

    from click.testing import CliRunner

    from immuneprofile.cli import main
    from immuneprofile.io import inspect_fcs

    markers = ["", "", "", "CD3", "", "CD4 PE", "", "CD25;APC", "", ""]
    spill = "2,FITC-A,PE-A,1,0.1,0.02,1"
    path = _write(tmp_path / "bd [1].fcs", BD_CHANNELS, bd_events, spill, markers=markers)
    info = inspect_fcs(path, ["treg"])
    loaded = load_fcs(path)
    assert info["events"] == loaded.n_events == 3000
    assert [c["channel"] for c in info["channels"]] == loaded.channels
    assert info["compensation"]["detectors"] == loaded.compensated == ["FITC-A", "PE-A"]
    assert [c["channel"] for c in info["channels"] if c["compensated"]] == ["FITC-A", "PE-A"]
    (treg,) = info["templates"]
    found = {m["marker"]: m["channel"] for m in treg["markers"]}
    assert found["CD3"] == "FITC-A" and found["CD4"] == "PE-A" and found["CD25"] == "APC-A"
    assert not treg["ready"] and set(treg["missing"]) == {"LiveDead", "CD127", "FoxP3"}
    r = CliRunner().invoke(main, ["inspect", "-t", "treg", "--json", str(path)])
    assert r.exit_code == 1  # a template's markers are missing
    assert json.loads(r.stdout)[0]["templates"][0]["missing"] == treg["missing"]
    r = CliRunner().invoke(main, ["inspect", str(path)])
    assert r.exit_code == 0 and "bd [1].fcs" in r.output and "compensation: $SPILLOVER over 2 channels" in r.output


def test_loading_does_not_import_flowkit_or_plotting():
    import subprocess
    import sys

    code = ("import sys, immuneprofile as ip; d = ip.load_fcs(sys.argv[1]); "
            "print(d.compensation, sorted(m for m in ('flowkit', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(COMP_FCS)], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["FCS", "[]"]


def test_malformed_numeric_keywords_are_named(tmp_path, bd_events):
    path = _write(tmp_path / "g.fcs", BD_CHANNELS, bd_events, None, extra={"$P4G": "1.5"})
    assert np.array_equal(load_fcs(path).events, flowkit_sample(path).get_events(source="raw"))  # gain applied
    for old, new, what in ((b"$P4G/1.5/", b"$P4G/1x5/", r"\$P4G is '1x5', not a number"),
                           (b"$P5E/0,0/", b"$P5E/0;0/", r"\$P5E is '0;0', expected 'decades,offset'")):
        bad = tmp_path / "bad.fcs"
        bad.write_bytes(path.read_bytes())
        _patch(bad, old, new)
        with pytest.raises(FCSError, match=r"bad\.fcs: TEXT keyword " + what):
            load_fcs(bad)


def test_text_only_read_has_no_events_to_require():
    from immuneprofile.io.reader import read_fcs

    head = read_fcs(COMP_FCS, only_text=True)
    assert head.events is None
    with pytest.raises(FCSError, match="test_comp_example.fcs: events not read"):
        head.require_events()
    full = read_fcs(COMP_FCS)
    assert full.require_events().shape == (int(full.text["tot"]), len(full.channels))
    assert full.require_events().shape[0] == flowkit_sample(COMP_FCS).event_count
