"""Exchange with other tools: FlowKit GatingStrategy, Gating-ML 2.0, FlowJo workspaces."""

from __future__ import annotations

from immuneprofile.interop.flowjo import (
    FlowJoError,
    add_flowjo_counts,
    flowjo_counts,
    flowjo_groups,
    read_flowjo,
    write_flowjo,
)
from immuneprofile.interop.flowkit import (
    flowkit_gate_path,
    to_gating_strategy,
)
from immuneprofile.interop.gatingml import (
    NS_DATATYPE,
    NS_GATING,
    NS_TRANSFORMS,
    GatingMLError,
    GatingMLWarning,
    from_gating_strategy,
    read_gatingml,
    write_gatingml,
)

__all__ = [
    "FlowJoError",
    "add_flowjo_counts",
    "flowjo_counts",
    "flowjo_groups",
    "read_flowjo",
    "write_flowjo",
    "GatingMLError",
    "GatingMLWarning",
    "NS_DATATYPE",
    "NS_GATING",
    "NS_TRANSFORMS",
    "flowkit_gate_path",
    "from_gating_strategy",
    "read_gatingml",
    "to_gating_strategy",
    "write_gatingml",
]
