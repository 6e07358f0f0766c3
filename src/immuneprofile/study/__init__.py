"""Studies: sample sheets, the clinical table, association with PASI, the simulator."""

from __future__ import annotations

from immuneprofile.study.clinical import (
    ClinicalDataError,
    DEFAULT_PSEUDOCOUNT,
    PASI_MAX,
    MSC_PERIOD,
    PERIODS,
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
    describe_changes,
    join_readouts,
    read_readouts,
    readouts_from_populations,
)
from immuneprofile.study.association import (
    METHODS,
    MIN_PATIENTS_FOR_INFERENCE,
    MIN_PATIENTS_FOR_LMM,
    associate,
    associate_readouts,
    correlate,
    mixed_model,
    rmcorr,
    permutation_pvalues,
    spearman_changes,
)
from immuneprofile.study.claims import case_series_claims
from immuneprofile.study.run import (
    DEFAULT_TEMPLATES,
    run_study,
)

__all__ = [
    "ClinicalDataError",
    "MIN_PATIENTS_FOR_LMM",
    "MSC_PERIOD",
    "PERIODS",
    "assay_cv",
    "associate_readouts",
    "case_series_claims",
    "describe_changes",
    "join_readouts",
    "permutation_pvalues",
    "read_readouts",
    "readouts_from_populations",
    "treatment_periods",
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
