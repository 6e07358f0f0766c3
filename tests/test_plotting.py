"""Tests for immuneprofile.plotting."""

from __future__ import annotations

import warnings
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from immuneprofile.plotting import (
    plot_association_heatmap,
    plot_pasi_trajectories,
    plot_subset_trajectories,
)
from immuneprofile.study.association import associate
from immuneprofile.study.clinical import join_clinical, read_clinical, subset_changes

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cohort import BASELINE, WEEKS
from cohort import make_cohort as _make_cohort

POPS = {"Treg": -0.15, "ncMono": -0.08, "Null": 0.0}


def make_cohort(seed: int = 0):
    return _make_cohort(seed, pops=[(p, s, 6.0) for p, s in POPS.items()], noise=0.3)


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    clin, sheet, pops = make_cohort()
    f = tmp_path_factory.mktemp("clin") / "clinical.csv"
    clin.to_csv(f, index=False)
    clinical = read_clinical(f)
    joined = join_clinical(pops, sheet, clinical)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        assoc = associate(subset_changes(joined))
    return clinical, joined, assoc


def _gids(ax, prefix: str) -> list:
    return [ln for ln in ax.get_lines() if (ln.get_gid() or "").startswith(prefix)]


def test_pasi_trajectories(data, tmp_path: Path):
    clinical, _, _ = data
    out = tmp_path / "sub" / "pasi.png"
    fig = plot_pasi_trajectories(clinical, save=out)
    assert isinstance(fig, matplotlib.figure.Figure)
    assert out.is_file() and out.stat().st_size > 0
    absolute, improvement = fig.axes[:2]
    for ax in (absolute, improvement):
        assert len(_gids(ax, "patient:")) == 3
        # infusion marks at W0 and W1
        inf = _gids(ax, "infusion")
        assert sorted(ln.get_xdata()[0] for ln in inf) == [0, 1]
        # biologic restart for P2 at W9 only
        rs = _gids(ax, "restart:")
        assert [ln.get_gid() for ln in rs] == ["restart:P2"]
        assert rs[0].get_xdata()[0] == 9
        assert [t.get_text() for t in ax.get_xticklabels()] == [f"W{w}" for w in WEEKS]
    # PASI75: one threshold per patient on the absolute panel, 75 % line on the other
    thr = {ln.get_gid(): ln.get_ydata()[0] for ln in _gids(absolute, "pasi75:")}
    assert thr == pytest.approx({f"pasi75:{p}": 0.25 * b for p, b in BASELINE.items()})
    ref = _gids(improvement, "pasi75")
    assert len(ref) == 1 and ref[0].get_ydata()[0] == 75
    # improvement panel values: P1 at W24 -> 85 %
    p1 = _gids(improvement, "patient:P1")[0]
    assert p1.get_ydata()[-1] == pytest.approx(85.0)


def test_pasi_trajectories_single_panel(data):
    clinical, _, _ = data
    fig = plot_pasi_trajectories(clinical, panels=["improvement"])
    assert len(fig.axes) == 1
    with pytest.raises(ValueError):
        plot_pasi_trajectories(clinical, panels=["bogus"])


def test_subset_trajectories(data, tmp_path: Path):
    _, joined, _ = data
    out = tmp_path / "subsets.png"
    fig = plot_subset_trajectories(joined, populations=["Treg", "ncMono"], save=out, col_wrap=3)
    assert out.is_file()
    assert len(fig.axes) == 2
    assert [ax.get_title() for ax in fig.axes] == ["Treg", "ncMono"]
    for ax in fig.axes:
        lines = _gids(ax, "patient:")
        assert len(lines) == 3
        assert all(len(ln.get_xdata()) == 6 for ln in lines)
        assert len(ax.get_xticks()) == 6
        assert len(_gids(ax, "infusion")) == 2  # from joined["treatment"]


def test_subset_trajectories_facets_all_and_wraps(data):
    _, joined, _ = data
    fig = plot_subset_trajectories(joined, col_wrap=2)
    assert len(fig.axes) == 3  # empty 4th cell removed
    assert sorted(ax.get_title() for ax in fig.axes) == sorted(POPS)
    with pytest.raises(ValueError, match="not found"):
        plot_subset_trajectories(joined, populations=["nope"])


def test_association_heatmap(data, tmp_path: Path):
    _, _, assoc = data
    out = tmp_path / "heat.png"
    fig = plot_association_heatmap(assoc, save=out)
    assert out.is_file()
    ax = fig.axes[0]
    assert len(ax.get_xticklabels()) == 3  # methods
    assert [t.get_text() for t in ax.get_yticklabels()] == sorted(POPS)
    texts = [t.get_text() for t in ax.texts]
    assert len(texts) == 3 * 3
    # annotation matches the table (std_coef, 2 decimals); no significance stars (issue 13: n = 3 is exploratory)
    v = assoc[(assoc.population == "Treg") & (assoc.method == "rmcorr")]["std_coef"].item()
    assert any(t.startswith(f"{v:.2f}") for t in texts)
    assert not any("*" in t for t in texts)
    assert "exploratory" in ax.get_title()


