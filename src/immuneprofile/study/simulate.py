"""Simulated flow-cytometry data for the UC-MSC psoriasis case series.

The simulator writes realistic FCS 3.1 files (float32 list mode, ``$SPILLOVER``
keyword, marker names in ``$PnS``) for three staining panels on one virtual
15-colour instrument, together with a sample sheet, a clinical table (PASI) and
the *true* population frequencies of every file, so that the gating templates in
``gating/`` and the downstream statistics can be checked against a known answer.

It reproduces the design of the case series of Lwin et al. (2025, Front Immunol
16:1656724): three patients with biologic-refractory plaque psoriasis receive two
intravenous infusions of umbilical-cord mesenchymal stromal cells (weeks 0 and 1);
as PASI falls, the blood frequencies of skin-homing (CLA+CD103-) and
skin-recirculating (CLA+CD103+) memory T cells, of CD25hi CD127lo FoxP3+ Tregs and of
non-classical (CD14lo CD16+) monocytes rise.  In the simulation every one of those
subsets follows ``patient baseline + slope * relative PASI improvement + noise``,
so a repeated-measures correlation of subset versus PASI is negative.

Event model
-----------
Each event is debris, a doublet, a dead cell or a live single cell (T, B, NK,
monocyte, dendritic cell, granulocyte).  Scatter is log-normal in linear
instrument units; marker intensities are log-normal in linear fluorescence units
for positive cells (10^3-10^5) and ``N(autofluorescence, sd)`` with sd ~100-180 for
negative cells, as in compensated data.  Spillover-spreading noise
(``~ sqrt(spill * signal)``) is added to the true (compensated-space) intensities,
which are then mixed with the spillover matrix to give the raw detector values
written to the file.  Compensating a file with its own ``$SPILLOVER`` therefore
recovers :attr:`SimulatedSample.unmixed` to float32 precision.  Fluorescence is
not clipped at ``$PnR`` (262144); scatter is.
"""

from __future__ import annotations

import csv
import datetime as _dt
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from immuneprofile.template.shipped import PANEL_TEMPLATES

if TYPE_CHECKING:  # pandas is imported lazily where it is used
    import pandas as pd

__all__ = [
    "fcs_header",
    "MARKERS",
    "DETECTORS",
    "SCATTER_CHANNELS",
    "PANELS",
    "PANEL_TEMPLATES",
    "PANEL_EVENTS",
    "DEFAULT_FREQUENCIES",
    "COURSE",
    "EFFECTS",
    "READOUT_SOURCES",
    "ASSAY_CV",
    "SimulatedSample",
    "spillover_matrix",
    "format_spillover",
    "parse_spillover",
    "simulate_sample",
    "truth_table",
    "write_fcs",
    "cohort_design",
    "design_pct",
    "has_true_effect",
    "simulate_study",
    "simulate_readouts",
]

# --------------------------------------------------------------------------- instrument

#: The 15 markers of the study, in the column order used internally.
MARKERS: tuple[str, ...] = (
    "LiveDead", "CD3", "CD4", "CD8", "CD45RA", "CCR7", "CLA", "CD103",
    "CD25", "CD127", "FoxP3",
    "CD19", "CD56", "HLA-DR", "CD14", "CD16",
)

#: Detector ($PnN) carrying each marker; one instrument for every panel.
DETECTORS: dict[str, str] = {
    "LiveDead": "BV510-A",
    "CD3": "BUV395-A",
    "CD4": "BV605-A",
    "CD8": "APC-Cy7-A",
    "CD45RA": "BV786-A",
    "CCR7": "PE-CF594-A",
    "CLA": "FITC-A",
    "CD103": "APC-A",
    "CD25": "PE-Cy7-A",
    "CD127": "BV421-A",
    "FoxP3": "PE-A",
    "CD19": "BV650-A",
    "CD56": "BUV805-A",
    "HLA-DR": "PerCP-Cy5.5-A",
    "CD14": "AF700-A",
    "CD16": "BV711-A",
}

#: Scatter channels ($PnS empty), in file order.
SCATTER_CHANNELS: tuple[str, ...] = ("FSC-A", "FSC-H", "SSC-A")

# Realistic mix of $PnS styles: bare marker, "marker fluorochrome", viability-dye names.
_PNS_STYLE: dict[str, dict[str, str]] = {
    "tcell": {
        "LiveDead": "L/D Aqua", "CD3": "CD3", "CD4": "CD4 BV605", "CD8": "CD8 APC-Cy7",
        "CD45RA": "CD45RA", "CCR7": "CCR7 PE-CF594", "CLA": "CLA FITC", "CD103": "CD103 APC",
    },
    "treg": {
        "LiveDead": "L/D Aqua", "CD3": "CD3 BUV395", "CD4": "CD4", "CD25": "CD25 PE-Cy7",
        "CD127": "CD127 BV421", "FoxP3": "FoxP3 PE",
    },
    "monocyte": {
        "LiveDead": "L/D Aqua", "CD3": "CD3", "CD19": "CD19 BV650", "CD56": "CD56",
        "HLA-DR": "HLA-DR PerCP-Cy5.5", "CD14": "CD14 AF700", "CD16": "CD16 BV711",
    },
    "full": {
        "LiveDead": "L/D Aqua", "CD3": "CD3 BUV395", "CD4": "CD4 BV605", "CD8": "CD8 APC-Cy7",
        "CD45RA": "CD45RA BV786", "CCR7": "CCR7 PE-CF594", "CLA": "CLA FITC", "CD103": "CD103 APC",
        "CD25": "CD25 PE-Cy7", "CD127": "CD127 BV421", "FoxP3": "FoxP3 PE",
        "CD19": "CD19 BV650", "CD56": "CD56 BUV805", "HLA-DR": "HLA-DR PerCP-Cy5.5",
        "CD14": "CD14 AF700", "CD16": "CD16 BV711",
    },
}

_PANEL_MARKERS: dict[str, tuple[str, ...]] = {
    "tcell": ("LiveDead", "CD3", "CD4", "CD8", "CD45RA", "CCR7", "CLA", "CD103"),
    "treg": ("LiveDead", "CD3", "CD4", "CD25", "CD127", "FoxP3"),
    "monocyte": ("LiveDead", "CD3", "CD19", "CD56", "HLA-DR", "CD14", "CD16"),
    "full": MARKERS,
}


def _build_panel(panel: str) -> list[tuple[str, str]]:
    chans = [(c, "") for c in SCATTER_CHANNELS]
    chans += [(DETECTORS[m], _PNS_STYLE[panel][m]) for m in _PANEL_MARKERS[panel]]
    if panel != "full":
        chans.append(("Time", ""))
    return chans


#: Panel name -> ordered list of ``($PnN, $PnS)``; scatter and Time have an empty $PnS.
PANELS: dict[str, list[tuple[str, str]]] = {p: _build_panel(p) for p in _PANEL_MARKERS}


