"""FCS reading, compensation and marker matching."""

from __future__ import annotations

from immuneprofile.io.fcs import (
    MARKER_ALIASES,
    FCSData,
    FCSError,
    MarkerError,
    load_fcs,
    normalize_marker,
)

__all__ = [
    "FCSData",
    "FCSError",
    "MARKER_ALIASES",
    "MarkerError",
    "load_fcs",
    "normalize_marker",
]
