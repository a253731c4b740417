"""The train step on the path study A uses, against the hardware's limit and the PyTorch peer.

  python -m benchmarks.bench_engine                       # 4 and 8 coupling steps, batch 16
  python -m benchmarks.bench_engine --flow-steps=4 --steps=20 --out=engine.json

What runs: ``tailjax.engine``'s compiled segment program for one row (the program
study A, the sweeps and the toy run all train with; on CPU convolutions as matmuls,
rows by ``lax.map``; on GPU XLA convolutions), 14×14×112 features, batch 16, the
tail-aware loss (λ = 0.7, r = 0.02), Adam, FastFlow with 3×3/1×1 alternating
subnets, hidden ratio 1.0, clamp 2.0, image LayerNorm. Time per step = best of
``--repeats`` segments of ``--steps`` steps (compilation excluded).

FLOPs: XLA's cost analysis of the compiled single-step program (forward, backward
and Adam), so GFLOP/s = flops / step time; the fraction of peak uses the CPU's
single-precision peak = cores × FMA ports × SIMD lanes × 2 × clock (from
``--peak-gflops`` or estimated from /proc/cpuinfo: AVX-512 → 16 lanes, AVX2 → 8;
2 FMA ports assumed) and on GPU the device's dense fp32 rate when known.
The PyTorch peer (``benchmarks.peer_torch``: anomalib's FastFlow block from
FrEIA's ``AllInOneBlock`` at the same shape) runs in the same process when torch
and FrEIA are importable, and the ratio peer / ours is printed, with the peer's
own FLOPs per step (torch's ``FlopCounterMode``; its block has a permutation
convolution and a global affine ours lacks, ≈ 17 % more FLOPs per step here) and
the GFLOP/s it achieves: the time ratio is the FLOP ratio times the rate ratio.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tailjax import engine, io as tj_io, sharding, train

HP = {"tail_weight": 0.7, "top_k_ratio": 0.02, "learning_rate": 1e-3}


def config(flow_steps: int, batch_size: int, steps: int) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.flow = {"num_steps": flow_steps, "kernel_mode": "alternate", "hidden_ratio": 1.0,
            "clamp": 2.0, "layer_norm": "image", "global_affine": False}
  c.optim = {"name": "adam", "learning_rate": 1e-3}
  c.train = {"num_steps": steps, "batch_size": batch_size, "segment_steps": steps,
             "row_mode": "auto", "conv_impl": "auto", "batch_devices": 1}
  return c


def cpu_peak_gflops() -> float | None:
  """cores × 2 FMA ports × lanes × 2 flops × GHz, from /proc/cpuinfo (None if unknown)."""
  try:
    info = open("/proc/cpuinfo").read()
  except OSError:
    return None
  flags = re.search(r"^flags\s*:(.*)$", info, re.M)
  mhz = [float(x) for x in re.findall(r"^cpu MHz\s*:\s*([\d.]+)", info, re.M)]
  if not flags or not mhz:
    return None
  lanes = 16 if "avx512f" in flags.group(1) else 8 if "avx2" in flags.group(1) else 4
  cores = len(os.sched_getaffinity(0))
  return cores * 2 * lanes * 2 * max(mhz) / 1000.0


def xla_flops(lowered) -> float | None:
  """XLA's flop count of a lowered program (None where the backend gives none)."""
  try:
    cost = lowered.compile().cost_analysis()
  except Exception:  # cost analysis is best effort on some backends
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost["flops"]) if cost and cost.get("flops") else None


def step_flops(cfg, feats) -> float | None:
  """XLA's flop count of one train step (forward + backward + Adam) of the engine's program."""
  program = train.make_flow_program(cfg, feats.shape)
  key = train.row_keys([0])[0]
  state = jax.jit(program.init)(HP, key)
  return xla_flops(jax.jit(lambda st: program.run(st, key, feats, 1)).lower(state))


def one_row(cfg, feats, steps: int) -> dict:
  """The engine's compiled programs for one row (``HP``, seed 0) of ``cfg`` on ``feats``,
  with segments of ``steps`` steps, on one device: ``program``, ``segment``, the row's
  initial ``state``, its key data ``kd``, the features ``f`` on the device, ``row_impl``."""
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  row_impl = train.resolve_row_impl("auto")
  program, init, segment = engine._row_fns(cfg, feats.shape, mesh, row_impl, steps)
  rows = engine.Rows.from_dicts([{**HP, "seed": 0}])
  h = {k: jnp.asarray(v) for k, v in rows.hparams_R.items()}
  kd = jnp.asarray(jax.random.key_data(train.row_keys(rows.seeds_R)))
  return {"program": program, "segment": segment, "state": init(h, kd), "kd": kd,
          "f": jnp.asarray(feats), "row_impl": row_impl}


