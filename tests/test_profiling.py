"""tailjax.profiling: op regions and kinds from HLO call paths, and the op summary."""

import numpy as np
import pytest

from tailjax import profiling

BASE = "jit(local_segment)/while/body/closed_call/while/body/"


def test_regions_read_the_jax_call_path():
  region = profiling.op_region
  assert region(BASE + "transpose(jvp(FastFlow2d))/FastFlow2d.forward/step_2.coupling/"
                "step_2._scale_shift/conv_in/dot_general") == "coupling 2 bwd"
  assert region(BASE + "jvp(FastFlow2d)/FastFlow2d.forward/step_0.coupling/concatenate") \
      == "coupling 0 fwd"
  assert region(BASE + "transpose(jvp(FastFlow2d))/FastFlow2d.forward/scatter-add") \
      == "permutations bwd"
  assert region(BASE + "jvp(FastFlow2d)/FastFlow2d.forward/gather") == "permutations fwd"
  assert region(BASE + "jvp(FastFlow2d)/sub") == "LayerNorm, log-det sum fwd"
  assert region(BASE + "jvp(jit(take_along_axis))/gather") == "top-k selection"
  assert region(BASE + "jit(_randint)/while/body/add") == "batch sampling"
  assert region(BASE + "transpose(jvp())/mul") == "NLL + loss bwd"
  assert region(BASE + "div") == "Adam, clipping, metrics, loop"


def test_kinds_read_the_instruction_name():
  names = ("ynn_fusion.3", "dot.12", "wrapped_scatter.1", "concatenate_gather_fusion",
           "add_pad_fusion", "copy_bitcast_fusion.9", "sort.29", "multiply_add_fusion")
  assert [profiling.op_kind(n) for n in names] == [
      "matmul", "matmul", "gather / scatter", "gather / scatter", "pad / slice / concatenate",
      "copy / transpose", "sort", "elementwise / reduce"]


HLO = """
  %dot.1 = f32[8,4]{1,0} dot(%a, %b), metadata={op_name="jit(f)/jvp(FastFlow2d)/FastFlow2d.forward/step_0.coupling/dot_general"}
  %add_fusion = f32[8,4]{1,0} fusion(%dot.1), kind=kLoop, metadata={op_name="jit(f)/transpose(jvp())/add"}
  %copy.7 = f32[8,4]{0,1} copy(%add_fusion)
"""


def test_summary_sums_per_step_and_leaves_out_the_runtimes_events():
  # Two steps; times in µs as the trace has them; one runtime event that is no instruction.
  events = [{"name": "dot.1", "ts": 0, "dur": 3000}, {"name": "add_fusion", "ts": 3000, "dur": 1000},
            {"name": "copy.7", "ts": 4000, "dur": 1000}, {"name": "PjitFunction(f)", "ts": 0, "dur": 9e6},
            {"name": "dot.1", "ts": 10000, "dur": 3000}, {"name": "add_fusion", "ts": 13000, "dur": 1000},
            {"name": "copy.7", "ts": 14000, "dur": 1000}]
  s = profiling.op_summary(events, HLO, steps=2)
  rows = {r["region"]: r for r in s["rows"]}
  assert s["ops_ms"] == pytest.approx(5.0) and s["ops_overlap"] == pytest.approx(1.0)
  assert rows["coupling 0 fwd"]["matmul"] == pytest.approx(3.0)
  assert rows["NLL + loss bwd"]["elementwise / reduce"] == pytest.approx(1.0)
  assert rows[profiling.NO_CALL_PATH]["copy / transpose"] == pytest.approx(1.0)
  assert s["rows"][0]["region"] == "coupling 0 fwd"
  assert sum(r["pct"] for r in s["rows"]) == pytest.approx(100)
  assert s["by_kind_pct"]["matmul"] == pytest.approx(60)
  lines = profiling.summary_lines(s, "ops")
  assert any(l.startswith("| coupling 0 fwd | 3.000 |") for l in lines)
  # Two ops running at once on two threads: the overlap says so.
  both = [{"name": "dot.1", "ts": 0, "dur": 1000}, {"name": "add_fusion", "ts": 0, "dur": 1000}]
  assert profiling.op_summary(both, HLO, steps=1)["ops_overlap"] == pytest.approx(2.0)


def test_a_trace_of_another_program_is_refused():
  with pytest.raises(ValueError, match="different programs"):
    profiling.op_summary([{"name": "fusion.99", "ts": 0, "dur": 1}], HLO, steps=1)
  with pytest.raises(FileNotFoundError, match="trace.json.gz"):
    profiling.trace_events("/nonexistent-folder")
