"""A synthetic 3-patient cohort shared by the clinical, association and plotting tests."""

from __future__ import annotations

from typing import Iterable, Mapping

import numpy as np
import pandas as pd

WEEKS = [0, 1, 2, 4, 9, 24]
BASELINE = {"P1": 20.0, "P2": 36.0, "P3": 12.0}
FRACTION = {0: 1.0, 1: 0.85, 2: 0.7, 4: 0.5, 9: 0.3, 24: 0.15}


def make_cohort(
    seed: int = 0,
    *,
    pops: Iterable[tuple[str, float, float]] = (("Treg", -0.15, 5.0), ("ncMono", -0.08, 3.0), ("Null", 0.0, 10.0)),
    noise: float = 0.2,
    offsets: Mapping[str, float] | None = None,
    pasi_noise: float = 0.0,
    suffix: str = "",
):
    """3 patients x 6 visits (infusions at W0/W1, a biologic restart for P2 at W9).

    Each population is ``(name, slope, base)``: ``pct = base + offset[patient] +
    slope * (PASI - baseline PASI) + N(0, noise)``, so a negative slope means the
    subset rises as PASI falls. Returns ``(clinical, sample sheet, population table)``.
    """
    rng = np.random.default_rng(seed)
    pops = list(pops)
    clin, sheet, rows = [], [], []
    for p, b in BASELINE.items():
        for w in WEEKS:
            pasi = round(b * FRACTION[w] + (rng.normal(0, pasi_noise) if pasi_noise else 0.0), 1)
            tr = "UC-MSC infusion" if w in (0, 1) else ""
            if p == "P2" and w == 9:
                tr = "biologic restart"
            clin.append({"patient": p, "week": w, "pasi": max(pasi, 0.0), "treatment": tr, "notes": ""})
            sid = f"{p}_W{w:02d}{suffix}"
            sheet.append({"file": f"{sid}.fcs", "sample_id": sid, "patient": p, "week": w})
            for name, slope, base in pops:
                pct = base + (offsets or {}).get(p, 0.0) + slope * (pasi - b) + rng.normal(0, noise)
                rows.append({"sample_id": sid, "population": name, "parent": "Live", "count": 100,
                             "parent_count": 1000, "pct_parent": pct, "pct_total": pct / 10})
    return pd.DataFrame(clin), pd.DataFrame(sheet), pd.DataFrame(rows)
