"""immuneprofile: cytometry gating and biomarker analysis built on FlowKit.

The public API::

    import immuneprofile as ip
    data = ip.load_fcs("P1_W00_treg.fcs")          # compensated events, FlowKit's values
    tmpl = ip.load_template("treg")                # a shipped template by name, or a YAML path
    res = ip.gate_sample(data, tmpl)               # vectorised engine, FlowKit-identical
    table = ip.population_table([res])             # tidy pandas table
    adata = ip.to_anndata([res])                   # events for scanpy; then discovery:
    ip.tl.embed(adata); ip.tl.cluster(adata); ip.pl.umap(adata, color="cluster")

Every public name is imported on first use (``import immuneprofile`` stays cheap: the command
line pays only for what a command uses; ``ip.tl`` and ``ip.pl`` bring scanpy and matplotlib).

The package's layout and data flow are described in ``docs/architecture.md``.
"""

from importlib.metadata import PackageNotFoundError, version

from immuneprofile._lazy import lazy_attributes
from immuneprofile.exceptions import (
    ClinicalDataError,
    FCSError,
    FlowJoError,
    GatingError,
    GatingMLError,
    ImmuneProfileError,
    ImmuneProfileWarning,
    MarkerError,
    ReferenceDBError,
    ResumeError,
    TemplateError,
    ThresholdError,
    ThresholdWarning,
    TransformError,
)

#: Public name -> the module that defines it, imported on first use.
_LAZY = {
    "Batch": "immuneprofile.batch",
    "gate_files": "immuneprofile.batch",
    "GatingResult": "immuneprofile.engine.gating",
    "gate_sample": "immuneprofile.engine.gating",
    "read_flowjo": "immuneprofile.interop.flowjo",
    "write_flowjo": "immuneprofile.interop.flowjo",
    "read_gatingml": "immuneprofile.interop.gatingml",
    "write_gatingml": "immuneprofile.interop.gatingml",
    "FCSData": "immuneprofile.io.fcs",
    "load_fcs": "immuneprofile.io.fcs",
    "population_table": "immuneprofile.stats",
    "thresholds_table": "immuneprofile.stats",
    "to_anndata": "immuneprofile.stats",
    "Template": "immuneprofile.template.parse",
    "load_template": "immuneprofile.template.parse",
    "parse_template": "immuneprofile.template.parse",
    "write_template": "immuneprofile.template.write",
    "tl": "immuneprofile.tl",
    "pl": "immuneprofile.pl",
}

__getattr__, __dir__ = lazy_attributes(__name__, _LAZY, globals())

try:
    __version__ = version("immuneprofile")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Batch",
    "ClinicalDataError",
    "FCSData",
    "FCSError",
    "FlowJoError",
    "GatingError",
    "GatingMLError",
    "GatingResult",
    "ImmuneProfileError",
    "ImmuneProfileWarning",
    "MarkerError",
    "ReferenceDBError",
    "ResumeError",
    "Template",
    "TemplateError",
    "ThresholdError",
    "ThresholdWarning",
    "TransformError",
    "gate_files",
    "gate_sample",
    "load_fcs",
    "load_template",
    "parse_template",
    "population_table",
    "read_flowjo",
    "read_gatingml",
    "thresholds_table",
    "to_anndata",
    "write_flowjo",
    "write_gatingml",
    "write_template",
]
