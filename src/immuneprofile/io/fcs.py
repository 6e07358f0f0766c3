"""Loading FCS files: compensation, marker-to-channel mapping.

The loader keeps FlowKit's own arithmetic (FlowIO's TEXT parsing and pre-processing,
FlowUtils' compensation solve) so that every downstream number is the number FlowKit
itself would compute, but reads the DATA segment with NumPy (:mod:`immuneprofile.io.reader`)
and compensates in place, so loading costs little more than reading the file. FlowKit
itself is imported only when a :class:`flowkit.Sample` or ``Matrix`` is asked for.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from immuneprofile.exceptions import FCSError, FCSWarning, MarkerError

__all__ = [
    "FCSError",
    "MarkerError",
    "FCSData",
    "compensate_inplace",
    "fluoro_indices",
    "load_fcs",
    "normalize_marker",
    "MARKER_ALIASES",
]


#: Case-insensitive alias groups: every spelling in a group names the same marker.
#: Keys and members are normalised with :func:`normalize_marker`.
MARKER_ALIASES: dict[str, set[str]] = {
    "livedead": {
        "livedead", "ld", "live", "dead", "viability", "viabilitydye", "fvs",
        "zombie", "zombieaqua", "aqua", "7aad", "dapi", "pi", "sytox", "lda",
        "livedeadaqua", "fixableviability", "vivid",
    },
    "foxp3": {"foxp3", "fox3"},
    "hladr": {"hladr", "hla", "dr"},
    "cd45ra": {"cd45ra", "45ra"},
    "cla": {"cla", "cutaneouslymphocyteantigen"},
    "cd127": {"cd127", "il7ra"},
    "cd25": {"cd25", "il2ra"},
}

_SPLIT = re.compile(r"[\s_]+")


def normalize_marker(label: str) -> str:
    """Lower-case a marker or channel label and drop everything but letters and digits.

    >>> normalize_marker("HLA-DR")
    'hladr'
    """
    return re.sub(r"[^0-9a-z]", "", str(label).lower())


def _alias_group(norm: str) -> set[str]:
    for key, group in MARKER_ALIASES.items():
        if norm == key or norm in group:
            return group | {key}
    return {norm}


@dataclass
class FCSData:
    """One loaded FCS file: compensated events plus channel and marker names.

    Attributes
    ----------
    path
        File the events came from.
    sample_id
        Sample identifier (the file stem unless given).
    channels
        ``$PnN`` channel names, in file order.
    markers
        ``$PnS`` labels (empty string where the file has none).
    events
        Compensated (untransformed) events, float64, shape ``(n_events, n_channels)``,
        column-major (Fortran order), exactly as FlowKit computes them.
    compensation
        ``"FCS"`` when the file's own spillover was applied, ``"custom"`` for a
        user-given matrix, ``None`` when uncompensated.
    spill_matrix
        The spillover matrix applied (rows and columns in the order of ``compensated``), or ``None``.
    compensated
        The channels (``$PnN``) the matrix named and that were compensated; every other
        channel holds its raw (pre-processed) values.
    scatter
        Indices of scatter and time channels (never compensated or transformed by default).
    metadata
        FCS TEXT keywords (lower-case keys, as FlowKit gives them).
    dataset
        Which data set of the file (0-based; files with several data sets).
    notes
        What was unusual about the file and how it was read (also issued as warnings).
    """

    path: str
    sample_id: str
    channels: list[str]
    markers: list[str]
    events: np.ndarray
    compensation: str | None
    spill_matrix: np.ndarray | None
    compensated: list[str]
    scatter: list[int]
    metadata: dict[str, str]
    dataset: int = 0
    notes: list[str] = field(default_factory=list)
    _columns: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _found: dict[str, int] = field(default_factory=dict, repr=False)  # find_channel's answers
    _cache: dict[str, Any] = field(default_factory=dict, repr=False)  # FlowKit objects, made on demand

    @property
    def spill(self) -> Any:
        """The applied matrix as a :class:`flowkit.Matrix` (``None`` when uncompensated)."""
        if self.spill_matrix is None:
            return None
        if "spill" not in self._cache:
            from flowkit import Matrix

            fluoro = [self.markers[self.channels.index(d)] for d in self.compensated]
            self._cache["spill"] = Matrix(self.spill_matrix, list(self.compensated), fluoro)
        return self._cache["spill"]

    @property
    def sample(self) -> Any:
        """The file read by FlowKit (:class:`flowkit.Sample`, made on first use).

        Raises
        ------
        FCSError
            FlowKit cannot read this file (e.g. the large-file offset convention).
        """
        if "sample" not in self._cache:
            self._cache["sample"] = _flowkit_sample(self.path, self.sample_id, self.dataset)
        return self._cache["sample"]

    def raw_events(self) -> np.ndarray:
        """The uncompensated (pre-processed) events, read again from the file, column-major."""
        from immuneprofile.io.reader import read_fcs

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FCSWarning)  # said once, when the file was loaded
            return read_fcs(self.path, self.dataset).require_events()

    @property
    def n_events(self) -> int:
        return int(self.events.shape[0])

    def column(self, index: int) -> np.ndarray:
        """One compensated channel as a contiguous array (a view of the column-major matrix)."""
        if self.events.flags.f_contiguous:
            return self.events[:, index]
        col = self._columns.get(index)
        if col is None:
            col = np.ascontiguousarray(self.events[:, index])
            self._columns[index] = col
        return col

    def marker_label(self, index: int) -> str:
        """Human-readable label of a channel: its marker if it has one, else its channel name."""
        m = self.markers[index]
        return m if m and m != self.channels[index] else self.channels[index]

    def find_channel(self, name: str, *, context: str = "") -> int:
        """Index of the channel carrying marker (or channel) ``name``.

        Matching, in order: exact ``$PnN``; ``$PnS`` equal to the name; first word
        of ``$PnS`` (``"CD4 BV605"`` -> ``CD4``); the alias table
        :data:`MARKER_ALIASES`. All comparisons ignore case and punctuation.

        Raises
        ------
        MarkerError
            If no channel, or more than one, matches. The message names the file,
            the marker, ``context`` (e.g. template and population) and what the file offers.
        """
        found = self._found.get(name)
        if found is None:
            found = self._found[name] = self._find_channel(name, context)
        return found

    def _find_channel(self, name: str, context: str) -> int:
        norm = normalize_marker(name)
        pnn = [normalize_marker(c) for c in self.channels]
        if norm in pnn:
            return pnn.index(norm)
        parts = [_label_parts(m) for m in self.markers]
        hits: list[int] = []
        for stage in (_same_label, _label_prefix, _alias):
            hits = [i for i in stage(name, self.markers, parts) if stage is not _alias or i not in self.scatter]
            if hits:
                break
        if len(hits) == 1:
            return hits[0]
        raise self._marker_error(name, context, hits)

    def _marker_error(self, name: str, context: str, hits: list[int]) -> MarkerError:
        where = f" ({context})" if context else ""
        if hits:
            return MarkerError(
                f"{self.path}: marker {name!r}{where} is ambiguous: channels "
                f"{', '.join(self.channels[i] for i in hits)} all match. Name the channel ($PnN) instead."
            )
        offered = ", ".join(
            f"{c}={m!r}" if m and m != c else c for c, m in zip(self.channels, self.markers)
        )
        return MarkerError(
            f"{self.path}: marker {name!r}{where} is not in this file. "
            f"Channels ($PnN=$PnS): {offered}. Fix the template's marker name, "
            f"or add a spelling to immuneprofile.io.MARKER_ALIASES."
        )


def _label_parts(label: str) -> list[list[str]]:
    """Normalised words of each part of a ``$PnS`` label.

    The whole label is the first part; then, if it has several, its parts separated by ``;`` (``"CD21;FITC;..."``) or ``/`` (dump channels such as
    ``"VIVID / CD14"``); words by spaces or underscores (``"CD4 BV605"``).
    """
    parts = [p.strip() for p in re.split(r"[;/]", label or "")]
    parts = [label.strip()] + (parts if len(parts) > 1 else [])  # the whole label ("L/D Aqua") first
    return [[normalize_marker(w) for w in _SPLIT.split(p)] for p in parts if p]


def _same_label(name: str, markers: list[str], parts: list[list[list[str]]]) -> list[int]:
    """Channels whose whole ``$PnS`` equals ``name``."""
    norm = normalize_marker(name)
    return [i for i, m in enumerate(markers) if m and normalize_marker(m) == norm]


def _label_prefix(name: str, markers: list[str], parts: list[list[list[str]]]) -> list[int]:
    """Channels a part of whose label starts with the name's words (``"CD4"`` ~ ``"CD4 BV605"``)."""
    nw = [normalize_marker(w) for w in _SPLIT.split(name.strip())]
    return [i for i, ps in enumerate(parts) if any(p[:len(nw)] == nw for p in ps)]


