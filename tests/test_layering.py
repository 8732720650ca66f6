"""Import layering of ldm_jax, read from the source with `ast` (no module is imported).

Every `import` of an ldm_jax module counts, at module level or inside a function: a deferred
import hides a cycle from the interpreter, not from a reader. Two rules (shared/LAYOUT.md):
no import cycles between ldm_jax modules, and imports flow downward only.
"""
from __future__ import annotations

import ast
import collections
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
CLIS = ("ldm_jax.cli", "ldm_jax.export", "ldm_jax.quickstart", "ldm_jax.interop.convert",
        "ldm_jax.recipes",
        "ldm_jax.evaluate", "train", "sample")
# Each lower layer (a module or package prefix) must not import these (modules or packages).
FORBIDDEN = {
    **{low: ("ldm_jax.training", "ldm_jax.inference", "ldm_jax.interop", "ldm_jax.sampling_job",
             *CLIS)
       for low in ("ldm_jax.models", "ldm_jax.diffusion", "ldm_jax.data", "ldm_jax.losses")},
    "ldm_jax.ldm": ("ldm_jax.training", "ldm_jax.inference", "ldm_jax.interop", *CLIS),
}


def _module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def _sources() -> dict[str, pathlib.Path]:
  files = sorted((ROOT / "ldm_jax").rglob("*.py")) + [ROOT / "train.py", ROOT / "sample.py"]
  return {_module_name(p): p for p in files if p.exists()}


def _known(name: str, modules) -> str | None:
  """The deepest module of `modules` that `name` is or lies inside (None if outside ldm_jax)."""
  parts = name.split(".")
  for n in range(len(parts), 0, -1):
    candidate = ".".join(parts[:n])
    if candidate in modules:
      return candidate
  return None


def imports_of(module: str, source: str, modules, is_package: bool = False):
  """[(imported module, line)] of every import in `source` that resolves to one of `modules`.

  `from pkg import name` means module pkg.name when that module exists, else pkg itself;
  relative imports resolve against `module`'s package.
  """
  package = module if is_package else module.rpartition(".")[0]
  found = []
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      base = node.module or ""
      if node.level:
        anchor = package.split(".") if package else []
        anchor = anchor[:len(anchor) - (node.level - 1)]
        base = ".".join(anchor + ([base] if base else []))
      targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                 for alias in node.names]
    else:
      continue
    for target in targets:
      resolved = _known(target, modules)
      if resolved is not None and resolved != module:
        found.append((resolved, node.lineno))
  return sorted(found, key=lambda edge: edge[1])


def import_graph():
  """{module: {imported module: first line}} over ldm_jax plus train.py and sample.py."""
  sources = _sources()
  graph = {}
  for module, path in sources.items():
    edges = {}
    for target, line in imports_of(module, path.read_text(), sources,
                                   path.name == "__init__.py"):
      edges.setdefault(target, line)
    graph[module] = edges
  return graph


