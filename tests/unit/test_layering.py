"""The package's floors are kept, not only drawn: a walk over every import.

Layers, bottom up: core (no asyncio, no sockets, nothing of ssefan), config,
http, stream, edge, ops, and on top cli, demo and the package itself. A module
may import its own layer and those below; nothing imports ops but the top;
the package root is imported below the top only for `__version__`. Module-level
imports must form no circle (function-level imports are how a module defers
one; TYPE_CHECKING imports cost nothing at run time).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import ssefan

PACKAGE = Path(ssefan.__file__).parent
ORDER = ["core", "config", "http", "stream", "edge", "ops", "top"]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("cli", "demo", "__main__"):
        return "top"
    if parts[1] in ORDER:
        return parts[1]
    raise AssertionError(f"{module} is in no layer: put it in a layer's package")


def imports(source: str, *, module_level_only: bool) -> list[tuple[int, str, list[str]]]:
    """(line, module, names) for each import of ssefan in `source`."""
    tree = ast.parse(source)
    found: list[tuple[int, str, list[str]]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue  # never run
            if isinstance(child, ast.ImportFrom):
                assert child.level == 0, f"line {child.lineno}: relative import; use ssefan.<layer>"
                imported = child.module or ""
                if imported.split(".")[0] == "ssefan" and (top or not module_level_only):
                    found.append((child.lineno, imported, [a.name for a in child.names]))
            elif isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "ssefan" and (top or not module_level_only):
                        found.append((child.lineno, alias.name, []))
            inner = top and not isinstance(
                child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda
            )
            visit(child, inner)

    visit(tree, True)
    return found


def targets(module: str, names: list[str]) -> list[str]:
    """The modules an import reaches: `from ssefan.ops import logs` is ssefan.ops.logs."""
    reached = []
    for name in names or [""]:
        candidate = f"{module}.{name}" if name else module
        is_module = (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists() or (
            PACKAGE.parent / Path(*candidate.split(".")) / "__init__.py"
        ).exists()
        reached.append(candidate if name and is_module else module)
    return reached


def breaches(module: str, source: str) -> list[str]:
    """Every import in `source` (the text of `module`) that a layer rule forbids."""
    own = ORDER.index(layer(module))
    problems = []
    for line, imported, names in imports(source, module_level_only=False):
        for target in targets(imported, names):
            if target == "ssefan" and set(names) <= {"__version__"}:
                continue
            their = ORDER.index(layer(target))
            if their > own:
                problems.append(
                    f"{module}:{line} imports {target}: {layer(module)} may not import "
                    f"{layer(target)}"
                )
    return problems


MODULES = {module_name(p): p.read_text() for p in sorted(PACKAGE.rglob("*.py"))}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_imports_a_layer_above_its_own(module: str) -> None:
    assert breaches(module, MODULES[module]) == []


def test_module_level_imports_form_no_circle() -> None:
    graph = {
        module: {
            target
            for _, imported, names in imports(source, module_level_only=True)
            for target in targets(imported, names)
            if target != module and target in MODULES
        }
        for module, source in MODULES.items()
    }
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def walk(module: str) -> None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                circle = [*path[path.index(target) :], target]
                raise AssertionError("import circle: " + " -> ".join(circle))
            if target not in state:
                walk(target)
        path.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            walk(module)


@pytest.mark.parametrize(
    ("module", "source", "expected"),
    [
        ("ssefan.core.ring", "from ssefan.config import Config\n", "core may not import config"),
        ("ssefan.http.pool", "from ssefan.edge.proxy import Proxy\n", "http may not import edge"),
        ("ssefan.stream.channel", "import ssefan.edge.server\n", "stream may not import edge"),
        (
            "ssefan.edge.server",
            "def f():\n    from ssefan.ops import app\n",
            "edge may not import ops",
        ),
        ("ssefan.config", "from ssefan import main\n", "config may not import top"),
    ],
)
def test_the_walk_finds_a_breach(module: str, source: str, expected: str) -> None:
    """The rules bite: each of these would be a breach."""
    found = breaches(module, source)
    assert len(found) == 1 and expected in found[0], found


def test_the_public_surface_is_named() -> None:
    assert sorted(ssefan.__all__) == sorted(
        ["Config", "Event", "Parser", "__version__", "encode", "load_config", "main"]
    )
    assert ssefan.encode(ssefan.Event("hi", id="1")) == b"id: 1\ndata: hi\n\n"