# Spillover of fluorochrome (row detector) into another detector (column), fraction.
_SPILL_PAIRS: dict[tuple[str, str], float] = {
    ("BUV395-A", "BV421-A"): 0.012,
    ("BV421-A", "BV510-A"): 0.12,
    ("BV421-A", "BV605-A"): 0.008,
    ("BV510-A", "BV605-A"): 0.045,
    ("BV510-A", "FITC-A"): 0.01,
    ("BV605-A", "BV650-A"): 0.18,
    ("BV605-A", "BV711-A"): 0.03,
    ("BV605-A", "PE-A"): 0.015,
    ("BV650-A", "BV711-A"): 0.11,
    ("BV650-A", "APC-A"): 0.02,
    ("BV711-A", "BV786-A"): 0.085,
    ("BV711-A", "AF700-A"): 0.025,
    ("BV786-A", "BUV805-A"): 0.03,
    ("BUV805-A", "BV786-A"): 0.05,
    ("FITC-A", "PE-A"): 0.16,
    ("FITC-A", "PerCP-Cy5.5-A"): 0.025,
    ("FITC-A", "BV510-A"): 0.006,
    ("PE-A", "FITC-A"): 0.005,
    ("PE-A", "PerCP-Cy5.5-A"): 0.06,
    ("PE-A", "PE-Cy7-A"): 0.022,
    ("PE-A", "PE-CF594-A"): 0.17,
    ("FITC-A", "PE-CF594-A"): 0.03,
    ("PE-CF594-A", "PE-Cy7-A"): 0.06,
    ("PE-CF594-A", "PerCP-Cy5.5-A"): 0.05,
    ("PE-CF594-A", "PE-A"): 0.02,
    ("PE-Cy7-A", "APC-Cy7-A"): 0.035,
    ("PE-Cy7-A", "PE-A"): 0.008,
    ("PerCP-Cy5.5-A", "PE-Cy7-A"): 0.08,
    ("PerCP-Cy5.5-A", "AF700-A"): 0.02,
    ("APC-A", "AF700-A"): 0.13,
    ("APC-A", "APC-Cy7-A"): 0.03,
    ("AF700-A", "APC-Cy7-A"): 0.10,
    ("AF700-A", "APC-A"): 0.02,
    ("APC-Cy7-A", "AF700-A"): 0.04,
    ("APC-Cy7-A", "PE-Cy7-A"): 0.01,
}

# Electronic/background noise sd of each detector (linear units, compensated space).
_NOISE_SD: dict[str, float] = {
    "BUV395-A": 100.0, "BV421-A": 110.0, "BV510-A": 130.0, "BV605-A": 120.0,
    "BV650-A": 110.0, "BV711-A": 120.0, "BV786-A": 150.0, "FITC-A": 100.0,
    "PE-A": 120.0, "PE-CF594-A": 130.0, "PE-Cy7-A": 140.0, "PerCP-Cy5.5-A": 150.0, "APC-A": 110.0,
    "AF700-A": 160.0, "APC-Cy7-A": 140.0, "BUV805-A": 180.0,
}

# Autofluorescence (linear units) of myeloid cells by detector (violet/blue highest).
_AUTOFLUOR: dict[str, float] = {
    "BUV395-A": 60.0, "BV421-A": 150.0, "BV510-A": 180.0, "BV605-A": 80.0,
    "BV650-A": 60.0, "BV711-A": 50.0, "BV786-A": 40.0, "FITC-A": 150.0,
    "PE-A": 80.0, "PE-CF594-A": 60.0, "PE-Cy7-A": 40.0, "PerCP-Cy5.5-A": 60.0, "APC-A": 30.0,
    "AF700-A": 30.0, "APC-Cy7-A": 30.0, "BUV805-A": 40.0,
}

_SPREAD_FACTOR = 2.0  # spillover-spreading sd = factor * sqrt(spill * signal)


def spillover_matrix(detectors: Sequence[str]) -> np.ndarray:
    """Spillover matrix of the simulated instrument restricted to ``detectors``.

    Parameters
    ----------
    detectors
        Fluorescence detector names (``$PnN``), e.g. ``["FITC-A", "PE-A"]``.

    Returns
    -------
    numpy.ndarray
        ``(n, n)`` float64 matrix ``S`` with ones on the diagonal; ``S[i, j]`` is the
        fraction of fluorochrome ``i``'s signal seen in detector ``j``, so
        ``raw = true @ S`` and ``compensated = raw @ inv(S)`` (the FlowKit convention).
    """
    idx = {d: i for i, d in enumerate(detectors)}
    unknown = [d for d in detectors if d not in _NOISE_SD]
    if unknown:
        raise ValueError(f"unknown detector(s) {unknown}; known: {sorted(_NOISE_SD)}")
    s = np.eye(len(detectors))
    for (src, dst), v in _SPILL_PAIRS.items():
        if src in idx and dst in idx:
            s[idx[src], idx[dst]] = v
    return s


def format_spillover(detectors: Sequence[str], matrix: np.ndarray) -> str:
    """Format a spillover matrix as an FCS ``$SPILLOVER`` value.

    Parameters
    ----------
    detectors
        ``$PnN`` of the matrix rows/columns.
    matrix
        ``(n, n)`` spillover matrix.

    Returns
    -------
    str
        ``"n,ch1,...,chn,v11,v12,...,vnn"`` (row-major), values in shortest exact form.
    """
    m = np.asarray(matrix, dtype=float)
    n = len(detectors)
    if m.shape != (n, n):
        raise ValueError(f"matrix shape {m.shape} does not match {n} detectors")
    vals = [repr(float(v)) if v not in (0.0, 1.0) else str(int(v)) for v in m.ravel()]
    return ",".join([str(n), *detectors, *vals])


def parse_spillover(text: str) -> tuple[list[str], np.ndarray]:
    """Parse an FCS ``$SPILLOVER`` value.

    Parameters
    ----------
    text
        ``"n,ch1,...,chn,v11,...,vnn"``.

    Returns
    -------
    (list of str, numpy.ndarray)
        Detector names and the ``(n, n)`` matrix.
    """
    parts = [p.strip() for p in text.strip().split(",")]
    n = int(float(parts[0]))
    if len(parts) != 1 + n + n * n:
        raise ValueError(f"$SPILLOVER has {len(parts)} fields, expected {1 + n + n * n} for n={n}")
    names = parts[1:1 + n]
    vals = np.array([float(v) for v in parts[1 + n:]], dtype=float).reshape(n, n)
    return names, vals


# --------------------------------------------------------------------------- frequencies

#: Default subset frequencies (a healthy donor's PBMC), each a fraction of its parent (named
#: in the comment). ``simulate_sample(frequencies=..., shifts=...)`` overrides / shifts them.
#: The rare skin-homing subsets (CLA+CD103+) are set several-fold above the blood frequencies
#: reported in healthy donors so that example files of a few tens of thousands of events
#: hold at least 200 of them (see example_data/README.md).
DEFAULT_FREQUENCIES: dict[str, float] = {
    # fractions of all events (PBMC: few granulocytes)
    "debris": 0.04,
    "doublets": 0.03,
    "dead": 0.03,
    "granulocytes": 0.01,
    "monocytes": 0.20,
    "dendritic cells": 0.012,
    # (the remaining events are live single lymphocytes)
    # fractions of lymphocytes
    "CD3+": 0.70,
    "B cells": 0.11,  # NK cells are the rest
    # fractions of T cells (double-negative T cells are the rest)
    "CD4+": 0.62,
    "CD8+": 0.32,
    # CD45RA x CCR7 memory subsets, fractions of CD4+ / CD8+ (naive CD45RA+CCR7+ is the rest)
    "CD4+ CM": 0.33,
    "CD4+ EM": 0.17,
    "CD4+ TEMRA": 0.05,
    "CD8+ CM": 0.10,
    "CD8+ EM": 0.32,
    "CD8+ TEMRA": 0.28,
    # fractions of CD4+ / CD8+ memory (CM + EM + TEMRA; CLA-CD103- is the rest)
    "CD4+ CLA+CD103-": 0.14,
    "CD4+ CLA+CD103+": 0.06,
    "CD4+ CLA-CD103+": 0.02,
    "CD8+ CLA+CD103-": 0.12,
    "CD8+ CLA+CD103+": 0.12,
    "CD8+ CLA-CD103+": 0.04,
    # fraction of CD4+ T cells that are CD25hi CD127lo; FoxP3+ fraction of those
    "CD25hi CD127lo": 0.065,
    "Treg": 0.88,
    # fractions of monocytes (classical is the rest)
    "intermediate": 0.06,
    "non-classical": 0.11,
}

# --------------------------------------------------------------------------- storage

#: Gain ($PnG) of the 16-bit integer list mode: a stored value v reads as v / gain, so the
#: 0-65535 range of ``$DATATYPE I`` covers 0-262140 linear units in steps of 4.
FCS_GAIN = 0.25


