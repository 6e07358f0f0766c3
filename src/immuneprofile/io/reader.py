"""FCS HEADER, TEXT and DATA parsing with NumPy, FlowIO's values without its copies.

The raw events are exactly those of ``flowio.FlowData(...).as_array(preprocess=True)``
(and so of ``flowkit.Sample(...).get_events(source="raw")``): the same bit masks
(``$PnR`` rounded up to a power of two), the same float64 arithmetic for ``$TIMESTEP``,
``$PnE`` log amplification and ``$PnG`` gain. What differs is how they are read: the DATA
segment is read in blocks straight into a column-major float64 matrix (no Python lists,
no full-size temporary copy), and files FlowIO rejects but that are merely unusual are
read with a warning saying what was unusual:

- the FCS 3.0 large-file convention (HEADER offsets blank or 0, real ones in TEXT);
- several data sets in one file (``$NEXTDATA``; Guava Muse, Beckman Coulter ``.lmd``);
- a ``$ENDDATA`` one byte past the data (Miltenyi MACSQuant);
- 24-bit (or other whole-byte) integer channels (Cytek xP5).

Broken files fail with an :class:`~immuneprofile.exceptions.FCSError` naming the file,
the segment or keyword at fault and what it should have been.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field

import numpy as np

from immuneprofile.exceptions import FCSError, FCSWarning

__all__ = ["RawFCS", "read_fcs"]

_HEADER_FIELDS = ("text_start", "text_stop", "data_start", "data_stop", "analysis_start", "analysis_stop")
_BLOCK_BYTES = 1 << 20  # DATA is converted in blocks of 1 MB (cache-sized): peak memory stays near the matrix's


@dataclass
class RawFCS:
    """One data set of an FCS file: its TEXT keywords and pre-processed (uncompensated) events.

    Attributes
    ----------
    path
        The file.
    version
        FCS version from the HEADER (``"2.0"``, ``"3.0"``, ``"3.1"``).
    text
        TEXT keywords as FlowIO gives them (lower-case keys, ``$`` removed).
    channels, markers
        ``$PnN`` and ``$PnS`` (``""`` where absent), in parameter order.
    events
        float64, ``(n_events, n_channels)``, column-major; ``None`` when read with ``only_text``.
    data_type
        ``$DATATYPE`` (``"F"``, ``"D"`` or ``"I"``) and ``bits`` the ``$PnB`` widths.
    dataset, n_datasets
        Which data set this is (0-based) and how many the file holds.
    notes
        What was unusual about the file and how it was read (also issued as warnings).
    """

    path: str
    version: str
    text: dict[str, str]
    channels: list[str]
    markers: list[str]
    events: np.ndarray | None
    data_type: str
    bits: list[int]
    dataset: int = 0
    n_datasets: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def n_events(self) -> int:
        return int(self.text["tot"])

    def require_events(self) -> np.ndarray:
        """The events (an :class:`FCSError` when only HEADER and TEXT were read)."""
        if self.events is None:
            raise _fail(self.path, "events not read (only_text=True)")
        return self.events


def _fail(path: str, problem: str) -> FCSError:
    return FCSError(f"{path}: {problem}")


def _int_field(path: str, raw: bytes, what: str) -> int:
    s = raw.decode("ascii", "replace").strip()
    if not s:
        return 0  # FCS 3.x large-file convention: blank (or 0) offsets, the real ones are in TEXT
    if not s.isdigit():
        raise _fail(path, f"HEADER field {what} is {s!r}, not a byte offset: not a valid FCS file")
    return int(s)


def _read_header(fh, path: str, base: int, size: int) -> dict:
    fh.seek(base)
    head = fh.read(58)
    if not head.startswith(b"FCS"):
        where = "" if base == 0 else f" (data set at byte {base})"
        raise _fail(path, f"not an FCS file{where}: HEADER starts {head[:6]!r}, expected 'FCS2.0'/'FCS3.x'")
    if len(head) < 42:
        raise _fail(path, f"corrupt or truncated FCS file: it has {size} bytes, too few for an FCS HEADER (58)")
    header = {"version": head[3:6].decode("ascii", "replace")}
    for i, name in enumerate(_HEADER_FIELDS):
        header[name] = _int_field(path, head[10 + 8 * i: 18 + 8 * i], name) if 18 + 8 * i <= len(head) else 0
    return header


def _parse_text(path: str, raw: bytes) -> dict[str, str]:
    """TEXT keywords, parsed by FlowIO's own rules (so names and values are FlowKit's)."""
    from flowio import FlowData

    try:
        text = raw.decode()
    except UnicodeDecodeError:
        text = raw.decode("ISO-8859-1")
    if len(text) < 2:
        raise _fail(path, "the TEXT segment is empty")
    return FlowData._FlowData__parse_pairs(text)  # FlowIO's parser: the keywords FlowKit sees


def _keyword(path: str, text: dict[str, str], key: str, kind=int):
    if key not in text:
        raise _fail(path, f"required TEXT keyword ${key.upper()} is missing (corrupt TEXT segment?)")
    try:
        return kind(float(text[key].strip())) if kind is int else kind(text[key].strip())
    except ValueError:
        raise _fail(path, f"TEXT keyword ${key.upper()} is {text[key]!r}, not a number") from None


def _number(path: str, text: dict[str, str], key: str, default: float | None = None) -> float:
    """A numeric TEXT keyword (``default`` if absent or blank); an error naming it if not a number."""
    raw = text.get(key, "").strip()
    if not raw:
        if default is None:
            raise _fail(path, f"required TEXT keyword ${key.upper()} is missing (corrupt TEXT segment?)")
        return default
    try:
        return float(raw)
    except ValueError:
        raise _fail(path, f"TEXT keyword ${key.upper()} is {text[key]!r}, not a number") from None


def _channel_keys(path: str, text: dict[str, str]) -> int:
    """``$PAR``, checked against the ``$PnN`` keywords actually present."""
    par = _keyword(path, text, "par")
    found = {int(m.group(1)) for k in text if (m := re.fullmatch(r"p(\d+)n", k))}
    missing = [n for n in range(1, par + 1) if n not in found]
    if missing or par < 1:
        shown = ", ".join(f"$P{n}N" for n in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise _fail(
            path,
            f"$PAR says {par} channels but the TEXT segment names {len(found & set(range(1, par + 1)))} "
            f"(missing {shown or '$P1N'}): the TEXT segment is corrupt or truncated",
        )
    return par


def _datasets(fh, path: str, size: int) -> list[tuple[int, dict, dict[str, str]]]:
    """(offset, HEADER, TEXT) of every data set, following ``$NEXTDATA``."""
    sets, base, seen = [], 0, set()
    while True:
        header = _read_header(fh, path, base, size)
        t0, t1 = base + header["text_start"], base + header["text_stop"]
        if header["text_start"] < 58 or t1 >= size or t1 <= t0:
            raise _fail(
                path,
                f"HEADER gives the TEXT segment at bytes {header['text_start']}-{header['text_stop']}, "
                f"outside the file ({size} bytes): corrupt or truncated FCS file",
            )
        fh.seek(t0)
        text = _parse_text(path, fh.read(t1 - t0 + 1))
        sets.append((base, header, text))
        nxt = text.get("nextdata", "0").strip() or "0"
        step = int(nxt) if nxt.isdigit() else 0
        if step == 0 or base + step in seen or base + step >= size:
            return sets
        seen.add(base)
        base += step


def _data_offsets(path: str, header: dict, text: dict[str, str]) -> tuple[int, int, list[str]]:
    notes: list[str] = []
    h0, h1 = header["data_start"], header["data_stop"]
    if "begindata" not in text or "enddata" not in text:
        if h0 == 0 and h1 == 0:
            raise _fail(path, "HEADER DATA offsets are 0 and TEXT has no $BEGINDATA/$ENDDATA: no DATA segment")
        return h0, h1, notes
    t0, t1 = _keyword(path, text, "begindata"), _keyword(path, text, "enddata")
    if header["version"] == "2.0" and h0:
        return h0, h1, notes  # FCS 2.0: the HEADER is authoritative (as FlowIO reads it)
    if h0 and (h0, h1) != (t0, t1):
        notes.append(
            f"HEADER DATA offsets {h0}-{h1} differ from TEXT $BEGINDATA/$ENDDATA {t0}-{t1}; used TEXT's"
        )
    return t0, t1, notes


def _next_pow2(x: int) -> int:
    return 1 if x <= 0 else 1 << (x - 1).bit_length()


def _layout(path: str, text: dict[str, str], par: int) -> tuple[str, list[int], str]:
    dtype = text.get("datatype", "").strip().upper()
    if text.get("mode", "L").strip().upper() != "L":
        raise _fail(path, f"$MODE is {text['mode']!r}: only list-mode (L) data can be gated")
    if dtype not in ("F", "D", "I"):
        raise _fail(path, f"$DATATYPE is {dtype or 'missing'!r}: only F, D and I (binary) data are supported")
    bits = []
    for n in range(1, par + 1):
        b = text.get(f"p{n}b", "").strip()
        if not b.isdigit() or int(b) == 0 or int(b) % 8:
            raise _fail(path, f"$P{n}B is {b!r}: expected a whole number of bytes (8, 16, 24, 32 or 64 bits)")
        bits.append(int(b))
    byteord = text.get("byteord", "1,2,3,4").replace(" ", "")
    order = ">" if byteord in ("4,3,2,1", "2,1") else "<"
    if byteord not in ("1,2,3,4", "1,2", "4,3,2,1", "2,1"):
        warnings.warn(f"{path}: unusual $BYTEORD {byteord!r}; read as little-endian", FCSWarning, stacklevel=4)
    if dtype in ("F", "D"):
        want = 32 if dtype == "F" else 64
        if any(b != want for b in bits):
            raise _fail(path, f"$DATATYPE {dtype} needs $PnB={want} for every channel, found {sorted(set(bits))}")
    return dtype, bits, order


def _record_dtype(dtype: str, bits: list[int], order: str) -> np.dtype:
    """NumPy dtype of one event (one record of the DATA segment)."""
    if dtype in ("F", "D"):
        return np.dtype(f"{order}f{bits[0] // 8}")
    if len(set(bits)) == 1 and bits[0] in (8, 16, 32, 64):
        return np.dtype(f"{order}u{bits[0] // 8}")
    return np.dtype([(f"c{i}", "u1", (b // 8,)) for i, b in enumerate(bits)])


def _block_to_float(block: np.ndarray, dtype: str, bits: list[int], order: str, masks: list[int | None]):
    """One block of records -> (rows, par) array, integer channels masked to ``$PnR`` as FlowIO does."""
    if block.dtype.names is None:
        arr = block.reshape(-1, len(bits)) if block.ndim == 1 else block
        if dtype == "I" and any(m is not None for m in masks):
            arr = arr & np.array([m if m is not None else -1 for m in masks], dtype=np.int64).astype(arr.dtype)
        return arr
    cols = []
    for i, (b, m) in enumerate(zip(bits, masks)):
        raw = block[f"c{i}"].astype(np.uint64)
        weights = [8 * k for k in range(b // 8)]
        if order == ">":
            weights = weights[::-1]
        col = np.zeros(len(block), dtype=np.uint64)
        for k, w in enumerate(weights):
            col |= raw[:, k] << np.uint64(w)
        cols.append(col & np.uint64(m) if m is not None else col)
    return np.stack(cols, axis=1)


#: Values (events x channels) from which the DATA segment is converted on several threads.
_THREADS_FROM = 1 << 21


def _read_events(fh, path: str, start: int, n: int, rec: np.dtype, layout, prepare, threads: int = 0) -> np.ndarray:
    """Read ``n`` events block by block; ``prepare(block)`` finishes each float64 block in place.

    The DATA segment is memory-mapped and its blocks are independent (each is read,
    converted, prepared and written to its own rows), so from :data:`_THREADS_FROM`
    values they are spread over ``threads`` threads (``0``: all cores); NumPy and
    LAPACK release the GIL. The values do not depend on the number of threads.
    """
    dtype, bits, order, masks = layout
    par = len(bits)
    out = np.empty((n, par), dtype=np.float64, order="F")
    items_per_event = 1 if rec.names else par
    per_block = max(1, _BLOCK_BYTES // (rec.itemsize * items_per_event))
    try:
        data = np.memmap(fh, dtype=rec, mode="r", offset=start, shape=(n * items_per_event,))
    except ValueError:
        raise _fail(path, f"corrupt or truncated FCS file: the DATA segment is shorter than {n} events") from None

    def one(r0: int) -> None:
        rows = min(per_block, n - r0)
        block = data[r0 * items_per_event:(r0 + rows) * items_per_event]
        if rec.names is None:
            block = block.reshape(rows, par)
        values = np.array(_block_to_float(block, dtype, bits, order, masks), dtype=np.float64)
        prepare(values)
        out[r0:r0 + rows] = values

    threads = threads if threads > 0 else (os.cpu_count() or 1)
    starts = range(0, n, per_block)
    if threads > 1 and n * par >= _THREADS_FROM:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(one, starts))
    else:
        for r0 in starts:
            one(r0)
    return out


def _masks(path: str, text: dict[str, str], dtype: str, bits: list[int]) -> list[int | None]:
    """FlowIO's rule: integer values are masked to ``next_power_of_2($PnR) - 1`` when narrower than ``$PnB``."""
    if dtype != "I":
        return [None] * len(bits)
    masks: list[int | None] = []
    for n, b in enumerate(bits, start=1):
        rng = _next_pow2(int(_number(path, text, f"p{n}r")))
        masks.append(rng - 1 if 2 ** b > rng else None)
    return masks


