"""The package's import graph: no cycles, and no module importing another module's private name.

Built from the source (AST), not by importing, so it sees every import: module-level ones and the
ones inside functions (which is how cycles hide from the interpreter).
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = "chinese_vicuna"
SRC = Path(__file__).resolve().parents[1] / "src" / PKG


def _modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    out = {}
    for path in sorted(SRC.rglob("*.py")):
        parts = [PKG, *path.relative_to(SRC).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``module``."""
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(modules: dict[str, Path]) -> list[tuple[str, str, str | None, int]]:
    """Every import of a package module, as (importer, imported module, imported name or None, line)."""
    found = []
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        is_package = path.name == "__init__.py"
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] == PKG:
                        found.append((mod, alias.name, None, node.lineno))
            elif isinstance(node, ast.ImportFrom):
                target = _resolve(mod, is_package, node.level, node.module)
                if target.split(".")[0] != PKG:
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:  # `from pkg import module`: an import of that module
                        found.append((mod, sub, None, node.lineno))
                    else:
                        found.append((mod, target, alias.name, node.lineno))
    return found


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The package module that ``name`` (a module path) is, or the closest one above it."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for importer, target, _name, _line in _imports(modules):
        owner = _owner(target, modules)
        # importing a package's submodule runs the package's __init__ too, but that is no edge
        # back into the importer; only the module named counts
        if owner and owner != importer:
            graph[importer].add(owner)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_resolve_relative_imports():
    assert _resolve("chinese_vicuna.serve.board.app", False, 3, "model.load") == "chinese_vicuna.model.load"
    assert _resolve("chinese_vicuna.serve.board", True, 1, "app") == "chinese_vicuna.serve.board.app"
    assert _resolve("chinese_vicuna.cli", False, 1, None) == "chinese_vicuna"
    assert _resolve("chinese_vicuna.cli", False, 0, "chinese_vicuna.config") == "chinese_vicuna.config"


def test_cycle_finder():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (function-level imports included):\n" + "\n".join(
        " <-> ".join(c) for c in cycles
    )


def test_no_import_cycles_between_packages():
    """The arrows between the package's parts point one way (serve/chat/eval -> generation -> tools -> model/data)."""

    def part(module: str) -> str:
        return ".".join(module.split(".")[:2])

    graph: dict[str, set[str]] = {}
    for importer, imported in _graph().items():
        graph.setdefault(part(importer), set())
        graph[part(importer)] |= {part(m) for m in imported if part(m) != part(importer)}
        for m in imported:
            graph.setdefault(part(m), set())
    cycles = _cycles(graph)
    assert not cycles, "import cycles between packages:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_private_imports_across_modules():
    modules = _modules()
    bad = []
    for importer, target, name, line in _imports(modules):
        if name is None or target == importer:
            continue
        if name.startswith("_") and not (name.startswith("__") and name.endswith("__")):
            bad.append(f"{modules[importer].relative_to(SRC.parent)}:{line}: from {target} import {name}")
    # `module._name` through an imported module object
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(mod, path.name == "__init__.py", node.level, node.module)
                for alias in node.names:
                    if f"{target}.{alias.name}" in modules:
                        aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name in modules and alias.asname:
                        aliases[alias.asname] = alias.name
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and aliases[node.value.id] != mod
                    and node.attr.startswith("_") and not node.attr.startswith("__")):
                bad.append(f"{path.relative_to(SRC.parent)}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)
