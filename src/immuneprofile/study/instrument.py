"""Simulated samples as another instrument records them, and acquisition faults.

Two additions to :mod:`immuneprofile.study.simulate` that change *how* a simulated
sample is recorded, not the cells in it (the truth labels stay valid):

* :func:`other_instrument`: scatter gains and range changed (``$PnR`` 2^20), a
  height (``-H``) detector recorded beside every fluorescence area detector, a
  ``$SPILLOVER`` naming only the ``-A`` detectors, and wider compensated negatives;
* :func:`inject_faults`: a clog, a bubble and a drift in the Time course of an
  acquisition, and margin events piled on a channel's maximum, each event
  labelled (the truth for :mod:`immuneprofile.qc.acquisition`).

:func:`write_recorded` writes either as an FCS file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from immuneprofile.study.simulate import SCATTER_CHANNELS, SimulatedSample, format_spillover

__all__ = ["Recorded", "other_instrument", "inject_faults", "write_recorded", "FAULTS"]

#: The fault labels :func:`inject_faults` adds to a sample's labels.
FAULTS = ("clog", "bubble", "drift", "margin")


class Recorded(NamedTuple):
    """A simulated sample as one instrument recorded it.

    Attributes
    ----------
    events
        ``(n, c)`` float32 raw events in ``channels`` order.
    channels
        ``[($PnN, $PnS), ...]``.
    labels
        The sample's truth labels (plus, after :func:`inject_faults`, ``FAULTS`` and ``"fault"``).
    spill_detectors
        The detectors ``$SPILLOVER`` names, in matrix order.
    spillover
        Its matrix.
    ranges
        ``$PnR`` of every channel.
    """

    events: np.ndarray
    channels: list[tuple[str, str]]
    labels: dict[str, np.ndarray]
    spill_detectors: list[str]
    spillover: np.ndarray
    ranges: list[int]

    def write(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> Path:
        """Write as FCS 3.1 (:func:`write_recorded`)."""
        return write_recorded(path, self, metadata)


def _as_recorded(sample: SimulatedSample | Recorded) -> Recorded:
    if isinstance(sample, Recorded):
        return sample
    return Recorded(sample.events, list(sample.channels), dict(sample.labels), sample.detectors,
                    sample.spillover, [262144] * len(sample.channels))


def _wider_negatives(fl: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
    """Extra noise that makes the negatives' spread ``factor`` times wider (their SD capped at 150)."""
    base_sd = 1.4826 * np.median(np.abs(fl - np.median(fl, axis=0)), axis=0)
    return rng.standard_normal(fl.shape) * (np.minimum(base_sd, 150.0) * np.sqrt(factor ** 2 - 1))


