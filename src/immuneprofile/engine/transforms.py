"""Transform specifications -> FlowKit's transform arithmetic.

Templates give transforms as small dicts (``{type: logicle, T: 262144, ...}``).
:func:`make_transform` turns them into FlowKit's own transform classes (for a
FlowKit ``GatingStrategy`` built from a template); :func:`exact_transform` gives
an object that makes the very same calls into FlowUtils as those classes do
(identical values) without importing FlowKit, whose import (its plotting stack)
costs seconds: the engine uses that one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

from immuneprofile.exceptions import TransformError

__all__ = ["AUTO", "DEFAULT_FLUORESCENCE", "MONOTONE", "TransformError", "density_transform", "exact_transform",
           "inverse_bound", "is_auto", "make_transform", "transform_key"]

DEFAULT_FLUORESCENCE: dict[str, Any] = {"type": "logicle", "T": 262144, "W": 0.5, "M": 4.5, "A": 0}

#: Transform types that are increasing on the whole real line (thresholds can be
#: mapped back to the raw scale, see :mod:`immuneprofile.gating`). FlowJo's ``biex``
#: (FlowKit's ``WSPBiexTransform``, a table interpolated linearly) and ``flowjo_log``
#: (``WSPLogTransform``) are increasing between the flat ends where FlowKit clamps
#: them; :func:`inverse_bound` maps a cut back only strictly inside that range.
MONOTONE = {"logicle", "asinh", "hyperlog", "linear", "biex", "flowjo_log"}

_PARAMS = {
    "logicle": ("T", "W", "M", "A"),
    "hyperlog": ("T", "W", "M", "A"),
    "asinh": ("T", "M", "A"),
    "linear": ("T", "A"),
    "log": ("T", "M"),
    "biex": ("neg", "width", "pos", "max"),  # FlowJo 10 biexponential (FlowKit's WSPBiexTransform)
    "flowjo_log": ("offset", "decades"),  # FlowJo 10 log (FlowKit's WSPLogTransform)
}
_DEFAULTS = {"T": 262144.0, "W": 0.5, "M": 4.5, "A": 0.0,
             "neg": 0.0, "width": -10.0, "pos": 4.418540, "max": 262144.0, "offset": 1.0, "decades": 4.0}


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
    if kind == "asinh" and "cofactor" in spec:
        return _asinh_cofactor(spec)
    if kind == "logicle" and _is_auto_width(spec):
        return _auto_logicle(spec)
    return _with_params(kind, spec)


def _asinh_cofactor(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``{type: asinh, cofactor: c}`` as Gating-ML's ``T, M, A``."""
    c = float(spec["cofactor"])
    if c <= 0:
        raise TransformError(f"asinh cofactor must be > 0, got {c}")
    t = float(spec.get("T", 262144.0))
    return {"type": "asinh", "T": t, "M": math.asinh(t / c) / math.log(10), "A": 0.0}


def _with_params(kind: str, spec: Mapping[str, Any]) -> dict[str, Any]:
    """A spec of ``kind`` with each of its parameters as a float (defaults filled in), checked."""
    out: dict[str, Any] = {"type": kind}
    unknown = set(spec) - {"type", *_PARAMS[kind]}
    if unknown:
        raise TransformError(f"{kind} transform takes {list(_PARAMS[kind])}, not {sorted(unknown)}")
    for p in _PARAMS[kind]:
        out[p] = float(spec.get(p, _DEFAULTS[p]))
    _check_params(out)
    return out


def _check_params(spec: Mapping[str, Any]) -> None:
    """Reject parameters for which the transform is undefined (FlowKit would fail on every file, or give NaN)."""
    bad = [k for k, v in spec.items() if k != "type" and not math.isfinite(v)]
    if bad:
        raise TransformError(f"{spec['type']} parameter(s) {bad} must be finite numbers")
    if spec["type"] in ("logicle", "hyperlog") and spec["W"] > spec["M"] / 2:
        raise TransformError(f"{spec['type']} W = {spec['W']:g} is above M/2 = {spec['M'] / 2:g}; "
                             "W must be at most M/2")


#: The value of ``W`` in a data-driven logicle spec before it is fitted (:mod:`immuneprofile.engine.fit2d`).
AUTO = "auto"


def _is_auto_width(spec: Mapping[str, Any]) -> bool:
    return str(spec.get("W", "")).lower() in ("auto", "estimate") or \
        str(spec.get("width", "")).lower() in ("auto", "estimate")