def time_segment(cfg, feats, steps: int, repeats: int) -> dict:
  """The engine's compiled segment program for one row of ``cfg`` on ``feats``: seconds
  per step (best of ``repeats`` segments of ``steps`` steps, after one compiling call),
  the compile time, XLA's flops of one step, the program and the row mode."""
  row = one_row(cfg, feats, steps)
  program, segment, state, kd, f, row_impl = (row[k] for k in ("program", "segment", "state", "kd",
                                                               "f", "row_impl"))
  t = time.perf_counter()
  state, m = segment(state, kd, f, jnp.int32(steps))
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    state, m = segment(state, kd, f, jnp.int32(steps))
    jax.block_until_ready(m)
    best = min(best, (time.perf_counter() - t) / steps)
  return {"s": best, "compile_s": compile_s, "flops": step_flops(cfg, f), "program": program,
          "row_mode": row_impl}


def engine_step_ms(flow_steps: int, batch_size: int = 16, steps: int = 20, repeats: int = 3,
                   n_feats: int = 64) -> dict:
  """ms per step of the engine's compiled segment program, one row."""
  cfg = config(flow_steps, batch_size, steps)
  feats = np.random.default_rng(0).normal(size=(n_feats, 14, 14, 112)).astype(np.float32)
  t = time_segment(cfg, feats, steps, repeats)
  best, flops = t["s"], t["flops"]
  return {"flow_steps": flow_steps, "batch_size": batch_size, "ms": 1000 * best,
          "patches_per_s": batch_size * 196 / best, "compile_s": t["compile_s"],
          "conv_impl": t["program"].conv_impl, "row_mode": t["row_mode"], "flops": flops,
          "gflops_per_s": flops / best / 1e9 if flops else None}


def peer_step_ms(flow_steps: int, batch_size: int = 16, device: str = "cpu") -> dict | None:
  try:
    from benchmarks import peer_torch
    return peer_torch.peer_train_step_ms(flow_steps, batch=batch_size, device=device)
  except ImportError as e:
    return {"skipped": f"peer not installed ({e}); pip install -e '.[peer]'"}


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--flow-steps", default="4,8")
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--peak-gflops", type=float, default=None)
  parser.add_argument("--no-peer", action="store_true")
  parser.add_argument("--peer-device", default=None, help="torch device (default: cuda on GPU)")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  peak = args.peak_gflops or (cpu_peak_gflops() if backend == "cpu" else None)
  rows = []
  for fs in (int(x) for x in args.flow_steps.split(",")):
    ours = engine_step_ms(fs, args.batch_size, args.steps, args.repeats)
    device = args.peer_device or ("cuda" if backend == "gpu" else "cpu")
    peer = None if args.no_peer else peer_step_ms(fs, args.batch_size, device)
    row = {"ours": ours, "peer": peer}
    if peer and "ms" in peer:
      row["speedup_vs_peer"] = peer["ms"] / ours["ms"]
      if peer.get("flops"):   # its own FLOPs: it does ≈ 27 % more multiply-adds than ours
        row["peer_gflops_per_s"] = peer["flops"] / (peer["ms"] / 1000) / 1e9
    if peak and ours["gflops_per_s"]:
      row["fraction_of_peak"] = ours["gflops_per_s"] / peak
    rows.append(row)
  out = {"backend": backend, "device": str(jax.devices()[0]), "peak_gflops": peak, "rows": rows}
  print(f"Train step on the engine's path ({backend}: {rows[0]['ours']['conv_impl']} convs, rows "
        f"{rows[0]['ours']['row_mode']}), 14×14×112, batch {args.batch_size}; peak "
        f"{peak if peak else 'unknown'} GFLOP/s")
  print(f"{'coupling':>8} {'ours ms':>8} {'GFLOP/step':>10} {'GFLOP/s':>8} {'of peak':>8} "
        f"{'peer ms':>8} {'peer/ours':>9}")
  for r in rows:
    o, p = r["ours"], r["peer"] or {}
    print(f"{o['flow_steps']:>8} {o['ms']:>8.1f} {(o['flops'] or 0) / 1e9:>10.2f} "
          f"{(o['gflops_per_s'] or 0):>8.1f} {100 * r.get('fraction_of_peak', 0):>7.1f}% "
          f"{p.get('ms', float('nan')):>8.1f} {r.get('speedup_vs_peer', float('nan')):>8.2f}×"
          + (f"  ({p['skipped']})" if "skipped" in p else ""))
  if args.out:
    tj_io.atomic_write_json(args.out, out)
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
