"""Discovery (immuneprofile.tl / .pl / discover): clusters checked against the simulator's per-event truth.

Simulated samples carry the true population of every event (``simulate_sample(...).labels``),
written in file order, so after gating and ``to_anndata`` the truth sits beside the gates.
Everything runs on a few thousand events.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

import immuneprofile as ip
from immuneprofile.exceptions import DiscoveryError, MarkerError
from immuneprofile.study.simulate import simulate_sample, write_fcs

N_EVENTS = 4000
SAMPLES = [("P1", 0), ("P1", 4), ("P2", 0)]


def _simulate(tmp_path_factory, panel: str, template: str, truth: list[str]):
    """Three simulated samples of ``panel`` gated with ``template``: (AnnData with `true <pop>` columns, files)."""
    folder = tmp_path_factory.mktemp(panel)
    results, labels, files = [], {k: [] for k in truth}, []
    for i, (patient, week) in enumerate(SAMPLES):
        sim = simulate_sample(panel, N_EVENTS, rng=100 + i)
        path = write_fcs(folder / f"{patient}_W{week:02d}_{panel}.fcs", sim)
        files.append(path)
        results.append(ip.gate_sample(ip.load_fcs(path), ip.load_template(template)))
        for k in truth:
            labels[k].append(sim.labels[k])
    adata = ip.to_anndata(results)
    for k, parts in labels.items():
        adata.obs[f"true {k}"] = np.concatenate(parts)
    sheet = pd.DataFrame({"sample_id": [f.stem for f in files], "patient": [p for p, _ in SAMPLES],
                          "week": [w for _, w in SAMPLES]})
    ip.tl.add_metadata(adata, sheet)
    return adata, files, results


@pytest.fixture(scope="module")
def tcell(tmp_path_factory):
    return _simulate(tmp_path_factory, "tcell", "tcell_skin_homing", ["CD4+", "CD8+", "CD4+ CLA+CD103+"])


@pytest.fixture(scope="module")
def tcell_sub(tcell):
    sub = ip.tl.subsample(tcell[0], 800, population="CD3+", seed=1)
    ip.tl.cluster(sub, "leiden", seed=1)
    return sub


def _f1(pred: np.ndarray, truth: np.ndarray) -> float:
    return 2.0 * (pred & truth).sum() / (pred.sum() + truth.sum())


def _union(adata, clusters: str) -> np.ndarray:
    return adata.obs["cluster"].astype(str).isin(clusters.split("+")).to_numpy()


# --------------------------------------------------------------------------- subsample


def test_subsample_draws_equal_events_per_sample_from_the_population(tcell):
    adata = tcell[0]
    sub = ip.tl.subsample(adata, 500, population="CD3+", seed=3)
    assert sub.obs["sample_id"].value_counts().tolist() == [500, 500, 500]
    assert sub.obs["CD3+"].all()
    assert set(sub.obs_names) <= set(adata.obs_names)
    again = ip.tl.subsample(adata, 500, population="CD3+", seed=3)
    assert list(again.obs_names) == list(sub.obs_names)
    other = ip.tl.subsample(adata, 500, population="CD3+", seed=4)
    assert list(other.obs_names) != list(sub.obs_names)
    # fewer events than asked: all of them
    small = ip.tl.subsample(adata, 10**6, population="CD8+", seed=0)
    assert small.n_obs == int(adata.obs["CD8+"].sum())
    assert sub.uns["immuneprofile"]["on"] == "CD3+"


# --------------------------------------------------------------------------- clusters vs gates and truth


def test_leiden_clusters_recover_cd4_and_cd8(tcell_sub):
    conc = ip.tl.concordance(tcell_sub, ["CD4+", "CD8+", "true CD4+", "true CD8+"]).set_index("population")
    assert (conc["f1"] >= 0.9).all(), conc
    for pop in ("CD4+", "true CD8+"):  # the reported numbers are those of the reported union
        pred, truth = _union(tcell_sub, conc.loc[pop, "clusters"]), tcell_sub.obs[pop].to_numpy()
        assert conc.loc[pop, "f1"] == pytest.approx(_f1(pred, truth))
        assert conc.loc[pop, "precision"] == pytest.approx((pred & truth).sum() / pred.sum())
        assert conc.loc[pop, "recall"] == pytest.approx((pred & truth).sum() / truth.sum())


def test_flowsom_metaclusters_recover_cd4_and_cd8(tcell_sub):
    sub = tcell_sub.copy()
    ip.tl.cluster(sub, "flowsom", n_clusters=8, grid=8, seed=1)
    assert sub.obs["cluster"].nunique() <= 8
    assert sub.obs["som_node"].nunique() <= 64
    conc = ip.tl.concordance(sub, ["CD4+", "CD8+", "true CD4+", "true CD8+"])
    assert (conc["f1"] >= 0.9).all(), conc


def test_clusters_recover_classical_monocytes(tmp_path_factory):
    adata, _, _ = _simulate(tmp_path_factory, "monocyte", "monocytes", ["classical"])
    sub = ip.tl.subsample(adata, 500, population="HLA-DR+", seed=0)
    ip.tl.cluster(sub, "leiden", seed=0)
    conc = ip.tl.concordance(sub, ["classical", "true classical"]).set_index("population")
    assert (conc["f1"] >= 0.9).all(), conc


def test_rare_populations_are_reported_as_they_are(tcell_sub, tmp_path_factory):
    """Tregs and CLA+CD103+ cells: a row each, with the F1 of the clusters really chosen, whatever it is."""
    conc = ip.tl.concordance(tcell_sub).set_index("population")
    for pop in ("CD4+ CLA+CD103+", "CD8+ CLA+CD103+"):
        row = conc.loc[pop]
        gate = tcell_sub.obs[pop].to_numpy()
        assert row["n_gated"] == gate.sum() > 0
        assert row["f1"] == pytest.approx(_f1(_union(tcell_sub, row["clusters"]), gate))
        best = (tcell_sub.obs["cluster"].astype(str) == row["best_cluster"]).to_numpy()
        assert row["best_cluster_f1"] == pytest.approx(_f1(best, gate))
        assert row["best_cluster_f1"] <= row["f1"] <= 1
    # the parent the events were drawn from is not a finding
    assert "CD3+" not in conc.index and "live" not in conc.index

    adata, _, _ = _simulate(tmp_path_factory, "treg", "treg", ["Treg"])
    sub = ip.tl.subsample(adata, 800, population="CD4+", seed=0)
    ip.tl.cluster(sub, "leiden", seed=0)
    treg = ip.tl.concordance(sub, ["Treg", "true Treg"]).set_index("population")
    for pop, row in treg.iterrows():
        assert row["n_gated"] == sub.obs[pop].sum()
        assert row["f1"] == pytest.approx(_f1(_union(sub, row["clusters"]), sub.obs[pop].to_numpy()))


def test_greedy_union_maximises_f1_among_single_additions(tcell_sub):
    """No further cluster, added to or removed from a reported union, raises its F1."""
    conc = ip.tl.concordance(tcell_sub, ["CD4+ memory", "CD8+"])
    names = list(tcell_sub.obs["cluster"].cat.categories)
    for row in conc.itertuples():
        truth = tcell_sub.obs[row.population].to_numpy()
        chosen = set(row.clusters.split("+"))
        for c in names:
            alt = chosen ^ {c}
            if alt:
                assert _f1(_union(tcell_sub, "+".join(alt)), truth) <= row.f1 + 1e-12


def test_clusters_are_reproducible_with_a_seed(tcell):
    a = ip.tl.subsample(tcell[0], 600, population="CD3+", seed=5)
    b = ip.tl.subsample(tcell[0], 600, population="CD3+", seed=5)
    for method in ("leiden", "flowsom"):
        ip.tl.cluster(a, method, seed=7)
        ip.tl.cluster(b, method, seed=7)
        assert a.obs["cluster"].tolist() == b.obs["cluster"].tolist(), method
    sizes = a.obs["cluster"].value_counts(sort=False).to_numpy()
    assert (np.diff(sizes) <= 0).all()  # named from the largest cluster down


def test_embedding_is_reproducible_and_plots(tcell, tmp_path):
    a = ip.tl.subsample(tcell[0], 300, population="CD3+", seed=2)
    b = a.copy()
    ip.tl.embed(a, ["CD3", "CD4", "CD8", "CD45RA", "CLA", "CD103"], seed=0)
    ip.tl.embed(b, ["CD3", "CD4", "CD8", "CD45RA", "CLA", "CD103"], seed=0)
    assert a.obsm["X_umap"].shape == (a.n_obs, 2)
    np.testing.assert_array_equal(a.obsm["X_umap"], b.obsm["X_umap"])
    assert a.uns["immuneprofile"]["markers"] == ["CD3", "CD4 BV605", "CD8 APC-Cy7", "CD45RA", "CLA FITC",
                                                 "CD103 APC"]
    ip.tl.cluster(a, seed=0)
    fig = ip.pl.umap(a, color=["cluster", "CD4", "CD4+", "week"], save=tmp_path / "u.png")
    assert len([ax for ax in fig.axes if ax.get_title()]) == 4
    assert (tmp_path / "u.png").stat().st_size > 0
    fig = ip.pl.cluster_heatmap(a, save=tmp_path / "h.png")
    table = ip.tl.cluster_table(a)
    shown = np.array(fig.axes[0].collections[0].get_array()).reshape(len(a.uns["immuneprofile"]["markers"]), -1)
    np.testing.assert_allclose(shown, table.filter(like="median_").T.to_numpy(), rtol=1e-6)
    with pytest.raises(DiscoveryError, match="CD999"):
        ip.pl.umap(a, color="CD999")


# --------------------------------------------------------------------------- abundance


def test_abundance_is_a_population_table_matching_the_gates(tcell, tcell_sub):
    adata, _, results = tcell
    ab = ip.tl.abundance(tcell_sub, by=["patient", "week"])
    assert list(ab.columns) == ["sample_id", "patient", "week", "population", "parent", "count", "parent_count",
                                "pct_parent"]
    assert len(ab) == 3 * tcell_sub.obs["cluster"].nunique()
    assert ab.groupby("sample_id")["pct_parent"].sum().tolist() == pytest.approx([100.0] * 3)
    assert set(ab["parent"]) == {"CD3+"}
    # the CD4+ clusters' share per sample estimates the gated CD4+ frequency among all CD3+ events
    cd4 = ip.tl.concordance(tcell_sub, ["CD4+"]).loc[0, "clusters"].split("+")
    est = ab[ab["population"].isin([f"cluster {c}" for c in cd4])].groupby("sample_id")["pct_parent"].sum()
    gated = ip.population_table(results).query("population == 'CD4+'").set_index("sample_id")["pct_parent"]
    assert (est - gated.loc[est.index]).abs().max() < 6.0  # 800 draws: SE ~1.7 percentage points

    from immuneprofile.study.clinical import join_clinical, subset_changes

    clin = pd.DataFrame({"patient": ["P1", "P1", "P2"], "week": [0, 4, 0], "pasi": [20.0, 5.0, 15.0]})
    changes = subset_changes(join_clinical(ab, None, clin))
    p1 = changes[(changes["patient"] == "P1") & (changes["week"] == 4)]
    assert len(p1) == tcell_sub.obs["cluster"].nunique()
    assert p1["delta_pasi"].eq(-15.0).all()


# --------------------------------------------------------------------------- errors, laziness


def test_bad_requests_raise_specific_errors(tcell, tcell_sub):
    with pytest.raises(DiscoveryError, match="'CD33\\+'"):
        ip.tl.subsample(tcell[0], 100, population="CD33+")
    with pytest.raises(MarkerError, match="CD999"):
        ip.tl.embed(tcell_sub.copy(), ["CD4", "CD999"])
    with pytest.raises(DiscoveryError, match="kmeans"):
        ip.tl.cluster(tcell_sub.copy(), "kmeans")
    with pytest.raises(DiscoveryError, match="tl.cluster"):
        ip.tl.concordance(tcell[0])
    with pytest.raises(DiscoveryError, match="Treg"):
        ip.tl.concordance(tcell_sub, ["Treg"])
    with pytest.raises(DiscoveryError, match="add_metadata"):
        ip.tl.abundance(tcell_sub, by=["visit"])


def test_import_immuneprofile_does_not_import_scanpy():
    code = "import sys, immuneprofile as ip; print('scanpy' in sys.modules, 'flowsom' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


# --------------------------------------------------------------------------- CLI


def test_discover_command_writes_one_runs_outputs(tcell, tmp_path):
    from click.testing import CliRunner

    from immuneprofile.cli import main

    _, files, _ = tcell
    bad = tmp_path / "broken.fcs"
    bad.write_bytes(b"FCS3.1 not really")
    out = tmp_path / "out"
    out.mkdir()
    (out / "umap_week.png").write_bytes(b"stale")  # from an earlier run with a sample sheet
    res = CliRunner().invoke(main, ["discover", *map(str, files), str(bad), "-t", "tcell_skin_homing",
                                    "--on", "CD3+", "-o", str(out), "--n-per-sample", "300", "--seed", "3"])
    assert res.exit_code == 1, res.output  # one file failed; the others' results are written
    for name in ("clusters.csv", "concordance.csv", "abundance.csv", "discovery.h5ad", "umap_clusters.png",
                 "umap_gates.png", "umap_markers.png", "cluster_heatmap.png", "errors.csv"):
        assert (out / name).exists(), name
    assert not (out / "umap_week.png").exists()
    assert "broken.fcs" in (out / "errors.csv").read_text()
    conc = pd.read_csv(out / "concordance.csv").set_index("population")
    assert conc.loc[["CD4+", "CD8+"], "f1"].min() >= 0.9
    clusters = pd.read_csv(out / "clusters.csv")
    assert clusters["n_events"].sum() == 900
    import anndata as ad

    saved = ad.read_h5ad(out / "discovery.h5ad")
    assert saved.n_obs == 900 and "X_umap" in saved.obsm
    assert saved.obs["cluster"].astype(str).value_counts().to_dict() == \
        dict(zip(clusters["cluster"].astype(str), clusters["n_events"]))
