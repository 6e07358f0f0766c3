"""The vectorised gating engine: kernels, transforms, data-driven thresholds, gating."""

from __future__ import annotations

from immuneprofile.engine.gating import (
    GatingError,
    GatingResult,
    ThresholdFit,
    gate_sample,
)
from immuneprofile.engine.thresholds import (
    ThresholdError,
    ThresholdWarning,
    density_peaks,
    fit_threshold,
)
from immuneprofile.engine.transforms import (
    DEFAULT_FLUORESCENCE,
    MONOTONE,
    TransformError,
    density_transform,
    make_transform,
    transform_key,
)
from immuneprofile.engine.values import Compensation, EventValues, gate_compensation

__all__ = [
    "Compensation",
    "EventValues",
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
    "fit_threshold",
    "gate_compensation",
    "gate_sample",
    "make_transform",
    "transform_key",
]