def test_association_heatmap_skips_nan_cells(data):
    _, _, assoc = data
    a = assoc.copy()
    a.loc[0, "std_coef"] = np.nan
    fig = plot_association_heatmap(a, annotate=True)
    assert len(fig.axes[0].texts) == 8
    fig2 = plot_association_heatmap(a, annotate=False)
    assert len(fig2.axes[0].texts) == 0


# --------------------------------------------------------------------------- per-patient panels, fold changes


@pytest.fixture(scope="module")
def readout_data():
    import pandas as pd

    from immuneprofile.study.clinical import validate_clinical
    from immuneprofile.study.readouts import describe_changes

    clin = validate_clinical(pd.DataFrame({
        "patient": ["P1"] * 4 + ["P2"] * 4, "week": [0, 1, 9, 24] * 2, "pasi": [20, 10, 4, 1, 30, 25, 20, 8],
        "treatment": ["MSC", "MSC", "biologic resumed", "biologic resumed", "MSC", "MSC", "MSC", "new biologic"],
        "event": ["infusion 1", "infusion 2", "resumed adalimumab", "", "infusion 1", "infusion 2", "",
                  "switched to secukinumab"]}))
    rows = []
    for p, w, pasi, period in clin[["patient", "week", "pasi", "period"]].itertuples(index=False):
        for name, of, pct in (("Treg", "CD4+", 4 + (30 - pasi) / 10), ("Treg_other", "CD25hi CD127lo", 90.0)):
            rows.append({"patient": p, "week": w, "pasi": pasi, "period": period, "cotherapy": "", "readout": name,
                         "of": of, "pct": pct, "count": int(pct * 10), "of_count": 1000})
    cv = pd.DataFrame({"readout": ["Treg", "Treg_other"], "assay_cv": [0.05, 0.2], "cv_source": "reference sample"})
    return clin, describe_changes(pd.DataFrame(rows), cv)


def test_patient_panels_shade_periods_mark_events_and_draw_cited_ranges(readout_data, tmp_path):
    from immuneprofile.plotting import REFERENCE_RANGES, plot_patient_panels

    clin, changes = readout_data
    fig = plot_patient_panels(changes, clin, readouts=["Treg"], save=tmp_path / "p.png")
    assert (tmp_path / "p.png").is_file()
    axes = np.array(fig.axes).reshape(2, 2)  # rows PASI, Treg; columns P1, P2
    spans = {p.get_gid(): (p.get_x(), p.get_x() + p.get_width()) for p in axes[0, 0].patches
             if (p.get_gid() or "").startswith("period:")}
    assert set(spans) == {"period:MSC", "period:biologic resumed"}
    assert spans["period:MSC"] == (0, 9)  # MSC window up to the resumption
    assert spans["period:biologic resumed"] == (9, 24)
    p2_periods = {p.get_gid() for p in axes[0, 1].patches}
    assert "period:new biologic" in p2_periods
    events = sorted(ln.get_gid() for ln in axes[0, 0].get_lines() if (ln.get_gid() or "").startswith("event:"))
    assert events == ["event:infusion 1", "event:infusion 2", "event:resumed adalimumab"]
    ref = [a for a in axes[1, 0].patches if a.get_gid() == "reference:Treg"]
    assert len(ref) == 1 and ref[0].get_y() == pytest.approx(6.35 - 0.26)
    assert ref[0].get_height() == pytest.approx(2 * 0.26)
    legend = " ".join(t.get_text() for t in fig.legends[0].get_texts())
    assert "Seddiki 2006" in legend and REFERENCE_RANGES["Treg"]["label"] in legend
    # a readout named like a reference but with another denominator gets no reference range
    fig2 = plot_patient_panels(changes.assign(of="CD25hi CD127lo"), clin, readouts=["Treg"])
    assert not [a for a in fig2.axes[2].patches if (a.get_gid() or "").startswith("reference:")]


def test_fold_change_plot_shows_assay_band(readout_data):
    from immuneprofile.plotting import plot_fold_changes

    _, changes = readout_data
    fig = plot_fold_changes(changes)
    ax = fig.axes[0]
    bands = {c.get_gid(): c.get_paths()[0].vertices[:, 0] for c in ax.collections
             if (c.get_gid() or "").startswith("assay:")}
    assert bands["assay:Treg"].max() == pytest.approx(np.log2(1.1))
    assert bands["assay:Treg_other"].min() == pytest.approx(np.log2(0.6))
    pts = [c for c in ax.collections if (c.get_gid() or "").startswith("patient:")]
    assert sum(len(c.get_offsets()) for c in pts) == 2 * 2 * 3  # patients x readouts x post-baseline visits
