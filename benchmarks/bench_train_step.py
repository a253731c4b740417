"""Flow train-step throughput (patches/s): FastFlow vs PatchFlow, lax.conv vs matmul convs.

  python -m benchmarks.bench_train_step                   # batch sizes 8 and 32
  python -m benchmarks.bench_train_step --batch-sizes=16 --flow-steps=8 --out=step.json

One jitted, state-donating ``train_step`` (``train.make_train_step`` with the
tail-aware flow loss, λ = 0.7, r = 0.02, Adam) on 14×14×112 feature maps (the
study's stride-16 grid), for the 4-step FastFlow (3×3 / 1×1 subnets, image
LayerNorm) and the per-patch flow (1×1 only). Convolutions either as XLA
convolutions (``lax.conv``, what ``flows.py`` emits) or as matmuls (im2col,
``tailjax.train.conv_as_matmul``); steps either called one by one from Python
("step", a host loop) or run inside one compiled loop ("scan": ``FlowProgram.run``,
the engine's step loop with a fixed trip count, batches sampled in the graph). Time per step is the best
of ``--repeats`` blocks of ``--steps`` steps, variants interleaved; throughput =
batch × 196 / step time.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.bench_sweep import FLOWS, bench_config
from tailjax import io as tj_io, train


HP = {"tail_weight": 0.7, "top_k_ratio": 0.02, "learning_rate": 1e-3}
IMPLS = ("xla", "matmul")


def _runners(cfg, feats, impl: str, steps: int) -> dict:
  """{"step": one jitted step called ``steps`` times from Python, "scan": the jitted
  ``FlowProgram.run`` running ``steps`` steps in one compiled loop}; each returns a callable
  that runs ``steps`` steps and blocks."""
  program = train.make_flow_program(cfg, feats.shape, conv_impl=impl)
  step = train.make_train_step(train.make_flow_loss(program.model))

  def one_step(state, batch, key):
    if impl == "matmul":
      with nn.intercept_methods(train.conv_as_matmul):
        return step(state, batch, key)
    return step(state, batch, key)

  key = jax.random.key(1)
  batch = feats[:program.batch_size]
  step_fn = jax.jit(one_step, donate_argnums=0)
  scan_fn = jax.jit(lambda st, f: program.run(st, key, f, steps), donate_argnums=0)
  init = jax.jit(program.init)
  box = {"step": init(HP, key), "scan": init(HP, key)}

  def run_steps():
    for _ in range(steps):
      box["step"], m = step_fn(box["step"], batch, key)
    jax.block_until_ready(m)

  def run_scan():
    box["scan"], m = scan_fn(box["scan"], feats)
    jax.block_until_ready(m)

  return {"step": run_steps, "scan": run_scan}


def throughput(flow_steps: int = 4, batch_sizes: Sequence[int] = (8, 32), steps: int = 3,
               repeats: int = 2) -> list[dict]:
  """Best seconds per step of every (loop kind, conv impl), interleaved; patches/s."""
  rng = np.random.default_rng(0)
  rows = []
  for flow_name, flow in FLOWS.items():
    for b in batch_sizes:
      cfg = bench_config(flow, steps, b, flow_steps)
      feats = jnp.asarray(rng.normal(size=(max(b, 64), 14, 14, 112)), jnp.float32)
      runs, compile_s = {}, {}
      for impl in IMPLS:
        for kind, fn in _runners(cfg, feats, impl, steps).items():
          t = time.perf_counter()
          fn()   # compiles
          compile_s[(kind, impl)] = time.perf_counter() - t
          runs[(kind, impl)] = fn
      best = {k: float("inf") for k in runs}
      for _ in range(repeats):
        for k, fn in runs.items():
          t = time.perf_counter()
          fn()
          best[k] = min(best[k], (time.perf_counter() - t) / steps)
      row = {"flow": flow_name, "batch_size": b}
      for (kind, impl), sec in best.items():
        row[f"{kind}_{impl}_ms"] = 1000 * sec
        row[f"{kind}_{impl}_patches_per_s"] = b * 196 / sec
      rows.append(row)
  return rows


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch-sizes", default="8,32")
  parser.add_argument("--flow-steps", type=int, default=4)
  parser.add_argument("--steps", type=int, default=3, help="steps per timed block")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--out", default=None, help="also write the results as JSON here")
  args = parser.parse_args(argv)
  sizes = [int(b) for b in args.batch_sizes.split(",")]
  results = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
             "flow_steps": args.flow_steps,
             "throughput": throughput(args.flow_steps, sizes, args.steps, args.repeats)}
  print(f"Flow train step, 14×14×112 maps, {args.flow_steps}-step flow, {results['device']}; "
        "patches/s")
  print(f"{'flow':>17} {'batch':>6} {'step lax.conv':>14} {'step matmul':>12} "
        f"{'scan lax.conv':>14} {'scan matmul':>12}")
  for r in results["throughput"]:
    print(f"{r['flow']:>17} {r['batch_size']:>6} {r['step_xla_patches_per_s']:>14.0f} "
          f"{r['step_matmul_patches_per_s']:>12.0f} {r['scan_xla_patches_per_s']:>14.0f} "
          f"{r['scan_matmul_patches_per_s']:>12.0f}")
  if args.out:
    tj_io.atomic_write_json(args.out, results)
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
