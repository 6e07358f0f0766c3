"""The one place that picks matplotlib's backend (Agg when nothing can show a window)."""

from __future__ import annotations

import os
import sys
from types import ModuleType

__all__ = ["pyplot"]


def _has_display() -> bool:
    if sys.platform.startswith(("win", "darwin")):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def pyplot() -> ModuleType:
    """``matplotlib.pyplot``, imported after selecting the non-interactive Agg backend if needed.

    Agg is chosen only when pyplot is not imported yet, no backend was asked for
    (``MPLBACKEND``), we are not in a Jupyter kernel and there is no display.
    """
    import matplotlib

    if ("matplotlib.pyplot" not in sys.modules and not os.environ.get("MPLBACKEND")
            and "ipykernel" not in sys.modules and not _has_display()):
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
