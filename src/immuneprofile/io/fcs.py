"""Loading FCS files with FlowKit: compensation, marker-to-channel mapping.

The loader keeps FlowKit's own arithmetic (FlowIO parsing, FlowUtils
compensation) so that every downstream number is the number FlowKit itself
would compute; the gating engine then works on the compensated, untransformed
columns it needs.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from immuneprofile.exceptions import FCSError, MarkerError

__all__ = [
    "FCSError",
    "MarkerError",
    "FCSData",
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
        "livedeadaqua", "fixableviability",
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
    spill
        The FlowKit ``Matrix`` applied, or ``None``.
    scatter
        Indices of scatter and time channels (never compensated or transformed by default).
    metadata
        FCS TEXT keywords (lower-case keys, as FlowKit gives them).
    sample
        The underlying :class:`flowkit.Sample`.
    """

    path: str
    sample_id: str
    channels: list[str]
    markers: list[str]
    events: np.ndarray
    compensation: str | None
    spill: Any
    scatter: list[int]
    metadata: dict[str, str]
    sample: Any = field(repr=False, default=None)
    _columns: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    _found: dict[str, int] = field(default_factory=dict, repr=False)  # find_channel's answers

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
        full = [normalize_marker(m) for m in self.markers]
        hits = [i for i, m in enumerate(full) if m and m == norm]
        if len(hits) == 1:
            return hits[0]
        words = [[normalize_marker(w) for w in _SPLIT.split(m.strip())] if m.strip() else [] for m in self.markers]
        first = [w[0] if w else "" for w in words]
        if not hits:  # the name's words start the label: "CD4" ~ "CD4 BV605", "CD8 B" ~ "CD8 B PE"
            nw = [normalize_marker(w) for w in _SPLIT.split(name.strip())]
            hits = [i for i, w in enumerate(words) if len(w) >= len(nw) and w[:len(nw)] == nw]
        if not hits:
            group = _alias_group(norm)
            hits = [i for i in range(len(self.channels))
                    if (first[i] and first[i] in group) or (full[i] and full[i] in group)]
            hits = [i for i in hits if i not in self.scatter]
        where = f" ({context})" if context else ""
        if len(hits) == 1:
            return hits[0]
        offered = ", ".join(
            f"{c}={m!r}" if m and m != c else c for c, m in zip(self.channels, self.markers)
        )
        if not hits:
            raise MarkerError(
                f"{self.path}: marker {name!r}{where} is not in this file. "
                f"Channels ($PnN=$PnS): {offered}. Fix the template's marker name, "
                f"or add a spelling to immuneprofile.io.MARKER_ALIASES."
            )
        raise MarkerError(
            f"{self.path}: marker {name!r}{where} is ambiguous: channels "
            f"{', '.join(self.channels[i] for i in hits)} all match. Name the channel ($PnN) instead."
        )


def _read_sample(path: str, sample_id: str | None):
    import flowio
    import flowkit as fk

    if not os.path.exists(path):
        raise FCSError(f"{path}: no such file")
    if os.path.getsize(path) == 0:
        raise FCSError(f"{path}: file is empty, not an FCS file")
    with open(path, "rb") as fh:
        head = fh.read(6)
    if not head.startswith(b"FCS"):
        raise FCSError(f"{path}: not an FCS file (header starts {head!r}, expected 'FCS2.0'/'FCS3.x')")
    kwargs: dict[str, Any] = dict(sample_id=sample_id, subsample=0)
    try:
        try:
            return fk.Sample(path, **kwargs)
        except flowio.exceptions.FCSParsingError as exc:
            if "offset" not in str(exc):
                raise
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                sample = fk.Sample(path, ignore_offset_error=True, **kwargs)
            warnings.warn(
                f"{path}: the file's DATA offsets are off by one byte; read it anyway "
                f"(FlowIO ignore_offset_error). Review its events before trusting it.",
                stacklevel=3,
            )
            return sample
    except FCSError:
        raise
    except Exception as exc:  # FlowIO raises many kinds for corrupt input
        reason = str(exc).strip() or type(exc).__name__
        raise FCSError(f"{path}: corrupt or truncated FCS file ({type(exc).__name__}: {reason})") from exc


def _spill_keyword(metadata: dict[str, str]) -> str | None:
    for key in ("spillover", "spill", "$spillover", "$spill"):
        if metadata.get(key, "").strip():
            return metadata[key]
    return None


