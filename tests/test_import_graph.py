"""The package's import graph: no cycle, at module or function level, and the library never
imports test utilities.

Every ``import`` / ``from ... import`` statement in gmf_kernels/ (at any depth: module level,
inside functions, methods and ``if`` blocks) is read with ``ast`` and resolved to the module
it names (``from .x import y`` -> ``pkg.x.y`` when that is a module, else ``pkg.x``). The
resulting directed graph over the package's modules must have no cycle. Two edge rules are
checked: the precise one above, and a coarse one where ``from X import y`` always counts as
an import of X itself (what a simpler reader of the code would see).
"""
from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, List, Set

import pytest

PKG_DIR = Path(__file__).resolve().parent.parent / "gmf_kernels"
PKG = "gmf_kernels"
#: modules the library must never import (test-only code)
TEST_ONLY = ("tests", "helpers", "conftest", "pytest")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG_DIR.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> Dict[str, Path]:
    return {module_name(p): p for p in PKG_DIR.rglob("*.py")}


def _package_of(name: str, path: Path) -> str:
    return name if path.name == "__init__.py" else name.rsplit(".", 1)[0]


def imports_of(name: str, path: Path, modules: Set[str], coarse: bool) -> List[str]:
    """Every module (of any package) that `name` imports, anywhere in its code."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = _package_of(name, path)
    out: List[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = pkg.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if coarse:
                out.append(base)
                continue
            for a in node.names:
                full = f"{base}.{a.name}"
                out.append(full if full in modules else base)
    return out


def graph(coarse: bool) -> Dict[str, Set[str]]:
    mods = all_modules()
    names = set(mods)
    g: Dict[str, Set[str]] = {}
    for name, path in mods.items():
        g[name] = {m for m in imports_of(name, path, names, coarse) if m in names and m != name}
    return g


def find_cycle(g: Dict[str, Set[str]]):
    WHITE, GREY, BLACK = 0, 1, 2
    color = {n: WHITE for n in g}
    stack: List[str] = []

    def visit(n):
        color[n] = GREY
        stack.append(n)
        for m in sorted(g[n]):
            if color[m] == GREY:
                return stack[stack.index(m):] + [m]
            if color[m] == WHITE:
                c = visit(m)
                if c:
                    return c
        stack.pop()
        color[n] = BLACK
        return None

    for n in sorted(g):
        if color[n] == WHITE:
            c = visit(n)
            if c:
                return c
    return None


@pytest.mark.parametrize("coarse", [False, True], ids=["precise", "coarse"])
def test_no_import_cycle(coarse):
    g = graph(coarse)
    assert len(g) > 20, "the package's modules were not found"
    cycle = find_cycle(g)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_library_never_imports_test_utilities():
    mods = all_modules()
    bad = []
    for name, path in mods.items():
        for m in imports_of(name, path, set(mods), coarse=False):
            if m.split(".")[0] in TEST_ONLY or m == f"{PKG}.testing":
                bad.append(f"{name} imports {m}")
    assert not bad, "\n".join(bad)


def test_checker_finds_a_planted_cycle(tmp_path):
    """The checker itself: a two-module cycle planted inside a function is found."""
    pkg = tmp_path / PKG
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("def f():\n    from .b import g\n    return g\n")
    (pkg / "b.py").write_text("from . import a\n\ndef g():\n    return a\n")
    real = globals()["PKG_DIR"]
    globals()["PKG_DIR"] = pkg
    try:
        cycle = find_cycle(graph(coarse=False))
    finally:
        globals()["PKG_DIR"] = real
    assert cycle is not None and set(cycle) == {f"{PKG}.a", f"{PKG}.b"}