def _alias(name: str, markers: list[str], parts: list[list[list[str]]]) -> list[int]:
    """Channels whose label (or a part's first word) is an alias of the name (:data:`MARKER_ALIASES`)."""
    group = _alias_group(normalize_marker(name))
    full = [normalize_marker(m) for m in markers]
    return [i for i, ps in enumerate(parts)
            if (full[i] and full[i] in group) or any(p and (p[0] in group or "".join(p) in group) for p in ps)]


def _flowkit_sample(path: str, sample_id: str, dataset: int) -> Any:
    """``flowkit.Sample`` of one data set of a file, read as leniently as FlowIO allows."""
    import flowio
    import flowkit as fk

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            offset = 0
            if dataset:
                offset = sum(int(fd.text["nextdata"]) for fd in flowio.read_multiple_data_sets(
                    path, ignore_offset_error=True, only_text=True)[:dataset])
            fd = flowio.FlowData(path, ignore_offset_error=True, ignore_offset_discrepancy=True,
                                 nextdata_offset=offset)
            return fk.Sample(fd, sample_id=sample_id, subsample=0)
    except Exception as exc:  # FlowIO raises many kinds for unusual input
        raise FCSError(f"{path}: FlowKit cannot read this file ({type(exc).__name__}: {exc})") from exc


