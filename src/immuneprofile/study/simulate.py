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
import sys
from array import array
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np

from immuneprofile.template.shipped import PANEL_TEMPLATES

__all__ = [
    "MARKERS",
    "DETECTORS",
    "SCATTER_CHANNELS",
    "PANELS",
    "PANEL_TEMPLATES",
    "DEFAULT_FREQUENCIES",
    "STUDY_SLOPES",
    "TRUTH_POPULATIONS",
    "SimulatedSample",
    "spillover_matrix",
    "format_spillover",
    "parse_spillover",
    "simulate_sample",
    "truth_table",
    "write_fcs",
    "pasi_trajectory",
    "simulate_study",
]

# --------------------------------------------------------------------------- instrument

#: The 15 markers of the study, in the column order used internally.
MARKERS: tuple[str, ...] = (
    "LiveDead", "CD3", "CD4", "CD8", "CD45RA", "CLA", "CD103",
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
        "CD45RA": "CD45RA", "CLA": "CLA FITC", "CD103": "CD103 APC",
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
        "CD45RA": "CD45RA BV786", "CLA": "CLA FITC", "CD103": "CD103 APC",
        "CD25": "CD25 PE-Cy7", "CD127": "CD127 BV421", "FoxP3": "FoxP3 PE",
        "CD19": "CD19 BV650", "CD56": "CD56 BUV805", "HLA-DR": "HLA-DR PerCP-Cy5.5",
        "CD14": "CD14 AF700", "CD16": "CD16 BV711",
    },
}

_PANEL_MARKERS: dict[str, tuple[str, ...]] = {
    "tcell": ("LiveDead", "CD3", "CD4", "CD8", "CD45RA", "CLA", "CD103"),
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
    "PE-A": 120.0, "PE-Cy7-A": 140.0, "PerCP-Cy5.5-A": 150.0, "APC-A": 110.0,
    "AF700-A": 160.0, "APC-Cy7-A": 140.0, "BUV805-A": 180.0,
}

