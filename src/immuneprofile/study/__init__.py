"""Studies: sample sheets, the clinical table, association with PASI, the simulator."""

from __future__ import annotations

from immuneprofile.study.association import (
    METHODS,
    MIN_PATIENTS_FOR_INFERENCE,
    MIN_PATIENTS_FOR_LMM,
    associate,
    associate_readouts,
    correlate,
    mixed_model,
    permutation_pvalues,
    rmcorr,
    spearman_changes,
)
from immuneprofile.study.claims import case_series_claims
from immuneprofile.study.clinical import (
    DEFAULT_PSEUDOCOUNT,
    MSC_PERIOD,
    PASI_MAX,
    PERIODS,
    ClinicalDataError,
    join_clinical,
    pasi_response,
    read_clinical,
    read_populations,
    read_sample_sheet,
    sample_metadata_from_fcs,
    select_populations,
    subset_changes,
    treatment_periods,
    validate_clinical,
    validate_sample_sheet,
)
from immuneprofile.study.readouts import (
    assay_cv,
    declared_readouts,
    describe_changes,
    join_readouts,
    read_readouts,
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
    "MIN_PATIENTS_FOR_LMM",
    "MSC_PERIOD",
    "PASI_MAX",
    "PERIODS",
    "assay_cv",
    "associate",
    "associate_readouts",
    "case_series_claims",
    "correlate",
    "describe_changes",
    "join_clinical",
    "join_readouts",
    "mixed_model",
    "pasi_response",
    "permutation_pvalues",
    "read_clinical",
    "read_populations",
    "read_readouts",
    "read_sample_sheet",
    "declared_readouts",
    "rmcorr",
    "run_study",
    "sample_metadata_from_fcs",
    "select_populations",
    "spearman_changes",
    "subset_changes",
    "treatment_periods",
    "validate_clinical",
    "validate_sample_sheet",
]
