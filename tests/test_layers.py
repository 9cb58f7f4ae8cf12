"""mmpt's import graph, built by grimp (import-linter's graph library): no import cycles among mmpt's modules,
and no module imports from a layer above its own. The layers are the layers contract of pyproject.toml
([tool.importlinter], which `make lint` checks with lint-imports); imports inside functions count too."""
from __future__ import annotations

import grimp
from importlinter.api import read_configuration

from tests.conftest import ROOT


def _layers() -> list[list[str]]:
    """pyproject.toml's layers contract, lowest layer first: each layer's modules, full names."""
    config = read_configuration(str(ROOT / "pyproject.toml"))
    (contract,) = [c for c in config["contracts_options"] if c["type"] == "layers"]
    (container,) = contract["containers"]
    layers = []
    for layer in reversed(contract["layers"]):
        names = layer.replace("|", ":").split(":")
        layers.append([f"{container}.{name.strip().strip('()')}" for name in names])
    return layers


def _layer_of(module: str, layers: list[list[str]]) -> int | None:
    for level, names in enumerate(layers):
        if any(module == name or module.startswith(name + ".") for name in names):
            return level
    return None  # the package itself, __main__, data packages: no layer


def _cycles(graph) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph.modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root))))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.find_modules_directly_imported_by(child)))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def _where(graph, importer: str, imported: str) -> str:
    lines = [d["line_number"] for d in graph.get_import_details(importer=importer, imported=imported)]
    return f"{importer} -> {imported} (line {', '.join(map(str, sorted(lines)))})"


def test_no_import_cycles():
    graph = grimp.build_graph("mmpt", cache_dir=None)
    cycles = _cycles(graph)
    report = []
    for cycle in cycles:
        members = set(cycle)
        report += [_where(graph, a, b) for a in cycle for b in sorted(graph.find_modules_directly_imported_by(a))
                   if b in members]
    assert not cycles, f"{len(cycles)} import cycle(s) {cycles}:\n" + "\n".join(report)


def test_no_module_imports_from_a_higher_layer():
    graph = grimp.build_graph("mmpt", cache_dir=None)
    layers = _layers()
    assert len(layers) == 5 and ["mmpt.cli", "mmpt.launch"] == layers[-1]
    upward = []
    for importer in sorted(graph.modules):
        mine = _layer_of(importer, layers)
        for imported in sorted(graph.find_modules_directly_imported_by(importer)):
            theirs = _layer_of(imported, layers)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"layer {mine + 1} -> {theirs + 1}: " + _where(graph, importer, imported))
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)


def test_cycle_finder_sees_a_cycle_and_its_modules():
    graph = grimp.ImportGraph()
    for a, b in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d"), ("p.d", "p.e")):
        graph.add_import(importer=a, imported=b)
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]
