"""Per-patch parameter gradients: implementations side by side, and memory vs chunk size.

  python -m benchmarks.bench_gradients                   # timings + memory (32 images)
  python -m benchmarks.bench_gradients --no-memory       # timings only
  python -m benchmarks.bench_gradients --steps=8 --out=bench_gradients.json

Setting: the study's flow on the study's grid — FastFlow2d, C = 112 channels,
4 coupling steps (3×3 / 1×1), image LayerNorm, 14×14 = 196 patches — with
random "trained-like" parameters (init + noise; the zero-initialised last
layers would make most gradients vanish).

Timings (best of ``--repeats``, interleaved so load drift on a shared machine
hits all alike; each is called once first to compile), all giving the norms
‖∂NLL_i/∂θ‖ of the 196 patches of ONE image:
  jacrev, jacrev/28   one forward, VJP vmapped over 196 (or 7 chunks of 28) cotangents
  vmap_grad, /28      jax.vmap(jax.grad(λθ,i: NLL_i(θ))) over 196 (or chunks of 28) indices
  loop                196 calls of one jitted single-patch grad
and, as cost units, one ordinary backward pass (∂ mean NLL/∂θ) of the same
image and of a batch of 196 images (the same number of cotangents).

Memory: the analysis for ``--mem-images`` images (norms only) at several patch
chunks, each in a fresh subprocess, compiled ahead of time first: growth of the
peak RSS during the run (Linux: VmHWM reset through /proc/self/clear_refs,
else ``resource.getrusage``) and the working set XLA reserves for one compiled
chunk call (``compiled.memory_analysis()``: temporaries + arguments + outputs).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tailjax import flows
from tailjax import io as tj_io
from tailjax.analysis import gradients

H = W = 14
C = 112


def setup(num_steps: int = 4, n_images: int = 1, seed: int = 0):
  model = flows.FastFlow2d(channels=C, num_steps=num_steps, layer_norm="image")
  key = jax.random.key(seed)
  x = jax.random.normal(jax.random.fold_in(key, 0), (n_images, H, W, C))
  params = jax.jit(model.init)(jax.random.fold_in(key, 1), x[:1])
  leaves, tree = jax.tree.flatten(params)
  ks = jax.random.split(jax.random.fold_in(key, 2), len(leaves))
  params = jax.tree.unflatten(tree, [l + 0.02 * jax.random.normal(k, l.shape) for l, k in zip(leaves, ks)])
  return model, params, np.asarray(x)


def _best_seconds(runs: dict, repeats: int) -> dict:
  for run in runs.values():
    jax.block_until_ready(run())
  best = {name: float("inf") for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      t = time.perf_counter()
      jax.block_until_ready(run())
      best[name] = min(best[name], time.perf_counter() - t)
  return best


def timings(num_steps: int = 4, repeats: int = 3) -> dict:
  model, params, x = setup(num_steps, 1)
  n = H * W
  per_patch = lambda method, chunk: (lambda: gradients.per_patch_param_grads(
      model, params, x, method=method, patch_chunk=chunk).norm_BxN)
  grad_mean = jax.jit(jax.grad(lambda p, xb: jnp.mean(flows.flat_nll(model, p, xb))))
  x_batch = jnp.asarray(np.repeat(x, n, axis=0))
  runs = {
      "jacrev": per_patch("jacrev", n), "jacrev/28": per_patch("jacrev", 28),
      "vmap_grad": per_patch("vmap_grad", n), "vmap_grad/28": per_patch("vmap_grad", 28),
      "loop": per_patch("loop", 1),
      "backward 1 image": lambda: grad_mean(params, jnp.asarray(x)),
      f"backward {n} images": lambda: grad_mean(params, x_batch),
  }
  ref = np.asarray(runs["loop"]())
  agree = {k: float(np.max(np.abs(np.asarray(runs[k]()) - ref)) / np.max(ref))
           for k in ("jacrev", "jacrev/28", "vmap_grad", "vmap_grad/28")}
  best = _best_seconds(runs, repeats)
  unit = best[f"backward {n} images"]
  return {"seconds": best, "over_backward_196": {k: v / unit for k, v in best.items()},
          "over_loop": {k: v / best["loop"] for k, v in best.items()},
          "max_rel_diff_vs_loop": agree,
          "n_params": int(sum(l.size for l in jax.tree.leaves(params))), "num_steps": num_steps}


def _rss_mb(field: str) -> float | None:
  """VmRSS / VmHWM (peak) of this process from /proc, in MB; None where unavailable."""
  try:
    for line in open("/proc/self/status"):
      if line.startswith(field + ":"):
        return int(line.split()[1]) / 1024
  except OSError:
    pass
  return None


def _reset_peak() -> bool:
  """Resets VmHWM to the current RSS (Linux ≥ 4.0), so compilation does not mask the run."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _child_memory(patch_chunk: int, n_images: int, num_steps: int) -> dict:
  """Runs in a fresh process: the norms-only analysis of ``n_images`` images."""
  model, params, x = setup(num_steps, n_images)
  n = H * W
  idx = jnp.arange(min(patch_chunk, n), dtype=jnp.int32)
  w = jnp.ones((1, len(idx)), x.dtype)
  compiled = gradients._chunk_grads.lower(model, params, jnp.asarray(x[:1]), idx, w, "jacrev",
                                          False).compile()
  ma = compiled.memory_analysis()
  xla = None if ma is None else int(ma.temp_size_in_bytes + ma.argument_size_in_bytes
                                    + ma.output_size_in_bytes)
  # The ahead-of-time compilation above fills jit's cache (no recompilation follows), so
  # the peak measured from here on is the analysis itself, not the compiler's.
  reset = _reset_peak()
  before = _rss_mb("VmRSS")
  t = time.perf_counter()
  gradients.per_patch_param_grads(model, params, x, method="jacrev", patch_chunk=patch_chunk)
  seconds = time.perf_counter() - t
  peak = _rss_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {"patch_chunk": patch_chunk, "n_images": n_images, "rss_before_mb": before,
          "peak_rss_mb": peak, "peak_growth_mb": None if before is None or peak is None else peak - before,
          "peak_is_since_compile": reset, "xla_chunk_bytes": xla, "seconds": seconds,
          "grad_bytes_per_chunk": 4 * len(idx) * int(sum(l.size for l in jax.tree.leaves(params)))}


