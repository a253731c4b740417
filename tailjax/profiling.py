"""Where a compiled train step spends its time: a ``jax.profiler`` trace read op by op.

``trace(folder)`` records a trace with the Python tracer off and, beside the
TensorBoard/XProf files, a Perfetto JSON (``*.trace.json.gz``) that this module reads
without the profiler plugin. ``op_summary`` maps every traced XLA op to its HLO
instruction in the compiled program's text (``compiled.as_text()``):

* its **region** from the instruction's ``op_name`` metadata, the JAX call path
  (``transpose(jvp(…))`` marks the backward pass): coupling i forward / backward
  (``step_i.`` in the flow's module path), the channel permutations, the LayerNorm and
  log-det sum, the NLL and loss, the top-k selection, batch sampling, and the optimiser
  with the rest of the loop; instructions XLA added without a call path (loop-carried
  and layout copies) get their own row;
* its **kind** from the instruction's name (XLA names a fusion after its root ops):
  matmul, gather/scatter, pad/slice/concatenate, copy/transpose, sort, elementwise/reduce.

Times are milliseconds per step. XLA:CPU runs a program's ops one after another, each
spread over the thread pool (``ops_overlap``, the ops' summed time over the length of
their union, is ≈ 1 there), so an op's time is its share of the step; the ops' total is
less than the step by the executor's dispatch between them. On a GPU, events of the
device's streams and the host's can overlap: read the shares per kind there, not the
total against the step.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import gzip
import json
import os
import re
from typing import Iterator, Sequence

import jax

from tailjax import reporting

# (kind, substrings of the HLO instruction name): the first match wins.
OP_KINDS = (("matmul", ("ynn_fusion", "dot", "onednn", "xnn_fusion", "custom-call", "gemm",
                        "cublas", "triton")),
            ("gather / scatter", ("gather", "scatter")),
            ("pad / slice / concatenate", ("concatenate", "pad", "slice")),
            ("copy / transpose", ("copy", "transpose")),
            ("sort", ("sort",)),
            ("elementwise / reduce", ("",)))
KINDS = tuple(kind for kind, _ in OP_KINDS)
NO_CALL_PATH = "copies XLA added (no call path)"

_INSTRUCTION = re.compile(r"^\s*%?([\w.-]+) = ", re.M)
_OP_NAME = re.compile(r"^\s*%?([\w.-]+) = [^\n]*?op_name=\"([^\"]*)\"", re.M)
_STEP = re.compile(r"step_(\d+)\.")


def op_kind(instruction: str) -> str:
  """The kind of an HLO instruction, from its name (``OP_KINDS``)."""
  return next(kind for kind, keys in OP_KINDS if any(k in instruction for k in keys))


def op_region(op_name: str) -> str:
  """Where an op comes from in the train step, from its ``op_name`` (the JAX call path)."""
  direction = "bwd" if "transpose(jvp(" in op_name else "fwd"
  step = _STEP.search(op_name)
  if step:
    return f"coupling {step.group(1)} {direction}"
  if "FastFlow2d" in op_name or "MultiScaleFlow" in op_name or "PatchFlow" in op_name:
    if "gather" in op_name or "scatter" in op_name:
      return f"permutations {direction}"
    return f"LayerNorm, log-det sum {direction}"
  if any(k in op_name for k in ("take_along_axis", "argsort", "sort", "top_k")):
    return "top-k selection"
  if "jvp(" in op_name:
    return f"NLL + loss {direction}"
  if any(k in op_name for k in ("threefry", "randint", "random")):
    return "batch sampling"
  return "Adam, clipping, metrics, loop"


@contextlib.contextmanager
def trace(folder: str | os.PathLike) -> Iterator[None]:
  """``jax.profiler.trace`` into ``folder`` with the Python tracer off (it would slow the
  step several-fold) and a Perfetto JSON beside the XProf files."""
  options = jax.profiler.ProfileOptions()
  options.python_tracer_level = 0
  with jax.profiler.trace(str(folder), create_perfetto_trace=True, profiler_options=options):
    yield


def trace_events(folder: str | os.PathLike) -> list[dict]:
  """The complete ("X") events of the newest Perfetto JSON under ``folder``."""
  paths = sorted(glob.glob(os.path.join(str(folder), "**", "*.trace.json.gz"), recursive=True),
                 key=os.path.getmtime)
  if not paths:
    raise FileNotFoundError(f"{folder}: no *.trace.json.gz (record it with profiling.trace)")
  with gzip.open(paths[-1]) as f:
    return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def op_summary(events: Sequence[dict], hlo_text: str, steps: int) -> dict:
  """Per-step time of a traced program's ops by region × kind (see the module docstring).

  Returns ``{"ops_ms", "ops_overlap", "by_kind_pct", "rows"}``; ``rows`` (largest first)
  are ``{"region", <each kind>, "total_ms", "pct"}``. Events that are not instructions of
  ``hlo_text`` (the runtime's own: dispatch, argument handling) are left out.
  """
  instructions = set(_INSTRUCTION.findall(hlo_text))
  op_names = dict(_OP_NAME.findall(hlo_text))
  ops = [e for e in events if e["name"] in instructions]
  if not ops:
    raise ValueError("no traced op is an instruction of this program: trace and HLO text "
                     "come from different programs")
  union, end = 0.0, float("-inf")
  for start, stop in sorted((e["ts"], e["ts"] + e["dur"]) for e in ops):
    union += max(0.0, stop - max(start, end))
    end = max(end, stop)
  cells: dict[tuple[str, str], float] = collections.defaultdict(float)
  for e in ops:
    region = op_region(op_names[e["name"]]) if e["name"] in op_names else NO_CALL_PATH
    cells[(region, op_kind(e["name"]))] += e["dur"] / 1000 / steps   # trace times are µs
  total = sum(cells.values())
  rows = []
  for region in {r for r, _ in cells}:
    row = {"region": region, **{kind: cells.get((region, kind), 0.0) for kind in KINDS}}
    row["total_ms"] = sum(row[kind] for kind in KINDS)
    row["pct"] = 100 * row["total_ms"] / total
    rows.append(row)
  rows.sort(key=lambda r: -r["total_ms"])
  by_kind = {kind: sum(v for (_, k), v in cells.items() if k == kind) for kind in KINDS}
  return {"ops_ms": total, "ops_overlap": sum(e["dur"] for e in ops) / union,
          "by_kind_pct": {k: 100 * v / total for k, v in by_kind.items()}, "rows": rows}


def summary_lines(summary: dict, title: str) -> list[str]:
  """``op_summary`` as markdown lines (ms per step), its shares by kind under the table."""
  rows = [[r["region"], *(f"{r[k]:.3f}" for k in KINDS), f"{r['total_ms']:.3f}", f"{r['pct']:.1f}"]
          for r in summary["rows"]]
  return ([f"# {title}", "",
           f"Ops {summary['ops_ms']:.2f} ms per step (overlap {summary['ops_overlap']:.2f}).", ""]
          + reporting.table(["region", *KINDS, "total ms", "%"], rows)
          + ["", "Share by kind: " + ", ".join(f"{k} {v:.0f} %"
                                               for k, v in summary["by_kind_pct"].items())])
