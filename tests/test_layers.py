"""The house's layers: every cw module imports only from its own layer or below, with no circle.

The layers, bottom to top (docs/design.md draws them):

1. contracts: version, errors, defaults, protocol, security, serialize, discovery, system, current, store
   (the package: the writer, its schema, its graph verbs, sqlite, reader, repair), link, command
2. batch systems: the launchers registry, base.py and one module per backend
3. the engine: master, worker, client (none of the three imports another)
4. launchers: the pool, its keeper, adaptive sizing and the pool's owner, the cluster
   objects (local and batch), and the doctor
5. the face: the CLI, the dashboard, ``cw/__init__.py`` and the ``__main__`` entry points

Imports are read from the source (every ``import`` statement, also inside
functions), so a lazy import cannot hide an upward one; only imports under
``if TYPE_CHECKING:`` are left out, since they never run.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "cw"

CONTRACTS = {"cw.version", "cw.errors", "cw.defaults", "cw.protocol", "cw.security", "cw.serialize",
             "cw.discovery", "cw.system", "cw.current", "cw.store", "cw.store.schema", "cw.store.graph", "cw.store.blobs",
             "cw.store.sqlite", "cw.store.reader", "cw.trace", "cw.store.repair", "cw.link", "cw.command", "cw.job",
             "cw.jobfile", "cw.resources"}  # fmt: skip
ENGINE = ("cw.master", "cw.worker", "cw.client")
LAUNCHERS = {"cw.launchers.pool", "cw.launchers.keeper", "cw.launchers.local", "cw.launchers.adapt",
             "cw.launchers.elastic", "cw.launchers.owner", "cw.launchers.cluster", "cw.launchers.surface",
             "cw.doctor"}  # fmt: skip


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def layer(mod: str) -> int:
    if mod in CONTRACTS:
        return 1
    if mod == "cw" or mod.endswith(".__main__") or mod.split(".")[:2] in (["cw", "cli"], ["cw", "dashboard"]):
        return 5
    if mod in LAUNCHERS:
        return 4
    if any(mod == e or mod.startswith(e + ".") for e in ENGINE):
        return 3
    if mod == "cw.launchers" or mod.startswith("cw.launchers."):
        return 2  # the registry, base.py and every backend: what runs inside a batch job
    raise AssertionError(f"{mod} is in no layer: add it to tests/test_layers.py and docs/design.md")


def component(mod: str) -> str | None:
    return next((e for e in ENGINE if mod == e or mod.startswith(e + ".")), None)


def _type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING"
    )


def imports(mod: str) -> set[str]:
    """The cw modules this module imports."""
    path = MODULES[mod]
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    out: set[str] = set()

    def add(name: str) -> None:
        while name and name not in MODULES:  # `from cw.x import name`: the module is cw.x
            name = name.rpartition(".")[0]
        if name:
            out.add(name)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _type_checking(child):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.Import):
                for a in child.names:
                    if a.name == "cw" or a.name.startswith("cw."):
                        add(a.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - (child.level - 1)]
                    stem = ".".join(base + ([child.module] if child.module else []))
                elif child.module and (child.module == "cw" or child.module.startswith("cw.")):
                    stem = child.module
                else:
                    continue
                for a in child.names:
                    full = f"{stem}.{a.name}"
                    add(full if full in MODULES else stem)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    out.discard(mod)
    return out


GRAPH = {m: imports(m) for m in MODULES}


@pytest.mark.parametrize("mod", sorted(MODULES))
def test_no_upward_import(mod):
    upward = sorted(d for d in GRAPH[mod] if layer(d) > layer(mod))
    assert not upward, f"{mod} (layer {layer(mod)}) imports from above: {upward}"


@pytest.mark.parametrize("mod", sorted(m for m in MODULES if component(m)))
def test_engine_parts_stay_apart(mod):
    """The master, the worker and the client speak through the protocol, never through each other."""
    others = sorted(d for d in GRAPH[mod] if component(d) and component(d) != component(mod))
    assert not others, f"{mod} imports {others}"


def test_no_import_circle():
    seen: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def walk(m: str) -> None:
        seen[m] = 1
        stack.append(m)
        for d in sorted(GRAPH[m]):
            if seen.get(d) == 1:
                cycle = stack[stack.index(d) :] + [d]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if d not in seen:
                walk(d)
        stack.pop()
        seen[m] = 2

    for m in sorted(MODULES):
        if m not in seen:
            walk(m)


def test_the_walk_sees_lazy_and_relative_imports():
    """The checker itself: a function-level relative import is an edge, TYPE_CHECKING is not."""
    assert "cw.link" in GRAPH["cw.client.client"]  # `from ..link import query_status`
    assert "cw.client" in GRAPH["cw.launchers.local"]  # the package, by its __init__
    assert "cw.client.connection" not in GRAPH["cw.client.futures"]  # only under TYPE_CHECKING
    assert layer("cw.launchers.slurm") == 2 and layer("cw.launchers.pool") == 4


def test_modules_stay_small():
    """About 500 lines each: a module that grows past it holds two ideas."""
    big = {m: n for m, p in MODULES.items() if (n := len(p.read_text().splitlines())) > 520}
    assert not big, f"split these modules: {big}"
