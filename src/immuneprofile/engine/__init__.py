"""The vectorised gating engine: kernels, transforms, data-driven thresholds, gating."""

from __future__ import annotations

from immuneprofile._lazy import lazy_attributes

# imported on first use: the engine's modules and the template parser import each other's parts
_LAZY = {
    "GatingError": "immuneprofile.engine.gating",
    "GatingResult": "immuneprofile.engine.gating",
    "ThresholdFit": "immuneprofile.engine.gating",
    "gate_sample": "immuneprofile.engine.gating",
    "DEFAULT_FLUORESCENCE": "immuneprofile.engine.transforms",
    "MONOTONE": "immuneprofile.engine.transforms",
    "TransformError": "immuneprofile.engine.transforms",
    "density_transform": "immuneprofile.engine.transforms",
    "exact_transform": "immuneprofile.engine.transforms",
    "make_transform": "immuneprofile.engine.transforms",
    "transform_key": "immuneprofile.engine.transforms",
    "ThresholdError": "immuneprofile.engine.thresholds",
    "ThresholdWarning": "immuneprofile.engine.thresholds",
    "density_peaks": "immuneprofile.engine.thresholds",
    "fit_threshold": "immuneprofile.engine.thresholds",
    "Compensation": "immuneprofile.engine.values",
    "EventValues": "immuneprofile.engine.values",
    "gate_compensation": "immuneprofile.engine.values",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())

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
    "exact_transform",
    "fit_threshold",
    "gate_compensation",
    "gate_sample",
    "make_transform",
    "transform_key",
]
