"""A sweep of 8 tail weights λ as one program vs 8 sequential runs, same steps, side by side.

  python -m benchmarks.bench_sweep                       # FastFlow (3×3/1×1) and PatchFlow (1×1)
  python -m benchmarks.bench_sweep --steps=10 --batch-size=16 --out=bench_sweep.json

Settings: the study's feature maps (14×14×112, N = 64 random training maps)
with the 4-step FastFlow (3×3 / 1×1, image LayerNorm) and the per-patch flow
(1×1), and, for contrast, the per-patch flow on tiny 4×4×16 maps (25× the
steps), where a step costs less than dispatching it. Adam, batch
``--batch-size`` (default 8), ``--steps`` steps (default 4) per run, rows
λ = 0, 1/7, …, 1 with r = 0.02 and one seed. Every variant trains the same 8
rows for the same number of steps:

  sequential host loop           8 runs one after another, each a Python loop of the
                                 jitted ``train_step`` (lax.conv), a host loop
                                 runs them minus checkpoint I/O: the baseline
  sequential scan, lax.conv      8 calls of the jitted single-run ``train.make_train``
                                 program (its step loop a lax.scan), lax.conv
  sequential scan, matmul conv   the same with ``conv_impl="matmul"``
  vmap, lax.conv                 ONE program, ``jit(vmap(train))`` over the 8 rows
  vmap, matmul conv              the same with matmul convolutions
  map, matmul conv               ONE program, rows one after another inside it
                                 (``lax.map``): the engine's default on CPU

Each program is compiled ahead of time (compile seconds reported separately),
then run once; on a noisy machine read the ratios, not the absolute times.
"speed-up" = baseline run time / variant run time (the target: ≥ 3× for
the vmapped sweep on CPU); "incl. compile" adds compilation, counted 8 times for
the baseline because a host loop that builds its step per run compiles it
anew in every call, once for the others.

Also: lower + compile seconds and HLO size when the data is baked into the
program (a jitted closure over the feature array) vs passed as an argument, for
the vmapped PatchFlow sweep on the 120-image texture category size.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from tailjax import io as tj_io, train

FLOWS = {
    "FastFlow 3x3/1x1": {"kernel_mode": "alternate", "layer_norm": "image"},
    "PatchFlow 1x1": {"kernel_mode": "1x1", "layer_norm": "patch"},
}
# (flow, map shape [H, W, C], steps multiplier): the study's maps, and tiny maps on which
# a step costs less than dispatching it (the regime where a sweep program pays on CPU).
SETTINGS = {
    "FastFlow 3x3/1x1": ("FastFlow 3x3/1x1", (14, 14, 112), 1),
    "PatchFlow 1x1": ("PatchFlow 1x1", (14, 14, 112), 1),
    "PatchFlow 1x1 on tiny 4x4x16 maps": ("PatchFlow 1x1", (4, 4, 16), 25),
}
VARIANTS = ("sequential host loop", "sequential scan, lax.conv", "sequential scan, matmul conv",
            "vmap, lax.conv", "vmap, matmul conv", "map, matmul conv")


def bench_config(flow: dict, steps: int, batch_size: int, flow_steps: int = 4):
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.flow = {"num_steps": flow_steps, "hidden_ratio": 1.0, "clamp": 2.0, **flow}
  c.loss = {"tail_weight": 0.7, "top_k_ratio": 0.02}
  c.optim = {"name": "adam", "learning_rate": 1e-3, "grad_clip_norm": 10.0}
  c.train = {"num_steps": steps, "batch_size": batch_size}
  return c


def _timed(fn, *args):
  t = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return out, time.perf_counter() - t


def _aot(fn, *args):
  """(compiled, seconds to lower + compile)."""
  t = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - t


def sweep_variants(cfg, feats, rows: int, only: Sequence[str] = VARIANTS) -> dict:
  """Seconds (run, compile) of every variant for ``rows`` λ values; final losses for a check."""
  lam = np.linspace(0.0, 1.0, rows).astype(np.float32)
  h_R = {"tail_weight": jnp.asarray(lam), "top_k_ratio": jnp.full((rows,), 0.02),
         "learning_rate": jnp.full((rows,), 1e-3)}
  keys_R = train.row_keys([0] * rows)
  feats = jnp.asarray(feats)
  steps = int(cfg.train.num_steps)
  out = {}

  def rows_program(conv_impl, row_impl):
    program = train.make_flow_program(cfg, feats.shape, conv_impl=conv_impl)
    local = train.over_rows(lambda h, k: program.train(h, k, feats), row_impl)
    return lambda h, k: local(h, k)

  for name in only:
    if name == "sequential host loop":
      program = train.make_flow_program(cfg, feats.shape, conv_impl="xla")
      step = train.make_train_step(train.make_flow_loss(program.model))
      h0 = {k: v[0] for k, v in h_R.items()}
      st0 = jax.jit(program.init)(h0, keys_R[0])
      batch0 = train.sample_batch(feats, program.batch_size, keys_R[0], 0)
      t = time.perf_counter()
      step_c = jax.jit(step, donate_argnums=0).lower(st0, batch0, keys_R[0]).compile()
      init_c = jax.jit(program.init).lower(h0, keys_R[0]).compile()
      batch_c = jax.jit(train.sample_batch, static_argnums=1).lower(
          feats, program.batch_size, keys_R[0], jnp.int32(0)).compile()
      compile_s = time.perf_counter() - t
      t = time.perf_counter()
      losses = []
      for i in range(rows):
        h = {k: v[i] for k, v in h_R.items()}
        key = keys_R[i]
        st = init_c(h, key)
        step_key = jax.random.fold_in(key, 2)
        for s in range(steps):
          st, m = step_c(st, batch_c(feats, key, jnp.int32(s)), step_key)
        losses.append(m["loss"])
      jax.block_until_ready(losses)
      out[name] = {"seconds": time.perf_counter() - t, "compile_s": compile_s,
                   "final_loss": np.asarray(losses).tolist()}
    elif name.startswith("sequential scan"):
      program = train.make_flow_program(
          cfg, feats.shape, conv_impl="xla" if name.endswith("lax.conv") else "matmul")
      h0 = {k: v[0] for k, v in h_R.items()}
      one, compile_s = _aot(program.train, h0, keys_R[0], feats)
      t = time.perf_counter()
      res = [one({k: v[i] for k, v in h_R.items()}, keys_R[i], feats)[1]["loss"][-1]
             for i in range(rows)]
      jax.block_until_ready(res)
      out[name] = {"seconds": time.perf_counter() - t, "compile_s": compile_s,
                   "final_loss": np.asarray(res).tolist()}
    else:
      row_impl, conv = name.split(", ")
      fn, compile_s = _aot(rows_program("xla" if conv == "lax.conv" else "matmul", row_impl),
                           h_R, keys_R)
      (_, metrics), secs = _timed(fn, h_R, keys_R)
      out[name] = {"seconds": secs, "compile_s": compile_s,
                   "final_loss": np.asarray(metrics["loss"][:, -1]).tolist()}
  # End to end: a host loop built per run compiles its step anew
  # in every call, so 8 sequential runs pay 8 compilations; a sweep program pays one.
  for name, v in out.items():
    v["seconds_with_compile"] = v["seconds"] + v["compile_s"] * (
        rows if name == "sequential host loop" else 1)
  base = out.get("sequential host loop")
  for v in out.values():
    v["speedup"] = base["seconds"] / v["seconds"] if base else None
    v["speedup_with_compile"] = (base["seconds_with_compile"] / v["seconds_with_compile"]
                                 if base else None)
  return out


def data_as_constant_vs_argument(n_images: int = 120, rows: int = 8, steps: int = 2) -> dict:
  """Lower + compile seconds and HLO text size: data closed over vs passed as an argument."""
  cfg = bench_config(FLOWS["PatchFlow 1x1"], steps, 8)
  feats = jnp.asarray(np.random.default_rng(1).normal(size=(n_images, 14, 14, 112)), jnp.float32)
  train_fn = train.make_train(cfg, feats.shape, conv_impl="matmul")
  h_R = {"tail_weight": jnp.linspace(0.0, 1.0, rows), "top_k_ratio": jnp.full((rows,), 0.02),
         "learning_rate": jnp.full((rows,), 1e-3)}
  keys_R = train.row_keys(range(rows))
  res = {}
  for name, fn, args in [
      ("argument", jax.vmap(train_fn, (0, 0, None)), (h_R, keys_R, feats)),
      ("closed-over constant", jax.vmap(lambda h, k: train_fn(h, k, feats)), (h_R, keys_R))]:
    t = time.perf_counter()
    lowered = jax.jit(fn).lower(*args)
    hlo = lowered.as_text()
    lowered.compile()
    res[name] = {"seconds": time.perf_counter() - t, "hlo_mb": len(hlo) / 1e6}
  res["feats_mb"] = feats.size * 4 / 1e6
  return res


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rows", type=int, default=8)
  parser.add_argument("--steps", type=int, default=4)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--n-feats", type=int, default=64)
  parser.add_argument("--settings", default=",".join(SETTINGS))
  parser.add_argument("--no-constant", action="store_true", help="skip the data-as-constant test")
  parser.add_argument("--out", default=None, help="also write the results as JSON here")
  args = parser.parse_args(argv)

  results = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
             "rows": args.rows, "batch_size": args.batch_size, "n_feats": args.n_feats,
             "settings": {}}
  print(f"Sweep of {args.rows} λ values vs {args.rows} sequential runs, batch {args.batch_size}, "
        f"4-step flow, {results['device']}")
  for setting in args.settings.split(","):
    flow_name, shape, mult = SETTINGS[setting]
    steps = args.steps * mult
    feats = np.random.default_rng(0).normal(size=(args.n_feats, *shape)).astype(np.float32)
    cfg = bench_config(FLOWS[flow_name], steps, args.batch_size)
    r = sweep_variants(cfg, feats, args.rows)
    results["settings"][setting] = {"shape": list(shape), "steps": steps, "variants": r}
    base_loss = np.asarray(r["sequential host loop"]["final_loss"])
    print(f"\n{setting}: {'×'.join(map(str, shape))} maps, {steps} steps per row")
    print(f"{'variant':>28} {'run s':>8} {'compile s':>10} {'speed-up':>9} "
          f"{'incl. compile':>14} {'max |Δ loss|':>13}")
    for name, v in r.items():
      v["max_abs_loss_diff"] = float(np.max(np.abs(np.asarray(v["final_loss"]) - base_loss)))
      print(f"{name:>28} {v['seconds']:>8.2f} {v['compile_s']:>10.2f} {v['speedup']:>8.2f}× "
            f"{v['speedup_with_compile']:>13.2f}× {v['max_abs_loss_diff']:>13.1e}")
  if not args.no_constant:
    results["data_in_program"] = d = data_as_constant_vs_argument()
    print(f"\nData in the program ({d['feats_mb']:.1f} MB of features, vmapped PatchFlow sweep): "
          f"argument {d['argument']['seconds']:.2f} s to lower+compile, HLO "
          f"{d['argument']['hlo_mb']:.2f} MB; closed-over constant "
          f"{d['closed-over constant']['seconds']:.2f} s, HLO {d['closed-over constant']['hlo_mb']:.2f} MB")
  if args.out:
    tj_io.atomic_write_json(args.out, results)
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
