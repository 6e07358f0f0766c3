"""The vectorised gating engine: kernels, transforms, data-driven thresholds, gating."""

from __future__ import annotations

from immuneprofile.engine.gating import (
    GatingError,
    GatingResult,
    ThresholdFit,
    gate_sample,
)
from immuneprofile.engine.transforms import (
    DEFAULT_FLUORESCENCE,
    MONOTONE,
    TransformError,
    density_transform,
    exact_transform,
    make_transform,
    transform_key,
)
from immuneprofile.engine.thresholds import (
    ThresholdError,
    ThresholdWarning,
    density_peaks,
    fit_threshold,
)

__all__ = [
    "DEFAULT_FLUORESCENCE",
    "GatingError",
    "GatingResult",
    "MONOTONE",
    "ThresholdError",
    "ThresholdFit",
    "ThresholdWarning",
    "TransformError",
    "density_peaks",
    "density_transform",
    "exact_transform",
    "fit_threshold",
    "gate_sample",
    "make_transform",
    "transform_key",
]