def _quantize(raw: np.ndarray, channels: Sequence[tuple[str, str]]) -> np.ndarray:
    """Raw values as the 16-bit instrument stores them: non-negative, in steps of 1/gain."""
    out = np.empty(raw.shape, dtype=np.float32)
    for j, (pnn, _) in enumerate(channels):
        if pnn == "Time":
            out[:, j] = np.round(raw[:, j])
        else:
            out[:, j] = np.clip(np.round(raw[:, j] * FCS_GAIN), 0, 65535) / FCS_GAIN
    return out


class SimulatedSample(NamedTuple):
    """Result of :func:`simulate_sample` (a tuple: ``events, labels, unmixed, ...``).

    Attributes
    ----------
    events
        ``(n, c)`` float32 raw events (spillover applied) in :data:`PANELS` order.
    labels
        Population name -> boolean array of true membership (see :func:`simulate_sample`).
    unmixed
        ``(n, c)`` float64 events before spillover (what compensation recovers).
    spillover
        ``(k, k)`` spillover matrix of the panel's fluorescence detectors.
    channels
        ``[($PnN, $PnS), ...]`` of the panel.
    panel
        Panel name.
    """

    events: np.ndarray
    labels: dict[str, np.ndarray]
    unmixed: np.ndarray
    spillover: np.ndarray
    channels: list[tuple[str, str]]
    panel: str

    @property
    def detectors(self) -> list[str]:
        """Fluorescence detectors (``$PnN``) of the panel, in matrix order."""
        return [c for c, _ in self.channels if c not in SCATTER_CHANNELS and c != "Time"]

    @property
    def spillover_keyword(self) -> str:
        """The ``$SPILLOVER`` value of this sample."""
        return format_spillover(self.detectors, self.spillover)


# cell-type codes
_DEBRIS, _DOUBLET, _T, _B, _NK, _MONO, _DC, _GRAN = range(8)
_TYPE_LABELS = {
    _T: "T cells", _B: "B cells", _NK: "NK cells", _MONO: "monocytes",
    _DC: "dendritic cells", _GRAN: "granulocytes",
}
# scatter: (FSC-A median, FSC sdlog, SSC-A median, SSC sdlog)
_SCATTER = {
    _T: (56000.0, 0.08, 15000.0, 0.15),
    _B: (60000.0, 0.08, 15500.0, 0.15),
    _NK: (60000.0, 0.08, 19000.0, 0.15),
    _MONO: (105000.0, 0.08, 50000.0, 0.15),
    _DC: (95000.0, 0.08, 38000.0, 0.15),
    _GRAN: (112000.0, 0.08, 135000.0, 0.15),
}


def _frequencies(frequencies: Mapping[str, float] | None, shifts: Mapping[str, float] | None) -> dict[str, float]:
    f = dict(DEFAULT_FREQUENCIES)
    for key, val in (frequencies or {}).items():
        if key not in f:
            raise KeyError(f"unknown frequency {key!r}; known: {sorted(f)}")
        f[key] = float(val)
    for key, val in (shifts or {}).items():
        if key not in f:
            raise KeyError(f"unknown frequency {key!r}; known: {sorted(f)}")
        f[key] = f[key] + float(val)
    for key, val in f.items():
        if not 0.0 <= val <= 1.0:
            raise ValueError(f"frequency {key!r} = {val} is outside [0, 1]")
    groups = {
        "events": ("debris", "doublets", "dead", "granulocytes", "monocytes", "dendritic cells"),
        "lymphocytes": ("CD3+", "B cells"),
        "T cells": ("CD4+", "CD8+"),
        "CD4+": ("CD4+ CM", "CD4+ EM", "CD4+ TEMRA"),
        "CD8+": ("CD8+ CM", "CD8+ EM", "CD8+ TEMRA"),
        "CD4+ memory": ("CD4+ CLA+CD103-", "CD4+ CLA+CD103+", "CD4+ CLA-CD103+"),
        "CD8+ memory": ("CD8+ CLA+CD103-", "CD8+ CLA+CD103+", "CD8+ CLA-CD103+"),
        "monocytes": ("intermediate", "non-classical"),
    }
    for parent, keys in groups.items():
        if sum(f[k] for k in keys) > 1.0 + 1e-12:
            raise ValueError(f"frequencies {keys} of {parent} sum to more than 1")
    return f


def _lognormal(rng: np.random.Generator, median: float, sdlog: float, n: int) -> np.ndarray:
    return median * np.exp(sdlog * rng.standard_normal(n))


