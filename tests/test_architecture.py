"""The layering and lint rules CI enforces.

* ``lint-imports`` (import-linter) checks the contracts in ``pyproject.toml``
  (``[tool.importlinter]``): the layer order, "the library never imports the
  experiments", private submodules. Every top-level module of ``jaxface`` must
  be in a layer (a module in none would escape the layer contract).
* An AST scan finds import cycles between modules of ``jaxface`` and
  ``experiments``, counting imports inside functions (a cycle hidden behind a
  function-level import is still a cycle) and ``importlib.import_module`` of a
  literal name.
* ``ruff check`` keeps the sources lint-clean (``[tool.ruff]``).

The tools run from the virtual environment of the interpreter running the
tests (``pip install -e .[test]`` installs both), without caches in the tree.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import tomllib

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ROOTS = ("jaxface", "experiments")


def _tool(name: str) -> str:
  path = os.path.join(os.path.dirname(sys.executable), name)
  if not os.path.exists(path):
    pytest.fail(f"{name} is not installed next to {sys.executable}: pip install -e .[test]")
  return path


def _run(argv: list[str]) -> subprocess.CompletedProcess:
  return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_import_contracts_hold():
  r = _run([_tool("lint-imports"), "--no-cache", "--no-logo"])
  assert r.returncode == 0, f"lint-imports found broken contracts:\n{r.stdout}\n{r.stderr}"


def test_every_top_level_module_is_in_a_layer():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    contracts = tomllib.load(f)["tool"]["importlinter"]["contracts"]
  layers = next(c for c in contracts if c["type"] == "layers")["layers"]
  named = {name.strip().strip("()") for layer in layers for name in re.split(r"[|:]", layer)}
  root = os.path.join(REPO, "jaxface")
  top = {f"jaxface.{os.path.splitext(n)[0]}" for n in os.listdir(root)
         if (n.endswith(".py") and n != "__init__.py") or os.path.isfile(os.path.join(root, n, "__init__.py"))}
  assert top <= named, f"jaxface modules in no layer of [tool.importlinter] (add them): {sorted(top - named)}"


def test_ruff_is_clean():
  r = _run([_tool("ruff"), "check", "--no-cache", "--output-format=concise", *ROOTS, "tests"])
  assert r.returncode == 0, f"ruff check found problems:\n{r.stdout}\n{r.stderr}"


# --------------------------------------------------------------------------- import cycles


def module_files(repo: str = REPO, roots=ROOTS) -> dict[str, str]:
  """{dotted module name: file path} of every ``.py`` file under ``roots``."""
  out = {}
  for root in roots:
    for folder, dirs, files in os.walk(os.path.join(repo, root)):
      dirs[:] = sorted(d for d in dirs if d != "__pycache__")
      for f in files:
        if not f.endswith(".py"):
          continue
        parts = os.path.relpath(os.path.join(folder, f), repo)[:-3].split(os.sep)
        if parts[-1] == "__init__":
          parts = parts[:-1]
        out[".".join(parts)] = os.path.join(folder, f)
  return out


def _imported(module: str, is_package: bool, node: ast.AST, known: dict[str, str]) -> list[str]:
  """Names of the project modules that one import statement (or import_module call) loads."""
  if isinstance(node, ast.Import):
    names = [a.name for a in node.names]
  elif isinstance(node, ast.ImportFrom):
    if node.level:
      base = module if is_package else module.rpartition(".")[0]
      for _ in range(node.level - 1):
        base = base.rpartition(".")[0]
      base = f"{base}.{node.module}" if node.module else base
    else:
      base = node.module or ""
    # `from pkg import name`: the submodule when there is one, else pkg itself (its __init__).
    names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
  else:  # importlib.import_module("literal")
    names = [node.args[0].value]
  out = []
  for name in names:
    while name and name not in known:  # `import a.b.c` where only a.b is ours, etc.
      name = name.rpartition(".")[0]
    if name and name != module:
      out.append(name)
  return out


def _is_import_module_call(node: ast.AST) -> bool:
  return (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
          and isinstance(node.args[0].value, str)
          and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
               or (isinstance(node.func, ast.Name) and node.func.id == "import_module")))


def import_graph(known: dict[str, str]) -> dict[str, dict[str, int]]:
  """{importer: {imported: first line}} over ``known``, every import anywhere in a file."""
  graph: dict[str, dict[str, int]] = {}
  for module, path in known.items():
    with open(path, encoding="utf-8") as f:
      tree = ast.parse(f.read(), path)
    edges = graph.setdefault(module, {})
    is_package = os.path.basename(path) == "__init__.py"
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)) or _is_import_module_call(node):
        for target in _imported(module, is_package, node, known):
          edges.setdefault(target, node.lineno)
  return graph


def strongly_connected(graph: dict[str, dict[str, int]]) -> list[list[str]]:
  """Tarjan's algorithm (iterative): the components with more than one module."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  found = []
  for start in sorted(graph):
    if start in index:
      continue
    work = [(start, iter(sorted(graph[start])))]
    index[start] = low[start] = len(index)
    stack.append(start)
    on_stack.add(start)
    while work:
      node, children = work[-1]
      child = next(children, None)
      if child is not None:
        if child not in index:
          index[child] = low[child] = len(index)
          stack.append(child)
          on_stack.add(child)
          work.append((child, iter(sorted(graph.get(child, ())))))
        elif child in on_stack:
          low[node] = min(low[node], index[child])
        continue
      work.pop()
      if work:
        parent = work[-1][0]
        low[parent] = min(low[parent], low[node])
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


def test_cycle_finder_sees_cycles_hidden_in_functions(tmp_path):
  pkg = tmp_path / "pkg"
  pkg.mkdir()
  (pkg / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from pkg import b\n")
  (pkg / "b.py").write_text("def f():\n  from . import c\n")
  (pkg / "c.py").write_text("import importlib\ndef g():\n  return importlib.import_module('pkg.a')\n")
  (pkg / "d.py").write_text("import pkg.a\n")
  graph = import_graph(module_files(str(tmp_path), ("pkg",)))
  assert graph["pkg.b"] == {"pkg.c": 2} and graph["pkg.d"] == {"pkg.a": 1}
  assert strongly_connected(graph) == [["pkg.a", "pkg.b", "pkg.c"]]


def test_no_import_cycles():
  graph = import_graph(module_files())
  cycles = strongly_connected(graph)
  lines = []
  for component in cycles:
    members = set(component)
    lines.append(" <-> ".join(component))
    lines += [f"    {a} -> {b} (line {graph[a][b]})" for a in component for b in sorted(graph[a]) if b in members]
  assert not cycles, "import cycles (counting imports inside functions):\n" + "\n".join(lines)