def fluoro_indices(channels: list[str]) -> list[int]:
    """FlowIO's fluorescence channels: every channel not named ``FSC-*``, ``SSC-*`` or ``Time``."""
    return [i for i, c in enumerate(channels) if c.lower()[:4] not in ("fsc-", "ssc-", "time")]


def _scatter(channels: list[str]) -> list[int]:
    """Scatter and time channels (never compensated or transformed by default)."""
    return [i for i, c in enumerate(channels) if c.lower()[:4] in ("fsc-", "ssc-") or c.lower() == "time"]


def _spill_keyword(metadata: dict[str, str]) -> str | None:
    for key in ("spillover", "spill", "$spillover", "$spill"):
        if metadata.get(key, "").strip():
            return metadata[key]
    return None


@dataclass
class _Spill:
    """A spillover matrix and the channels (detectors) it names, in file order."""

    matrix: np.ndarray
    detectors: list[str]


def _in_file_order(matrix: np.ndarray, labels: list[str], channels: list[str]) -> _Spill:
    """Check a matrix's labels against the file and reorder it to file order (FlowUtils' order)."""
    fluoro = {channels[i] for i in fluoro_indices(channels)}
    unknown = [lab for lab in labels if lab not in fluoro]
    if unknown:
        raise ValueError(
            f"it names {', '.join(map(repr, unknown))}, not fluorescence channels of this file "
            f"(its channels: {', '.join(channels)})"
        )
    if len(set(labels)) != len(labels):
        raise ValueError(f"it names a detector twice: {labels}")
    if matrix.shape != (len(labels), len(labels)):
        raise ValueError(f"it is {matrix.shape[0]}x{matrix.shape[1]} for {len(labels)} detectors")
    order = sorted(range(len(labels)), key=lambda k: channels.index(labels[k]))
    return _Spill(np.ascontiguousarray(matrix[np.ix_(order, order)]), [labels[k] for k in order])