def _auto_logicle(spec: Mapping[str, Any]) -> dict[str, Any]:
    """``{type: logicle, W: auto}`` (or ``width: estimate``): ``W`` fitted per sample or batch from the data."""
    unknown = set(spec) - {"type", "T", "W", "M", "A", "width", "scope", "q"}
    if unknown:
        raise TransformError(f"data-driven logicle takes T, W: auto, M, A, scope, q, not {sorted(unknown)}")
    scope = str(spec.get("scope", "sample"))
    if scope not in ("sample", "batch"):
        raise TransformError(f"logicle scope must be 'sample' or 'batch', got {scope!r}")
    q = float(spec.get("q", 0.05))
    if not 0 < q < 1:
        raise TransformError(f"logicle q (quantile of the negative values) must be in (0, 1), got {q}")
    try:
        t, m, a = (float(spec.get(k, d)) for k, d in (("T", 262144.0), ("M", 4.5), ("A", 0.0)))
    except (TypeError, ValueError):
        raise TransformError(f"logicle T, M and A must be numbers, got {dict(spec)!r}") from None
    if t <= 0 or m <= 0:
        raise TransformError(f"logicle T and M must be > 0, got T={t}, M={m}")
    return {"type": "logicle", "T": t, "W": AUTO, "M": m, "A": a, "scope": scope, "q": q}


def is_auto(spec: Mapping[str, Any] | None) -> bool:
    """Whether a normalised spec still has a data-driven parameter to fit."""
    return spec is not None and spec.get("W") == AUTO


def transform_key(spec: Mapping[str, Any] | None) -> str:
    """A stable identifier of a spec, used as the FlowKit transform id and as cache key.

    Exact: each parameter is written as the shortest string that reads back as the same
    float (``repr``), so two transforms differing in any digit never share a key.
    """
    if spec is None:
        return "none"
    if is_auto(spec):
        return f"logicle_auto_T{spec['T']!r}_M{spec['M']!r}_A{spec['A']!r}_{spec['scope']}_q{spec['q']!r}"
    return spec["type"] + "_" + "_".join(f"{k}{float(spec[k])!r}" for k in _PARAMS[spec["type"]])


def make_transform(spec: Mapping[str, Any] | None):
    """FlowKit transform object for a normalised spec (``None`` -> ``None``)."""
    from flowkit import transforms as fkt

    if spec is None:
        return None
    if is_auto(spec):
        raise TransformError("a data-driven logicle (W: auto) has no transform until it is fitted "
                             "(immuneprofile.engine.fit2d.fit_template)")
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
    if k == "biex":
        return _biex(spec["neg"], spec["width"], spec["pos"], spec["max"])
    if k == "flowjo_log":
        return fkt.WSPLogTransform(offset=spec["offset"], decades=spec["decades"])
    raise TransformError(f"unknown transform type {k!r}")


@lru_cache(maxsize=16)
def _biex(neg: float, width: float, pos: float, top: float):
    """FlowKit's FlowJo biex (its table is built once per parameter set)."""
    from flowkit import transforms as fkt

    try:
        return fkt.WSPBiexTransform(negative=neg, width=width, positive=pos, max_value=top)
    except (ValueError, IndexError, ZeroDivisionError) as exc:
        raise TransformError(f"FlowJo biex with neg={neg}, width={width}, pos={pos}, max={top}: {exc}") from exc


def inverse_bound(spec: Mapping[str, Any], xform: Any, t: float) -> float | None:
    """``T^-1(t)`` on the raw scale if ``T`` is strictly increasing around ``t``, else ``None``.

    ``xform`` is :func:`make_transform` of ``spec``. For the clamped FlowJo transforms
    (``biex``, ``flowjo_log``) a cut at or beyond a flat end has no raw-scale equivalent
    (the engine then compares FlowKit's transformed values directly).
    """
    if spec["type"] == "flowjo_log":  # flat (0) up to `offset`, then offset * 10**(decades * t)
        return float(spec["offset"] * 10.0 ** (spec["decades"] * t)) if t > 0 else None
    if spec["type"] == "biex":  # flat beyond the ends of FlowKit's table
        ys = xform._lut_func.y
        if not ys[0] < t < ys[-1]:
            return None
    v = float(np.asarray(xform.inverse(np.array([[t]], dtype=float))).reshape(-1)[0])
    return v if np.isfinite(v) else None


#: FlowJo's transforms (FlowKit's WSPBiexTransform, WSPLogTransform): evaluated by FlowKit's objects.
_FLOWJO = {"biex", "flowjo_log"}


