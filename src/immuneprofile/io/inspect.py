"""A first look at an FCS file: what it holds, and whether templates can gate it (TEXT only, fast)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from immuneprofile.exceptions import FCSWarning, MarkerError

__all__ = ["inspect_fcs", "format_inspection"]


def _compensation(path: str, channels: list[str], text: dict[str, str]) -> dict[str, Any]:
    from immuneprofile.io.fcs import _resolve_spill

    key = next((k for k in ("spillover", "spill") if text.get(k, "").strip()), None)
    if key is None:
        return {"keyword": None, "detectors": [], "problem": None}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FCSWarning)
        spill, _ = _resolve_spill(path, "auto", channels, text)
    problem = str(caught[0].message).removeprefix(f"{path}: ") if caught else None
    return {"keyword": f"${key.upper()}", "detectors": list(spill.detectors) if spill else [], "problem": problem}


def _template_needs(data: Any, template: Any) -> dict[str, Any]:
    needs = []
    for marker in template.markers:
        try:
            j = data.find_channel(marker)
            needs.append({"marker": marker, "status": "present", "channel": data.channels[j],
                          "label": data.markers[j]})
        except MarkerError as exc:
            status = "ambiguous" if "ambiguous" in str(exc) else "missing"
            needs.append({"marker": marker, "status": status, "channel": None, "label": None})
    missing = [n["marker"] for n in needs if n["status"] != "present"]
    return {"template": template.name, "path": str(template.path), "markers": needs, "ready": not missing,
            "missing": missing}


def inspect_fcs(path: str | os.PathLike, templates: Sequence[Any] = (), *, dataset: int | None = None) -> dict:
    """Describe an FCS file from its HEADER and TEXT (no events are read).

    Parameters
    ----------
    path
        FCS file.
    templates
        :class:`~immuneprofile.template.Template` objects (or names/paths for
        :func:`~immuneprofile.load_template`): for each, which of the markers it gates on
        the file has (and on which channel), and which are missing or ambiguous.
    dataset
        Data set of a multi-data-set file (0-based; default the first).

    Returns
    -------
    dict
        Plain data (JSON-serialisable): ``path``, ``version``, ``data_type``, ``events``,
        ``dataset``/``n_datasets``, ``channels`` (one dict per channel: ``channel``,
        ``marker``, ``bits``, ``range``, ``kind`` scatter/time/fluorescence,
        ``compensated``), ``compensation`` (``keyword``, ``detectors`` it covers,
        ``problem``), ``notes`` (what is unusual) and ``templates``.

    Raises
    ------
    FCSError
        The file cannot be read (the message says why).
    """
    from immuneprofile.io.fcs import FCSData, _scatter, fluoro_indices
    from immuneprofile.io.reader import read_fcs
    from immuneprofile.template.parse import load_template

    path = os.fspath(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FCSWarning)  # kept in raw.notes
        raw = read_fcs(path, dataset, only_text=True)
    comp = _compensation(path, raw.channels, raw.text)
    fluoro = set(fluoro_indices(raw.channels))
    scatter = _scatter(raw.channels)
    channels = []
    for i, (c, m) in enumerate(zip(raw.channels, raw.markers)):
        kind = "fluorescence" if i in fluoro else ("time" if c.lower() == "time" else "scatter")
        channels.append({"index": i + 1, "channel": c, "marker": m, "bits": raw.bits[i],
                         "range": raw.text.get(f"p{i + 1}r", "").strip(), "kind": kind,
                         "compensated": c in comp["detectors"]})
    data = FCSData(path=path, sample_id=os.path.basename(path), channels=raw.channels, markers=raw.markers,
                   events=np.empty((0, len(raw.channels))), compensation=None, spill_matrix=None,
                   compensated=comp["detectors"], scatter=scatter, metadata=raw.text)
    tmpls = [load_template(t) if isinstance(t, (str, os.PathLike)) else t for t in templates]
    notes = list(raw.notes) + ([comp["problem"]] if comp["problem"] else [])
    return {
        "path": path, "version": raw.version, "data_type": raw.data_type, "events": raw.n_events,
        "dataset": raw.dataset, "n_datasets": raw.n_datasets, "cytometer": raw.text.get("cyt", "").strip(),
        "channels": channels, "compensation": comp, "notes": notes,
        "templates": [_template_needs(data, t) for t in tmpls],
    }


def format_inspection(info: dict) -> str:
    """A plain-text report of :func:`inspect_fcs`'s result (what ``immuneprofile inspect`` prints)."""
    lines = [
        f"{info['path']}",
        f"  FCS {info['version']}, $DATATYPE {info['data_type']}, {info['events']:,} events, "
        f"{len(info['channels'])} channels" + (f", cytometer {info['cytometer']}" if info["cytometer"] else "")
        + (f", data set {info['dataset'] + 1} of {info['n_datasets']}" if info["n_datasets"] > 1 else ""),
    ]
    comp = info["compensation"]
    if comp["detectors"]:
        lines.append(f"  compensation: {comp['keyword']} over {len(comp['detectors'])} channels "
                     f"({', '.join(comp['detectors'])})")
    else:
        lines.append(f"  compensation: {'none in the file' if not comp['keyword'] else comp['keyword'] + ' unusable'}")
    lines.append("  channels:")
    for c in info["channels"]:
        flag = " (compensated)" if c["compensated"] else ""
        marker = f"  {c['marker']}" if c["marker"] and c["marker"] != c["channel"] else ""
        lines.append(f"    {c['index']:>3}  {c['channel']:<16} {c['kind']:<12} {c['bits']:>2} bit{marker}{flag}")
    for note in info["notes"]:
        lines.append(f"  note: {note}")
    for t in info["templates"]:
        state = "ready" if t["ready"] else f"missing {', '.join(t['missing'])}"
        lines.append(f"  template {t['template']}: {state}")
        for m in t["markers"]:
            where = f"-> {m['channel']}" + (f" ({m['label']})" if m["label"] else "") if m["channel"] else m["status"]
            lines.append(f"    {m['marker']:<12} {where}")
    return "\n".join(lines)