def _compensate(matrix: Any, sample: Any) -> np.ndarray:
    """FlowKit's ``Matrix.apply(sample)``, written column-major.

    The compensated values are those of FlowKit's own path (FlowUtils'
    ``compensate``): the same ``np.linalg.solve`` call on the same arrays, whose
    result, transposed, is already column-major; the other channels are copied
    from the raw events. This skips FlowUtils' copy of the whole matrix and the
    transposition that would follow (tests/test_errors.py checks the values
    are bit for bit FlowKit's).
    """
    fluoro = {sample.pnn_labels[i] for i in sample.fluoro_indices}
    if not set(matrix.detectors) <= fluoro:
        raise ValueError("Detectors must be a subset of the Sample's fluorochromes")
    idx = [sample.get_channel_index(d) for d in matrix.detectors]
    raw = sample.get_events(source="raw")
    out = np.empty(raw.shape, dtype=np.float64, order="F")
    chosen = set(idx)
    rest = [j for j in range(raw.shape[1]) if j not in chosen]
    if rest:
        out[:, rest] = raw[:, rest]
    out[:, idx] = np.linalg.solve(matrix.matrix.T, raw[:, idx].T).T  # FlowUtils' arithmetic
    return out


def load_fcs(
    path: str | os.PathLike,
    compensation: str | os.PathLike | np.ndarray | pd.DataFrame | None = "auto",
    *,
    sample_id: str | None = None,
) -> FCSData:
    """Read an FCS file with FlowKit and compensate it.

    Parameters
    ----------
    path
        FCS 2.0/3.0/3.1 file.
    compensation
        ``"auto"`` (default): the file's ``$SPILLOVER``/``$SPILL`` matrix if present,
        otherwise none. ``"fcs"``: the file's matrix, an error if it has none.
        ``None`` or ``"none"``: no compensation. A path to a CSV/TSV matrix (header
        row of detector names), a NumPy array (fluorescence channels in file order)
        or a DataFrame whose columns are detector names.
    sample_id
        Identifier for the sample; defaults to the file stem.

    Returns
    -------
    FCSData

    Raises
    ------
    FCSError
        The file is missing, not FCS, corrupt or truncated, or the matrix does not fit it.
    """
    from flowkit import Matrix

    path = os.fspath(path)
    sid = sample_id or Path(path).stem
    sample = _read_sample(path, sid)
    meta = dict(sample.metadata)
    detectors = [sample.pnn_labels[i] for i in sample.fluoro_indices]
    fluorochromes = [sample.pns_labels[i] for i in sample.fluoro_indices]

    mode: str | None
    spill_src: Any
    if isinstance(compensation, str) and compensation.lower() in ("auto", "fcs"):
        spill_src = _spill_keyword(meta)
        if spill_src is None and compensation.lower() == "fcs":
            raise FCSError(f"{path}: compensation='fcs' but the file has no $SPILLOVER/$SPILL keyword")
        mode = "FCS" if spill_src is not None else None
    elif compensation is None or (isinstance(compensation, str) and compensation.lower() == "none"):
        spill_src, mode = None, None
    else:
        spill_src, mode = compensation, "custom"
        if isinstance(compensation, pd.DataFrame):
            try:
                spill_src = compensation.loc[:, detectors].to_numpy(dtype=float) if set(detectors) <= set(
                    compensation.columns) else compensation.to_numpy(dtype=float)
            except Exception as exc:
                raise FCSError(f"{path}: compensation DataFrame does not fit the file: {exc}") from exc
        elif not isinstance(compensation, np.ndarray):
            spill_src = os.fspath(compensation)
            if not os.path.exists(spill_src):
                raise FCSError(f"{path}: compensation matrix file {spill_src} does not exist")

    matrix = None
    if spill_src is not None:
        try:
            matrix = Matrix(spill_src, detectors, fluorochromes, null_channels=sample.null_channels)
            events = _compensate(matrix, sample)
        except Exception as exc:
            what = "its $SPILLOVER keyword" if mode == "FCS" else f"compensation {compensation!r}"
            raise FCSError(f"{path}: cannot compensate with {what}: {exc}") from exc
    else:
        # column-major: every channel is one contiguous block, read without a copy by the engine
        events = np.asfortranarray(sample.get_events(source="raw"))

    scatter = list(sample.scatter_indices)
    if sample.time_index is not None:
        scatter.append(sample.time_index)
    markers = [m if m is not None else "" for m in sample.pns_labels]
    return FCSData(
        path=path,
        sample_id=sid,
        channels=list(sample.pnn_labels),
        markers=markers,
        events=events,
        compensation=mode,
        spill=matrix,
        scatter=sorted(scatter),
        metadata=meta,
        sample=sample,
    )

