"""Gating many files: one task per file, bad files reported and skipped, on one core or a Dask cluster.

:func:`gate_files` reads each file once and gates it with every template
(:func:`immuneprofile.gate_sample`); ``scope: batch`` thresholds are fitted
first on values pooled over every file, the samples loaded for those fits kept
for gating within a memory budget (:class:`_Reads`). Files are gated in this process
(``jobs=1``), on a local Dask cluster (``jobs=N``) or on an existing Dask
deployment (``scheduler=``: an address or a :class:`distributed.Client`), one
task per file. With ``parts=`` each file's tables are written (atomically) as
it finishes, so that an interrupted run can be resumed without regating the
files already done (``resume=True``).
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from immuneprofile._atomic import atomic_write
from immuneprofile.engine.gating import (
    GatingResult,
    ThresholdFit,
    _gate_templates,
    gate_sample,
)
from immuneprofile.engine.transforms import density_transform
from immuneprofile.engine.values import EventValues
from immuneprofile.exceptions import ImmuneProfileError, ResumeError, TemplateError
from immuneprofile.template.model import Dim, Population, RectGate, Template, ThresholdRef

__all__ = ["Batch", "FileResult", "gate_files"]


@dataclass
class Batch:
    """Results of gating many files with one template (or several).

    Attributes
    ----------
    results
        One :class:`GatingResult` per file and template gated in this run (with
        event data when gated in-process); files taken over from an earlier,
        interrupted run (``resume=True``) have table rows but no results.
    table
        The population table of all those samples (:func:`immuneprofile.population_table`).
    thresholds
        Every threshold used, per sample (:func:`immuneprofile.thresholds_table`).
    errors
        ``{path: message}`` for every file that could not be read or gated.
    gated
        The files gated, in input order (including those taken over by ``resume``).
    """

    results: list[GatingResult]
    table: Any
    thresholds: Any
    errors: dict[str, str]
    gated: list[str] = field(default_factory=list)


@dataclass
class FileResult:
    """One file's outcome: its gating results and tables, or the error that stopped it.

    Attributes
    ----------
    path
        The FCS file.
    results
        One :class:`GatingResult` per template (empty if the file failed or was resumed).
    table, thresholds
        The file's population and thresholds tables (``None`` if it failed).
    error
        ``None``, or the message naming the file and the problem.
    resumed
        The tables were read back from the parts of an earlier run.
    """

    path: str
    results: list[GatingResult] = field(default_factory=list)
    table: Any = None
    thresholds: Any = None
    error: str | None = None
    resumed: bool = False


def _message(path: str, exc: BaseException) -> str:
    """An error message that names the file."""
    msg = str(exc)
    if isinstance(exc, ImmuneProfileError):
        return msg if path in msg or os.path.basename(path) in msg else f"{path}: {msg}"
    return f"{path}: unexpected {type(exc).__name__}: {msg}"


# ----------------------------------------------------------------------------- reading each file once
def _event_bytes(data: Any) -> int:
    """Bytes of a loaded sample's events (and of any column copies made from them)."""
    return int(data.events.nbytes) + sum(int(c.nbytes) for c in data._columns.values())


