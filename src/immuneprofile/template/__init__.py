"""Gating templates: the model (:mod:`.model`), YAML parsing and validation (:mod:`.parse`), shipped templates."""

from __future__ import annotations

from immuneprofile.template.model import (
    BooleanGate,
    Dim,
    EllipseGate,
    PolygonGate,
    Population,
    RectGate,
    Template,
    ThresholdRef,
)
from immuneprofile.template.parse import THRESHOLD_METHODS, TemplateError, load_template, parse_template
from immuneprofile.template.shipped import (
    PANEL_TEMPLATES,
    resolve_template,
    shipped_templates,
)
from immuneprofile.template.write import template_to_dict, write_template

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
