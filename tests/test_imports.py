"""Structure: no import cycles among the gateway's modules (late imports inside functions included), one error tree.

The graph is read from the source (ast), so an import a function makes only
when called counts as much as one at the top; imports under TYPE_CHECKING
never run and do not count.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from .harness import ROOT

PACKAGE = ROOT / "gateway"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted([*PACKAGE.glob("*.py"), *PACKAGE.glob("upstreams/*.py")])}


def type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the nodes inside `if TYPE_CHECKING:` blocks."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for child in node.body for inner in ast.walk(child))
    return skipped


def imports_of(name: str, source: str) -> set[str]:
    """The gateway modules `name` imports, wherever in it the import is."""
    tree = ast.parse(source)
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    skipped = type_checking_only(tree)
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            for alias in node.names:
                # `from . import errors` imports the module gateway.errors; `from .errors import X` imports gateway.errors.
                found.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in MODULES else target)
    return {module for module in found if module in MODULES and module != name}


def import_graph() -> dict[str, set[str]]:
    return {name: imports_of(name, path.read_text()) for name, path in MODULES.items()}


def cycle_in(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of `graph` (as the path that closes it), or None."""
    done: set[str] = set()
    for start in sorted(graph):
        path: list[str] = []
        # Depth first, iteratively: (module, the imports still to follow).
        stack = [(start, iter(sorted(graph[start])))]
        on_path = {start}
        path.append(start)
        while stack:
            node, todo = stack[-1]
            following = next(todo, None)
            if following is None:
                stack.pop()
                on_path.discard(path.pop())
                done.add(node)
            elif following in on_path:
                return [*path[path.index(following):], following]
            elif following not in done:
                stack.append((following, iter(sorted(graph[following]))))
                on_path.add(following)
                path.append(following)
    return None


def test_the_gateway_modules_import_no_cycle() -> None:
    graph = import_graph()
    assert len(graph) > 30 and "gateway.upstreams.http" in graph
    assert cycle_in(graph) is None, " -> ".join(cycle_in(graph) or [])


def test_the_graph_sees_late_imports_and_cycles() -> None:
    late = "def f():\n    from .auth import load_hook\n"
    assert imports_of("gateway.registry", late) == {"gateway.auth"}
    assert imports_of("gateway.registry", "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from . import auth\n") == set()
    assert imports_of("gateway.upstreams.http", "from .. import errors\nfrom ..registry import X\n") == {
        "gateway.errors", "gateway.registry"}
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": set()}) is None


def test_every_gateway_module_imports() -> None:
    for name in MODULES:
        if name != "gateway.demo_server":  # needs the demo extra (the mcp SDK), which tests have anyway
            importlib.import_module(name)


def test_every_exception_class_is_in_the_one_error_tree() -> None:
    """Exceptions are declared in errors.py only, each under GatewayError or ConfigurationError."""
    from gateway import errors

    elsewhere = {
        f"{name}.{node.name}"
        for name, path in MODULES.items() if name != "gateway.errors"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ClassDef) and any("Error" in ast.unparse(base) or "Exception" in ast.unparse(base)
                                                  for base in node.bases)
    }
    assert elsewhere == set()
    declared = [value for value in vars(errors).values() if isinstance(value, type) and issubclass(value, Exception)
                and value.__module__ == "gateway.errors"]
    assert len(declared) > 25
    assert all(issubclass(cls, (errors.GatewayError, errors.ConfigurationError)) for cls in declared)