def _singlets(types: np.ndarray, f: dict[str, float], rng: np.random.Generator):
    """Phenotype of single cells of the given types.

    Returns signal (n, 15) without noise, scatter (n, 3) and subtype label dict.
    """
    n = len(types)
    mi = {m: i for i, m in enumerate(MARKERS)}
    sig = np.zeros((n, len(MARKERS)))
    lab: dict[str, np.ndarray] = {}

    def put(mask: np.ndarray, marker: str, median: float, sdlog: float = 0.35) -> None:
        k = int(mask.sum())
        if k:
            sig[mask, mi[marker]] = _lognormal(rng, median, sdlog, k)

    def pick(mask: np.ndarray, probs: Sequence[float]) -> np.ndarray:
        """Category per cell in mask (-1 outside); last category = the rest."""
        out = np.full(n, -1)
        k = int(mask.sum())
        p = list(probs) + [max(0.0, 1.0 - sum(probs))]
        out[mask] = rng.choice(len(p), size=k, p=np.asarray(p) / sum(p))
        return out

    # ---- T cells
    t = types == _T
    tsub = pick(t, [f["CD4+"], f["CD8+"]])  # 0 CD4, 1 CD8, 2 DN
    cd4, cd8, dn = tsub == 0, tsub == 1, tsub == 2
    # CD45RA x CCR7 subsets: 0 CM, 1 EM, 2 TEMRA, 3 naive
    tmem = np.full(n, -1)
    tmem[cd4] = pick(cd4, [f["CD4+ CM"], f["CD4+ EM"], f["CD4+ TEMRA"]])[cd4]
    tmem[cd8] = pick(cd8, [f["CD8+ CM"], f["CD8+ EM"], f["CD8+ TEMRA"]])[cd8]
    tmem[dn] = pick(dn, [0.2, 0.3, 0.1])[dn]
    naive = tmem == 3
    mem = t & ~naive
    quad = np.full(n, -1)  # 0 CLA+CD103-, 1 CLA+CD103+, 2 CLA-CD103+, 3 CLA-CD103-
    for tmask, key in ((cd4, "CD4+"), (cd8, "CD8+")):
        m = tmask & mem
        quad[m] = pick(m, [f[f"{key} CLA+CD103-"], f[f"{key} CLA+CD103+"], f[f"{key} CLA-CD103+"]])[m]
    treg_axis = pick(cd4, [f["CD25hi CD127lo"] * f["Treg"], f["CD25hi CD127lo"] * (1 - f["Treg"])])
    treg, act = treg_axis == 0, treg_axis == 1  # FoxP3+ / FoxP3- CD25hi CD127lo
    put(t, "CD3", 18000, 0.3)
    put(cd4, "CD4", 15000, 0.3)
    put(cd8, "CD8", 30000, 0.3)
    nkt = t & (rng.random(n) < 0.05)
    put(nkt, "CD56", 5000, 0.35)
    put(t & (naive | (tmem == 2)), "CD45RA", 15000, 0.4)
    put(t & (naive | (tmem == 0)), "CCR7", 6000, 0.35)
    cla = (quad == 0) | (quad == 1)
    cd103 = (quad == 1) | (quad == 2)
    put(cla, "CLA", 7000, 0.4)
    put(cd103, "CD103", 5000, 0.35)
    cd25dim = cd4 & ~treg & ~act & (rng.random(n) < 0.35)
    put(cd25dim, "CD25", 600, 0.4)
    put(treg | act, "CD25", 22000, 0.35)
    put(t & ~treg & ~act, "CD127", 9000, 0.35)
    put(treg, "FoxP3", 8000, 0.35)
    put(t & (rng.random(n) < 0.05), "HLA-DR", 3000, 0.4)  # activated T cells

    # ---- B cells
    b = types == _B
    put(b, "CD19", 12000, 0.35)
    put(b, "HLA-DR", 20000, 0.35)
    put(b, "CD45RA", 20000, 0.35)
    put(b, "CCR7", 4000, 0.4)

    # ---- NK cells: 10% CD56bright CD16-, 90% CD56dim CD16+
    nk = types == _NK
    bright = nk & (rng.random(n) < 0.1)
    dim = nk & ~bright
    put(bright, "CD56", 25000, 0.3)
    put(dim, "CD56", 6000, 0.3)
    put(dim, "CD16", 15000, 0.35)
    put(nk, "CD45RA", 10000, 0.4)
    put(nk & (rng.random(n) < 0.3), "CD8", 2500, 0.4)
    put(nk, "CD127", 400, 0.5)

    # ---- monocytes: classical / intermediate / non-classical
    mono = types == _MONO
    msub = pick(mono, [f["intermediate"], f["non-classical"]])  # 0 int, 1 nc, 2 classical
    inter, nonc, clas = msub == 0, msub == 1, msub == 2
    put(clas, "CD14", 35000, 0.3)
    put(inter, "CD14", 22000, 0.3)
    put(nonc, "CD14", 700, 0.45)
    put(inter, "CD16", 7000, 0.3)
    put(nonc, "CD16", 18000, 0.3)
    put(clas, "HLA-DR", 12000, 0.35)
    put(inter, "HLA-DR", 30000, 0.3)
    put(nonc, "HLA-DR", 18000, 0.3)
    put(mono, "CD4", 2000, 0.4)

    # ---- dendritic cells: HLA-DR++ lineage- CD14- CD16-
    dc = types == _DC
    put(dc, "HLA-DR", 35000, 0.3)
    put(dc, "CD4", 1500, 0.4)

    # ---- granulocytes: neutrophils CD16++ CD14dim HLA-DR-
    gran = types == _GRAN
    put(gran, "CD16", 40000, 0.35)
    put(gran, "CD14", 1200, 0.4)

    # scatter
    sc = np.zeros((n, 3))
    for code, (fm, fs, sm, ss) in _SCATTER.items():
        m = types == code
        k = int(m.sum())
        if k:
            sc[m, 0] = _lognormal(rng, fm, fs, k)
            sc[m, 2] = _lognormal(rng, sm, ss, k)
    sc[:, 1] = sc[:, 0] * rng.normal(0.88, 0.025, n)

    lab["CD4+"] = cd4
    lab["CD8+"] = cd8
    lab["CD4+ memory"] = cd4 & mem
    lab["CD8+ memory"] = cd8 & mem
    for tmask, key in ((cd4, "CD4+"), (cd8, "CD8+")):
        for code, nm in enumerate(("CM", "EM", "TEMRA", "naive")):
            lab[f"{key} {nm}"] = tmask & (tmem == code)
    names = ["CLA+CD103-", "CLA+CD103+", "CLA-CD103+", "CLA-CD103-"]
    for tmask, key in ((cd4, "CD4+"), (cd8, "CD8+")):
        for q, nm in enumerate(names):
            lab[f"{key} {nm}"] = tmask & (quad == q)
        lab[f"{key} CLA-"] = tmask & mem & ((quad == 2) | (quad == 3))
    lab["CD25hi CD127lo"] = treg | act
    lab["Treg"] = treg
    lab["classical"] = clas
    lab["intermediate"] = inter
    lab["non-classical"] = nonc
    lab["CD14- CD16-"] = dc
    return sig, sc, lab


