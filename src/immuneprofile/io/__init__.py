"""FCS reading, compensation and marker matching."""

from __future__ import annotations

from immuneprofile.io.fcs import (
    FCSData,
    FCSError,
    MARKER_ALIASES,
    MarkerError,
    load_fcs,
    normalize_marker,
)
from immuneprofile.io.inspect import format_inspection, inspect_fcs

__all__ = [
    "FCSData",
    "FCSError",
    "MARKER_ALIASES",
    "MarkerError",
    "format_inspection",
    "inspect_fcs",
    "load_fcs",
    "normalize_marker",
]
