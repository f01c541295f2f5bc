"""The import graph: layers run one way, no cycles, no private names across packages, no
module importing its own package's ``__init__``, ``bench/`` on public APIs only, and the
folders ``catalog/``, ``ingest/``, ``flows/`` imported only as ``relaymap.*`` (a bare generic
name would pick up whatever folder of that name is first on ``sys.path``)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: Import name of each package folder (``flows/products`` is a layer of its own).
PACKAGES = {
    "relay_models": "relay_models",
    "ingest": "relaymap.ingest",
    "catalog": "relaymap.catalog",
    "flows/products": "relaymap.flows.products",
    "flows": "relaymap.flows",
}
GENERIC = {"catalog", "ingest", "flows"}
MODELS, INGEST, CATALOG, PRODUCTS, FLOWS = PACKAGES.values()
#: What each package may import of ours: lower layers never import upper ones. The products
#: (COGs, mosaics, change, ...) never import the orchestration that runs them. A module
#: belongs to the first package here its name starts with (products before flows).
LAYERS = {
    MODELS: set(),
    CATALOG: {MODELS},
    INGEST: {MODELS, CATALOG},
    PRODUCTS: {MODELS, CATALOG, INGEST},
    FLOWS: {MODELS, CATALOG, INGEST, PRODUCTS},
    "bench": {MODELS, CATALOG, INGEST, PRODUCTS, FLOWS},
}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, top in (*PACKAGES.items(), ("bench", "bench")):
        for path in sorted((ROOT / folder).glob("*.py")):
            name = top if path.stem == "__init__" else f"{top}.{path.stem}"
            mods[name] = path
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, str | None, int]]:
    """``(module, imported name or None, line)`` for every import in the file, relative
    ones resolved, at any depth (lazy imports in functions count too)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, base] if base else parts)
            out += [(base, a.name, node.lineno) for a in node.names]
    return out


def _ours(module: str) -> str | None:
    """The package of ours ``module`` belongs to (``tests`` included), or None."""
    for top in (*LAYERS, "tests"):
        if module == top or module.startswith(top + "."):
            return top
    return None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_layers_private_names_and_own_init(name):
    path, top = MODULES[name], _ours(name)
    for module, imported, line in _imports(name, path):
        where = f"{path.relative_to(ROOT)}:{line} imports {module}"
        assert module.split(".")[0] not in GENERIC, f"{where}: import it as relaymap.*"
        other = _ours(module)
        if other is None:
            continue
        assert other == top or other in LAYERS[top], f"{where}: {top} may not import {other}"
        if other != top:
            private = [p for p in module.split(".") if p.startswith("_")]
            assert not private, f"{where}: a private module of another package"
            assert not (imported or "").startswith("_"), f"{where}.{imported}: a private name"
        elif path.stem != "__init__" and module == top and top != "bench":
            submodule = f"{top}.{imported}" in MODULES
            assert submodule, f"{where}.{imported}: from its own package's __init__"


def test_no_import_cycles():
    graph = {
        name: {
            m
            for mod, imported, _ in _imports(name, path)
            for m in (mod, f"{mod}.{imported}")
            if m in MODULES and m != name
        }
        for name, path in MODULES.items()
    }
    # a package's __init__ re-exports its modules: edges into it stand for its public names
    for pkg in PACKAGES.values():
        graph[pkg] = {m for m in graph[pkg] if not m.startswith(pkg + ".")}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = [*stack[stack.index(nxt) :], nxt] if nxt in stack else [node, nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_checker_sees_a_violation(tmp_path):
    """The rules fire on code that breaks them (a test that can fail)."""
    bad = tmp_path / "stats.py"
    bad.write_text("from . import create_model\nfrom relaymap.flows.infer import _plan\n")
    found = _imports("relay_models.stats", bad)
    product = MODULES["relaymap.flows.products.change"]
    assert _ours("relaymap.flows.products.change") == PRODUCTS and FLOWS not in LAYERS[PRODUCTS]
    assert ("relaymap.flows.products.cog", "NODATA") in [
        (m, n) for m, n, _ in _imports("relaymap.flows.products.change", product)
    ]
    assert ("relay_models", "create_model", 1) in found and (
        "relaymap.flows.infer",
        "_plan",
        2,
    ) in found
