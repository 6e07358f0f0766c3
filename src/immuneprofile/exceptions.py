"""One family of errors and warnings: everything immuneprofile raises derives from
:class:`ImmuneProfileError` (warnings from :class:`ImmuneProfileWarning`).

Each error is also a :class:`ValueError` (the input was wrong), so code that caught
``ValueError`` before keeps working. Messages name the file, the template and the
population or field at fault, and what to do.
"""

from __future__ import annotations

__all__ = [
    "ClinicalDataError",
    "DiscoveryError",
    "DuplicateBatchError",
    "FCSError",
    "FlowJoError",
    "FCSWarning",
    "GatingError",
    "GatingMLError",
    "GatingMLWarning",
    "ImmuneProfileError",
    "ImmuneProfileWarning",
    "MarkerError",
    "ReferenceDBError",
    "TemplateError",
    "ThresholdError",
    "ThresholdWarning",
    "TransformError",
]


class ImmuneProfileError(ValueError):
    """Base class of every error immuneprofile raises."""


class ImmuneProfileWarning(UserWarning):
    """Base class of every warning immuneprofile issues."""


class FCSError(ImmuneProfileError):
    """An FCS file could not be read or compensated; the message names the file."""


class MarkerError(ImmuneProfileError):
    """A marker named by a template is absent from (or ambiguous in) an FCS file."""


class TemplateError(ImmuneProfileError):
    """A template is malformed; the message names the file, the population and the fix."""


class TransformError(ImmuneProfileError):
    """A transform specification is malformed."""


class GatingError(ImmuneProfileError):
    """Gating a sample failed; the message names the file, template and population."""


class ThresholdError(ImmuneProfileError):
    """A data-driven threshold could not be fitted and has no fallback."""


class GatingMLError(ImmuneProfileError):
    """A Gating-ML document cannot be read or a template cannot be written as one."""


class FlowJoError(ImmuneProfileError):
    """A FlowJo workspace cannot be read, or a template or result cannot be written as one."""


class ClinicalDataError(ImmuneProfileError):
    """Invalid or inconsistent clinical or sample metadata.

    Messages name the offending file (or ``<DataFrame>``), the row(s) or column(s), and the fix.
    """


class DiscoveryError(ImmuneProfileError):
    """Embedding, clustering or concordance cannot run on the data given (``immuneprofile.tl``)."""


class ReferenceDBError(ImmuneProfileError):
    """The reference database or the reference sample cannot be used; the message says why and how to fix it."""


class DuplicateBatchError(ReferenceDBError):
    """A batch id is already stored in the reference database."""


class ThresholdWarning(ImmuneProfileWarning):
    """A data-driven threshold fell back to its template value."""


class GatingMLWarning(ImmuneProfileWarning):
    """A Gating-ML document needed repair (e.g. gates wrapped in a non-Gating-ML element)."""


class FCSWarning(ImmuneProfileWarning):
    """An FCS file is unusual but readable (the message says what was unusual and how it was read)."""
