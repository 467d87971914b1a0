"""The shape of the code, checked: the engine's parts import each other in one direction
only (no circle, not even under ``TYPE_CHECKING``), no module under ``engine/`` grows past
400 lines, and no module reaches into another's private names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "dynvm"
ENGINE_MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py") if "migrations" not in p.parts}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Every dynvm module ``name`` imports, anywhere in it (functions and TYPE_CHECKING too)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def test_no_import_circle_in_dynvm():
    found = modules()
    graph = {name: imports_of(name, path, set(found)) for name, path in found.items()}
    # a package's __init__ importing its own modules is no circle of the code's parts
    graph = {
        n: {t for t in ts if not (t.startswith(n + ".") and found[n].name == "__init__.py")} for n, ts in graph.items()
    }
    state: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                circles.append([*stack[stack.index(target) :], target])
            elif target not in state:
                visit(target)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert circles == [], "import circles: " + "; ".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("path", sorted((PACKAGE / "engine").glob("*.py")), ids=lambda p: p.name)
def test_engine_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= ENGINE_MAX_LINES, f"{path.name} has {lines} lines; split it along a concept"


def private_uses(path: Path) -> list[str]:
    """``from x import _name`` from another dynvm module, and ``obj._name`` on anything but
    ``self``/``cls`` (where obj is not one of this module's own classes or names)."""
    tree = ast.parse(path.read_text())
    own = {n.name for n in ast.walk(tree) if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("dynvm")):
            out += [f"imports {alias.name}" for alias in node.names if _private(alias.name)]
        elif isinstance(node, ast.Attribute) and _private(node.attr):
            owner = node.value
            if isinstance(owner, ast.Name) and owner.id in {"self", "cls", *own}:
                continue
            out.append(f"line {node.lineno}: {ast.unparse(node)}")
    return out


SQLALCHEMY_PUBLIC = {"_mapping", "_asdict", "_fields"}  # public, though named with an underscore


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__") and name not in SQLALCHEMY_PUBLIC


def test_no_private_name_is_used_across_modules():
    found = {module_name(path): private_uses(path) for path in modules().values()}
    assert {name: uses for name, uses in found.items() if uses} == {}


def test_the_engine_and_the_xen_provider_know_each_other_only_through_the_seam():
    found = modules()
    known = set(found)
    for name, path in found.items():
        imported = imports_of(name, path, known)
        if name.startswith("dynvm.engine"):
            assert not [m for m in imported if m.startswith("dynvm.xen")], f"{name} imports Xen"
        if name.startswith("dynvm.xen"):
            assert not [m for m in imported if m.startswith("dynvm.engine")], f"{name} imports the engine"


PROVIDER_PACKAGES = ("dynvm.xen", "dynvm.libvirt", "dynvm.static")


def test_each_provider_is_a_package_the_engine_and_the_other_providers_never_import():
    found = modules()
    known = set(found)
    for name, path in found.items():
        imported = imports_of(name, path, known)
        own = next((p for p in PROVIDER_PACKAGES if name.startswith(p)), None)
        if name.startswith("dynvm.engine") or own is not None:
            others = [m for m in imported if m.startswith(PROVIDER_PACKAGES) and not (own and m.startswith(own))]
            assert others == [], f"{name} imports {others}"
        if own is not None:
            assert not [m for m in imported if m.startswith("dynvm.engine")], f"{name} imports the engine"
