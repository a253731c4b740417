"""The architecture's rules, checked on the source: core modules never import the study
layer, no two tailjax modules import each other (directly or round a longer circle), and
there is one training loop / optimiser / checkpoint writer."""

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "tailjax"


def _imports(path: Path) -> set[str]:
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      out.add(node.module)
      out.update(f"{node.module}.{a.name}" for a in node.names)
  return out


def test_core_never_imports_studies():
  # cli.py is the entry point, the one layer above the studies.
  core = [p for p in PKG.rglob("*.py")
          if "studies" not in p.relative_to(PKG).parts and p.name != "cli.py"]
  offenders = {str(p.relative_to(PKG)): sorted(i for i in _imports(p) if "tailjax.studies" in i)
               for p in core}
  assert {k: v for k, v in offenders.items() if v} == {}


def _grep(pattern: str) -> dict[str, int]:
  rx = re.compile(pattern)
  hits = {}
  for p in PKG.rglob("*.py"):
    n = len(rx.findall(p.read_text()))
    if n:
      hits[str(p.relative_to(PKG))] = n
  return hits


def test_one_optimiser_factory_and_one_update():
  # optax optimisers are built, and gradients applied, only in tailjax/train.py.
  assert set(_grep(r"optax\.(adam|adamw|sgd|inject_hyperparams)\(")) <= {"train.py"}
  assert set(_grep(r"apply_gradients\(|optax\.apply_updates\(")) <= {"train.py"}


def test_one_checkpoint_writer_and_one_flow_loop():
  assert set(_grep(r"ocp\.CheckpointManager\(")) <= {"engine.py"}
  # The only loops over flow training steps: the program's scan / segment (train.py), driven
  # by the engine.
  assert set(_grep(r"make_flow_loss\(")) <= {"train.py"}


def _module_name(root: Path, path: Path) -> str:
  parts = (root.name,) + path.relative_to(root).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path) -> dict[str, set[str]]:
  """``module -> the tailjax modules it imports`` for every ``.py`` under ``root``.

  Every import statement counts, at module level or inside a function (a lazy
  import still makes the two modules depend on each other). ``from a.b import c``
  is an edge to ``a.b.c`` when that is a module, else to ``a.b``; relative imports
  are resolved against the importing module's package.
  """
  modules = {_module_name(root, p): p for p in root.rglob("*.py")}
  graph = {}
  for name, path in modules.items():
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    edges = set()
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
          up = package.split(".")[:len(package.split(".")) - (node.level - 1)]
          base = ".".join(up + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
      else:
        continue
      # ``import a.b.c`` binds ``a`` but runs a.b.c: the edge is to the deepest known module.
      for tgt in targets:
        while tgt and tgt not in modules:
          tgt = tgt.rpartition(".")[0]
        if tgt and tgt != name:
          edges.add(tgt)
    graph[name] = edges
  return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan), sorted."""
  index, low, on_stack, stack, out = {}, {}, set(), [], []

  def visit(v):
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
      comp = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        comp.append(w)
        if w == v:
          break
      if len(comp) > 1:
        out.append(sorted(comp))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return sorted(out)


def test_no_import_circles_between_tailjax_modules():
  assert import_circles(import_graph(PKG)) == []


def test_the_circle_check_finds_lazy_and_relative_circles(tmp_path):
  # A planted package: a -> b at module level, b -> a inside a function (relative), c alone.
  pkg = tmp_path / "tailjax"
  (pkg / "sub").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "sub" / "__init__.py").write_text("")
  (pkg / "sub" / "a.py").write_text("from tailjax.sub import b\n")
  (pkg / "sub" / "b.py").write_text("def f():\n  from . import a\n  return a\n")
  (pkg / "c.py").write_text("import tailjax.sub.a\nimport numpy\n")
  graph = import_graph(pkg)
  assert graph["tailjax.c"] == {"tailjax.sub.a"}
  assert import_circles(graph) == [["tailjax.sub.a", "tailjax.sub.b"]]
