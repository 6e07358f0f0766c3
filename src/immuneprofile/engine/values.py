"""One event-value accessor: the numbers the engine gates, the report draws and batch thresholds are fitted on."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from immuneprofile.engine.transforms import MONOTONE, exact_transform, inverse_bound, transform_key
from immuneprofile.exceptions import GatingError
from immuneprofile.io.fcs import FCSData
from immuneprofile.template.model import Dim, Template

__all__ = ["Compensation", "EventValues", "gate_compensation"]

Compensation = bool | str
"""How a gate's events are compensated: ``False`` (raw), ``True`` (the file's matrix) or a template matrix id."""


def gate_compensation(gate: Any) -> Compensation:
    """The compensation of a gate's events, as FlowKit applies it.

    FlowKit compensates all dimensions of a gate if any is; with a matrix id
    (Gating-ML ``spectrumMatrix``) if a dimension names one.
    """
    return next((d.compensated for d in gate.dims if d.compensated), False)


class EventValues:
    """The event values of one sample as the engine gates them, for the gate dimensions of one template.

    The one place that turns a gate dimension (:class:`~immuneprofile.template.Dim`:
    marker or ratio, transform) and a gate's compensation (:func:`gate_compensation`)
    into numbers: the engine gates on these values, the QC report draws them and
    ``scope: batch`` thresholds are fitted on them. Columns, transforms and
    transformed values are computed lazily and kept for the sample.

    Parameters
    ----------
    data
        The loaded sample.
    template
        The template whose dimensions are read (its compensation matrices, for
        Gating-ML ``spectrumMatrix`` ids); ``None`` for the file's own columns only.
    """

    def __init__(self, data: FCSData, template: Template | None):
        self.data = data
        # no template: only the file's own columns (raw or file-compensated) are read
        self.template = template if template is not None else Template(name="", populations=[])
        self._raw_cols: dict[int, np.ndarray] = {}
        self._xf: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}
        self._xform_obj: dict[str, Any] = {}
        self._inv: dict[tuple, float] = {}
        self._chan: dict[str, int] = {}
        self._tkeys: dict[int, str] = {}  # id(spec) -> transform_key (the template keeps its specs alive)

    def channel(self, name: str, pop: str) -> int:
        idx = self._chan.get(name)
        if idx is None:
            idx = self.data.find_channel(name, context=f"template {self.template.path}, population {pop!r}")
            self._chan[name] = idx
        return idx

    def matrix_column(self, ch: int, matrix_id: str) -> np.ndarray:
        """Column ``ch`` of the raw events compensated with ``template.compensation[matrix_id]`` (as FlowKit)."""
        cache = self.__dict__.setdefault("_matrix_events", {})
        ev = cache.get(matrix_id)
        if ev is None:
            from immuneprofile.io.fcs import compensate_inplace

            frame = self.template.compensation[matrix_id]
            missing = [str(c) for c in frame.columns if c not in self.data.channels]
            if missing:
                raise GatingError(f"{self.data.path}: template {self.template.path} matrix {matrix_id!r} "
                                  f"names channels not in the file: {', '.join(missing)}")
            ev = self.raw_events().copy(order="F")
            idx = [self.data.channels.index(c) for c in frame.columns]
            compensate_inplace(ev, np.asarray(frame, dtype=float), idx)  # FlowKit Matrix.apply's arithmetic
            cache[matrix_id] = ev
        return np.ascontiguousarray(ev[:, ch])

    def raw_events(self) -> np.ndarray:
        """The file's uncompensated events (read again once, only when a gate asks for them)."""
        raw = self.__dict__.get("_raw_events")
        if raw is None:
            raw = self.__dict__["_raw_events"] = self.data.raw_events()
        return raw

    def base(self, ch: int, compensated: Compensation) -> np.ndarray:
        """Contiguous column ``ch`` of the compensated (or, if not ``compensated``, raw) events."""
        if isinstance(compensated, str):  # a spillover matrix of the template (Gating-ML spectrumMatrix)
            return self.matrix_column(ch, compensated)
        if compensated or self.data.compensation is None:
            return self.data.column(ch)
        col = self._raw_cols.get(ch)
        if col is None:
            col = np.ascontiguousarray(self.raw_events()[:, ch])
            self._raw_cols[ch] = col
        return col

    def tkey(self, spec: Mapping[str, Any] | None) -> str:
        """:func:`~immuneprofile.transforms.transform_key` of a spec of the template (kept per spec)."""
        key = self._tkeys.get(id(spec))
        if key is None:
            key = self._tkeys[id(spec)] = transform_key(spec)
        return key

    def xform(self, spec: Mapping[str, Any] | None):
        if spec is None:
            return None
        key = self.tkey(spec)
        obj = self._xform_obj.get(key)
        if obj is None:
            obj = self._xform_obj[key] = exact_transform(spec)
        return obj

    def raw(self, dim: Dim, idx: np.ndarray | None, compensated: Compensation, pop: str) -> np.ndarray:
        """Untransformed values of ``dim`` (ratio computed as FlowKit does) for events ``idx``."""
        if dim.ratio is not None:
            num, den, a, b, c = dim.ratio
            x = self.base(self.channel(num, pop), compensated)
            y = self.base(self.channel(den, pop), compensated)
            if idx is not None:
                x, y = x[idx], y[idx]
            with np.errstate(divide="ignore", invalid="ignore"):
                return a * ((x - b) / (y - c))
        col = self.base(self.channel(dim.marker, pop), compensated)
        return col if idx is None else col[idx]

    def exact(self, dim: Dim, raw_vals: np.ndarray) -> np.ndarray:
        """Transform values with FlowKit's transform object, as FlowKit does (column arrays)."""
        xf = self.xform(dim.transform)
        if xf is None or raw_vals.size == 0:
            return np.asarray(raw_vals, dtype=float)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = xf.apply(np.asarray(raw_vals, dtype=float).reshape(-1, 1))
        return np.asarray(out, dtype=float).reshape(-1)

    def transformed(self, dim: Dim, idx: np.ndarray | None, compensated: Compensation, pop: str) -> np.ndarray:
        """Exact transformed values for events ``idx`` (cached per event, computed once)."""
        if dim.transform is None:
            return self.raw(dim, idx, compensated, pop)
        key = (dim.marker, dim.ratio, self.tkey(dim.transform), compensated)
        n = self.data.n_events
        cache = self._xf.get(key)
        if cache is None:
            cache = self._xf[key] = (np.empty(n), np.zeros(n, dtype=bool))
        vals, have = cache
        sel = np.arange(n) if idx is None else idx
        need = sel[~have[sel]]
        if need.size:
            vals[need] = self.exact(dim, self.raw(dim, need, compensated, pop))
            have[need] = True
        return vals[sel]

    def raw_bound(self, dim: Dim, t: float) -> float | None:
        """``T^-1(t)`` for increasing transforms (``None`` if not applicable)."""
        spec = dim.transform
        if spec is None:
            return t
        if spec["type"] not in MONOTONE or dim.ratio is not None:
            return None
        key = (self.tkey(spec), t)
        v = self._inv.get(key)
        if v is None:
            v = inverse_bound(spec, self.xform(spec), t)
            if v is None:
                return None
            self._inv[key] = v
        return v