def memory(chunks: Sequence[int] = (7, 28, 98, 196), n_images: int = 32, num_steps: int = 4) -> list[dict]:
  rows = []
  for c in chunks:
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_gradients", "--child-memory",
                           f"--patch-chunk={c}", f"--mem-images={n_images}", f"--steps={num_steps}"],
                          capture_output=True, text=True, check=True)
    rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  return rows


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=4, help="coupling steps of the flow")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--mem-images", type=int, default=32)
  parser.add_argument("--mem-chunks", default="7,28,98,196")
  parser.add_argument("--no-memory", action="store_true")
  parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--patch-chunk", type=int, default=28, help=argparse.SUPPRESS)
  parser.add_argument("--out", default=None, help="also write the results as JSON here")
  args = parser.parse_args(argv)
  if args.child_memory:
    res = _child_memory(args.patch_chunk, args.mem_images, args.steps)
    print(json.dumps(res))
    return res

  t = timings(args.steps, args.repeats)
  results = {"backend": jax.default_backend(), "device": str(jax.devices()[0]), "timings": t}
  print(f"Per-patch parameter-gradient norms, 196 patches of one 14×14×{C} image, "
        f"{args.steps}-step flow ({t['n_params']} parameters), {results['device']}")
  print(f"{'':>18} {'ms':>9} {'/ backward(196 img)':>20} {'/ loop':>8} {'max rel diff':>13}")
  for k, s in t["seconds"].items():
    diff = t["max_rel_diff_vs_loop"].get(k)
    print(f"{k:>18} {1000 * s:>9.1f} {t['over_backward_196'][k]:>20.2f} {t['over_loop'][k]:>8.2f} "
          f"{'' if diff is None else f'{diff:.1e}':>13}")
  if not args.no_memory:
    chunks = [int(c) for c in args.mem_chunks.split(",")]
    results["memory"] = mem = memory(chunks, args.mem_images, args.steps)
    print(f"\nNorms of {args.mem_images} images × 196 patches (jacrev), per patch chunk, fresh process each:")
    print(f"{'chunk':>6} {'RSS before MB':>14} {'peak growth MB':>15} {'XLA per call MB':>16} "
          f"{'grads per call MB':>18} {'s':>7}")
    for r in mem:
      xla = "n/a" if r["xla_chunk_bytes"] is None else f"{r['xla_chunk_bytes'] / 2**20:.1f}"
      growth = "n/a" if r["peak_growth_mb"] is None else f"{r['peak_growth_mb']:.1f}"
      print(f"{r['patch_chunk']:>6} {r['rss_before_mb'] or float('nan'):>14.0f} {growth:>15} {xla:>16} "
            f"{r['grad_bytes_per_chunk'] / 2**20:>18.1f} {r['seconds']:>7.1f}")
  if args.out:
    tj_io.atomic_write_json(args.out, results)
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