def _check_size(path: str, text: dict[str, str], start: int, stop: int, size: int, event_bytes: int):
    """Number of events to read, and a note when ``$ENDDATA`` is one byte off."""
    tot = _keyword(path, text, "tot")
    if tot == 0:
        raise _fail(path, "$TOT is 0: the file holds no events")
    if stop >= size:
        raise _fail(
            path,
            f"corrupt or truncated FCS file: its DATA segment should span bytes {start}-{stop}, but the file "
            f"ends at byte {size} (a HEADER and TEXT without their events?)",
        )
    nbytes = stop - start + 1
    want = tot * event_bytes
    if nbytes == want:
        return tot, None
    if nbytes == want + 1:
        return tot, (f"the DATA offsets are off by one byte: the DATA end offset {stop} is one byte past the "
                     f"data ({want} bytes = $TOT {tot} x {event_bytes} bytes per event); read the {tot} events "
                     f"anyway. Review them before trusting it.")
    held = nbytes / event_bytes
    raise _fail(
        path,
        f"$TOT says {tot} events ({want} bytes) but the DATA segment holds {nbytes} bytes "
        f"({held:g} events of {event_bytes} bytes): $TOT or the DATA offsets are wrong",
    )


def _preprocessor(path: str, text: dict[str, str], channels: list[str]):
    """FlowIO's ``as_array(preprocess=True)`` as a function of a block of events (in place):
    ``$TIMESTEP`` on the time channel, ``$PnE`` log decades, ``$PnG`` gain, in FlowIO's order and arithmetic."""
    time_index = next((i for i, c in enumerate(channels) if c.lower() == "time"), None)
    step = _number(path, text, "timestep", 1.0) if time_index is not None and "timestep" in text else None
    ops = []
    for i in range(len(channels)):
        n = i + 1
        pne = text.get(f"p{n}e", "0,0").split(",")
        if len(pne) != 2:
            raise _fail(path, f"TEXT keyword $P{n}E is {text[f'p{n}e']!r}, expected 'decades,offset'")
        decades, log0 = (_number(path, {f"p{n}e": v}, f"p{n}e") for v in pne)
        if log0 == 0 and decades != 0:
            log0 = 1.0
        gain = _number(path, text, f"p{n}g", 1.0) if i != time_index else 1.0
        rng = _number(path, text, f"p{n}r") if decades > 0 else 0.0
        if decades > 0 or (gain != 1.0 and gain != 0):
            ops.append((i, decades, log0, rng, gain))

    def prepare(block: np.ndarray) -> None:
        if step is not None:
            block[:, time_index] = block[:, time_index] * step
        for i, decades, log0, rng, gain in ops:
            if decades > 0:
                block[:, i] = (10 ** (decades * block[:, i] / rng)) * log0
            if gain != 1.0 and gain != 0:
                block[:, i] = block[:, i] / gain

    return prepare


