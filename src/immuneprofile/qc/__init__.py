"""Quality control: the reference-sample store (Westgard rules) and the HTML report."""

from __future__ import annotations

from immuneprofile.qc.reference import (
    CHECK_COLUMNS,
    DuplicateBatchError,
    ReferenceDBError,
    add_reference,
    check_reference,
    history,
    levey_jennings,
    list_batches,
    read_population_table,
    remove_batch,
    select_reference,
    write_levey_jennings,
)
from immuneprofile.qc.report import (
    MAX_POINTS,
    MIN_POPULATION_EVENTS,
    MIN_SAMPLE_EVENTS,
    build_report,
    gate_figure,
    gate_panels,
    make_report,
    report_warnings,
)

__all__ = [
    "CHECK_COLUMNS",
    "DuplicateBatchError",
    "MAX_POINTS",
    "MIN_POPULATION_EVENTS",
    "MIN_SAMPLE_EVENTS",
    "ReferenceDBError",
    "add_reference",
    "build_report",
    "check_reference",
    "gate_figure",
    "gate_panels",
    "history",
    "levey_jennings",
    "list_batches",
    "make_report",
    "read_population_table",
    "remove_batch",
    "report_warnings",
    "select_reference",
    "write_levey_jennings",
]