# Autofluorescence (linear units) of myeloid cells by detector (violet/blue highest).
_AUTOFLUOR: dict[str, float] = {
    "BUV395-A": 60.0, "BV421-A": 150.0, "BV510-A": 180.0, "BV605-A": 80.0,
    "BV650-A": 60.0, "BV711-A": 50.0, "BV786-A": 40.0, "FITC-A": 150.0,
    "PE-A": 80.0, "PE-Cy7-A": 40.0, "PerCP-Cy5.5-A": 60.0, "APC-A": 30.0,
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

#: Default subset frequencies, each a fraction of its parent (named in the comment).
#: ``simulate_sample(frequencies=..., shifts=...)`` overrides / shifts them.
DEFAULT_FREQUENCIES: dict[str, float] = {
    # fractions of all events
    "debris": 0.05,
    "doublets": 0.04,
    "dead": 0.04,
    "granulocytes": 0.04,
    "monocytes": 0.13,
    "dendritic cells": 0.008,
    # (the remaining events are live single lymphocytes)
    # fractions of lymphocytes
    "CD3+": 0.70,
    "B cells": 0.11,  # NK cells are the rest
    # fractions of T cells (double-negative T cells are the rest)
    "CD4+": 0.64,
    "CD8+": 0.31,
    # memory (CD45RA-) fraction of CD4+ / CD8+ T cells
    "CD4+ memory": 0.50,
    "CD8+ memory": 0.42,
    # fractions of CD4+ / CD8+ memory (CLA-CD103- is the rest)
    "CD4+ CLA+CD103-": 0.09,
    "CD4+ CLA+CD103+": 0.012,
    "CD4+ CLA-CD103+": 0.01,
    "CD8+ CLA+CD103-": 0.06,
    "CD8+ CLA+CD103+": 0.02,
    "CD8+ CLA-CD103+": 0.03,
    # fraction of CD4+ T cells that are CD25hi CD127lo; FoxP3+ fraction of those
    "CD25hi CD127lo": 0.055,
    "Treg": 0.88,
    # fractions of monocytes (classical is the rest)
    "intermediate": 0.05,
    "non-classical": 0.08,
}

#: Study model: change of each subset (fraction of parent) per unit of relative PASI
#: improvement ``1 - PASI(week) / PASI(0)``; every case-series subset rises as PASI falls.
STUDY_SLOPES: dict[str, float] = {
    "CD4+ CLA+CD103-": 0.08,
    "CD4+ CLA+CD103+": 0.02,
    "CD8+ CLA+CD103-": 0.06,
    "CD8+ CLA+CD103+": 0.04,
    "CD25hi CD127lo": 0.035,
    "Treg": 0.07,
    "non-classical": 0.08,
}

# --------------------------------------------------------------------------- truth

#: Template -> list of (population, template parent, label key of the true parent).
TRUTH_POPULATIONS: dict[str, list[tuple[str, str, str]]] = {
    "tcell_skin_homing": [
        ("CD3+", "live", "live lymphocytes"),
        ("CD4+", "CD3+", "CD3+"),
        ("CD8+", "CD3+", "CD3+"),
        ("CD4+ memory", "CD4+", "CD4+"),
        ("CD8+ memory", "CD8+", "CD8+"),
        *[
            (f"{t} {q}", f"{t} memory", f"{t} memory")
            for t in ("CD4+", "CD8+")
            for q in ("CLA+CD103-", "CLA+CD103+", "CLA-")
        ],
    ],
    "treg": [
        ("CD3+", "live", "live lymphocytes"),
        ("CD4+", "CD3+", "CD3+"),
        ("CD25hi CD127lo", "CD4+", "CD4+"),
        ("Treg", "CD25hi CD127lo", "CD25hi CD127lo"),
    ],
    "monocytes": [
        ("classical", "HLA-DR+", "HLA-DR+"),
        ("intermediate", "HLA-DR+", "HLA-DR+"),
        ("non-classical", "HLA-DR+", "HLA-DR+"),
    ],
}


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
    mem = np.zeros(n, bool)
    mem[cd4] = rng.random(int(cd4.sum())) < f["CD4+ memory"]
    mem[cd8] = rng.random(int(cd8.sum())) < f["CD8+ memory"]
    mem[dn] = rng.random(int(dn.sum())) < 0.6
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
    put(t & ~mem, "CD45RA", 15000, 0.4)
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
    lab["CD14lo CD16-"] = dc
    return sig, sc, lab


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

    # labels
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

    # assemble the panel
    chans = PANELS[panel]
    cols = []
    for pnn, _ in chans:
        if pnn in SCATTER_CHANNELS:
            cols.append(sc_all[:, SCATTER_CHANNELS.index(pnn)])
        elif pnn == "Time":
            cols.append(time)
        else:
            cols.append(true[:, dets.index(pnn)])
    unmixed = np.column_stack(cols)
    fl = [i for i, (pnn, _) in enumerate(chans) if pnn not in SCATTER_CHANNELS and pnn != "Time"]
    spill = spillover_matrix([chans[i][0] for i in fl])
    raw = unmixed.copy()
    raw[:, fl] = unmixed[:, fl] @ spill
    return SimulatedSample(raw.astype(np.float32), labels, unmixed, spill, list(chans), panel)


def truth_table(sample: SimulatedSample, templates: Sequence[str] | None = None) -> list[dict[str, object]]:
    """True ``pct_parent`` of every case-series population of a simulated sample.

    Parameters
    ----------
    sample
        Output of :func:`simulate_sample`.
    templates
        Template names (default: ``PANEL_TEMPLATES[sample.panel]``).

    Returns
    -------
    list of dict
        ``{"population", "parent", "count", "parent_count", "pct_parent"}`` per
        population (population names are unique across the templates of a panel);
        ``pct_parent`` is NaN when the true parent is empty.
    """
    templates = PANEL_TEMPLATES[sample.panel] if templates is None else templates
    rows, seen = [], set()
    for tpl in templates:
        for pop, parent, parent_key in TRUTH_POPULATIONS[tpl]:
            if pop in seen:
                continue
            seen.add(pop)
            k = int(sample.labels[pop].sum())
            pk = int(sample.labels[parent_key].sum())
            rows.append({
                "population": pop, "parent": parent, "count": k, "parent_count": pk,
                "pct_parent": 100.0 * k / pk if pk else float("nan"),
            })
    return rows


# --------------------------------------------------------------------------- FCS writing


def write_fcs(
    path: str | os.PathLike,
    sample: SimulatedSample,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a simulated sample as an FCS 3.1 file (float32, little-endian).

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
    import flowio

    path = Path(path)
    meta: dict[str, str] = {
        "$CYT": "immuneprofile simulated 5-laser cytometer",
        "$SPILLOVER": sample.spillover_keyword,
        "$FIL": path.name,
    }
    if any(c == "Time" for c, _ in sample.channels):
        meta["$TIMESTEP"] = "0.01"
    for k, v in (metadata or {}).items():
        meta[str(k)] = str(v)
    data = np.ascontiguousarray(sample.events, dtype="<f4")
    buf = array("f")
    buf.frombytes(data.tobytes())
    if sys.byteorder == "big":  # pragma: no cover - FCS BYTEORD written by FlowIO is 1,2,3,4
        buf.byteswap()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        flowio.create_fcs(
            fh, buf,
            [c for c, _ in sample.channels],
            opt_channel_names=[s for _, s in sample.channels],
            metadata_dict=meta,
        )
    return path


# --------------------------------------------------------------------------- study

# PASI at anchor weeks for the three case-series patients (interpolated in between).
_PASI_PROFILES: list[dict[float, float]] = [
    # P1: responder, PASI75 by W9, PASI90 by W24
    {0: 24.6, 1: 22.8, 2: 17.9, 4: 10.6, 9: 4.2, 24: 1.8},
    # P2: responder, PASI75 by W9
    {0: 17.2, 1: 16.5, 2: 13.1, 4: 8.0, 9: 3.6, 24: 2.9},
    # P3: partial responder (~PASI50 at W9) with rebound -> biologic restarted at W24
    {0: 28.4, 1: 27.1, 2: 23.0, 4: 17.2, 9: 13.9, 24: 22.5},
]
_PARTIAL_RESPONDER = 2  # profile index whose patient restarts a biologic at the last visit


def pasi_trajectory(patient_index: int, weeks: Sequence[float], *, seed: int = 0) -> np.ndarray:
    """PASI of a simulated patient at the given weeks.

    Patients 0-2 follow the case-series profiles (two responders reaching PASI75 by
    week 9, one partial responder with a rebound at week 24); further patients reuse
    those shapes with a random baseline (15-30).

    Parameters
    ----------
    patient_index
        0-based patient number.
    weeks
        Weeks since the first infusion.
    seed
        Seed for the baselines of patients beyond the third.

    Returns
    -------
    numpy.ndarray
        PASI (0-72) rounded to 0.1.
    """
    prof = _PASI_PROFILES[patient_index % len(_PASI_PROFILES)]
    xs = np.array(sorted(prof))
    ys = np.array([prof[x] for x in xs])
    if patient_index >= len(_PASI_PROFILES):
        r = np.random.default_rng([seed, 7919, patient_index])
        ys = ys * (r.uniform(15, 30) / ys[0])
    out = np.interp(np.asarray(weeks, dtype=float), xs, ys)
    return np.round(np.clip(out, 0, 72), 1)


def _patient_baseline(rng: np.random.Generator) -> dict[str, float]:
    base = dict(DEFAULT_FREQUENCIES)
    for key in ("CD3+", "CD4+", "CD4+ memory", "CD8+ memory", "monocytes", "B cells"):
        base[key] = float(np.clip(base[key] * np.exp(rng.normal(0, 0.08)), 0.05, 0.9))
    base["CD8+"] = float(min(base["CD8+"] * np.exp(rng.normal(0, 0.1)), 0.95 - base["CD4+"]))
    for key in (*STUDY_SLOPES, "CD4+ CLA-CD103+", "CD8+ CLA-CD103+", "intermediate"):
        if key == "Treg":
            base[key] = float(np.clip(rng.uniform(0.82, 0.9), 0, 1))
        else:
            base[key] = float(base[key] * np.exp(rng.normal(0, 0.2)))
    return base


def simulate_study(
    out_dir: str | os.PathLike,
    *,
    n_events: int = 50_000,
    patients: Sequence[str] = ("P1", "P2", "P3"),
    weeks: Sequence[int] = (0, 1, 2, 4, 9, 24),
    panels: Sequence[str] = ("tcell", "treg", "monocyte"),
    seed: int = 0,
    instrument=None,
) -> dict[str, object]:
    """Simulate the UC-MSC psoriasis case series and write it to ``out_dir``.

    Writes one FCS file per patient x week x panel (``P1_W04_treg.fcs``; keywords
    ``$FIL``, ``$DATE``, ``PATIENT``, ``WEEK``, ``PANEL``, ``$SPILLOVER``) and

    - ``samples.csv``: ``file,sample_id,patient,week,panel`` (``sample_id`` = file stem);
    - ``clinical.csv``: ``patient,week,pasi,treatment,notes`` (UC-MSC infusions at
      weeks 0 and 1; biologic restart at the last visit of the partial responder);
    - ``truth.csv``: ``sample_id,patient,week,panel,population,parent,pct_parent``, the
      true frequency of every case-series population among its template parent,
      computed from the events written.

    Within each patient the case-series subsets follow
    ``baseline + STUDY_SLOPES[subset] * (1 - PASI/PASI_0) + noise``.  Output is
    deterministic given ``seed``.

    Parameters
    ----------
    out_dir
        Output directory (created).
    n_events
        Events per FCS file.
    patients
        Patient identifiers; the first three get the case-series PASI profiles.
    weeks
        Visit weeks (week 0 = baseline, before the first infusion).
    panels
        Panels to stain each sample with (keys of :data:`PANELS`).
    seed
        Random seed.
    instrument
        Optional ``f(sample, rng) -> Recorded`` recording each sample on another
        instrument (e.g. :func:`immuneprofile.study.instrument.other_instrument`);
        the cells, hence ``truth.csv``, are the same.

    Returns
    -------
    dict
        ``{"fcs": {sample_id: Path}, "samples": Path, "clinical": Path, "truth": Path}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for p in panels:
        if p not in PANELS:
            raise ValueError(f"unknown panel {p!r}; choose from {sorted(PANELS)}")
    weeks = [int(w) for w in weeks]
    fcs: dict[str, Path] = {}
    sample_rows: list[list[object]] = []
    clinical_rows: list[list[object]] = []
    truth_rows: list[list[object]] = []
    start0 = _dt.date(2024, 3, 4)
    for pi, patient in enumerate(patients):
        prng = np.random.default_rng([seed, 1, pi])
        base = _patient_baseline(prng)
        pasi = pasi_trajectory(pi, weeks, seed=seed)
        pasi0 = float(pasi_trajectory(pi, [0], seed=seed)[0])
        start = start0 + _dt.timedelta(days=int(prng.integers(0, 120)))
        partial = pi % len(_PASI_PROFILES) == _PARTIAL_RESPONDER
        for wi, week in enumerate(weeks):
            improvement = 1.0 - float(pasi[wi]) / pasi0
            freqs = dict(base)
            for key, slope in STUDY_SLOPES.items():
                val = base[key] + slope * improvement + prng.normal(0, 0.06 * slope)
                freqs[key] = float(np.clip(val, 0.002, 0.97))
            for key in ("CD4+ memory", "CD8+ memory"):
                freqs[key] = float(np.clip(base[key] + prng.normal(0, 0.02), 0.05, 0.95))
            date = (start + _dt.timedelta(weeks=week)).strftime("%d-%b-%Y").upper()
            for ki, panel in enumerate(panels):
                sid = f"{patient}_W{week:02d}_{panel}"
                rng = np.random.default_rng([seed, 2, pi, wi, ki])
                sim = simulate_sample(panel, n_events, frequencies=freqs, rng=rng)
                meta = {"$DATE": date, "PATIENT": patient, "WEEK": str(week), "PANEL": panel,
                        "$SRC": "peripheral blood", "$SMNO": sid}
                if instrument is None:
                    path = write_fcs(out / f"{sid}.fcs", sim, meta)
                else:
                    from immuneprofile.study.instrument import write_recorded

                    path = write_recorded(out / f"{sid}.fcs", instrument(sim, rng), meta)
                fcs[sid] = path
                sample_rows.append([path.name, sid, patient, week, panel])
                for row in truth_table(sim):
                    pct = row["pct_parent"]
                    truth_rows.append([sid, patient, week, panel, row["population"], row["parent"],
                                       "" if pct != pct else f"{pct:.4f}"])
            # clinical visit
            treatment, notes = "", []
            if week == 0:
                treatment = "UC-MSC infusion"
                notes.append("baseline; first UC-MSC infusion after blood draw")
            elif week == 1:
                treatment = "UC-MSC infusion"
                notes.append("second UC-MSC infusion")
            resp = 100.0 * improvement
            if wi > 0 and pasi[wi] > pasi[:wi].min() * 1.25 and week > 1:
                notes.append("rebound")
            if resp >= 90:
                notes.append("PASI90")
            elif resp >= 75:
                notes.append("PASI75")
            elif resp >= 50:
                notes.append("PASI50")
            if partial and wi == len(weeks) - 1 and week >= 9 and len(weeks) > 1:
                treatment = "biologic restart"
                notes.append("partial responder, biologic restarted after this visit")
            clinical_rows.append([patient, week, f"{pasi[wi]:.1f}", treatment, "; ".join(notes)])

    def _write(name: str, header: Sequence[str], rows: list[list[object]]) -> Path:
        p = out / name
        with open(p, "w", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            w.writerow(header)
            w.writerows(rows)
        return p

    return {
        "fcs": fcs,
        "samples": _write("samples.csv", ["file", "sample_id", "patient", "week", "panel"], sample_rows),
        "clinical": _write("clinical.csv", ["patient", "week", "pasi", "treatment", "notes"], clinical_rows),
        "truth": _write("truth.csv", ["sample_id", "patient", "week", "panel", "population", "parent",
                                      "pct_parent"], truth_rows),
    }
