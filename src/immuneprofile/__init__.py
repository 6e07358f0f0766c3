"""immuneprofile: cytometry gating and biomarker analysis built on FlowKit.

The public API::

    import immuneprofile as ip
    data = ip.load_fcs("P1_W00_treg.fcs")          # compensated events, FlowKit's values
    tmpl = ip.load_template("treg")                # a shipped template by name, or a YAML path
    res = ip.gate_sample(data, tmpl)               # vectorised engine, FlowKit-identical
    table = ip.population_table([res])             # tidy pandas table
    adata = ip.to_anndata([res])                   # events for scanpy; then discovery:
    ip.tl.embed(adata); ip.tl.cluster(adata); ip.pl.umap(adata, color="cluster")

``ip.tl`` and ``ip.pl`` are imported on first use (they bring scanpy and matplotlib).

The package's layout and data flow are described in ``docs/architecture.md``.
"""

from importlib.metadata import PackageNotFoundError, version

from immuneprofile.batch import Batch, gate_files
from immuneprofile.engine.gating import GatingResult, gate_sample
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
    TemplateError,
    ThresholdError,
    ThresholdWarning,
    TransformError,
)
from immuneprofile.interop.flowjo import read_flowjo, write_flowjo
from immuneprofile.interop.gatingml import read_gatingml, write_gatingml
from immuneprofile.io.fcs import FCSData, load_fcs
from immuneprofile.stats import population_table, thresholds_table, to_anndata
from immuneprofile.template.parse import Template, load_template, parse_template
from immuneprofile.template.write import write_template

try:
    __version__ = version("immuneprofile")
except PackageNotFoundError:  # pragma: no cover - running from a source tree that was never installed
    __version__ = "0+unknown"

def __getattr__(name: str):
    """``ip.tl`` and ``ip.pl`` on first use: scanpy/umap/flowsom stay out of ``import immuneprofile``."""
    if name in ("tl", "pl"):
        import importlib

        return importlib.import_module(f"immuneprofile.{name}")
    raise AttributeError(f"module 'immuneprofile' has no attribute {name!r}")


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