def _spill_from_text(text: str, channels: list[str]) -> _Spill:
    """A ``$SPILLOVER`` value (``n,label1..n,values``), parsed as FlowUtils does."""
    parts = text.split(",")
    head = parts[0].strip()
    if not head.isdigit() or int(head) == 0:
        raise ValueError(f"it does not start with the number of detectors: {text[:60]!r}")
    n = int(head)
    if len(parts) != 1 + n + n * n:
        raise ValueError(
            f"it names {n} detectors but holds {max(0, len(parts) - 1 - n)} values "
            f"(expected {n * n})"
        )
    labels = [p.strip().replace("\n", "") for p in parts[1:n + 1]]
    try:
        values = np.reshape([float(v.strip().replace("\n", "")) for v in parts[n + 1:]], (n, n))
    except ValueError as exc:
        raise ValueError(f"it holds a value that is not a number ({exc})") from None
    return _in_file_order(values, labels, channels)


def _spill_from_csv(csv: str, channels: list[str]) -> _Spill:
    """A CSV/TSV matrix file: a header row of detector names (optionally after ``#``), then the rows."""
    try:
        with open(csv) as fh:
            lines = [ln.strip() for ln in fh.read().splitlines() if ln.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read it: {exc}") from None
    if len(lines) == 1:
        return _spill_from_text(lines[0], channels)
    for i, line in enumerate(lines):
        labels = [v.strip() for v in re.split("[\t,]", re.sub(r"^#\s*", "", line))]
        if labels and all(lab in channels for lab in labels):
            return _in_file_order(_csv_rows(lines[i + 1:i + 1 + len(labels)], len(labels)), labels, channels)
    raise ValueError(
        f"it has no header row naming channels of this file "
        f"(expected a row like {','.join(channels[i] for i in fluoro_indices(channels))})"
    )


def _csv_rows(rows: list[str], n: int) -> np.ndarray:
    try:
        values = [[float(v) for v in re.split("[\t,]", r)] for r in rows]
    except ValueError as exc:
        raise ValueError(f"a value is not a number ({exc})") from None
    if len(rows) < n or any(len(v) != n for v in values):
        raise ValueError(f"it needs {n} rows of {n} values after its header, found {[len(v) for v in values]}")
    return np.array(values)


def _spill_from_frame(frame: pd.DataFrame, channels: list[str]) -> _Spill:
    labels = [str(c) for c in frame.columns]
    try:
        values = frame.to_numpy(dtype=float)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"it holds a value that is not a number ({exc})") from None
    if list(map(str, frame.index)) != labels and set(map(str, frame.index)) == set(labels):
        values = frame.loc[frame.columns, :].to_numpy(dtype=float)
    return _in_file_order(values, labels, channels)


def _spill_from_array(array: np.ndarray, channels: list[str]) -> _Spill:
    fluoro = [channels[i] for i in fluoro_indices(channels)]
    array = np.asarray(array, dtype=float)
    if array.shape != (len(fluoro), len(fluoro)):
        raise ValueError(
            f"it is {'x'.join(map(str, array.shape))}; this file has "
            f"{len(fluoro)} fluorescence channels ({', '.join(fluoro)}): pass a DataFrame naming the detectors"
        )
    return _Spill(array, fluoro)


def _resolve_spill(path: str, compensation: Any, channels: list[str], text: dict[str, str]):
    """(spillover, mode) for ``load_fcs``'s ``compensation`` argument."""
    if compensation is None or (isinstance(compensation, str) and compensation.lower() == "none"):
        return None, None
    if isinstance(compensation, str) and compensation.lower() in ("auto", "fcs"):
        spill_text = _spill_keyword(text)
        if spill_text is None:
            if compensation.lower() == "fcs":
                raise FCSError(f"{path}: compensation='fcs' but the file has no $SPILLOVER/$SPILL keyword")
            return None, None
        try:
            return _spill_from_text(spill_text, channels), "FCS"
        except ValueError as exc:
            if compensation.lower() == "fcs":
                raise FCSError(f"{path}: cannot compensate with its $SPILLOVER keyword: {exc}") from None
            warnings.warn(f"{path}: cannot compensate with its $SPILLOVER keyword: {exc}. Events left "
                          f"uncompensated; pass a matrix with compensation=...", FCSWarning, stacklevel=3)
            return None, None
    make: Callable[[Any, list[str]], _Spill] = _spill_from_csv
    what = f"compensation {compensation!r}"
    if isinstance(compensation, pd.DataFrame):
        what, make = "the compensation DataFrame", _spill_from_frame
    elif isinstance(compensation, np.ndarray):
        what, make = "the compensation array", _spill_from_array
    else:
        compensation = os.fspath(compensation)
        if not os.path.isfile(compensation):
            raise FCSError(f"{path}: compensation matrix file {compensation} does not exist")
    try:
        return make(compensation, channels), "custom"
    except ValueError as exc:
        raise FCSError(f"{path}: cannot compensate with {what}: {exc}") from None


