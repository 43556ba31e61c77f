"""The layering rule: instruments never import the study layer, and no import circles."""

from __future__ import annotations

import ast
from pathlib import Path

import ridgeline

PACKAGE = Path(ridgeline.__file__).parent
INSTRUMENTS = ["connectivity", "curvature", "kernels", "gradients", "transport", "subspace",
               "optim", "merge"]
LOWER = ["objective.py", "params.py", "linalg.py", "distributed.py", "train.py", "losses.py",
         "checkpoints.py", "usercode.py",
         "plotting.py", "_json.py", "_files.py", "errors.py", "progress.py"]


def _imported_modules(path: Path) -> set[str]:
    """Every module a file imports (at any depth: lazy imports inside functions count)."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                base = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-node.level])
                names.add(f"{base}.{node.module}")
            else:
                names.add(node.module)
    return names


def _files_below(names: list[str]) -> list[Path]:
    files: list[Path] = []
    for name in names:
        target = PACKAGE / name
        files += sorted(target.rglob("*.py")) if target.is_dir() else [target]
    return [f for f in files if f.exists()]


def test_instruments_and_core_never_import_the_study_layer():
    offenders = [f"{f.relative_to(PACKAGE)} imports {m}"
                 for f in _files_below(INSTRUMENTS + LOWER)
                 for m in _imported_modules(f)
                 if m == "ridgeline.study" or m.startswith(("ridgeline.study.", "ridgeline.sweep"))]
    assert offenders == []


def test_no_import_cycles_between_modules():
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        module = module.removesuffix(".__init__")
        graph[module] = {m for m in _imported_modules(path) if m.startswith("ridgeline.")}
    # Edges to a package's __init__ count as edges to the package only; check module-level cycles.
    cycles = []
    for start in graph:
        if start.endswith("__init__"):
            continue
        for middle in graph[start]:
            if middle != start and start in graph.get(middle, set()) \
                    and not _is_package(middle) and not _is_package(start):
                cycles.append(tuple(sorted((start, middle))))
    assert sorted(set(cycles)) == []


def _is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").exists()