def _true_labels(kind: np.ndarray, sub: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Population name -> true membership, from the event kinds and the lymphocyte subset labels."""
    live = kind < 100
    labels: dict[str, np.ndarray] = {
        "debris": kind == _DEBRIS,
        "doublets": kind == _DOUBLET,
        "dead": kind >= 100,
    }
    for code, name in _TYPE_LABELS.items():
        labels[name] = kind == code
    labels["live lymphocytes"] = np.isin(kind, [_T, _B, _NK])
    labels["live cells"] = np.isin(kind, [_T, _B, _NK, _MONO, _DC, _GRAN])
    labels["CD3+"] = kind == _T
    labels["HLA-DR+"] = np.isin(kind, [_MONO, _DC])
    for key, arr in sub.items():
        labels[key] = arr & live
    return labels


def _panel_columns(chans: Sequence[tuple[str, str]], scatter: np.ndarray, time: np.ndarray,
                   fluorescence: np.ndarray, dets: list[str]) -> np.ndarray:
    """The (unmixed) events in the panel's channel order: scatter, Time and fluorescence columns."""
    cols = []
    for pnn, _ in chans:
        if pnn in SCATTER_CHANNELS:
            cols.append(scatter[:, SCATTER_CHANNELS.index(pnn)])
        elif pnn == "Time":
            cols.append(time)
        else:
            cols.append(fluorescence[:, dets.index(pnn)])
    return np.column_stack(cols)


def simulate_sample(
    panel: str,
    n_events: int,
    *,
    frequencies: Mapping[str, float] | None = None,
    shifts: Mapping[str, float] | None = None,
    rng: np.random.Generator | int | None = None,
) -> SimulatedSample:
    """Simulate one stained blood sample measured with one panel.

    Parameters
    ----------
    panel
        ``"tcell"``, ``"treg"``, ``"monocyte"`` or ``"full"`` (see :data:`PANELS`).
    n_events
        Number of events (all kinds, including debris, doublets and dead cells).
    frequencies
        Absolute subset frequencies overriding :data:`DEFAULT_FREQUENCIES` (fractions of
        the parent given there, e.g. ``{"non-classical": 0.15}``).
    shifts
        Additive changes to the (possibly overridden) frequencies, e.g.
        ``{"CD4+ CLA+CD103-": +0.04}``.
    rng
        NumPy Generator or seed.

    Returns
    -------
    SimulatedSample
        ``(events, labels, unmixed, spillover, channels, panel)``.  ``events`` are the raw
        float32 detector values (spillover applied) in ``PANELS[panel]`` order.
        ``labels`` maps population names to boolean arrays of true membership: the
        template populations of the case series (``"CD3+"``, ``"CD4+"``, ``"CD8+"``,
        ``"CD4+ memory"``, ``"CD4+ CLA+CD103-"`` ... ``"CD4+ CLA-"``, ``"CD25hi CD127lo"``,
        ``"Treg"``, ``"HLA-DR+"``, ``"classical"``, ``"intermediate"``,
        ``"non-classical"``, ``"CD14lo CD16-"``) - all restricted to live single cells -
        plus event kinds ``"debris"``, ``"doublets"``, ``"dead"``, ``"T cells"``,
        ``"B cells"``, ``"NK cells"``, ``"monocytes"``, ``"dendritic cells"``,
        ``"granulocytes"`` and the true parents ``"live lymphocytes"`` (parent of
        ``CD3+`` in the T-cell templates) and ``"live cells"``.
    """
    if panel not in PANELS:
        raise ValueError(f"unknown panel {panel!r}; choose from {sorted(PANELS)}")
    n_events = int(n_events)
    if n_events < 1:
        raise ValueError("n_events must be >= 1")
    if not isinstance(rng, np.random.Generator):
        rng = np.random.default_rng(rng)
    f = _frequencies(frequencies, shifts)

    # event kinds
    kinds = ["debris", "doublets", "dead", "granulocytes", "monocytes", "dendritic cells"]
    p = [f[k] for k in kinds]
    p.append(max(0.0, 1.0 - sum(p)))
    n_debris, n_doub, n_dead, n_gran, n_mono, n_dc, n_lymph = rng.multinomial(n_events, p)
    lymph_types = rng.choice(
        [_T, _B, _NK], size=n_lymph,
        p=[f["CD3+"], f["B cells"], max(0.0, 1.0 - f["CD3+"] - f["B cells"])],
    )
    live_types = np.concatenate([
        lymph_types, np.full(n_mono, _MONO), np.full(n_dc, _DC), np.full(n_gran, _GRAN)])
    # dead cells and doublet partners are drawn from the same mix of cells
    pool_p = np.array([0.45, 0.06, 0.09, 0.25, 0.15])  # T, B, NK, mono, gran
    dead_types = rng.choice([_T, _B, _NK, _MONO, _GRAN], size=n_dead, p=pool_p)
    doub_types = rng.choice([_T, _B, _NK, _MONO, _GRAN], size=2 * n_doub,
                            p=np.array([0.55, 0.08, 0.1, 0.22, 0.05]))
    all_types = np.concatenate([live_types, dead_types, doub_types])
    sig, sc, sublab = _singlets(all_types, f, rng)

    n_live = len(live_types)
    dsl = slice(n_live, n_live + n_dead)
    # dead cells: viability dye bright, smaller and more granular, dimmer markers
    sig[dsl] *= 0.6
    sig[dsl, MARKERS.index("LiveDead")] = _lognormal(rng, 25000, 0.45, n_dead)
    sc[dsl, 0] *= 0.72
    sc[dsl, 1] *= 0.72
    sc[dsl, 2] *= 1.15
    # doublets: two cells side by side in the laser -> area adds up, height does not
    a = slice(n_live + n_dead, n_live + n_dead + n_doub)
    b = slice(n_live + n_dead + n_doub, n_live + n_dead + 2 * n_doub)
    d_sig = sig[a] + sig[b]
    d_sc = np.empty((n_doub, 3))
    d_sc[:, 0] = sc[a, 0] + sc[b, 0]
    d_sc[:, 2] = sc[a, 2] + sc[b, 2]
    d_sc[:, 1] = np.maximum(sc[a, 1], sc[b, 1]) * rng.uniform(1.0, 1.12, n_doub)
    # debris: small, low scatter, some of it viability-dye bright
    deb_sig = np.zeros((n_debris, len(MARKERS)))
    stained = rng.random(n_debris) < 0.4
    deb_sig[stained, MARKERS.index("LiveDead")] = _lognormal(rng, 8000, 0.8, int(stained.sum()))
    deb_sc = np.empty((n_debris, 3))
    deb_sc[:, 0] = _lognormal(rng, 11000, 0.35, n_debris)
    deb_sc[:, 2] = _lognormal(rng, 5000, 0.5, n_debris)
    deb_sc[:, 1] = deb_sc[:, 0] * rng.normal(0.9, 0.06, n_debris)

    sig_all = np.vstack([sig[: n_live + n_dead], d_sig, deb_sig])
    sc_all = np.vstack([sc[: n_live + n_dead], d_sc, deb_sc])
    kind = np.concatenate([
        live_types, dead_types + 100, np.full(n_doub, _DOUBLET), np.full(n_debris, _DEBRIS)])
    n = len(kind)

    # background + autofluorescence + spillover spreading, all in compensated space
    dets = [DETECTORS[m] for m in MARKERS]
    noise_sd = np.array([_NOISE_SD[d] for d in dets])
    af = np.array([_AUTOFLUOR[d] for d in dets])
    myeloid = np.isin(kind % 100, [_MONO, _DC, _GRAN])
    af_scale = np.where(myeloid, np.where(kind % 100 == _GRAN, 1.5, 1.0), 0.15)
    af_scale[kind == _DEBRIS] = 0.3
    true = sig_all + af_scale[:, None] * af[None, :] + rng.standard_normal((n, len(MARKERS))) * noise_sd
    s_full = spillover_matrix(dets)
    pos = np.clip(sig_all, 0, None)
    spread_var = (pos @ (s_full - np.eye(len(dets))))  # sum_i spill_ij * signal_i
    true += _SPREAD_FACTOR * np.sqrt(spread_var) * rng.standard_normal((n, len(MARKERS)))
    sc_all = np.clip(sc_all, 0, 262143)

    # event order: random; Time increases through the acquisition (~ 2,500 events/s)
    order = rng.permutation(n)
    true, sc_all, kind = true[order], sc_all[order], kind[order]
    sub = {}
    pad = n - n_live
    for key, arr in sublab.items():
        full = np.concatenate([arr[:n_live], np.zeros(pad, bool)])
        sub[key] = full[order]
    time = np.sort(rng.uniform(0, n / 2500.0 / 0.01, n))  # $TIMESTEP 0.01 s

    labels = _true_labels(kind, sub)
    chans = PANELS[panel]
    unmixed = _panel_columns(chans, sc_all, time, true, dets)
    fl = [i for i, (pnn, _) in enumerate(chans) if pnn not in SCATTER_CHANNELS and pnn != "Time"]
    spill = spillover_matrix([chans[i][0] for i in fl])
    raw = unmixed.copy()
    raw[:, fl] = unmixed[:, fl] @ spill
    return SimulatedSample(_quantize(raw, chans), labels, unmixed, spill, list(chans), panel)


def truth_table(sample: SimulatedSample, templates: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """True value of every readout declared by the panel's templates, counted from the event labels.

    Parameters
    ----------
    sample
        Output of :func:`simulate_sample`.
    templates
        Template names (default: ``PANEL_TEMPLATES[sample.panel]``).

    Returns
    -------
    list of dict
        ``{"template", "readout", "population", "of", "count", "of_count", "pct"}`` per
        declared readout; ``pct`` (= 100 count / of_count) is NaN when ``of`` is empty. Also
        ``parent``, ``parent_count`` and ``pct_parent``: the same against the population's
        parent in the template (as in the population table).
    """
    from immuneprofile.template.parse import load_template

    def pct(k: int, d: int) -> float:
        return 100.0 * k / d if d else float("nan")

    rows = []
    for name in PANEL_TEMPLATES[sample.panel] if templates is None else templates:
        t = load_template(name)
        for r in t.readouts.values():
            parent = t[r.population].parent
            assert parent is not None  # a readout's `of` is an ancestor (parse_readouts): never a root population
            k, d, pk = (int(sample.labels[x].sum()) for x in (r.population, r.of, parent))
            rows.append({"template": name, "readout": r.name, "population": r.population, "of": r.of,
                         "count": k, "of_count": d, "pct": pct(k, d),
                         "parent": parent, "parent_count": pk, "pct_parent": pct(k, pk)})
    return rows


# --------------------------------------------------------------------------- FCS writing


def _fcs_text(keywords: Mapping[str, str], delim: str = "|") -> bytes:
    for k, v in keywords.items():
        if delim in k or delim in v:
            raise ValueError(f"FCS keyword {k}={v!r} contains the delimiter {delim!r}")
    return (delim + "".join(f"{k}{delim}{v}{delim}" for k, v in keywords.items())).encode("ascii")


def fcs_header(text_start: int, text_end: int, data_start: int, data_end: int) -> str:
    """The 58-character FCS 3.1 HEADER for these byte offsets (no ANALYSIS segment).

    A HEADER field holds 8 characters: offsets beyond 99,999,999 are written as 0 there, and
    readers take them from ``$BEGINDATA``/``$ENDDATA`` in TEXT (the FCS 3.0 large-file rule).
    """
    fit = [v if v <= 99_999_999 else 0 for v in (text_start, text_end, data_start, data_end)]
    if fit[2] == 0 or fit[3] == 0:  # both DATA offsets come from TEXT then
        fit[2] = fit[3] = 0
    return "FCS3.1    " + "".join(f"{v:>8}" for v in (*fit, 0, 0))


def write_fcs(
    path: str | os.PathLike,
    sample: SimulatedSample,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a simulated sample as an FCS 3.1 file: 16-bit unsigned integer list mode.

    Values are stored as ``round(value * FCS_GAIN)`` with ``$PnG = FCS_GAIN`` and
    ``$PnR = 65536`` (FlowKit and FlowJo divide by the gain when reading), except ``Time``
    (ticks of ``$TIMESTEP`` = 0.01 s, gain 1). ``sample.events`` already holds these values.

    Parameters
    ----------
    path
        Output file.
    sample
        Output of :func:`simulate_sample`.
    metadata
        Extra keywords (``$``-prefixed standard keywords such as ``$DATE``, or custom
        ones such as ``PATIENT``); values are converted to ``str``.

    Returns
    -------
    pathlib.Path
        The written path.
    """
    path = Path(path)
    ev = np.asarray(sample.events, dtype=np.float64)
    gains = np.array([1.0 if c == "Time" else FCS_GAIN for c, _ in sample.channels])
    ints = np.round(ev * gains)
    if ints.min() < 0 or ints.max() > 65535:
        raise ValueError(f"{path}: events outside the 16-bit range (quantize with simulate_sample)")
    data = ints.astype("<u2").tobytes()
    kw: dict[str, str] = {"$BYTEORD": "1,2", "$DATATYPE": "I", "$MODE": "L", "$NEXTDATA": "0",
                          "$PAR": str(len(sample.channels)), "$TOT": str(len(ev))}
    for i, ((pnn, pns), g) in enumerate(zip(sample.channels, gains), start=1):
        kw.update({f"$P{i}N": pnn, f"$P{i}B": "16", f"$P{i}E": "0,0", f"$P{i}R": "65536", f"$P{i}G": repr(float(g))})
        if pns:
            kw[f"$P{i}S"] = pns
    kw.update({"$CYT": "immuneprofile simulated 5-laser cytometer", "$SPILLOVER": sample.spillover_keyword,
               "$FIL": path.name})
    if any(c == "Time" for c, _ in sample.channels):
        kw["$TIMESTEP"] = "0.01"
    kw.update({str(k): str(v) for k, v in (metadata or {}).items()})
    offsets = {k: "0" * 12 for k in ("$BEGINANALYSIS", "$ENDANALYSIS", "$BEGINSTEXT", "$ENDSTEXT",
                                     "$BEGINDATA", "$ENDDATA")}
    text_start = 58
    text_len = len(_fcs_text({**offsets, **kw}))
    begin = text_start + text_len
    offsets["$BEGINDATA"], offsets["$ENDDATA"] = f"{begin:012d}", f"{begin + len(data) - 1:012d}"
    text = _fcs_text({**offsets, **kw})
    header = fcs_header(text_start, begin - 1, begin, begin + len(data) - 1)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(header.encode("ascii") + text + data)
    return path


# --------------------------------------------------------------------------- study design

#: The case series' course (Lwin et al. 2025): three women, two UC-MSC infusions one week apart
#: (1.96-3.00 x 10^6 cells/kg); P2 alongside etanercept; P1 (the best responder, PASI 87 at W4)
#: and P3 resume their last failed biologic at W9 on relapse, P2 switches to a new biologic at
#: W24; P1 and P2 then hold PASI 0-2. Ages, doses per patient, PASI values and drug names are
#: invented within those facts. ``change`` = (week, event kind, drug).
COURSE: dict[str, dict[str, Any]] = {
    "P1": {"sex": "F", "age": 46, "dose1": 2.46, "dose2": 2.31, "cotherapy": "",
           "prior": "adalimumab; secukinumab", "change": (9, "resumed", "secukinumab"),
           "pasi": {0: 18.6, 1: 14.9, 4: 2.4, 9: 9.6, 24: 1.4, 52: 0.8, 104: 1.2}},
    "P2": {"sex": "F", "age": 52, "dose1": 1.96, "dose2": 2.12, "cotherapy": "etanercept",
           "prior": "etanercept; ustekinumab", "change": (24, "switched", "risankizumab"),
           "pasi": {0: 14.2, 1: 12.6, 4: 8.1, 9: 9.9, 24: 12.8, 52: 1.9, 104: 0.6}},
    "P3": {"sex": "F", "age": 38, "dose1": 3.00, "dose2": 2.85, "cotherapy": "",
           "prior": "adalimumab; ixekizumab", "change": (9, "resumed", "ixekizumab"),
           "pasi": {0: 24.8, 1: 22.0, 4: 14.6, 9: 19.4, 24: 9.1, 52: 6.2}},
}

#: Events per file of each panel in the example data: enough for >= 200 events in every
#: declared readout, while 3 patients x 6-7 visits + 7 reference samples stay under 40 MB.
PANEL_EVENTS: dict[str, int] = {"tcell": 30_000, "treg": 17_000, "monocyte": 16_000, "full": 30_000}

#: Coefficient of variation of one staining (tube to tube), applied to every subset frequency.
ASSAY_CV = 0.06
#: Visit-to-visit biological variation of a patient's subset frequencies (coefficient of variation).
VISIT_CV = 0.04

#: True effects of the study model, per simulator frequency (fraction of its parent):
#: ``msc`` = peak change after the infusions (lagged response to each infusion, fading by ~W9),
#: ``disease`` = change per unit of relative PASI improvement ``lag`` weeks earlier,
#: ``biologic`` = change per unit of relative PASI improvement while on a restarted/new biologic.
#: Each is scaled by a per-patient multiplier (heterogeneous responses). Every frequency not
#: listed here has no effect at all.
EFFECTS: dict[str, dict[str, float]] = {
    "CD25hi CD127lo": {"msc": 0.022, "lag": 2.0, "biologic": 0.014},
    "non-classical": {"msc": 0.05, "lag": 1.0},
    "CD4+ CLA+CD103-": {"disease": 0.06, "lag": 2.0},
    "CD4+ CLA+CD103+": {"disease": 0.03, "lag": 2.0},
    "CD8+ CLA+CD103+": {"msc": 0.03, "lag": 2.0},
}

#: Declared readout -> simulator frequencies it depends on; readouts of none of the
#: :data:`EFFECTS` frequencies have a true effect of zero.
READOUT_SOURCES: dict[str, tuple[str, ...]] = {
    "Treg": ("CD25hi CD127lo", "Treg"),
    "classical": ("intermediate", "non-classical"),
    "non-classical": ("non-classical",),
    **{f"{t} {q}": (f"{t} {q}",) for t in ("CD4+", "CD8+") for q in ("CLA+CD103-", "CLA+CD103+")},
    **{f"{t} {m}": (f"{t} {m}",) for t in ("CD4+", "CD8+") for m in ("CM", "EM", "TEMRA")},
    **{f"{t} naive": tuple(f"{t} {x}" for x in ("CM", "EM", "TEMRA")) for t in ("CD4+", "CD8+")},
    "CD4+": ("CD4+",),
    "CD8+": ("CD8+",),
}

_CASE_MULTIPLIERS = (1.3, 0.8, 0.5)  # P1 responds most, P3 least
_REF = "REF"


def has_true_effect(readout: str) -> bool:
    """Whether a declared readout has a non-zero true effect in the study model."""
    return any(src in EFFECTS for src in READOUT_SOURCES[readout])


def _course(pi: int, rng: np.random.Generator) -> dict[str, Any]:
    """Course of patient ``pi``: the case series' for 0-2, a rescaled copy beyond."""
    names = list(COURSE)
    c = dict(COURSE[names[pi % len(names)]])
    if pi >= len(names):
        scale = rng.uniform(0.7, 1.4)
        c["pasi"] = {w: round(min(72.0, v * scale * (1 if w == 0 else np.exp(rng.normal(0, 0.1)))), 1)
                     for w, v in c["pasi"].items()}
    return c


def _msc_exposure(week: float, lag: float) -> float:
    """Response to the two infusions (weeks 0 and 1), each rising and fading with time constant ``lag``."""
    grid = np.linspace(0, 30, 601)

    def h(t):
        u = np.clip(np.subtract.outer(np.atleast_1d(t), [0.0, 1.0]), 0, None) / lag
        return (u * np.exp(1 - u)).sum(axis=1)

    return float(h(week)[0] / h(grid).max())


def _improvement(pasi: Mapping[int, float], week: float) -> float:
    """Relative PASI improvement ``1 - PASI/PASI_0`` at ``week`` (linear between visits)."""
    xs = np.array(sorted(pasi), dtype=float)
    ys = np.array([pasi[int(x)] for x in xs])
    return float(1.0 - np.interp(max(week, 0.0), xs, ys) / ys[0])


def _periods(course: Mapping[str, Any]) -> dict[int, tuple[str, str, str]]:
    """Week -> (treatment period, cotherapy, event) of every visit of a course."""
    cweek, kind, drug = course["change"]
    out = {}
    for w in sorted(course["pasi"]):
        period = "MSC" if w <= cweek else ("biologic resumed" if kind == "resumed" else "new biologic")
        event = {0: "infusion 1", 1: "infusion 2"}.get(w, "")
        if w == cweek:
            event = f"resumed {drug}" if kind == "resumed" else f"switched to {drug}"
        out[w] = (period, course["cotherapy"] if w <= cweek else "", event)
    return out


def _design(course: Mapping[str, Any], base: Mapping[str, float], mult: float,
            week: int, period: str) -> dict[str, float]:
    """True subset frequencies of one visit (before visit and assay noise)."""
    f = dict(base)
    for key, e in EFFECTS.items():
        lag = e.get("lag", 0.0)
        d = e.get("msc", 0.0) * _msc_exposure(week, lag) if "msc" in e else 0.0
        d += e.get("disease", 0.0) * _improvement(course["pasi"], week - lag)
        if period != "MSC":
            d += e.get("biologic", 0.0) * _improvement(course["pasi"], week)
        f[key] = base[key] + mult * d
    return f


def _noisy(f: Mapping[str, float], cv: float, rng: np.random.Generator) -> dict[str, float]:
    """Frequencies with multiplicative noise on the non-structural subsets (kept within [0, 1])."""
    out = dict(f)
    for key in ("CD4+", "CD8+", *(k for k in READOUT_SOURCES if k not in ("Treg", "classical", "CD4+", "CD8+")),
                "CD25hi CD127lo", "intermediate"):
        if key in out and not key.endswith("naive"):
            out[key] = float(np.clip(out[key] * np.exp(rng.normal(0, cv)), 0.002, 0.95))
    out["CD8+"] = min(out["CD8+"], 0.97 - out["CD4+"])
    return out


def _patient_baseline(rng: np.random.Generator) -> dict[str, float]:
    base = dict(DEFAULT_FREQUENCIES)
    for key in ("CD3+", "monocytes", "B cells", "CD4+ CM", "CD4+ EM", "CD8+ EM", "CD8+ TEMRA"):
        base[key] = float(base[key] * np.exp(rng.normal(0, 0.1)))
    for key in (*EFFECTS, "CD4+ CLA-CD103+", "CD8+ CLA-CD103+", "CD8+ CLA+CD103-", "intermediate"):
        base[key] = float(base[key] * np.exp(rng.normal(0, 0.1)))
    base["CD25hi CD127lo"] *= 0.92  # psoriasis: fewer circulating Tregs before treatment
    return base


def cohort_design(n_patients: int = 3, *, seed: int = 0) -> tuple[list[dict], list[dict], list[dict]]:
    """The study's patients, visits and per-sample true subset frequencies.

    Parameters
    ----------
    n_patients
        Patients; the first three follow :data:`COURSE`, later ones rescaled copies of it.
    seed
        Random seed.

    Returns
    -------
    (patients, visits, samples)
        ``patients``: rows of ``patients.csv``; ``visits``: rows of ``clinical.csv``;
        ``samples``: one dict per blood sample (patients' visits, then one reference sample
        ``REF`` per staining batch = study week) with ``sample_id, patient, week, role,
        batch, lymphocytes_per_uL, monocytes_per_uL`` and ``freqs`` (the noisy true
        frequencies the events are drawn from) and ``design`` (before noise).
    """
    patients, visits, samples = [], [], []
    weeks_seen: set[int] = set()
    for pi in range(n_patients):
        pid = f"P{pi + 1}"
        rng = np.random.default_rng([seed, 1, pi])
        course = _course(pi, rng)
        mult = (_CASE_MULTIPLIERS[pi] if pi < 3 else 1.0) * float(np.exp(rng.normal(0, 0.25 if pi < 3 else 0.5)))
        base = _patient_baseline(rng)
        patients.append({"patient": pid, "sex": course["sex"], "age": course["age"],
                         "dose1_cells_per_kg": f"{course['dose1']:.2f}e6", "dose2_cells_per_kg": f"{course['dose2']:.2f}e6",
                         "cotherapy": course["cotherapy"], "prior_biologics": course["prior"],
                         "notes": "" if pi < 3 else "simulated extra patient"})
        lymph, mono = rng.normal(1900, 300), rng.normal(480, 80)
        pasi0 = course["pasi"][0]
        for week, (period, cot, event) in _periods(course).items():
            pasi = course["pasi"][week]
            resp = 100 * (1 - pasi / pasi0)
            note = next((f"PASI {t}" for t in (90, 75, 50) if resp >= t), "")
            visits.append({"patient": pid, "week": week, "pasi": f"{pasi:.1f}", "treatment": period,
                           "cotherapy": cot, "event": event, "notes": note})
            design = _design(course, base, mult, week, period)
            samples.append({"sample_id": f"{pid}_W{week:02d}", "patient": pid, "week": week, "role": "patient",
                            "batch": f"W{week:02d}", "design": design,
                            "freqs": _noisy(_noisy(design, VISIT_CV, rng), ASSAY_CV, rng),
                            "lymphocytes_per_uL": round(lymph * np.exp(rng.normal(0, 0.08))),
                            "monocytes_per_uL": round(mono * np.exp(rng.normal(0, 0.08)))})
            weeks_seen.add(week)
    for week in sorted(weeks_seen):
        rng = np.random.default_rng([seed, 3, week])
        samples.append({"sample_id": f"{_REF}_W{week:02d}", "patient": _REF, "week": week, "role": "reference",
                        "batch": f"W{week:02d}", "design": dict(DEFAULT_FREQUENCIES),
                        "freqs": _noisy(DEFAULT_FREQUENCIES, ASSAY_CV, rng),
                        "lymphocytes_per_uL": "", "monocytes_per_uL": ""})
    return patients, visits, samples


def design_pct(freqs: Mapping[str, float], readout: str) -> float:
    """A declared readout's value (percent) implied by simulator frequencies (before counting noise)."""
    f = freqs
    if readout == "Treg":
        return 100.0 * f["CD25hi CD127lo"] * f["Treg"]
    if readout == "classical":
        return 100.0 * (1.0 - f["intermediate"] - f["non-classical"])
    if readout.endswith("naive"):
        t = readout.split()[0]
        return 100.0 * (1.0 - sum(f[f"{t} {x}"] for x in ("CM", "EM", "TEMRA")))
    return 100.0 * f[READOUT_SOURCES[readout][0]]


def _write_csv(path: Path, rows: Sequence[Mapping[str, object]], header: Sequence[str]) -> Path:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(header)
        w.writerows([[r.get(h, "") for h in header] for r in rows])
    return path


SAMPLE_COLUMNS = ["file", "sample_id", "patient", "week", "panel", "role", "batch",
                  "lymphocytes_per_uL", "monocytes_per_uL"]
CLINICAL_COLUMNS = ["patient", "week", "pasi", "treatment", "cotherapy", "event", "notes"]
PATIENT_COLUMNS = ["patient", "sex", "age", "dose1_cells_per_kg", "dose2_cells_per_kg", "cotherapy",
                   "prior_biologics", "notes"]
TRUTH_COLUMNS = ["sample_id", "patient", "week", "panel", "role", "template", "readout", "population", "of",
                 "count", "of_count", "pct", "design_pct", "true_effect"]


def _truth_rows(sim: SimulatedSample, smp: Mapping[str, Any], sid: str) -> list[dict[str, object]]:
    """Rows of truth.csv for one written file."""
    return [{**smp, **row, "sample_id": sid, "panel": sim.panel, "pct": f"{row['pct']:.4f}",
             "design_pct": f"{design_pct(smp['design'], row['readout']):.4f}",
             "true_effect": "yes" if has_true_effect(row["readout"]) else "no"} for row in truth_table(sim)]


def _write_sample(path: Path, sim: SimulatedSample, meta: Mapping[str, str], instrument, rng) -> Path:
    """Write one simulated sample: as this simulator's cytometer records it, or through ``instrument``."""
    if instrument is None:
        return write_fcs(path, sim, meta)
    return instrument(sim, rng).write(path, meta)  # a study.instrument.Recorded


def simulate_study(
    out_dir: str | os.PathLike,
    *,
    n_events: int | Mapping[str, int] | None = None,
    n_patients: int = 3,
    weeks: Sequence[int] | None = None,
    panels: Sequence[str] = ("tcell", "treg", "monocyte"),
    seed: int = 0,
    instrument=None,
) -> dict[str, object]:
    """Simulate the UC-MSC psoriasis case series and write it to ``out_dir``.

    Writes one FCS file per blood sample x panel (``P1_W04_treg.fcs``, ``REF_W04_treg.fcs``;
    keywords ``$FIL``, ``$DATE``, ``PATIENT``, ``WEEK``, ``PANEL``, ``BATCH``, ``$SPILLOVER``) and

    - ``samples.csv``: :data:`SAMPLE_COLUMNS` (``role`` = patient/reference; cell counts per µL
      from the blood count, empty for the reference PBMC aliquot);
    - ``clinical.csv``: :data:`CLINICAL_COLUMNS` (treatment period, co-therapy, event per visit);
    - ``patients.csv``: :data:`PATIENT_COLUMNS`;
    - ``truth.csv``: :data:`TRUTH_COLUMNS`: every declared readout of every file counted from the
      event labels (``pct``), the model value before counting noise (``design_pct``) and whether
      the model gives it a true effect.

    Parameters
    ----------
    out_dir
        Output directory (created).
    n_events
        Events per file: one number, a ``{panel: events}`` mapping, or ``None`` for :data:`PANEL_EVENTS`.
    n_patients
        Patients; the first three follow :data:`COURSE`.
    weeks
        Keep only these visit weeks (default: every visit of the course).
    panels
        Panels to stain each sample with (keys of :data:`PANELS`).
    seed
        Random seed; the output is byte-identical for the same arguments.
    instrument
        Optional ``f(sample, rng) -> Recorded`` recording each sample on another
        instrument (e.g. :func:`immuneprofile.study.instrument.other_instrument`);
        the cells, hence ``truth.csv``, are the same.

    Returns
    -------
    dict
        ``{"fcs": {sample_id: Path}, "samples", "clinical", "patients", "truth": Path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for p in panels:
        if p not in PANELS:
            raise ValueError(f"unknown panel {p!r}; choose from {sorted(PANELS)}")
    events = n_events if isinstance(n_events, Mapping) else {p: n_events or PANEL_EVENTS[p] for p in panels}
    patients, visits, samples = cohort_design(n_patients, seed=seed)
    batches = sorted({s["batch"] for s in samples}, key=lambda b: int(b[1:]))
    keep = set(weeks) if weeks is not None else {s["week"] for s in samples}
    visits = [v for v in visits if v["week"] in keep]
    fcs: dict[str, Path] = {}
    sheet, truth = [], []
    for si, smp in enumerate(samples):  # seeds from the full design, so a subset reproduces its files
        if smp["week"] not in keep:
            continue
        date = (_dt.date(2026, 1, 12) + _dt.timedelta(days=batches.index(smp["batch"]))).strftime("%d-%b-%Y").upper()
        for panel in panels:
            sid = f"{smp['sample_id']}_{panel}"
            rng = np.random.default_rng([seed, 2, si, list(PANELS).index(panel)])
            sim = simulate_sample(panel, int(events[panel]), frequencies=smp["freqs"], rng=rng)
            meta = {"$DATE": date, "PATIENT": smp["patient"], "WEEK": str(smp["week"]), "PANEL": panel,
                    "BATCH": smp["batch"], "$SRC": "PBMC", "$SMNO": sid}
            fcs[sid] = _write_sample(out / f"{sid}.fcs", sim, meta, instrument, rng)
            sheet.append({**smp, "file": f"{sid}.fcs", "sample_id": sid, "panel": panel})
            truth.extend(_truth_rows(sim, smp, sid))
    return {
        "fcs": fcs,
        "samples": _write_csv(out / "samples.csv", sheet, SAMPLE_COLUMNS),
        "clinical": _write_csv(out / "clinical.csv", visits, CLINICAL_COLUMNS),
        "patients": _write_csv(out / "patients.csv", patients, PATIENT_COLUMNS),
        "truth": _write_csv(out / "truth.csv", truth, TRUTH_COLUMNS),
    }


def _of_fraction(f: Mapping[str, float], of: str) -> float:
    """Expected fraction of all events in the readout denominator ``of`` (before gating losses)."""
    kinds = ("debris", "doublets", "dead", "granulocytes", "monocytes", "dendritic cells")
    t = (1.0 - sum(f[k] for k in kinds)) * f["CD3+"]
    if of == "CD3+":
        return t
    if of == "monocytes":
        return f["monocytes"]
    lineage = of.split()[0]
    frac = t * f[lineage]
    return frac if of == lineage else frac * sum(f[f"{lineage} {x}"] for x in ("CM", "EM", "TEMRA"))


def simulate_readouts(n_patients: int = 3, *, seed: int = 0,
                      n_events: Mapping[str, int] | None = None) -> pd.DataFrame:
    """The declared readouts of a simulated cohort, without writing FCS files.

    The same model as :func:`simulate_study` (:func:`cohort_design`); counting noise is drawn
    directly: ``of_count ~ Poisson(events x expected denominator fraction)`` and
    ``count ~ Binomial(of_count, true pct)``. Fast enough for calibration studies over
    hundreds of cohorts.

    Parameters
    ----------
    n_patients
        Patients (the first three follow :data:`COURSE`).
    seed
        Random seed (the same ``seed`` gives the same design as ``simulate_study``).
    n_events
        Events per file by panel (default :data:`PANEL_EVENTS`).

    Returns
    -------
    pandas.DataFrame
        ``sample_id, patient, week, role, readout, of, count, of_count, pct, design_pct,
        true_effect`` joined with the visit's ``pasi, treatment, cotherapy, event``.
    """
    import pandas as pd

    from immuneprofile.template.parse import load_template

    events = {**PANEL_EVENTS, **(n_events or {})}
    _, visits, samples = cohort_design(n_patients, seed=seed)
    rng = np.random.default_rng([seed, 4])
    rows = []
    for panel, names in PANEL_TEMPLATES.items():
        if panel == "full":
            continue
        for name in names:
            for ro in load_template(name).readouts.values():
                for smp in samples:
                    f = smp["freqs"]
                    d = int(rng.poisson(events[panel] * _of_fraction(f, ro.of)))
                    p = design_pct(f, ro.name) / 100.0
                    k = int(rng.binomial(d, min(max(p, 0.0), 1.0)))
                    rows.append({"sample_id": f"{smp['sample_id']}_{panel}", "patient": smp["patient"],
                                 "week": smp["week"], "role": smp["role"], "panel": panel, "readout": ro.name,
                                 "of": ro.of, "count": k, "of_count": d, "pct": 100.0 * k / d if d else np.nan,
                                 "design_pct": design_pct(smp["design"], ro.name),
                                 "true_effect": has_true_effect(ro.name)})
    table = pd.DataFrame(rows)
    clin = pd.DataFrame(visits).assign(pasi=lambda v: v.pasi.astype(float))
    return table.merge(clin, on=["patient", "week"], how="left")