def find_cycles(graph) -> list[list[str]]:
  """Shortest cycles [a, b, ..., a] covering every module of each strongly connected
  component (the modules that import each other in a loop)."""
  index, low, on_stack, stack, components = {}, {}, set(), [], []

  def connect(v):  # Tarjan's algorithm; graphs here are small enough for recursion.
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph.get(v, ()):
      if w not in index:
        connect(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      components.append(component)

  for v in sorted(graph):
    if v not in index:
      connect(v)
  cycles = []
  for component in components:
    if len(component) == 1 and min(component) not in graph.get(min(component), ()):
      continue
    uncovered = set(component)
    while uncovered:  # a shortest cycle through each module no earlier chain went through
      start = min(uncovered)
      parent, queue = {}, collections.deque([start])
      while queue:
        v = queue.popleft()
        if start in graph.get(v, ()):
          chain = [v]
          while chain[-1] != start:
            chain.append(parent[chain[-1]])
          cycles.append([start] + chain[::-1][1:] + [start])
          break
        for w in sorted(graph.get(v, ())):
          if w in component and w not in parent and w != start:
            parent[w] = v
            queue.append(w)
      uncovered -= set(cycles[-1])
  return cycles


def _inside(module: str, prefix: str) -> bool:
  return module == prefix or module.startswith(prefix + ".")


def _where(module: str, line: int, sources) -> str:
  path = sources[module].relative_to(ROOT) if module in sources else module.replace(".", "/")
  return f"{path}{'' if module in sources else '.py'}:{line}"


def layering_violations(graph) -> list[str]:
  """'a (path:line) imports b' for every import a lower layer must not make."""
  sources = _sources()
  found = []
  for module, edges in sorted(graph.items()):
    for low, banned in FORBIDDEN.items():
      if not _inside(module, low):
        continue
      for target, line in sorted(edges.items()):
        if any(_inside(target, b) for b in banned):
          found.append(f"{module} ({_where(module, line, sources)}) imports {target}")
  return found


def _chain(cycle, graph) -> str:
  sources = _sources()
  hops = [f"{a} ({_where(a, graph[a][b], sources)})" for a, b in zip(cycle, cycle[1:])]
  return " -> ".join(hops + [cycle[-1]])


def test_no_import_cycles():
  graph = import_graph()
  cycles = find_cycles(graph)
  assert not cycles, "import cycles (module (file:line of the import) -> ...):\n  " + (
      "\n  ".join(_chain(c, graph) for c in cycles))


def test_imports_flow_downward():
  violations = layering_violations(import_graph())
  assert not violations, ("lower layers import upper ones (shared/LAYOUT.md):\n  " +
                          "\n  ".join(violations))


def test_graph_sees_function_level_and_relative_imports():
  """The resolver itself: every import form maps to the module a reader would open."""
  modules = {"ldm_jax", "ldm_jax.data", "ldm_jax.data.masks", "ldm_jax.data.pipeline",
             "ldm_jax.models", "ldm_jax.models.unet", "ldm_jax.errors", "ldm_jax.training",
             "ldm_jax.training.loop"}
  source = (
      "import numpy\n"
      "from . import masks\n"
      "from .. import errors\n"
      "from ldm_jax.data import pipeline, open_source\n"
      "def f():\n"
      "  import ldm_jax.models.unet as unet\n"
      "  from ldm_jax.training.loop import train\n"
      "  from ..training import loop\n")
  found = imports_of("ldm_jax.data.pipeline", source, modules)
  assert [m for m, _ in found] == [
      "ldm_jax.data.masks", "ldm_jax.errors", "ldm_jax.data", "ldm_jax.models.unet",
      "ldm_jax.training.loop", "ldm_jax.training.loop"]
  assert imports_of("ldm_jax.data", "from . import masks\n", modules, is_package=True) == [
      ("ldm_jax.data.masks", 1)]


def test_cycle_finder_on_a_synthetic_graph():
  """The detector can fail: it finds a planted cycle and its shortest chain, and no others."""
  graph = {"a": {"b": 1}, "b": {"c": 1, "d": 1}, "c": {"a": 1}, "d": {"e": 1}, "e": {"d": 1},
           "f": {"a": 1}, "g": {"g": 1}}
  assert sorted(find_cycles(graph)) == [["a", "b", "c", "a"], ["d", "e", "d"], ["g", "g"]]
  # Two loops through one hub: both are reported.
  assert find_cycles({"s1": {"hub": 1}, "s2": {"hub": 1}, "hub": {"s1": 1, "s2": 1}}) == [
      ["hub", "s1", "hub"], ["s2", "hub", "s2"]]
  assert find_cycles({"a": {"b": 1}, "b": {"c": 1}, "c": {}, "d": {"a": 1, "c": 1}}) == []
  bad = {"ldm_jax.models.unet": {"ldm_jax.training.loop": 3}, "ldm_jax.training.loop": {},
         "ldm_jax.ldm": {"ldm_jax.models.unet": 1, "ldm_jax.inference": 2}}
  assert layering_violations(bad) == [
      "ldm_jax.ldm (ldm_jax/ldm.py:2) imports ldm_jax.inference",
      "ldm_jax.models.unet (ldm_jax/models/unet.py:3) imports ldm_jax.training.loop"]
