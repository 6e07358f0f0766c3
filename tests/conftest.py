"""Shared fixtures: paths to the reference data in ../shared (read in place)."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "reference"
EXAMPLE = ROOT / "example_data"
GATING = ROOT / "gating"
COMP_FCS = SHARED / "fcs" / "test_comp_example.fcs"  # a real file with $SPILLOVER


def flowkit_sample(path):
    """A FlowKit Sample read as FlowKit users read it (tolerating the known off-by-one offset files)."""
    import flowkit as fk

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return fk.Sample(str(path), subsample=0)
        except Exception:
            return fk.Sample(str(path), subsample=0, ignore_offset_error=True)


@pytest.fixture(scope="session")
def shared():
    if not SHARED.exists():
        pytest.fail(f"reference data missing: {SHARED} (the project expects ../shared beside it)")
    return SHARED


@pytest.fixture(scope="session")
def comp_data():
    """The real compensated reference file, loaded once."""
    from immuneprofile import load_fcs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_fcs(COMP_FCS)
