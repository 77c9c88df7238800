"""No import cycles among the modules of finetune_trainer and finetune_operator.

Every ``import`` statement counts, also those inside functions and under TYPE_CHECKING: a lazy
import hides a cycle from Python, not from the design. Read with ``ast``, nothing is imported.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

PACKAGES = ("finetune_trainer", "finetune_operator")


def package_modules(package: str, directory: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every ``.py`` file under ``directory``."""
    modules = {}
    for path in sorted(directory.rglob("*.py")):
        parts = [package, *path.relative_to(directory).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module ``name`` is, or is defined in (``pkg.mod.func`` -> ``pkg.mod``); None outside ``modules``."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict[str, Path]) -> set[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".") if is_package else module.split(".")[:-1]
            anchor = anchor[: len(anchor) - (node.level - 1)]
            base = ".".join([*anchor, node.module] if node.module else anchor)
        # `from pkg import sub` imports the submodule pkg.sub; `from pkg import name`, pkg itself
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    owners = {_owner(n, modules) for n in names}
    return {o for o in owners if o is not None and o != module}


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ``modules`` it imports."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = graph.setdefault(name, set())
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                deps |= _targets(node, name, is_package, modules)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # finds the package without running it
    assert spec is not None and spec.submodule_search_locations, package
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package):
    modules = package_modules(package, _package_dir(package))
    assert len(modules) > 3, modules
    assert cycles(import_graph(modules)) == []


def test_the_check_finds_lazy_and_relative_cycles(tmp_path):
    pkg = tmp_path / "demo"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .sub import c\n")  # lazy, and into a subpackage
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from ..a import thing\n")
    (pkg / "d.py").write_text("import demo.a\nfrom demo import e\n")
    (pkg / "e.py").write_text("")
    graph = import_graph(package_modules("demo", pkg))
    assert graph["demo.a"] == {"demo.b"} and graph["demo.sub.c"] == {"demo.a"}
    assert graph["demo.d"] == {"demo.a", "demo.e"}
    assert cycles(graph) == [["demo.a", "demo.b", "demo.sub.c"]]
