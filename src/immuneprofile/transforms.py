"""Transform specifications -> FlowKit transform objects.

Templates give transforms as small dicts (``{type: logicle, T: 262144, ...}``);
this module turns them into FlowKit's own transform classes so that the engine
and a FlowKit ``GatingStrategy`` built from the same template compute
identical values.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

__all__ = ["TransformError", "make_transform", "transform_key", "DEFAULT_FLUORESCENCE", "MONOTONE"]

DEFAULT_FLUORESCENCE: dict[str, Any] = {"type": "logicle", "T": 262144, "W": 0.5, "M": 4.5, "A": 0}

#: Transform types that are increasing on the whole real line (thresholds can be
#: mapped back to the raw scale, see :mod:`immuneprofile.gating`).
MONOTONE = {"logicle", "asinh", "hyperlog", "linear"}

_PARAMS = {
    "logicle": ("T", "W", "M", "A"),
    "hyperlog": ("T", "W", "M", "A"),
    "asinh": ("T", "M", "A"),
    "linear": ("T", "A"),
    "log": ("T", "M"),
}


class TransformError(ValueError):
    """A transform specification is malformed."""


def normalize_spec(spec: Any) -> dict[str, Any] | None:
    """Canonical dict form of a transform spec, ``None`` for no transform.

    Accepts ``"none"``/``None``, a type name (FlowKit defaults), or a dict.
    ``{type: asinh, cofactor: c}`` becomes the Gating-ML parameters
    ``T=262144, M=asinh(T/c)/ln 10, A=0`` (the same curve, rescaled to [0, 1]).
    """
    if spec is None or (isinstance(spec, str) and spec.lower() in ("none", "linear-raw", "raw")):
        return None
    if isinstance(spec, str):
        spec = {"type": spec}
    if not isinstance(spec, Mapping) or "type" not in spec:
        raise TransformError(f"transform must be 'none', a type name or a mapping with 'type': got {spec!r}")
    kind = str(spec["type"]).lower()
    if kind == "none":
        return None
    if kind not in _PARAMS:
        raise TransformError(f"unknown transform type {kind!r}; use one of {sorted(_PARAMS)} or 'none'")
    out: dict[str, Any] = {"type": kind}
    defaults = {"T": 262144.0, "W": 0.5, "M": 4.5, "A": 0.0}
    if kind == "asinh" and "cofactor" in spec:
        c = float(spec["cofactor"])
        if c <= 0:
            raise TransformError(f"asinh cofactor must be > 0, got {c}")
        t = float(spec.get("T", 262144.0))
        out.update(T=t, M=math.asinh(t / c) / math.log(10), A=0.0)
        return out
    unknown = set(spec) - {"type", *_PARAMS[kind]}
    if unknown:
        raise TransformError(f"{kind} transform takes {list(_PARAMS[kind])}, not {sorted(unknown)}")
    for p in _PARAMS[kind]:
        out[p] = float(spec.get(p, defaults[p]))
    return out


def transform_key(spec: Mapping[str, Any] | None) -> str:
    """A short stable identifier of a spec, used as the FlowKit transform id."""
    if spec is None:
        return "none"
    return spec["type"] + "_" + "_".join(f"{k}{spec[k]:g}" for k in _PARAMS[spec["type"]])


def make_transform(spec: Mapping[str, Any] | None):
    """FlowKit transform object for a normalised spec (``None`` -> ``None``)."""
    from flowkit import transforms as fkt

    if spec is None:
        return None
    k = spec["type"]
    if k == "logicle":
        return fkt.LogicleTransform(param_t=spec["T"], param_w=spec["W"], param_m=spec["M"], param_a=spec["A"])
    if k == "hyperlog":
        return fkt.HyperlogTransform(param_t=spec["T"], param_w=spec["W"], param_m=spec["M"], param_a=spec["A"])
    if k == "asinh":
        return fkt.AsinhTransform(param_t=spec["T"], param_m=spec["M"], param_a=spec["A"])
    if k == "linear":
        return fkt.LinearTransform(param_t=spec["T"], param_a=spec["A"])
    if k == "log":
        return fkt.LogTransform(param_t=spec["T"], param_m=spec["M"])
    raise TransformError(f"unknown transform type {k!r}")
