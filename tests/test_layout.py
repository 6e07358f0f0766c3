"""The package's house rules that a refactoring could silently break: no import cycle, one error family."""

from __future__ import annotations

import ast
import graphlib
import inspect

from conftest import ROOT

SRC = ROOT / "src"


def _imports() -> dict[str, set[str]]:
    """``{module: immuneprofile modules it imports}``, counting imports inside functions too."""
    mods = {}
    for f in SRC.rglob("*.py"):
        name = ".".join(f.with_suffix("").relative_to(SRC).parts).removesuffix(".__init__")
        mods[name] = f
    deps = {}
    for name, f in mods.items():
        found = {n.module for n in ast.walk(ast.parse(f.read_text())) if isinstance(n, ast.ImportFrom) and n.module}
        deps[name] = {m for m in found if m in mods and m != name and name != "immuneprofile"}
    return deps


def test_no_import_cycle_even_through_lazy_imports():
    deps = _imports()
    assert "immuneprofile.engine.gating" in deps and deps["immuneprofile.batch"]  # the walk sees the package
    graphlib.TopologicalSorter(deps).prepare()  # raises CycleError naming the cycle


def test_every_error_and_warning_belongs_to_the_family():
    import immuneprofile.exceptions as exc

    classes = [c for _, c in inspect.getmembers(exc, inspect.isclass) if c.__module__ == exc.__name__]
    errors = [c for c in classes if issubclass(c, Exception) and not issubclass(c, Warning)]
    warnings = [c for c in classes if issubclass(c, Warning)]
    assert len(errors) >= 10 and warnings
    assert all(issubclass(c, exc.ImmuneProfileError) for c in errors)
    assert all(issubclass(c, exc.ImmuneProfileWarning) for c in warnings)
    # nothing else in the package defines an exception class of its own
    for f in SRC.rglob("*.py"):
        if f.name == "exceptions.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ClassDef):
                bases = {getattr(b, "id", getattr(b, "attr", "")) for b in node.bases}
                assert not bases & {"Exception", "ValueError", "KeyError", "UserWarning", "Warning"}, \
                    f"{f.relative_to(SRC)}: {node.name} is not in immuneprofile.exceptions"