def _chain(first, then):
    def both(block: np.ndarray) -> None:
        first(block)
        then(block)

    return both


def _pick_dataset(path: str, sets: list, dataset: int | None) -> tuple[int, list[str]]:
    notes = []
    if dataset is None:
        dataset = 0
        if len(sets) > 1:
            notes.append(
                f"the file holds {len(sets)} data sets ($NEXTDATA); loaded the first. "
                f"pass dataset=1..{len(sets) - 1} to load_fcs (or --dataset to inspect) for another"
            )
    if not 0 <= dataset < len(sets):
        raise _fail(path, f"dataset={dataset} asked, but the file holds {len(sets)} data set(s) (0-based)")
    return dataset, notes


def read_fcs(
    path: str | os.PathLike,
    dataset: int | None = None,
    *,
    only_text: bool = False,
    finish=None,
    threads: int = 0,
) -> RawFCS:
    """Read one data set of an FCS file (events pre-processed exactly as FlowIO does).

    Parameters
    ----------
    path
        FCS 2.0/3.0/3.1 file (also Beckman Coulter ``.lmd``).
    dataset
        Which data set of a multi-data-set file (0-based). ``None``: the first, with a
        warning when there are more.
    only_text
        Parse HEADER and TEXT only (``events`` is ``None``).
    finish
        ``finish(text, channels)`` may return a function that completes each block of
        pre-processed events in place (``load_fcs`` compensates there, while the block is
        in cache), or ``None``.
    threads
        Threads converting the DATA segment of a large file (``0``: all cores; ``1``:
        none). The events do not depend on it.

    Raises
    ------
    FCSError
        Missing, empty, not FCS, truncated or inconsistent file; the message names the field.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise _fail(path, "is a directory, not an FCS file")
    if not os.path.exists(path):
        raise _fail(path, "no such file")
    size = os.path.getsize(path)
    if size == 0:
        raise _fail(path, "file is empty, not an FCS file")
    with open(path, "rb") as fh:
        sets = _datasets(fh, path, size)
        index, notes = _pick_dataset(path, sets, dataset)
        base, header, text = sets[index]
        par = _channel_keys(path, text)
        channels = [text[f"p{n}n"] for n in range(1, par + 1)]
        markers = [text.get(f"p{n}s", "") for n in range(1, par + 1)]
        dtype, bits, order = _layout(path, text, par)
        events = None
        start, stop, off_notes = _data_offsets(path, header, text)
        notes += off_notes
        n, note = _check_size(path, text, base + start, base + stop, size, sum(bits) // 8)
        if note:
            notes.append(note)
        if not only_text:
            rec = _record_dtype(dtype, bits, order)
            prepare = _preprocessor(path, text, channels)
            done = finish(text, channels) if finish is not None else None
            if done is not None:
                prepare = _chain(prepare, done)
            events = _read_events(fh, path, base + start, n, rec, (dtype, bits, order, _masks(path, text, dtype, bits)),
                                  prepare, threads)
    for note in notes:
        warnings.warn(f"{path}: {note}", FCSWarning, stacklevel=3)
    return RawFCS(path, header["version"], text, channels, markers, events, dtype, bits, index, len(sets), notes)
