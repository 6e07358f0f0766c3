"""Gating many files: one task per file, bad files reported and skipped.

:func:`gate_files` reads each file once and gates it with every template
(:func:`immuneprofile.gate_sample`); ``scope: batch`` thresholds are fitted
first on values pooled over every file.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from immuneprofile.engine.gating import (
    GatingError,
    GatingResult,
    ThresholdFit,
    _gate_templates,
    gate_sample,
)
from immuneprofile.engine.transforms import density_transform
from immuneprofile.engine.values import EventValues
from immuneprofile.io.fcs import MarkerError
from immuneprofile.template.parse import Dim, Population, RectGate, Template, ThresholdRef

__all__ = ["Batch", "gate_files"]


@dataclass
class Batch:
    """Results of gating many files with one template.

    Attributes
    ----------
    results
        One :class:`GatingResult` per file that gated (with event data when gated in-process).
    table
        The population table of all those samples (:func:`immuneprofile.population_table`).
    thresholds
        Every threshold used, per sample (:func:`immuneprofile.thresholds_table`).
    errors
        ``{path: message}`` for every file that could not be read or gated.
    """

    results: list[GatingResult]
    table: Any
    thresholds: Any
    errors: dict[str, str]


def _gate_path(path: str, templates: Sequence[Template], compensation: Any, keep_data: bool,
               fixed: Sequence[Mapping[tuple[str, str], Any] | None], threads: int):
    """Load one file and gate it with every template: ``(path, results, table, thresholds, error)``."""
    from immuneprofile.engine.thresholds import ThresholdError
    from immuneprofile.io.fcs import FCSError, load_fcs
    from immuneprofile.stats import population_table, thresholds_table

    try:
        results = _gate_templates(load_fcs(path, compensation), templates, [f or None for f in fixed], threads)
    except (FCSError, MarkerError, GatingError, ThresholdError) as exc:
        return path, None, None, None, str(exc)
    except Exception as exc:  # a file must never take the batch down
        return path, None, None, None, f"{path}: {type(exc).__name__}: {exc}"
    table = population_table(results)
    th = thresholds_table(results)
    if not keep_data:
        for res in results:
            res.data = None
    return path, results, table, th, None


def _batch_rules(template: Template) -> dict[tuple[str, str], tuple[dict, str | None, Population, Dim]]:
    """``{(marker, cut): (rule, fitted-on population or None, first user, its dim)}`` of ``scope: batch`` rules."""
    rules = {(m, c): spec for m, cuts in template.thresholds.items() for c, spec in cuts.items()
             if isinstance(spec, Mapping) and spec.get("scope") == "batch"}
    out: dict[tuple[str, str], tuple[dict, str | None, Population, Dim]] = {}
    for pop in template.populations:
        g = pop.gate
        if not isinstance(g, RectGate):
            continue
        for dim, bounds in zip(g.dims, g.bounds):
            for b in bounds:
                if isinstance(b, ThresholdRef):
                    key = (b.marker, b.cut)
                    if key in rules and key not in out:
                        rule = rules[key]
                        out[key] = (rule, rule.get("on", pop.parent), pop, dim)
    return out


def _closure(template: Template, names: Iterable[str | None]) -> set[str]:
    """The populations needed to gate ``names``: themselves, their ancestors and boolean operands."""
    need: set[str] = set()
    todo = [n for n in names if n is not None]
    while todo:
        n = todo.pop()
        if n in need:
            continue
        need.add(n)
        p = template[n]
        todo += ([p.parent] if p.parent else []) + [r for r, _ in getattr(p.gate, "refs", ())]
    return need


def _batch_values(path: str, sub: Template, template: Template, compensation: Any,
                  known: Mapping[tuple[str, str], Any], targets: list) -> dict | None:
    """Pass 1 for one file: the transformed values each batch threshold is fitted on (``None``: file failed)."""
    from immuneprofile.io.fcs import load_fcs

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = load_fcs(path, compensation)
            res = gate_sample(data, sub, thresholds=dict(known) or None, threads=1)
            cols = EventValues(data, template)
            out = {}
            for key, on, pop_name, dim, method in targets:
                sel = None if on is None else res.indices[on]
                if method == "quantile":  # read off the values: FlowKit's exact ones
                    out[key] = np.asarray(cols.transformed(dim, sel, True, pop_name), dtype=float)
                else:  # a density: the fast transform serves (as for per-sample fits)
                    out[key] = density_transform(dim.transform)(cols.raw(dim, sel, True, pop_name))
            return out
    except Exception:  # reported by pass 2, which gates (and fails on) the same file
        return None


def _load_quiet(path: str, compensation: Any):
    from immuneprofile.io.fcs import load_fcs

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_fcs(path, compensation)


def _fit_batch_shapes(paths: list[str], template: Template, compensation: Any) -> tuple[dict, str | None]:
    """Fit the ``scope: batch`` transforms and 2-D gates (:func:`~immuneprofile.engine.fit2d.fit_batch`)."""
    from functools import partial

    from immuneprofile.engine.fit2d import batch_items, fit_batch
    from immuneprofile.exceptions import ImmuneProfileError

    if not batch_items(template):
        return {}, None
    try:
        return fit_batch([partial(_load_quiet, p, compensation) for p in paths], template), None
    except ImmuneProfileError as exc:
        return {}, str(exc)


def _fit_batch_thresholds(paths: list[str], template: Template, compensation: Any, jobs: int,
                          given: Mapping[tuple[str, str], Any] | None = None,
                          ) -> tuple[dict[tuple[str, str], Any], str | None]:
    """Fit every ``scope: batch`` threshold once on the pooled values of all files (pass 1).

    A batch threshold whose fitted-on population needs another batch threshold is
    fitted in a later round, after that one; each round reads every file once.
    """
    from dataclasses import replace

    from immuneprofile.engine.thresholds import ThresholdError, fit_threshold

    rules = _batch_rules(template)
    fits: dict[tuple[str, str], Any] = dict(given or {})  # the batch transforms and 2-D gates, then thresholds
    pending = dict(rules)
    while pending:
        ready, subsets = [], {}
        for key, (rule, on, pop, dim) in pending.items():
            need = _closure(template, [on])
            uses = {(b.marker, b.cut) for n in need for bs in getattr(template[n].gate, "bounds", ())
                    for b in bs if isinstance(b, ThresholdRef)}
            if key in uses:
                return fits, (f"template {template.path}: batch threshold {key[0]}.{key[1]} is fitted on "
                              f"{on!r}, which is gated with that same threshold")
            if not (uses & set(pending)):
                ready.append(key)
                subsets[key] = need
        if not ready:  # pragma: no cover - a cycle through several thresholds
            return fits, f"template {template.path}: batch thresholds {sorted(pending)} depend on each other"
        need_all = set().union(*subsets.values())
        sub = replace(template, populations=[p for p in template.populations if p.name in need_all])
        targets = [(k, pending[k][1], pending[k][2].name, pending[k][3], pending[k][0]["method"]) for k in ready]
        if jobs > 1 and len(paths) > 1:
            from concurrent.futures import ProcessPoolExecutor

            with ProcessPoolExecutor(max_workers=min(jobs, len(paths))) as pool:
                per_file = list(pool.map(_batch_values, paths, [sub] * len(paths), [template] * len(paths),
                                         [compensation] * len(paths), [fits] * len(paths),
                                         [targets] * len(paths)))
        else:
            per_file = [_batch_values(p, sub, template, compensation, fits, targets) for p in paths]
        used = [v for v in per_file if v is not None]
        for key in ready:
            rule, on, pop, dim = pending.pop(key)
            pooled = np.concatenate([v[key] for v in used]) if used else np.empty(0)
            label = f"batch of {len(used)} file(s): {key[0]}.{key[1]}"
            try:
                value, fallback, note = fit_threshold(pooled, rule, label=label)
            except ThresholdError as exc:
                return fits, str(exc)
            note = "; ".join(x for x in (f"scope: batch, pooled over {len(used)} file(s)", note) if x)
            fits[key] = ThresholdFit(key[0], key[1], value, str(rule["method"]), on or "root",
                                     int(pooled.size), fallback, note)
    return fits, None


def gate_files(
    paths: Iterable[str],
    template: Template | Sequence[Template],
    *,
    compensation: Any = "auto",
    jobs: int = 1,
    progress: Any = None,
) -> Batch:
    """Gate a batch of FCS files with a template (or several); bad files are reported, not fatal.

    Parameters
    ----------
    paths
        FCS files.
    template
        The gating template, or a list of templates: each file is read once and
        gated with all of them (populations they share computed once, see
        :func:`immuneprofile.gate_sample`).
    compensation
        As for :func:`immuneprofile.load_fcs` (``"auto"``: each file's own spillover).
    jobs
        Worker processes (``1``: in-process, results keep their event data for
        AnnData export, and the engine uses every core; ``0`` or negative: all
        cores, one file per process).
    progress
        Optional callable ``progress(path, error_or_None)`` called after each file.

    Thresholds with ``scope: batch`` are fitted once on the fitted-on population's
    values pooled over all files (pass 1), then every file is gated with that value
    (pass 2). If such a fit fails without a ``fallback``, every file reports the error.

    Returns
    -------
    Batch
        ``results`` holds one result per file and template (files in order,
        templates in order within a file); the tables have a ``template`` column.
    """
    import os

    import pandas as pd

    templates = [template] if isinstance(template, Template) else list(template)
    paths = [os.fspath(p) for p in paths]
    if jobs <= 0:
        jobs = os.cpu_count() or 1
    fixed = []
    for t in templates:
        batch_fits, batch_error = _fit_batch_shapes(paths, t, compensation)
        if batch_error is None:
            batch_fits, batch_error = _fit_batch_thresholds(paths, t, compensation, jobs, batch_fits)
        if batch_error is not None:
            for p in paths:
                if progress:
                    progress(p, batch_error)
            return Batch(results=[], table=pd.DataFrame(), thresholds=pd.DataFrame(),
                         errors={p: batch_error for p in paths})
        fixed.append(batch_fits)
    outs = []
    if jobs == 1 or len(paths) <= 1:
        for p in paths:
            out = _gate_path(p, templates, compensation, True, fixed, 0)
            outs.append(out)
            if progress:
                progress(p, out[4])
    else:
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=min(jobs, len(paths))) as pool:
            futs = [pool.submit(_gate_path, p, templates, compensation, False, fixed, 1) for p in paths]
            for fut in futs:
                out = fut.result()
                outs.append(out)
                if progress:
                    progress(out[0], out[4])
    ok = [o for o in outs if o[4] is None]
    table = pd.concat([o[2] for o in ok], ignore_index=True) if ok else pd.DataFrame()
    th = pd.concat([o[3] for o in ok], ignore_index=True) if ok else pd.DataFrame()
    return Batch(results=[r for o in ok for r in o[1]], table=table, thresholds=th,
                 errors={o[0]: o[4] for o in outs if o[4] is not None})
