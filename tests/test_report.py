"""HTML batch report: gate overlays, tables, warnings, and rendering in headless Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
import warnings
from html.parser import HTMLParser

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from conftest import COMP_FCS, EXAMPLE, GATING
from immuneprofile import gate_files, load_template, parse_template
from immuneprofile.cli import main
from immuneprofile.qc.reference import add_reference
from immuneprofile.qc.report import build_report, gate_figure, gate_panels

DOC = {
    "name": "demo",
    "transforms": {"default": {"type": "logicle", "T": 262144, "W": 0.5, "M": 4.5, "A": 0}},
    "thresholds": {"CD3": {"pos": 0.3}, "CD4": {"pos": {"method": "valley", "fallback": 0.4}}},
    "populations": [
        {"name": "cells", "gate": {"type": "polygon", "x": "FSC-A", "y": "SSC-A",
                                   "vertices": [[40000, 5000], [200000, 5000], [200000, 150000], [40000, 150000]]}},
        {"name": "CD3+", "parent": "cells", "gate": {"type": "threshold", "markers": {"CD3": "+"}}},
        {"name": "ell", "parent": "cells", "gate": {"type": "ellipse", "x": "CD3", "y": "CD4", "center": [0.4, 0.4],
                                                    "covariance": [[0.02, 0.01], [0.01, 0.03]], "distance_square": 1}},
        {"name": "rect", "parent": "cells", "gate": {"type": "rectangle", "x": "CD20", "y": "CD33", "xmin": 0.3,
                                                     "ymax": 0.5}},
        {"name": "rare", "parent": "CD3+", "gate": {"type": "range", "marker": "pStat3", "min": 0.55}},
        {"name": "Q", "parent": "CD3+", "gate": {"type": "quadrant", "x": "CD4", "y": "CD20", "x_cut": "CD4.pos",
                                                 "y_cut": 0.4, "names": {"++": "a", "+-": "b", "-+": "c", "--": "d"}}},
        {"name": "notA", "parent": "CD3+", "gate": {"type": "boolean", "op": "not", "of": ["a"]}},
    ],
}


def _gate_comp(template):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return gate_files([str(COMP_FCS)], template)


@pytest.fixture(scope="module")
def demo():
    t = parse_template(DOC)
    batch = _gate_comp(t)
    assert not batch.errors
    return t, batch


def chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        exe = shutil.which(name)
        if exe:
            return exe
    pytest.fail("headless Chromium not found: run `.ci/install-browser.sh` (apt-get install -y chromium) "
                "before the test suite")


def render_dom(path, tmp_path) -> str:
    """The DOM of the page after load (its inline script has run), from headless Chromium."""
    cmd = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp_path / 'chromium-profile'}", "--virtual-time-budget=10000",
           "--dump-dom", path.resolve().as_uri()]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert out.returncode == 0 and "<html" in out.stdout, f"chromium failed: {out.stderr[-2000:]}"
    return out.stdout


class Dom(HTMLParser):
    """Collects tags with their attributes, and the cell texts of every table row."""

    def __init__(self, text: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.rows: list[tuple[dict, list[str]]] = []
        self._row = None
        self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.append((tag, a))
        if tag == "tr":
            self._row = (a, [])
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None and self._row is not None:
            self._row[1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def find(self, tag, **attrs):
        return [a for t, a in self.tags if t == tag and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())]


# --------------------------------------------------------------------------- figures


def test_gate_figure_overlays_every_gate(demo):
    import matplotlib.pyplot as plt
    from matplotlib.patches import Ellipse, Polygon, Rectangle

    t, batch = demo
    res = batch.results[0]
    panels = gate_panels(t)
    # booleans are not drawn; the quadrant's four populations share one plot
    assert [[p.name for p in ps] for ps in panels] == [["cells"], ["CD3+"], ["ell"], ["rect"], ["rare"],
                                                       ["a", "b", "c", "d"]]
    fig = gate_figure(res)
    assert len(fig.axes) == len(panels)
    ax = {a.get_title().split("\n")[0]: a for a in fig.axes}
    gids = {a.get_title().split("\n")[0]: {x.get_gid(): x for x in [*a.patches, *a.lines] if x.get_gid()}
            for a in fig.axes}

    poly = gids["cells"]["gate:cells"]
    assert isinstance(poly, Polygon)
    np.testing.assert_allclose(poly.get_xy()[:4], t["cells"].gate.vertices)
    assert ax["cells"].get_xlabel() == "FSC-A (linear)"

    # the data-driven CD4 threshold drawn is the value fitted for this sample
    cd4 = {(f.marker, f.cut): f.value for f in res.thresholds}[("CD4", "pos")]
    qlines = [ln for ln in ax["Q"].lines if ln.get_gid() == "gate:Q"]
    assert sorted(ln.get_xdata()[0] for ln in qlines if ln.get_xdata()[0] == ln.get_xdata()[1])[0] == \
        pytest.approx(cd4)
    assert any(ln.get_ydata()[0] == pytest.approx(0.4) and ln.get_ydata()[1] == pytest.approx(0.4) for ln in qlines)
    texts = " ".join(x.get_text() for x in ax["Q"].texts)
    for q in "abcd":
        assert f"{res.count(q):,} (" in texts

    rect = gids["rect"]["gate:rect"]
    assert isinstance(rect, Rectangle)
    assert rect.get_x() == pytest.approx(0.3) and rect.get_y() + rect.get_height() == pytest.approx(0.5)

    ell = gids["ell"]["gate:ell"]
    assert isinstance(ell, Ellipse) and ell.center == pytest.approx((0.4, 0.4))
    w = np.linalg.eigvalsh([[0.02, 0.01], [0.01, 0.03]])
    assert sorted([ell.width, ell.height]) == pytest.approx(sorted(2 * np.sqrt(w)))

    # 1-D gate: histogram with the cut at the CD3 threshold, title with count and % of parent
    assert gids["CD3+"]["cut:CD3+"].get_xdata()[0] == pytest.approx(0.3)
    n, pn = res.count("CD3+"), res.count("cells")
    assert ax["CD3+"].get_title().split("\n")[1] == f"{n:,} events, {100 * n / pn:.1f}% of cells"
    assert ax["CD3+"].get_xlabel() == "CD3 (logicle)"
    plt.close(fig)


def test_gate_figure_subsamples(demo):
    import matplotlib.pyplot as plt

    _, batch = demo
    res = batch.results[0]
    fig = gate_figure(res, max_points=500)
    mesh = fig.axes[0].collections[0]          # root panel: all 10,703 events -> 500 drawn
    assert int(np.ma.sum(mesh.get_array())) == 500
    plt.close(fig)
    fig = gate_figure(res)
    assert int(np.ma.sum(fig.axes[0].collections[0].get_array())) == res.n_events
    plt.close(fig)


# --------------------------------------------------------------------------- HTML


def _reference_db(tmp_path, table, sample, shifts):
    """A study database whose history is ``table``'s reference sample jittered by ``shifts`` (in % points)."""
    db = tmp_path / "study.sqlite"
    ref = table[table["sample_id"] == sample]
    for i, s in enumerate(shifts):
        add_reference(db, f"B{i:02d}", ref.assign(pct_parent=ref["pct_parent"] + s), date=f"2024-01-{i + 10}")
    return db