def other_instrument(
    sample: SimulatedSample,
    *,
    scatter_gain: Mapping[str, float] | None = None,
    scatter_range: int = 2 ** 20,
    negative_spread: float = 2.0,
    heights: bool = True,
    rng: np.random.Generator | int | None = None,
) -> Recorded:
    """The sample as another cytometer records it.

    Parameters
    ----------
    sample
        Output of :func:`~immuneprofile.study.simulate.simulate_sample`.
    scatter_gain
        Gain per scatter channel (default: FSC-A x2.6, FSC-H x3.1, SSC-A x1.7: the
        FSC-H/FSC-A ratio changes too); the scatter is clipped at ``scatter_range``.
    scatter_range
        ``$PnR`` of the scatter channels (fluorescence keeps 262144).
    negative_spread
        Factor by which the spread of the compensated negatives grows (extra
        Gaussian noise added to every fluorescence value in compensated space, so
        that compensation recovers it; the cells' classes are unchanged).
    heights
        Record a ``-H`` detector after each fluorescence ``-A`` detector (height:
        0.82 x area, uncompensated, not named in ``$SPILLOVER``).
    rng
        Generator or seed of the extra noise.
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    gains = {"FSC-A": 2.6, "FSC-H": 3.1, "SSC-A": 1.7, **(scatter_gain or {})}
    names = [c for c, _ in sample.channels]
    fl = [i for i, c in enumerate(names) if c not in SCATTER_CHANNELS and c != "Time"]
    unmixed = np.array(sample.unmixed, dtype=float)
    for i, c in enumerate(names):
        if c in SCATTER_CHANNELS:
            unmixed[:, i] = np.clip(unmixed[:, i] * gains[c], 0, scatter_range - 1)
    if negative_spread > 1:
        unmixed[:, fl] += _wider_negatives(unmixed[:, fl], negative_spread, rng)
    raw = unmixed.copy()
    raw[:, fl] = unmixed[:, fl] @ sample.spillover
    events, chans, ranges = _columns(raw, list(sample.channels), fl if heights else [], scatter_range)
    return Recorded(events, chans, dict(sample.labels), [names[i] for i in fl], sample.spillover, ranges)


def _columns(raw: np.ndarray, channels: list[tuple[str, str]], heights: list[int], scatter_range: int):
    """Events, ``($PnN, $PnS)`` and ``$PnR`` of the recorded channels: a ``-H`` after each of ``heights``."""
    cols, chans, ranges = [], [], []
    for i, (pnn, pns) in enumerate(channels):
        cols.append(raw[:, i])
        chans.append((pnn, pns))
        ranges.append(scatter_range if pnn in SCATTER_CHANNELS else 262144)
        if i in heights:
            cols.append(0.82 * raw[:, i])
            chans.append((pnn[:-2] + "-H" if pnn.endswith("-A") else pnn + "-H", ""))
            ranges.append(262144)
    return np.column_stack(cols).astype(np.float32), chans, ranges


def inject_faults(
    sample: SimulatedSample | Recorded,
    *,
    clog: tuple[float, float] = (0.30, 0.36),
    bubble: tuple[float, float] = (0.55, 0.57),
    drift: tuple[float, float] = (0.85, 1.0),
    margin_fraction: float = 0.01,
    rng: np.random.Generator | int | None = None,
) -> Recorded:
    """Acquisition faults in a sample's Time course, each event labelled.

    Segments are fractions of the events in time order.

    * clog: the event rate falls to a fifth and every signal (scatter and
      fluorescence) drops to 35 %;
    * bubble: a short burst at five times the rate with signals at 25 %;
    * drift: the fluorescence gain climbs to 1.5x within the segment's first tenth
      and stays there (the laser or fluidics drifting off);
    * margin: ``margin_fraction`` of the events (outside the segments) pile on
      the maximum of one scatter channel.

    The sample must have a ``Time`` channel. Returns a :class:`Recorded` whose labels
    add ``"clog"``, ``"bubble"``, ``"drift"``, ``"margin"`` and ``"fault"`` (any).
    """
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    rec = _as_recorded(sample)
    names = [c for c, _ in rec.channels]
    if "Time" not in names:
        raise ValueError("inject_faults needs a sample with a Time channel")
    ti = names.index("Time")
    ev = np.array(rec.events, dtype=float)
    order = np.argsort(ev[:, ti], kind="stable")
    ev, labels = ev[order], {k: v[order] for k, v in rec.labels.items()}
    n = ev.shape[0]
    pos = np.arange(n) / n
    scatter = [i for i, c in enumerate(names) if c in SCATTER_CHANNELS]
    signal = [i for i, c in enumerate(names) if c != "Time"]
    fluor = [i for i in signal if i not in scatter]
    gap = np.diff(ev[:, ti], prepend=ev[0, ti])  # time between events: stretched in a clog, squeezed in a bubble
    faults = {name: (pos >= a) & (pos < b) for name, (a, b) in (("clog", clog), ("bubble", bubble), ("drift", drift))}
    gap[faults["clog"]] *= 5.0
    gap[faults["bubble"]] *= 0.2
    ev[:, ti] = np.cumsum(gap)
    ev[np.ix_(faults["clog"], signal)] *= 0.35
    ev[np.ix_(faults["bubble"], signal)] *= 0.25
    ramp = np.clip((pos - drift[0]) / (0.1 * (drift[1] - drift[0])), 0, 1)
    ev[np.ix_(faults["drift"], fluor)] *= (1 + 0.5 * ramp[faults["drift"]])[:, None]
    free = np.flatnonzero(~(faults["clog"] | faults["bubble"] | faults["drift"]))
    hit = rng.choice(free, int(margin_fraction * n), replace=False)
    faults["margin"] = np.zeros(n, dtype=bool)
    faults["margin"][hit] = True
    for j, e in zip(rng.choice(scatter, hit.size), hit):
        ev[e, j] = rec.ranges[j] - 1
    labels.update(faults)
    labels["fault"] = np.logical_or.reduce([faults[k] for k in FAULTS])
    return rec._replace(events=ev.astype(np.float32), labels=labels)


def write_recorded(path: str | os.PathLike, rec: SimulatedSample | Recorded,
                   metadata: Mapping[str, str] | None = None) -> Path:
    """Write a recorded sample as FCS 3.1 (``$SPILLOVER`` over ``spill_detectors``, ``$PnR`` per channel)."""
    import flowio

    rec = _as_recorded(rec)
    path = Path(path)
    meta = {"$CYT": "immuneprofile simulated second cytometer", "$FIL": path.name,
            "$SPILLOVER": format_spillover(rec.spill_detectors, rec.spillover)}
    if any(c == "Time" for c, _ in rec.channels):
        meta["$TIMESTEP"] = "0.01"
    meta.update({f"$P{i + 1}R": str(r) for i, r in enumerate(rec.ranges)})
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:  # FlowIO writes little-endian float32 from a flat list
        flowio.create_fcs(fh, np.ascontiguousarray(rec.events, dtype="<f4").ravel().tolist(),
                          [c for c, _ in rec.channels], opt_channel_names=[s for _, s in rec.channels],
                          metadata_dict=meta)
    return path
