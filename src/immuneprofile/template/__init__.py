"""Gating templates: the model, YAML parsing and validation."""

from __future__ import annotations

from immuneprofile.template.parse import (
    BooleanGate,
    Dim,
    EllipseGate,
    PolygonGate,
    Population,
    RectGate,
    THRESHOLD_METHODS,
    Template,
    TemplateError,
    ThresholdRef,
    load_template,
    parse_template,
)
from immuneprofile.template.write import template_to_dict, write_template
from immuneprofile.template.shipped import (
    PANEL_TEMPLATES,
    resolve_template,
    shipped_templates,
)

__all__ = [
    "PANEL_TEMPLATES",
    "resolve_template",
    "shipped_templates",
    "BooleanGate",
    "Dim",
    "EllipseGate",
    "PolygonGate",
    "Population",
    "RectGate",
    "THRESHOLD_METHODS",
    "Template",
    "TemplateError",
    "ThresholdRef",
    "load_template",
    "parse_template",
    "template_to_dict",
    "write_template",
]