def test_report_html_content(demo, tmp_path):
    t, batch = demo
    sid = batch.results[0].sample_id
    db = _reference_db(tmp_path, batch.table, sid, [-1.0, 1.0, -0.5, 0.5])
    path = build_report(batch, tmp_path / "out", reference_db=db, reference_sample=sid, min_sample_events=20_000)
    assert path.name == "report.html"
    dom = Dom(path.read_text())
    pops = [r for r in dom.rows if r[0].get("data-population") and len(r[1]) == 6]
    assert [r[1][0] for r in pops] == t.names
    counts = {r[1][0]: int(r[1][2].replace(",", "")) for r in pops}
    assert counts == {n: batch.results[0].count(n) for n in t.names}
    assert sum(1 for r in pops if r[0].get("class") == "low") == sum(c < 100 for c in counts.values()) >= 1
    warns = re.findall(r'<li class="warning">([^<]*)</li>', path.read_text())
    assert any("low event count" in w and "10,703" in w for w in warns)
    assert any("under 100 events" in w and "rare (" in w for w in warns)
    assert not any("FAILED" in w for w in warns)
    # the reference check: each population passes (it *is* the history's centre)
    check = [r for r in dom.rows if r[0].get("class", "").startswith("status-")]
    assert len(check) == len(t.names) and all(r[0]["class"] == "status-pass" for r in check)
    imgs = dom.find("img")
    assert len(dom.find("img", **{"class": "gating"})) == 1
    assert len(dom.find("img", **{"class": "levey-jennings"})) == len(t.names)
    assert all(a["src"].startswith("data:image/png;base64,iVBORw0KGgo") and len(a["src"]) > 2000 for a in imgs)
    assert (tmp_path / "out" / "populations.csv").exists() and (tmp_path / "out" / "reference_check.csv").exists()


def test_report_flags_reference_failure(demo, tmp_path):
    _, batch = demo
    sid = batch.results[0].sample_id
    db = _reference_db(tmp_path, batch.table, sid, [10.0, 10.2, 9.8, 10.1])  # history ~10 points higher
    path = build_report(batch, tmp_path / "out", reference_db=db, reference_sample=sid)
    text = path.read_text()
    assert "<strong>FAIL</strong>" in text
    assert re.search(r'<li class="warning">reference [^<]*CD3\+ \(demo\) FAILED 1-3s', text)
    # without a reference sample name and none containing "ref": skipped with a warning, not an error
    path = build_report(batch, tmp_path / "out2", reference_db=db)
    assert "no reference sample identified" in path.read_text()


