"""Studies: sample sheets, the clinical table, association with PASI, the simulator."""

from __future__ import annotations

from immuneprofile.study.association import (
    METHODS,
    MIN_PATIENTS_FOR_INFERENCE,
    associate,
    correlate,
    mixed_model,
    rmcorr,
    spearman_changes,
)
from immuneprofile.study.clinical import (
    DEFAULT_PSEUDOCOUNT,
    PASI_MAX,
    ClinicalDataError,
    join_clinical,
    pasi_response,
    read_clinical,
    read_populations,
    read_sample_sheet,
    sample_metadata_from_fcs,
    select_populations,
    subset_changes,
    validate_clinical,
    validate_sample_sheet,
)
from immuneprofile.study.run import (
    DEFAULT_TEMPLATES,
    run_study,
)

__all__ = [
    "ClinicalDataError",
    "DEFAULT_PSEUDOCOUNT",
    "DEFAULT_TEMPLATES",
    "METHODS",
    "MIN_PATIENTS_FOR_INFERENCE",
    "PASI_MAX",
    "associate",
    "correlate",
    "join_clinical",
    "mixed_model",
    "pasi_response",
    "read_clinical",
    "read_populations",
    "read_sample_sheet",
    "rmcorr",
    "run_study",
    "sample_metadata_from_fcs",
    "select_populations",
    "spearman_changes",
    "subset_changes",
    "validate_clinical",
    "validate_sample_sheet",
]
