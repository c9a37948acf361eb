"""krea2_core's module-level imports form no cycle, and the core never imports flytekit: read from the source, so
a cycle that Python's import order happens to tolerate today still fails here."""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "krea2_core"


def _module_name(file: Path) -> str:
    parts = file.relative_to(CORE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(file: Path, modules: set[str]) -> tuple[set[str], set[str]]:
    """(the krea2_core modules ``file`` imports at module level, every top-level package it imports anywhere)."""
    tree = ast.parse(file.read_text())
    core: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("krea2_core"):
            for alias in node.names:  # `from krea2_core.training import checkpoint` imports a module
                full = f"{node.module}.{alias.name}"
                core.add(full if full in modules else node.module)
        elif isinstance(node, ast.Import):
            core.update(alias.name for alias in node.names if alias.name.startswith("krea2_core"))
    anywhere = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    anywhere |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    return core, anywhere


def test_the_core_has_no_import_cycle_and_no_flytekit() -> None:
    files = {_module_name(f): f for f in CORE.rglob("*.py")}
    graph, flyte = {}, []
    for name, file in files.items():
        core, anywhere = _imports(file, set(files))
        graph[name] = core - {name}
        if "flytekit" in anywhere or "flytekitplugins" in anywhere:
            flyte.append(name)
    assert not flyte
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as err:
        raise AssertionError(f"import cycle: {' -> '.join(err.args[1])}") from None


def test_a_cycle_is_found(tmp_path: Path) -> None:
    """The check itself: two modules that import each other are a cycle."""
    (tmp_path / "a.py").write_text("from krea2_core.b import x\n")
    (tmp_path / "b.py").write_text("import krea2_core.a\nx = 1\n")
    graph = {name: _imports(tmp_path / f"{name}.py", {"krea2_core.a", "krea2_core.b"})[0] - {f"krea2_core.{name}"}
             for name in ("a", "b")}
    graph = {f"krea2_core.{k}": v for k, v in graph.items()}
    try:
        list(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError:
        return
    raise AssertionError("the cycle a <-> b was not found")
