"""The package's layout holds: data flows one way through its layers, no module imports a private
name of another, there is no import cycle, and no function grows past what a reader can follow.

The layers, lowest first (a module may import from its own layer and the layers below it):

    core        torch access, seeds, validation, the integrity guard, JSON, fingerprints
    compare     similarity and agreement metrics, chance levels, statistics
    model       layer selection, layer randomization, the cache of trained models
    maps        attribution methods over captum, baselines, presets, the map cache
    reporting   the result protocol, figures, the JSON and HTML reports
    engine      maps of many model states, fast
    checks      the sanity checks of the papers
    plugin      pytest hooks, fixtures and options

The top-level modules are the public faces: ``exceptions`` (core), ``metrics`` (compare), and
``strategies`` and the package ``__init__`` (which may import anything).
"""

from __future__ import annotations

import ast
from collections.abc import Mapping
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pytest_saliency"
LAYERS = ["core", "compare", "model", "maps", "reporting", "engine", "checks", "plugin"]
TOP_LEVEL = {"exceptions": "core", "metrics": "compare", "strategies": "checks"}
# Code lines of a function, its docstring left out: past this, it should be split.
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


MODULES = _modules()
# The rules below read a map of module name -> source text, so that a test can feed them a made-up package.
SOURCES = {name: path.read_text() for name, path in MODULES.items()}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = module.split(".") if is_package else module.split(".")[:-1]
    base = package[: len(package) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(module: str, sources: Mapping[str, str] = SOURCES) -> list[tuple[str, str, int, bool]]:
    """(imported module, imported name, line, at import time) for every import of the package by
    ``module`` (a package, its ``__init__``, when ``sources`` holds a module under it)."""
    tree = ast.parse(sources[module])
    is_package = any(other.startswith(f"{module}.") for other in sources)
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = _resolve(module, is_package, node)
            if target.startswith("pytest_saliency"):
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    found.append((submodule if submodule in sources else target, alias.name, node.lineno,
                                  id(node) in top_level))
        elif isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno, id(node) in top_level) for a in node.names
                      if a.name.startswith("pytest_saliency")]
    return found


def _layer(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) == 1:
        return None
    return parts[1] if parts[1] in LAYERS else TOP_LEVEL.get(parts[1])


def test_every_module_belongs_to_a_layer():
    unplaced = [m for m in MODULES if m != "pytest_saliency" and _layer(m) is None]
    assert unplaced == []


def _upward_imports(sources: Mapping[str, str]) -> list[str]:
    """Every import, at module level or deferred, of a module from a higher layer than its own."""
    upward = []
    for module in sources:
        layer = _layer(module)
        if layer is None:
            continue
        for target, name, line, _ in _imports(module, sources):
            target_layer = _layer(target)
            if target_layer is not None and LAYERS.index(target_layer) > LAYERS.index(layer):
                upward.append(f"{module}:{line} ({layer}) imports {target}.{name} ({target_layer})")
    return upward


def test_no_module_imports_from_a_higher_layer():
    assert _upward_imports(SOURCES) == []


def test_no_private_name_is_imported_from_another_module():
    private = [f"{module}:{line} imports {target}.{name}"
               for module in MODULES for target, name, line, _ in _imports(module)
               if name.startswith("_") and not name.startswith("__") and target != module]
    assert private == []


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(edges.get(node, ())):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize("at_import_time_only", [True, False], ids=["module-level", "with-deferred-imports"])
def test_there_is_no_import_cycle(at_import_time_only):
    """Deferred imports (inside functions, to keep torch out of the plugin's import) count too: a
    cycle through one still means two modules that each need the other. The package ``__init__``
    is left out: it exports the public API lazily from everywhere."""
    edges: dict[str, set[str]] = {}
    for module in MODULES:
        if module == "pytest_saliency":
            continue
        edges[module] = {target for target, _, _, top in _imports(module)
                         if target in MODULES and target not in (module, "pytest_saliency")
                         and (top or not at_import_time_only)}
    assert _cycles(edges) == []


def _code_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = function.body
    if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    if not body:
        return 0
    return (body[-1].end_lineno or body[-1].lineno) - body[0].lineno + 1


def test_functions_are_short_enough_to_read():
    long = []
    for module, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > MAX_FUNCTION_LINES:
                long.append(f"{module}.{node.name}: {_code_lines(node)} lines")
    assert long == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_the_layer_rule_sees_an_upward_import():
    package = {
        "pytest_saliency": "from .checks.agreement import agreement_matrix\n",  # the package __init__: any layer
        "pytest_saliency.maps": "",
        "pytest_saliency.maps.explainers": (
            "from ..core.rng import seeded\n"
            "from ..checks.agreement import agreement_matrix\n"
            "def explain():\n"
            "    from pytest_saliency.plugin import checker\n"
        ),
        "pytest_saliency.checks": "from .agreement import agreement_matrix\n",
        "pytest_saliency.checks.agreement": "from ..maps import explainers\n",
        "pytest_saliency.core": "",
        "pytest_saliency.core.rng": "",
        "pytest_saliency.exceptions": "from .checks import agreement\n",  # a top-level module of the core layer
        "pytest_saliency.plugin": "",
        "pytest_saliency.plugin.checker": "",
    }
    assert _upward_imports(package) == [
        "pytest_saliency.maps.explainers:2 (maps) imports pytest_saliency.checks.agreement.agreement_matrix (checks)",
        "pytest_saliency.maps.explainers:4 (maps) imports pytest_saliency.plugin.checker.checker (plugin)",
        "pytest_saliency.exceptions:1 (core) imports pytest_saliency.checks.agreement.agreement (checks)",
    ]
