"""immuneprofile: cytometry gating and biomarker analysis built on FlowKit."""

__version__ = "0.1.0"
