"""Package boundaries: serving never imports the factory, and no two packages import each other.

Units of the graph: each subpackage of ``appliance`` (``appliance.serve``, ``appliance.factory``,
...), each top-level module of ``appliance`` (``appliance.store``, ``appliance.cli``, ...) on its own,
and ``kernels``. An edge is an import at module level, ``if TYPE_CHECKING:`` blocks included (they
are dependencies of the code's design even when they do not run). Imports inside functions are
left out: they are the deliberate way to reach a heavy or higher layer on demand (the CLI reaching
its commands, the serve command training the demo model).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVING_MODULES = [
    "appliance.serve.runtime",
    "appliance.api.server",
    *sorted(f"appliance.engines.{p.stem}" for p in (ROOT / "appliance" / "engines").glob("[!_]*.py")),
    *sorted(f"appliance.router.{p.stem}" for p in (ROOT / "appliance" / "router").glob("[!_]*.py")),
]


def test_serving_imports_no_factory_module() -> None:
    code = (
        "import importlib, json, sys\n"
        f"for name in {SERVING_MODULES!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('appliance'))))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    assert "appliance.serve.runtime" in loaded and "appliance.artifact.manifest" in loaded
    assert [m for m in loaded if m.startswith("appliance.factory")] == []


def _unit(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] == "kernels":
        return "kernels"
    if parts[0] != "appliance":
        return None
    return ".".join(parts[:2])


def _module_name(path: Path) -> tuple[str, bool]:
    rel = path.relative_to(ROOT).with_suffix("").parts
    is_package = rel[-1] == "__init__"
    return ".".join(rel[:-1] if is_package else rel), is_package


def _module_level_imports(tree: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        elif not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            yield from _module_level_imports(node)  # if/try/class bodies run at import time


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = module.split(".") if is_package else module.split(".")[:-1]
        anchor = package[: len(package) - node.level + 1]
        base = ".".join([*anchor, *([node.module] if node.module else [])])
    # `from appliance import store` imports the module appliance.store
    return [f"{base}.{alias.name}" for alias in node.names] + [base]


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in [*(ROOT / "appliance").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]:
        if "_proto" in path.parts:
            continue  # generated gRPC code
        module, is_package = _module_name(path)
        source = _unit(module)
        assert source is not None
        for node in _module_level_imports(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _targets(node, module, is_package):
                unit = _unit(target)
                if unit is not None and unit != source and _exists(unit):
                    graph.setdefault(source, set()).add(unit)
    return graph


def _exists(unit: str) -> bool:
    """A subpackage or a top-level module; not the bare ``appliance`` package nor a name in it."""
    path = ROOT / Path(*unit.split("."))
    return unit != "appliance" and (path.is_dir() or path.with_suffix(".py").is_file())


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}}) is None


def test_the_package_graph_is_acyclic() -> None:
    graph = package_graph()
    # the graph is real: the known layers are in it
    assert "appliance.artifact" in graph["appliance.store"]
    assert "appliance.artifact" in graph["kernels"]
    assert "appliance.engines" in graph["appliance.factory"]
    assert "appliance.factory" not in graph.get("appliance.engines", set())
    assert graph.get("appliance.artifact", set()) == set(), "the artifact package depends on no other"
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"
