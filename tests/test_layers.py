"""The layout's rule, checked on the source: imports point down the layers.

cli → jobs → apps → engine → parts → io → leaves (see docs/ARCHITECTURE.md). A module
may import a module of a lower layer, or one of its own package; the apps (``recon``,
``train``, ``guarantees``) do not import each other. Every import counts, including
the ones inside functions (the CLI imports lazily for its start-up time).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "molrecon"

# The first component of a module's dotted name under molrecon → its layer.
LAYERS: dict[str, int] = {
    "errors": 0, "kinds": 0, "lazy": 0,                                # leaves
    "config": 1, "atomic": 1, "memory": 1, "device": 1,                # leaves over errors
    "molrecon": 1, "__version__": 1,                    # the package root: version, lazy API
    "io": 2, "solvers": 2,                                             # io
    "physics": 3,                                                      # parts
    "models": 4, "sim": 4, "preview": 4, "metrics": 4,
    "deq": 5, "problem": 5,                                            # engine
    "recon": 6, "train": 6, "guarantees": 6,                           # apps
    "jobs": 7,                                                         # files of a batch
    "cli": 8, "__main__": 9,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """The molrecon modules ``path`` imports (absolute names), anywhere in the file."""
    return _imports_of(path.read_text(encoding="utf-8"), _module_name(path),
                       is_package=path.name == "__init__.py")


def _imports_of(text: str, name: str, *, is_package: bool = False) -> set[str]:
    package = name if is_package else name.rsplit(".", 1)[0]
    out: set[str] = set()
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                targets = ([target] if node.module
                           else [f"{target}.{a.name}" for a in node.names])
            else:
                targets = [node.module or ""]
            out.update(t for t in targets if t == "molrecon" or t.startswith("molrecon."))
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("molrecon"))
    return out


def _group(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "molrecon"


SOURCES = sorted(SRC.rglob("*.py"))


def test_every_package_has_a_layer() -> None:
    groups = {_group(_module_name(p)) for p in SOURCES}
    assert groups <= set(LAYERS), sorted(groups - set(LAYERS))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(SRC)))
def test_imports_point_down(path: Path) -> None:
    src = _group(_module_name(path))
    wrong = [t for t in sorted(_imports(path))
             if _group(t) != src and LAYERS[_group(t)] >= LAYERS[src]]
    assert wrong == [], f"{path.relative_to(SRC)} imports {wrong} (layer {LAYERS[src]})"


def test_the_parser_sees_imports_inside_functions() -> None:
    """Relative imports inside a function resolve to absolute names (the CLI's lazy imports
    are where an upward import would hide)."""
    text = ("def f():\n    from ..recon import reconstruct\n    from . import fft\n"
            "    import molrecon.cli\n")
    found = _imports_of(text, "molrecon.physics.probe")
    assert found == {"molrecon.recon", "molrecon.physics.fft", "molrecon.cli"}
    assert all(LAYERS[_group(t)] > LAYERS["physics"] for t in ("molrecon.recon", "molrecon.cli"))


ROOT = SRC.parents[1]


@pytest.mark.parametrize("folder", ["examples", "scripts", "benchmarks"])
def test_every_molrecon_import_outside_the_package_resolves(folder: str) -> None:
    """Scripts, benchmarks and examples are not imported by the suite: a moved module would
    break them silently. Every ``from molrecon.x import name`` in them must resolve."""
    import importlib

    missing = []
    for path in sorted((ROOT / folder).glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and not node.level and node.module \
                    and node.module.split(".")[0] == "molrecon":
                try:
                    module = importlib.import_module(node.module)
                except ImportError:
                    missing.append(f"{path.name}: {node.module}")
                    continue
                for alias in node.names:
                    if not hasattr(module, alias.name):
                        try:
                            importlib.import_module(f"{node.module}.{alias.name}")
                        except ImportError:
                            missing.append(f"{path.name}: {node.module}.{alias.name}")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == "molrecon":
                        try:
                            importlib.import_module(alias.name)
                        except ImportError:
                            missing.append(f"{path.name}: {alias.name}")
    assert missing == []
