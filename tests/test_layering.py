"""The architecture's rules, checked on the source: core modules never import the study
layer, and there is one training loop / optimiser / checkpoint writer."""

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