def _default_budget() -> int:
    """A quarter of the memory available now, or of a Dask worker's memory limit if lower (2 GiB if unknown)."""
    try:
        import psutil

        budget = int(psutil.virtual_memory().available // 4)
    except Exception:  # noqa: BLE001 - psutil missing or unable to read the system: a fixed budget
        budget = 2 << 30
    try:
        from distributed import get_worker

        limit = get_worker().memory_manager.memory_limit
    except (ImportError, ValueError, AttributeError):  # not on a Dask worker, or a worker without a limit
        limit = None
    return min(budget, int(limit) // 4) if limit else budget


_WORKER_READS: dict[str, _Reads] = {}  # on a Dask worker: each batch's kept samples, by batch token


def _worker_reads(token: str | None, compensation: Any, cache_bytes: int | None) -> _Reads:
    """A ``_Reads`` sent to a worker: the worker's own store for that batch (an empty one without a token)."""
    if token is None:
        return _Reads(compensation, 0)
    if token not in _WORKER_READS:  # its budget known once a task runs (the worker's memory limit)
        _WORKER_READS[token] = _Reads(compensation, cache_bytes, token, cache_bytes)
    return _WORKER_READS[token]


def _drop_worker_reads(token: str) -> None:
    """Release a finished batch's samples kept on this worker."""
    _WORKER_READS.pop(token, None)


class _Reads:
    """Loads files, keeping them between the batch fits (pass 1) and gating (pass 2) within a budget.

    Pass 1 (:meth:`load`) keeps each sample it loads while the kept event bytes
    stay within ``budget``, so that the batch fits (every ``scope: batch``
    transform, 2-D gate and threshold round, of every template) and pass 2
    (:meth:`take`) read each kept file once; files beyond the budget are read
    again when needed. With a kept sample go the 2-D gates already fitted on it
    (:meth:`fitted`), so that pass 2 does not fit them again. The warnings of a
    kept file's load are shown when pass 2 takes it, as they would be had it read
    the file again. Sent to a Dask worker,
    a ``_Reads`` with a ``token`` becomes that worker's own store for the batch
    (its budget ``cache_bytes``, or a quarter of the worker's memory limit); one
    without arrives empty, with a zero budget.
    """

    def __init__(self, compensation: Any, budget: int | None, token: str | None = None,
                 cache_bytes: int | None = None) -> None:
        self.compensation, self.used = compensation, 0
        self.budget = None if budget is None else max(0, int(budget))  # None: the default, on first load
        self.token, self.cache_bytes = token, cache_bytes
        self.kept: dict[str, tuple[Any, list[warnings.WarningMessage], dict]] = {}

    def __reduce__(self) -> tuple:
        return _worker_reads, (self.token, self.compensation, self.cache_bytes)

    def load(self, path: str) -> Any:
        """The sample (kept, or read now and kept if it fits), its warnings held back for :meth:`take`."""
        from immuneprofile.io.fcs import load_fcs

        if path in self.kept:
            return self.kept[path][0]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            data = load_fcs(path, self.compensation)
        size = _event_bytes(data)
        if self.budget is None:
            self.budget = _default_budget()
        if self.used + size <= self.budget:
            self.kept[path] = (data, caught, {})
            self.used += size
        return data

    def fitted(self, path: str) -> dict | None:
        """The 2-D gates fitted so far on the kept sample of ``path`` (``None`` if it is not kept)."""
        return self.kept[path][2] if path in self.kept else None

    def take(self, path: str, threads: int = 0) -> tuple[Any, dict | None]:
        """The sample for gating and its fitted 2-D gates: the kept ones (released, warnings shown) or read now
        (on ``threads``, as for :func:`immuneprofile.load_fcs`)."""
        from immuneprofile.io.fcs import load_fcs

        if path not in self.kept:
            return load_fcs(path, self.compensation, threads=threads), None
        data, caught, fitted = self.kept.pop(path)
        self.used -= _event_bytes(data)
        for w in caught:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        return data, fitted

    def forget(self, paths: Iterable[str] | None = None) -> None:
        """Release the kept samples of ``paths`` (``None``: all of them)."""
        for p in list(self.kept) if paths is None else paths:
            if p in self.kept:
                self.used -= _event_bytes(self.kept.pop(p)[0])


def _gate_path(path: str, templates: Sequence[Template], reads: _Reads, keep_data: bool,
               fixed: Sequence[Mapping[tuple[str, str], Any] | None], threads: int) -> FileResult:
    """Load one file (or take it from ``reads``), gate it with every template and tabulate it (raises on failure)."""
    from immuneprofile.stats import population_table, thresholds_table

    data, fitted = reads.take(path, threads)
    results = _gate_templates(data, templates, [f or None for f in fixed], threads, fitted)
    table, th = population_table(results, threads=threads), thresholds_table(results)
    if not keep_data:
        for res in results:
            res.data = None
    return FileResult(path, results, table, th)


# ----------------------------------------------------------------------------- where tasks run
class _Now:
    """A finished-on-demand stand-in for a future: runs its task when its result is asked for."""

    def __init__(self, fn: Callable, args: tuple) -> None:
        self.fn, self.args = fn, args

    def result(self) -> Any:
        return self.fn(*self.args)


class _InProcess:
    """Runs each task in this process when it is collected (files one after the other)."""

    def submit(self, fn: Callable, path: str, *args: Any) -> _Now:
        return _Now(fn, (path, *args))

    @staticmethod
    def result(fut: _Now, path: str) -> Any:
        return fut.result()

    @staticmethod
    def as_completed(futures: list) -> Iterator:
        return iter(futures)

    def release(self, reads: _Reads) -> None:
        reads.forget()


def _placed(fn: Callable, *args: Any) -> tuple[Any, str | None]:
    """``fn(*args)`` on a Dask worker, and that worker's address."""
    from distributed import get_worker

    return fn(*args), get_worker().address


class _OnDask:
    """Runs each task on a Dask distributed cluster, one task per file.

    A file's next task goes preferably to the worker that ran its last one
    (which may keep the sample it loaded, see :class:`_Reads`); any worker runs
    it if that one is gone.
    """

    def __init__(self, client: Any) -> None:
        self.client = client
        self.placed: dict[str, str] = {}

    def submit(self, fn: Callable, path: str, *args: Any) -> Any:
        near = self.placed.get(path)
        return self.client.submit(_placed, fn, path, *args, pure=False, workers=[near] if near else None,
                                  allow_other_workers=near is not None)

    def result(self, fut: Any, path: str) -> Any:
        value, self.placed[path] = fut.result()
        return value

    @staticmethod
    def as_completed(futures: list) -> Iterator:
        from distributed import as_completed

        return iter(as_completed(futures))

    def release(self, reads: _Reads) -> None:
        """Release what the workers keep for this batch."""
        if reads.token is not None:
            with suppress(Exception):  # a worker gone or a cluster closing: nothing left to release there
                self.client.run(_drop_worker_reads, reads.token)


@contextmanager
def _executor(jobs: int, scheduler: Any):
    """Where the files are gated: in-process, a local Dask cluster of ``jobs`` workers, or ``scheduler``."""
    if scheduler is None and jobs == 1:
        yield _InProcess()
        return
    from distributed import Client, LocalCluster

    if scheduler is not None and not isinstance(scheduler, (str, os.PathLike)):
        yield _OnDask(scheduler)  # the caller's Client: theirs to close
        return
    if scheduler is not None:
        client = Client(os.fspath(scheduler))
    else:
        client = Client(LocalCluster(n_workers=jobs, threads_per_worker=1, processes=True,
                                     dashboard_address=None))
    try:
        yield _OnDask(client)
    finally:
        cluster = client.cluster if scheduler is None else None
        client.close()
        if cluster is not None:
            cluster.close()


def _run(ex: Any, fn: Callable, paths: Sequence[str], *args: Any) -> Iterator[tuple[int, Any, str | None]]:
    """``fn(path, *args)`` for every path, as each finishes: ``(index, result or None, error or None)``.

    The package's errors (bad file, missing marker, failed fit...) become the
    file's error message; so does anything unexpected (labelled so), for one
    file must never take the batch down.
    """
    futures = {ex.submit(fn, p, *args): i for i, p in enumerate(paths)}
    for fut in ex.as_completed(list(futures)):
        i = futures.pop(fut)
        try:
            yield i, ex.result(fut, paths[i]), None
        except Exception as exc:  # noqa: BLE001 - reported per file, see the docstring
            yield i, None, _message(paths[i], exc)


# ----------------------------------------------------------------------------- per-file parts
def _fingerprint(templates: Sequence[Template], compensation: Any, fixed: Sequence[Mapping | None]) -> str:
    """What a file's tables depend on besides the file: templates, compensation, batch-fitted thresholds."""
    def tmpl(t: Template) -> tuple:
        comp = {k: (list(v.index), list(v.columns), np.asarray(v, dtype=float).tolist()) for k, v in t.compensation.items()}
        return t.name, repr(t.populations), repr(t.thresholds), repr(t.transforms), repr(comp)

    fits = [sorted((k, repr(v)) for k, v in (f or {}).items()) for f in fixed]
    text = repr(([tmpl(t) for t in templates], repr(compensation), fits))
    return hashlib.sha256(text.encode()).hexdigest()


class _Parts:
    """A folder of per-file tables (``<name>-<hash>.populations.parquet``, ``.thresholds.parquet``).

    ``manifest.json`` records what the tables depend on (:func:`_fingerprint`);
    a resumed run must match it. A file's part is complete once its populations
    table exists (written last, atomically).
    """

    MANIFEST = "manifest.json"

    def __init__(self, folder: str | os.PathLike, fingerprint: str, resume: bool) -> None:
        self.dir = Path(folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        manifest = self.dir / self.MANIFEST
        if resume and manifest.exists():
            found = json.loads(manifest.read_text()).get("fingerprint")
            if found != fingerprint:
                raise ResumeError(f"{self.dir}: these parts were written with other templates, compensation or "
                                  "batch thresholds (or other files, for batch-scope thresholds); "
                                  "run without --resume to start afresh")
        else:
            for old in self.dir.glob("*.parquet"):
                old.unlink()
        atomic_write(manifest, lambda p: p.write_text(json.dumps({"fingerprint": fingerprint})))

    def _base(self, path: str) -> Path:
        digest = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:12]
        return self.dir / f"{Path(path).stem}-{digest}"

    def load(self, path: str) -> FileResult | None:
        """The file's tables from an earlier run, or ``None``."""
        import pandas as pd

        base = self._base(path)
        pops, ths = Path(f"{base}.populations.parquet"), Path(f"{base}.thresholds.parquet")
        if not (pops.exists() and ths.exists()):
            return None
        return FileResult(path, table=pd.read_parquet(pops), thresholds=pd.read_parquet(ths), resumed=True)

    def save(self, fr: FileResult) -> None:
        base = self._base(fr.path)
        atomic_write(f"{base}.thresholds.parquet", lambda p: fr.thresholds.to_parquet(p, index=False))
        atomic_write(f"{base}.populations.parquet", lambda p: fr.table.to_parquet(p, index=False))


def _batch_rules(template: Template) -> dict[tuple[str, str], tuple[Mapping, str | None, Population, Dim]]:
    """``{(marker, cut): (rule, fitted-on population or None, first user, its dim)}`` of ``scope: batch`` rules."""
    rules = {(m, c): spec for m, cuts in template.thresholds.items() for c, spec in cuts.items()
             if isinstance(spec, Mapping) and spec.get("scope") == "batch"}
    out: dict[tuple[str, str], tuple[Mapping, str | None, Population, Dim]] = {}
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


def _batch_values(path: str, sub: Template, template: Template, reads: _Reads,
                  known: Mapping[tuple[str, str], Any], targets: list) -> dict:
    """Pass 1 for one file: the transformed values each batch threshold is fitted on (raises if the file fails)."""
    from immuneprofile.engine.fit2d import with_fitted_transforms

    data = reads.load(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res = _gate_templates(data, [sub], [dict(known) or None], 1, reads.fitted(path))[0]
    fitted = with_fitted_transforms(data, template, known)  # a `W: auto` logicle: this file's (or the batch's) W
    cols = EventValues(data, fitted)
    out = {}
    for key, on, pop_name, dim, method in targets:
        dim = fitted[pop_name].dims[template[pop_name].dims.index(dim)]
        sel = None if on is None else res.indices[on]
        if method == "quantile":  # read off the values: FlowKit's exact ones
            out[key] = np.asarray(cols.transformed(dim, sel, True, pop_name), dtype=float)
        else:  # a density: the fast transform serves (as for per-sample fits)
            out[key] = density_transform(dim.transform)(cols.raw(dim, sel, True, pop_name))
    return out


def _ready_rounds(template: Template, pending: Mapping) -> tuple[list, set[str]]:
    """The batch thresholds fittable now (their fitted-on population needs no pending one) and what to gate."""
    ready, need_all = [], set()
    for key, (_rule, on, _pop, _dim) in pending.items():
        need = template.closure([on])
        uses = {(b.marker, b.cut) for n in need for bs in getattr(template[n].gate, "bounds", ())
                for b in bs if isinstance(b, ThresholdRef)}
        if key in uses:
            raise TemplateError(f"template {template.path}: batch threshold {key[0]}.{key[1]} is fitted on "
                                f"{on!r}, which is gated with that same threshold")
        if not (uses & set(pending)):
            ready.append(key)
            need_all |= need
    if not ready:  # pragma: no cover - a cycle through several thresholds
        raise TemplateError(f"template {template.path}: batch thresholds {sorted(pending)} depend on each other")
    return ready, need_all


def _fit_batch_shapes(paths: list[str], template: Template, reads: _Reads) -> dict:
    """Fit the ``scope: batch`` transforms and 2-D gates (:func:`~immuneprofile.engine.fit2d.fit_batch`).

    They are fitted in this process, the samples loaded (and kept) by ``reads``.
    """
    from functools import partial

    from immuneprofile.engine.fit2d import batch_items, fit_batch

    if not batch_items(template):
        return {}
    return fit_batch([partial(reads.load, p) for p in paths], template, gate=gate_sample)


def _fit_batch(paths: list[str], template: Template, reads: _Reads, ex: Any,
               failed: dict[str, str]) -> dict[tuple[str, str], Any]:
    """Every ``scope: batch`` fit of a template: its transforms and 2-D gates, then its thresholds."""
    return _fit_batch_thresholds(paths, template, reads, ex, failed, _fit_batch_shapes(paths, template, reads))


def _fit_batch_thresholds(paths: list[str], template: Template, reads: _Reads, ex: Any,
                          failed: dict[str, str], given: Mapping[tuple[str, str], Any] | None = None,
                          ) -> dict[tuple[str, str], Any]:
    """Fit every ``scope: batch`` threshold once on the pooled values of all files (pass 1).

    A batch threshold whose fitted-on population needs another batch threshold is
    fitted in a later round, after that one; each round visits every file (``ex``
    runs the visits; in-process, ``reads`` keeps the samples between rounds). Files that fail are added to ``failed`` (``{path:
    message}``) and left out of the pool.

    Raises
    ------
    ThresholdError
        A fit failed and its rule has no ``fallback``.
    TemplateError
        A batch threshold is fitted on a population gated with itself.
    """
    from dataclasses import replace

    fits: dict[tuple[str, str], Any] = dict(given or {})  # the batch transforms and 2-D gates, then thresholds
    pending = dict(_batch_rules(template))
    while pending:
        ready, need_all = _ready_rounds(template, pending)
        sub = replace(template, populations=[p for p in template.populations if p.name in need_all])
        targets = [(k, pending[k][1], pending[k][2].name, pending[k][3], pending[k][0]["method"]) for k in ready]
        todo = [p for p in paths if p not in failed]
        per_file: list[dict | None] = [None] * len(todo)
        for i, values, error in _run(ex, _batch_values, todo, sub, template, reads, fits, targets):
            per_file[i] = values
            if error is not None:
                failed[todo[i]] = error
        used = [v for v in per_file if v is not None]  # pooled in file order, whatever order they finished in
        for key in ready:
            rule, on, _, _ = pending.pop(key)
            fits[key] = _fit_pooled(key, rule, on, [v[key] for v in used])
    return fits


def _fit_pooled(key: tuple[str, str], rule: Mapping, on: str | None, values: list[np.ndarray]) -> ThresholdFit:
    """One batch threshold fitted on the values of every file, pooled in file order."""
    from immuneprofile.engine.thresholds import fit_threshold

    pooled = np.concatenate(values) if values else np.empty(0)
    label = f"batch of {len(values)} file(s): {key[0]}.{key[1]}"
    value, fallback, note = fit_threshold(pooled, rule, label=label)
    note = "; ".join(x for x in (f"scope: batch, pooled over {len(values)} file(s)", note) if x)
    return ThresholdFit(key[0], key[1], value, str(rule["method"]), on or "root", int(pooled.size), fallback, note)


def _taken_over(paths: list[str], parts: _Parts | None, reads: _Reads) -> list[FileResult | None]:
    """The files an earlier run already gated (``parts``, else ``None``); their kept samples are released."""
    outs = [parts.load(p) if parts is not None else None for p in paths]
    reads.forget(p for p, o in zip(paths, outs) if o is not None)
    return outs


def _gate_all(paths: list[str], templates: Sequence[Template], reads: _Reads, ex: Any,
              fixed: list, parts: _Parts | None, progress: Callable | None, keep_data: bool) -> list[FileResult]:
    """Pass 2: gate every file not already done (``parts``), saving each one's tables as it finishes."""
    outs = _taken_over(paths, parts, reads)
    todo = [i for i, o in enumerate(outs) if o is None]
    in_process = isinstance(ex, _InProcess)
    for k, fr, error in _run(ex, _gate_path, [paths[i] for i in todo], templates, reads,
                             in_process and keep_data, fixed, 0 if in_process else 1):
        i = todo[k]
        outs[i] = fr if error is None else FileResult(paths[i], error=error)
        if parts is not None and error is None:
            parts.save(fr)
        if progress:
            progress(paths[i], error)
    return [o if o is not None else FileResult(p, error="not gated") for p, o in zip(paths, outs)]


def gate_files(
    paths: Iterable[str | os.PathLike],
    template: Template | Sequence[Template],
    *,
    compensation: Any = "auto",
    jobs: int = 1,
    scheduler: Any = None,
    parts: str | os.PathLike | None = None,
    resume: bool = False,
    keep_data: bool = True,
    progress: Callable[[str, str | None], None] | None = None,
    cache_bytes: int | None = None,
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
        ``1``: in this process (results keep their event data for AnnData export,
        and the engine uses every core); ``N > 1``: a local Dask cluster of ``N``
        single-threaded worker processes, one task per file; ``0`` or negative:
        as many workers as cores.
    scheduler
        An existing Dask deployment instead: a scheduler address
        (``"tcp://host:8786"``) or a :class:`distributed.Client` (``jobs`` is then
        ignored). Workers need immuneprofile installed and must be able to read
        the files at the paths given.
    parts
        A folder for per-file tables: each file's population and thresholds
        tables are written there (atomically) as soon as it is gated.
    resume
        With ``parts``: take over the files an earlier, interrupted run with the
        same templates and options already gated instead of gating them again
        (without it, the folder's old parts are removed first).
    keep_data
        In-process (``jobs=1``): keep each result's event data (for
        :func:`immuneprofile.to_anndata`); ``False`` frees each file's events once
        its tables are made.
    progress
        Optional callable ``progress(path, error_or_None)`` called after each file.
    cache_bytes
        With ``scope: batch`` fits: how many bytes of event data this process
        (or each Dask worker) may keep between the fits (pass 1) and gating (pass
        2), so that each file is read once (``None``: a quarter of the memory
        available, or of a worker's memory limit; ``0``: each pass reads the files
        again). Files beyond it are read again when needed; the results do not
        depend on it. On Dask a file's gating task goes preferably to the worker
        that read it.

    Thresholds with ``scope: batch`` are fitted once on the fitted-on population's
    values pooled over all files (pass 1), then every file is gated with that value
    (pass 2). If such a fit fails without a ``fallback``, every file reports the error.

    Returns
    -------
    Batch
        ``results`` holds one result per file and template (files in order,
        templates in order within a file); the tables have a ``template`` column
        and follow the order of ``paths`` whatever the order files finished in.

    Raises
    ------
    ResumeError
        ``resume`` with parts written with other templates or options.
    """
    templates = [template] if isinstance(template, Template) else list(template)
    files: list[str] = [str(os.fspath(p)) for p in paths]
    jobs = jobs if jobs > 0 else (os.cpu_count() or 1)
    reads = _Reads(compensation, cache_bytes)
    with _executor(jobs if len(files) > 1 else 1, scheduler) as ex:
        if not isinstance(ex, _InProcess):  # the workers keep what they load, each within its own budget
            reads.token, reads.cache_bytes = uuid.uuid4().hex, cache_bytes
        try:
            outs, failed = _two_passes(files, templates, reads, ex, parts, resume, progress, keep_data)
        finally:
            ex.release(reads)
    for p, msg in failed.items():
        if progress:
            progress(p, msg)
    return _combine(files, outs, failed)


def _two_passes(files: list[str], templates: list[Template], reads: _Reads, ex: Any, parts: Any, resume: bool,
                progress: Callable | None, keep_data: bool) -> tuple[list[FileResult], dict[str, str]]:
    """The batch fits (pass 1) then gating (pass 2): the files' results and ``{path: error}`` of pass 1."""
    failed: dict[str, str] = {}
    try:
        fixed = [_fit_batch(files, t, reads, ex, failed) for t in templates]
    except ImmuneProfileError as exc:  # a fit that failed fails every file; a file's own pass-1 error comes first
        return [], {**dict.fromkeys(files, str(exc)), **failed}
    reads.forget(failed if isinstance(ex, _InProcess) else None)  # what is not gated (here)
    store = None if parts is None else _Parts(parts, _fingerprint(templates, reads.compensation, fixed), resume)
    todo = [p for p in files if p not in failed]
    return _gate_all(todo, templates, reads, ex, fixed, store, progress, keep_data), failed


def _combine(paths: list[str], outs: list[FileResult], failed: dict[str, str]) -> Batch:
    """The batch's tables, in the order of ``paths``."""
    import pandas as pd

    ok = [o for o in outs if o.error is None]
    errors = {**failed, **{o.path: o.error for o in outs if o.error is not None}}
    return Batch(results=[r for o in ok for r in o.results],
                 table=pd.concat([o.table for o in ok], ignore_index=True) if ok else pd.DataFrame(),
                 thresholds=pd.concat([o.thresholds for o in ok], ignore_index=True) if ok else pd.DataFrame(),
                 errors={p: errors[p] for p in paths if p in errors}, gated=[o.path for o in ok])
