"""The templates shipped with immuneprofile, addressable by name (``"treg"``).

They live in the repository's ``gating/`` folder and travel inside the package
(``immuneprofile/templates``), so ``load_template("treg")`` and ``immuneprofile
gate -t treg`` work wherever immuneprofile is installed.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path

__all__ = ["PANEL_TEMPLATES", "resolve_template", "shipped_templates"]

#: The simulator's and the example study's panels -> the shipped templates that gate them.
PANEL_TEMPLATES: dict[str, tuple[str, ...]] = {
    "tcell": ("tcell_skin_homing",),
    "treg": ("treg",),
    "monocyte": ("monocytes",),
    "full": ("tcell_skin_homing", "treg", "monocytes"),
}


def _shipped_dir() -> Path:
    return Path(str(files("immuneprofile") / "templates"))


def shipped_templates() -> list[str]:
    """Names of the shipped templates (``load_template(name)`` loads one)."""
    return sorted(p.stem for p in _shipped_dir().glob("*.yaml"))


def resolve_template(name_or_path: str | os.PathLike) -> Path:
    """The file of a template given as a path, or as the name of a shipped template.

    An existing path wins; otherwise a bare name (``"treg"`` or ``"treg.yaml"``) is looked up
    among the shipped templates. A name that is neither is returned as given, for the
    caller's "not found" error.
    """
    path = Path(os.fspath(name_or_path))
    if path.exists() or path.parent != Path("."):
        return path
    shipped = _shipped_dir() / (path.name if path.suffix in (".yaml", ".yml") else f"{path.name}.yaml")
    return shipped if shipped.exists() else path
