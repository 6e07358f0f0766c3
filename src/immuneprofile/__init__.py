"""immuneprofile: cytometry gating and biomarker analysis built on FlowKit.

The public API::

    from immuneprofile import load_fcs, load_template, gate_sample, population_table
    data = load_fcs("P1_W00_treg.fcs")            # FlowKit read + compensation
    tmpl = load_template("gating/treg.yaml")      # validated, marker-named template
    res = gate_sample(data, tmpl)                 # vectorised engine, FlowKit-identical
    table = population_table([res])               # tidy pandas table
"""

from .gatingml import read_gatingml, write_gatingml
from .gating import Batch, GatingError, GatingResult, gate_files, gate_sample
from .io import FCSData, FCSError, MarkerError, load_fcs
from .stats import population_table, thresholds_table, to_anndata
from .template import Template, TemplateError, load_template, parse_template

__version__ = "0.1.0"

__all__ = [
    "Batch",
    "FCSData",
    "FCSError",
    "GatingError",
    "GatingResult",
    "MarkerError",
    "Template",
    "TemplateError",
    "gate_files",
    "gate_sample",
    "load_fcs",
    "load_template",
    "parse_template",
    "population_table",
    "read_gatingml",
    "thresholds_table",
    "to_anndata",
    "write_gatingml",
]