class ExactTransform:
    """A transform computed exactly as FlowKit's transform class of the same spec computes it.

    FlowKit's ``LogicleTransform``, ``HyperlogTransform``, ``AsinhTransform`` and
    ``LogTransform`` call ``flowutils.transforms.<type>(events, None, t=..., ...)``
    (and ``<type>_inverse``); ``LinearTransform`` computes ``(x + A) / (T + A)``.
    This class makes the same calls with the same arguments, so its values are
    FlowKit's bit for bit (tests/test_kernels.py), and imports only FlowUtils.
    """

    __slots__ = ("kind", "params")

    def __init__(self, spec: Mapping[str, Any]) -> None:
        self.kind = spec["type"]
        if self.kind not in _PARAMS:
            raise TransformError(f"unknown transform type {self.kind!r}")
        self.params = {k.lower(): spec[k] for k in _PARAMS[self.kind]}

    def _call(self, events: np.ndarray, inverse: bool) -> np.ndarray:
        if self.kind == "linear":
            t, a = self.params["t"], self.params["a"]
            return (events * (t + a)) - a if inverse else (events + a) / (t + a)
        from flowutils import transforms as fut

        fn = getattr(fut, self.kind + ("_inverse" if inverse else ""))
        return fn(events, None, **self.params)

    def apply(self, events: np.ndarray) -> np.ndarray:
        """Transformed values (as FlowKit's ``apply``: a 2-D array of events x channels)."""
        return self._call(events, False)

    def inverse(self, events: np.ndarray) -> np.ndarray:
        """Values on the raw scale (as FlowKit's ``inverse``)."""
        return self._call(events, True)


def exact_transform(spec: Mapping[str, Any] | None) -> Any:
    """:class:`ExactTransform` of a normalised spec (``None`` -> ``None``): FlowKit's values without FlowKit."""
    if spec is None:
        return None
    if spec["type"] in _FLOWJO:  # FlowJo's clamped, tabulated transforms: FlowKit's own objects
        return make_transform(spec)
    return ExactTransform(spec)


#: Transforms FlowKit evaluates by root finding per value (slow); the others are closed-form.
_ITERATIVE = {"logicle", "hyperlog"}
#: Table of :func:`density_transform`: knots per octave, and the octaves (powers of two) covered.
_PER_OCTAVE = 1024
_OCTAVES = (-30, 40)


def density_transform(spec: Mapping[str, Any] | None):
    """A fast evaluator of a transform, for density estimates (data-driven thresholds).

    Closed-form transforms are FlowKit's own. Logicle and hyperlog, which
    FlowKit evaluates by root finding (~150 ns a value), are interpolated
    linearly in a table of FlowKit's values at 1024 knots per octave of
    ``|x|`` from ``2**-30`` to ``2**40`` (linear in between ``+-2**-30``; FlowKit's
    own values beyond ``2**40`` and for NaN): within 2e-8 of FlowKit, ~20x faster.
    Gating never uses this: gates compare against FlowKit's exact values
    (:mod:`immuneprofile.gating`).

    Returns
    -------
    callable
        ``f(values, out=None) -> transformed values`` (1-D float arrays; into ``out`` if given).
    """
    if spec is None:
        return _into(lambda x: np.asarray(x, dtype=float))
    if spec["type"] not in _ITERATIVE:
        xf = exact_transform(spec)
        return _into(lambda x: np.asarray(xf.apply(np.asarray(x, dtype=float).reshape(-1, 1)), dtype=float).reshape(-1))
    return _table_transform(tuple(sorted(spec.items())))


def _into(f):
    def apply(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        y = f(x)
        if out is None:
            return y
        out[:] = y
        return out

    return apply


@lru_cache(maxsize=32)  # pure function of the spec: a bounded per-process memo of lookup tables
def _table_transform(items: tuple):
    from immuneprofile.engine._kernels import kernels_for

    xf = exact_transform(dict(items))

    def exact(x: np.ndarray) -> np.ndarray:
        return np.asarray(xf.apply(np.asarray(x, dtype=float).reshape(-1, 1)), dtype=float).reshape(-1)

    e0, e1 = _OCTAVES
    knots = np.ldexp(1.0 + np.arange(_PER_OCTAVE) / _PER_OCTAVE, np.arange(e0, e1)[:, None]).ravel()
    knots = np.append(knots, 2.0 ** e1)
    pos_tab, neg_tab = exact(knots), exact(-knots)

    def apply(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=float)
        out = np.empty(x.shape[0]) if out is None else out
        if kernels_for(x.shape[0]).octave_lookup(x, e0, _PER_OCTAVE, pos_tab, neg_tab, out):
            far = np.isnan(out)
            out[far] = exact(x[far])
        return out

    return apply
