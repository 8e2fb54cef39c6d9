"""The import rules of docs/architecture.md, checked over every module's imports (``ast``, nothing run).

Every import counts, including those inside functions and under ``TYPE_CHECKING``: a lazy import is
still a dependency, and a type-only one still couples the code.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT

# Lowest first. A module may import its own package and the layers below it, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("backends",),
    ("gateway.settings", "gateway.errors", "gateway.db", "gateway.devtools"),
    ("gateway.serving",),
    ("gateway.accounting",),
    ("gateway.state",),
    ("gateway.observability",),
    ("gateway.api",),
    ("gateway.cli",),
]
WEB_FRAMEWORKS = ("litestar", "starlette", "uvicorn")


@dataclass(frozen=True)
class Import:
    module: str
    imported: str
    line: int


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {module_name(path): path for root in ("gateway", "backends") for path in (REPO_ROOT / root).rglob("*.py")}


def imports_of(module: str, path: Path) -> Iterator[Import]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            yield Import(module, base, node.lineno)
            for alias in node.names:  # ``from package import module`` names a module too
                yield Import(module, f"{base}.{alias.name}", node.lineno)


def all_imports() -> list[Import]:
    return [found for module, path in project_modules().items() for found in imports_of(module, path)]


def layer_of(module: str) -> int | None:
    for index, prefixes in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return index
    return None


def within(module: str, *prefixes: str) -> bool:
    return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def test_every_module_has_a_layer() -> None:
    unplaced = [m for m in project_modules() if m not in ("gateway",) and layer_of(m) is None]
    assert unplaced == [], f"add these modules to a layer in LAYERS and docs/architecture.md: {unplaced}"


def test_backends_import_nothing_of_the_gateway() -> None:
    offenders = [i for i in all_imports() if within(i.module, "backends") and within(i.imported, "gateway")]
    assert offenders == []


def test_accounting_knows_no_web_framework_and_no_http_layer() -> None:
    offenders = [
        i
        for i in all_imports()
        if within(i.module, "gateway.accounting")
        and within(i.imported, *WEB_FRAMEWORKS, "gateway.api", "gateway.state")
    ]
    assert offenders == []


def test_no_module_imports_a_layer_above_its_own() -> None:
    offenders = []
    for found in all_imports():
        source, target = layer_of(found.module), layer_of(found.imported)
        if source is not None and target is not None and target > source:
            offenders.append(f"{found.module}:{found.line} imports {found.imported}")
    assert offenders == []


def test_no_import_cycles() -> None:
    modules = project_modules()
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for found in all_imports():
        if found.imported in modules and found.imported != found.module:
            graph[found.module].add(found.imported)
    cycles = strongly_connected_cycles(graph)
    assert cycles == [], f"import cycles: {cycles}"


def strongly_connected_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm: every strongly connected component with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in sorted(graph[node]):
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

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import litestar\nfrom gateway.api import app\n", {"litestar", "gateway.api", "gateway.api.app"}),
        ("def f():\n    from gateway.state import GatewayState\n", {"gateway.state", "gateway.state.GatewayState"}),
    ],
)
def test_lazy_and_from_imports_are_seen(tmp_path: Path, source: str, expected: set[str]) -> None:
    path = REPO_ROOT / "gateway" / "accounting" / "probe.py"
    found = {i.imported for i in imports_of("gateway.accounting.probe", _write(tmp_path, source, path))}
    assert found == expected


def test_a_cycle_is_found() -> None:
    assert strongly_connected_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected_cycles({"a": {"b"}, "b": set()}) == []


def _write(tmp_path: Path, source: str, like: Path) -> Path:
    # imports_of reads the file; only its name decides how relative imports resolve.
    path = tmp_path / like.name
    path.write_text(source, encoding="utf-8")
    return path