def test_report_renders_in_chromium(tmp_path):
    """Real data: two treg samples of the example set, one as the reference sample with a stored history."""
    files = sorted(EXAMPLE.glob("P1_W0[01]_treg.fcs"))
    assert len(files) == 2, f"example data missing in {EXAMPLE}"
    template = load_template(GATING / "treg.yaml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = gate_files([str(f) for f in files], template)
    ref = files[0].stem
    db = _reference_db(tmp_path, batch.table, ref, [0.3, -0.3, 0.2, -0.2, 0.0])
    path = build_report(batch, tmp_path / "report", reference_db=db, reference_sample=ref)

    dom = Dom(render_dom(path, tmp_path))
    check = dom.find("p", id="image-check")
    n_img = len(dom.find("img"))
    assert n_img == 2 + len(template.names)            # 2 gating figures + one Levey-Jennings per population
    assert check and check[0]["data-total"] == str(n_img)
    assert check[0]["data-decoded"] == str(n_img), f"images not decoded: {check[0].get('data-failed')}"
    tables = dom.find("table", **{"class": "populations"})
    assert [a["data-sample-id"] for a in tables] == [f.stem for f in files]
    rows = [r for r in dom.rows if r[0].get("data-population") and len(r[1]) == 6]
    assert len(rows) == 2 * len(template.names)
    treg = [r for r in rows if r[1][0] == "Treg"]
    want = batch.table[batch.table["population"] == "Treg"]["count"].tolist()
    assert [int(r[1][2].replace(",", "")) for r in treg] == want
    assert len(dom.find("table", **{"class": "reference-check"})) == 1

    # negative control: a corrupt image is reported as not decoded
    broken = path.with_name("broken.html")
    broken.write_text(path.read_text().replace("base64,iVBORw0KGgo", "base64,AAAAiVBORw0KGgo", 1))
    check = Dom(render_dom(broken, tmp_path)).find("p", id="image-check")[0]
    assert check["data-decoded"] == str(n_img - 1)


def test_cli_report(tmp_path):
    files = sorted(EXAMPLE.glob("P2_W00_*.fcs"))
    tcell = [str(f) for f in files if f.stem.endswith("tcell")]
    assert tcell
    r = CliRunner().invoke(main, ["report", "--template", str(GATING / "tcell_skin_homing.yaml"), *tcell,
                                  str(tmp_path / "missing.fcs"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert "1 sample(s) gated, 1 failed" in r.output
    html = (tmp_path / "rep" / "report.html").read_text()
    assert "missing.fcs" in html and 'id="errors"' in html
    table = pd.read_csv(tmp_path / "rep" / "populations.csv")
    assert set(table["sample_id"]) == {"P2_W00_tcell"}
    assert html.count('<img class="gating"') == 1


def test_report_draws_the_values_the_engine_gates():
    """Gating-ML compliance case with a template spillover matrix (``compensation-ref="MySpill"``): the
    values a report panel draws are FlowKit's values for that gate, event for event, and the engine's
    membership is exactly the rectangle on them."""
    import flowkit as fk

    from conftest import SHARED
    from immuneprofile import gate_sample, load_fcs, read_gatingml
    from immuneprofile.engine import EventValues
    from immuneprofile.qc.report import panel_events

    gml = SHARED / "gatingml2_compliance"
    doc, fcs = gml / "gml" / "gml_matrix_rect3_gate.xml", gml / "data1.fcs"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tmpl = read_gatingml(doc)
        res = gate_sample(load_fcs(fcs), tmpl)
        gs = fk.parse_gating_xml(str(doc))
        sample = fk.Sample(str(fcs))
        truth = gs._preprocess_sample_events(sample, gs.get_gate("Rectangle3"))  # FlowKit's gate input
    pop = tmpl.populations[0]
    idx, parent_n, (x, y) = panel_events(res, pop, EventValues(res.data, tmpl), res.n_events,
                                         np.random.default_rng(0))
    assert parent_n == res.n_events and np.array_equal(idx, np.arange(res.n_events))
    np.testing.assert_allclose(x, truth["FITC"].to_numpy(), rtol=1e-12, atol=1e-9)
    np.testing.assert_allclose(y, truth["PE"].to_numpy(), rtol=1e-12, atol=1e-9)
    inside = (x >= 5) & (x < 70) & (y >= 9) & (y < 208)
    assert np.array_equal(res.mask(pop.name), inside)
    assert 0 < inside.sum() < res.n_events
