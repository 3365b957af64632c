"""The import graph of softvq_kernels, read from the source (no module is executed for the graph):

- no cycle among the package's modules (imports executed when a module is imported: those at module
  level, including inside ``try``/``if``; imports inside functions run later and may point anywhere);
- no module uses a private name (``_name``) defined in another module of the package, neither by
  ``from m import _name`` nor as ``m._name``. A package may import its own private submodules
  (``softvq_kernels.cuda`` uses ``softvq_kernels.cuda._build``, which loads the compiled extension
  ``softvq_kernels._cuda``): what is private to a package is public inside it;
- the package never imports the repository's ``tests`` or a top-level ``benchmarks``;
- every module imports.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = "softvq_kernels"
PACKAGE_DIR = Path(__file__).resolve().parent.parent / PACKAGE
# Compiled extension modules: modules of the package without a .py file.
EXTENSION_MODULES = {f"{PACKAGE}._cuda"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE_DIR.rglob("*.py"))}


def _is_module(name: str) -> bool:
    return name in MODULES or name in EXTENSION_MODULES


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _inside(importer: str, package: str) -> bool:
    return importer == package or importer.startswith(package + ".")


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module name of ``from <...> import``."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    if not MODULES[importer].name == "__init__.py":
        base = base[:-1]
    base = base[: len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _import_time_nodes(tree: ast.AST):
    """Import statements that run when the module is imported (not inside a function body)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child
            stack.append(child)


def _analyse():
    """(edges {module: {imported package modules}}, problems [str]) over every module of the package."""
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    problems: list[str] = []
    for importer, path in MODULES.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        where = f"{path.relative_to(PACKAGE_DIR.parent)}"
        aliases: dict[str, str] = {}  # local name -> package module it is bound to
        import_time = set(map(id, _import_time_nodes(tree)))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    top = a.name.split(".")[0]
                    if top in ("tests", "benchmarks"):
                        problems.append(f"{where}:{node.lineno}: imports {a.name} (not part of the package)")
                    if top != PACKAGE:
                        continue
                    if a.asname:
                        aliases[a.asname] = a.name
                    for part in a.name.split(".")[1:]:
                        if _is_private(part) and not _inside(importer, a.name.rsplit("." + part, 1)[0]):
                            problems.append(f"{where}:{node.lineno}: imports private module {a.name}")
                    if id(node) in import_time and _is_module(a.name):
                        edges[importer].add(a.name)
            elif isinstance(node, ast.ImportFrom):
                source = _resolve(importer, node)
                top = source.split(".")[0]
                if top in ("tests", "benchmarks"):
                    problems.append(f"{where}:{node.lineno}: imports from {source} (not part of the package)")
                if top != PACKAGE:
                    continue
                for a in node.names:
                    target = f"{source}.{a.name}"
                    if _is_module(target):
                        aliases[a.asname or a.name] = target
                    if _is_private(a.name) and not (_is_module(target) and _inside(importer, source)):
                        problems.append(f"{where}:{node.lineno}: from {source} import {a.name} (private to {source})")
                    if id(node) in import_time:
                        # ``from pkg import submodule`` needs the submodule (pkg is a parent, imported
                        # first like every parent and never a cycle); ``from m import name`` needs m run.
                        edges[importer].add(target if _is_module(target) else source)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and _is_private(node.attr) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases):
                module = aliases[node.value.id]
                if not (_is_module(f"{module}.{node.attr}") and _inside(importer, module)):
                    problems.append(f"{where}:{node.lineno}: {node.value.id}.{node.attr} (private to {module})")
        edges[importer].discard(importer)
    return {k: {v for v in vs if v in MODULES} for k, vs in edges.items()}, problems


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_walk_sees_the_package():
    edges, _ = _analyse()
    assert {"softvq_kernels", "softvq_kernels.api", "softvq_kernels.triton.forward", "softvq_kernels.bench.bench_op"} <= set(edges)
    assert "softvq_kernels.api" in edges["softvq_kernels"]
    assert "softvq_kernels.triton.configs" in edges["softvq_kernels.triton.forward"]


def test_no_import_cycle():
    edges, _ = _analyse()
    cycles = _cycles(edges)
    assert not cycles, "import cycles among softvq_kernels modules:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_detector_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_private_name_crosses_modules():
    _, problems = _analyse()
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    if name.startswith(f"{PACKAGE}.bench.profile_"):
        pytest.importorskip("triton")
    importlib.import_module(name)