_COMP_ROWS = 1 << 14  # events compensated per block: FlowUtils' solve, without a full-size copy


def compensate_inplace(events: np.ndarray, matrix: np.ndarray, idx: list[int]) -> None:
    """FlowUtils' ``compensate`` (``np.linalg.solve(M.T, X.T).T``), in place, block by block.

    Every event is solved on its own by LAPACK, so solving blocks of events gives the
    values of one whole-matrix solve bit for bit (``tests/test_io.py`` checks this
    against FlowKit) while the extra memory stays one block.
    """
    mt = np.ascontiguousarray(matrix.T)
    cols: list[int] | slice = list(idx)
    if idx and list(idx) == list(range(idx[0], idx[-1] + 1)):
        cols = slice(idx[0], idx[-1] + 1)  # adjacent channels: a view, not a gathered copy
    for r0 in range(0, events.shape[0], _COMP_ROWS):
        block = events[r0:r0 + _COMP_ROWS, cols]
        events[r0:r0 + _COMP_ROWS, cols] = np.linalg.solve(mt, block.T).T


def load_fcs(
    path: str | os.PathLike,
    compensation: str | os.PathLike | np.ndarray | pd.DataFrame | None = "auto",
    *,
    sample_id: str | None = None,
    dataset: int | None = None,
    threads: int = 0,
) -> FCSData:
    """Read an FCS file and compensate it (FlowKit's values, read with NumPy).

    Parameters
    ----------
    path
        FCS 2.0/3.0/3.1 file.
    compensation
        ``"auto"`` (default): the file's ``$SPILLOVER``/``$SPILL`` matrix if present,
        otherwise none (a malformed one is skipped with a warning). ``"fcs"``: the file's
        matrix, an error if it has none or it is malformed. ``None`` or ``"none"``: no
        compensation. A path to a CSV/TSV matrix (header row of detector names), a NumPy
        array (all fluorescence channels in file order) or a DataFrame whose columns are
        detector names. A matrix may name only some channels (e.g. BD's -A detectors of a
        file that also records -H): those are compensated, the others stay raw, and
        :attr:`FCSData.compensated` lists them.
    sample_id
        Identifier for the sample; defaults to the file stem.
    dataset
        Data set of a multi-data-set file (0-based); default the first (with a warning
        when the file holds more).
    threads
        Threads reading and compensating a large file (``0``: all cores; ``1``: none;
        files under about 2 million values always use one). The events do not depend on it.

    Returns
    -------
    FCSData

    Raises
    ------
    FCSError
        The file is missing, not FCS, corrupt or truncated, or the matrix does not fit it.
    """
    from immuneprofile.io.reader import read_fcs

    path = os.fspath(path)
    chosen: dict[str, Any] = {}

    def finish(text: dict[str, str], channels: list[str]):
        """Resolve the matrix from TEXT, then compensate each block of events as it is read."""
        spill, chosen["mode"] = _resolve_spill(path, compensation, channels, text)
        chosen["spill"] = spill
        if spill is None:
            return None
        idx = [channels.index(d) for d in spill.detectors]
        return lambda block: compensate_inplace(block, spill.matrix, idx)

    raw = read_fcs(path, dataset, finish=finish, threads=threads)
    spill, mode = chosen["spill"], chosen["mode"]
    events = raw.require_events()
    compensated = list(spill.detectors) if spill is not None else []
    return FCSData(
        path=path,
        sample_id=sample_id or Path(path).stem,
        channels=raw.channels,
        markers=raw.markers,
        events=events,
        compensation=mode,
        spill_matrix=spill.matrix if spill is not None else None,
        compensated=compensated,
        scatter=_scatter(raw.channels),
        metadata=raw.text,
        dataset=raw.dataset,
        notes=raw.notes,
    )
