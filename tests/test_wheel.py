"""The package as users get it: a wheel built from this repository, installed in a fresh environment,
gates an example file with a shipped template by name, from an empty folder."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv

import pandas as pd

from conftest import EXAMPLE, ROOT


def _run(cmd, **kw):
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, **kw)
    assert out.returncode == 0, f"{cmd}: exit {out.returncode}\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def test_wheel_gates_with_a_shipped_template_from_an_empty_folder(tmp_path):
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-w", str(dist)])
    wheel = next(dist.glob("immuneprofile-*.whl"))

    env_dir = tmp_path / "env"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    site = _run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    # the dependencies come from this environment's site-packages: a plain path entry (its .pth files,
    # among them the editable install of this checkout, are not read), after the fresh env's own packages
    with open(f"{site}/zz_test_deps.pth", "w") as fh:
        fh.write(sysconfig.get_paths()["purelib"] + "\n")
    _run([str(py), "-m", "pip", "install", "--no-deps", "--no-index", str(wheel)])

    empty = tmp_path / "work"
    empty.mkdir()
    where = _run([str(py), "-c", "import immuneprofile; print(immuneprofile.__file__)"], cwd=empty).stdout
    assert where.startswith(str(env_dir)), where  # the wheel's package, not this checkout
    fcs = EXAMPLE / "P1_W00_treg.fcs"
    _run([str(env_dir / "bin" / "immuneprofile"), "gate", "-t", "treg", str(fcs), "-o", "out"], cwd=empty)

    got = pd.read_csv(empty / "out" / "populations.csv")
    golden = pd.read_csv(ROOT / "tests" / "golden" / "populations_treg.csv")
    want = golden[golden["sample_id"] == "P1_W00_treg"]
    assert len(want) > 3
    merged = want.merge(got, on=["sample_id", "population"], suffixes=("_golden", ""))
    assert len(merged) == len(want)
    assert (merged["count"] == merged["count_golden"]).all()
