"""How the stages import each other: no import cycles among cnnctl's modules, the server and
client packages load without torch or cnnctl.training, and ``cnnctl --help`` loads no stage."""

from __future__ import annotations

import ast
import importlib.util
import pkgutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

# The installed packages besides cnnctl itself (pyproject.toml [tool.setuptools] packages).
STAGES = ("training", "export", "serving", "protos", "clients")


def cnnctl_modules() -> dict[str, str]:
    """Every module of the installed cnnctl package: name -> source file."""
    found: dict[str, str] = {}

    def walk(name: str) -> None:
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        found[name] = spec.origin
        for sub in pkgutil.iter_modules(spec.submodule_search_locations or []):
            walk(f"{name}.{sub.name}")

    for name in ("cnnctl", *(f"cnnctl.{stage}" for stage in STAGES)):
        if name not in found:
            walk(name)
    return found


def import_nodes(nodes: list[ast.AST], lazy: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    """The import statements that run: at import time, and with ``lazy`` also those in
    functions (they run on a call)."""
    for node in nodes:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from import_nodes(list(node.orelse), lazy)
        elif lazy or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield from import_nodes(list(ast.iter_child_nodes(node)), lazy)


def import_graph(lazy: bool) -> dict[str, set[str]]:
    """module -> the cnnctl modules importing it executes (a module's packages included)."""
    modules = cnnctl_modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
        targets: set[str] = set()
        tree = ast.parse(open(path, encoding="utf-8").read())
        for node in import_nodes(list(tree.body), lazy):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*parts, *([node.module] if node.module else [])])
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                targets.add(sub if sub in modules else base)
        edges: set[str] = set()
        for target in targets:
            # Importing a.b.c runs a and a.b first, unless they are the importer's own packages.
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                mod = ".".join(parts[:i])
                if mod in modules and mod != name and not name.startswith(mod + "."):
                    edges.add(mod)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle through each group of modules that import each other (Tarjan's SCCs)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("lazy", [False, True])
def test_no_import_cycles(lazy: bool) -> None:
    graph = import_graph(lazy)
    assert {"cnnctl.cli", "cnnctl.serving.server", "cnnctl.clients.client", "cnnctl.export.api",
            "cnnctl.training.models", "cnnctl.protos.grpc_service_pb2"} <= set(graph)
    assert "cnnctl.clients.client" in graph["cnnctl.clients"]  # the walker sees edges
    assert cycles(graph) == []


def test_cycles_are_found() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"]]


def run_python(*lines: str) -> list[str]:
    """These lines in a fresh interpreter: what they print."""
    r = subprocess.run([sys.executable, "-c", "\n".join(lines)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()


def test_serving_and_clients_import_without_torch_or_training() -> None:
    *_, imported, training = run_python(
        "import importlib, importlib.util, pkgutil, sys",
        "sys.modules['torch'] = None  # any import of torch fails",
        "done = []",
        "for package in ('cnnctl.serving', 'cnnctl.clients'):",
        "    spec = importlib.util.find_spec(package)",
        "    for m in pkgutil.iter_modules(spec.submodule_search_locations):",
        "        done.append(importlib.import_module(f'{package}.{m.name}').__name__)",
        "print(sorted(done))",
        "print(sorted(m for m in sys.modules if m.startswith('cnnctl.training')))")
    assert "'cnnctl.serving.server'" in imported and "'cnnctl.clients.client'" in imported
    assert "'cnnctl.serving.workers'" in imported and "'cnnctl.clients.commands'" in imported
    assert training == "[]"


def test_cnnctl_help_imports_no_stage() -> None:
    """cnnctl/cli.py lists the commands without importing them: ``cnnctl --help`` stays instant."""
    out = run_python(
        "import contextlib, sys",
        "from cnnctl.cli import main",
        "with contextlib.suppress(SystemExit):",
        "    main(['--help'])",
        "print(sorted(m for m in sys.modules if m.startswith('cnnctl') or m.split('.')[0] in "
        "('torch', 'numpy', 'grpc', 'onnxruntime', 'prometheus_client')))")
    assert any(line.startswith("  serve ") for line in out)
    assert out[-1] == "['cnnctl', 'cnnctl.cli', 'cnnctl.errors']"
