"""Per-patch parameter-gradient norms: our methods side by side with the PyTorch peer's loop.

  python -m benchmarks.bench_gradients                   # 4 and 8 coupling steps, peer if installed, memory
  python -m benchmarks.bench_gradients --no-memory --steps=8
  python -m benchmarks.bench_gradients --out=bench_gradients.json

Setting: the study's flow on the study's grid — FastFlow2d, C = 112 channels,
3×3 / 1×1 coupling steps, hidden ratio 1.0, image LayerNorm, 14×14 = 196
patches — with random "trained-like" parameters (init + noise; the
zero-initialised last layers would make most gradients vanish), at each
``--steps`` count, from one run.

Timings (best of ``--repeats``, interleaved so load drift on a shared machine
hits all alike; each is called once first to compile), all giving the norms
‖∂NLL_i/∂θ‖ of the 196 patches of ONE image:
  ghost          receptive-field windows, hand-written windowed backward, ghost norms (the default on CPU)
  window         receptive-field windows, autodiff of each patch's crop, gradients materialised
  jacrev/28      one forward, VJP vmapped over 7 chunks of 28 one-hot cotangents
  vmap_grad/28   jax.vmap(jax.grad(λθ,i: NLL_i(θ))) over chunks of 28 indices
  loop           196 calls of one jitted single-patch grad
and, as cost units, one ordinary backward pass (∂ mean NLL/∂θ) of the same
image and of a batch of 196 images (the same number of cotangents).

The peer (``benchmarks/peer_torch.py``, when torch and FrEIA are installed):
anomalib's FastFlow from FrEIA AllInOneBlocks at the same shape, the study's
way — one forward, then ``torch.autograd.grad(NLL_i, θ, retain_graph=True)``
for each of the 196 patches — on the CPU with torch threads = all cores and
with 1 thread (on a shared machine more threads can be far slower); the
ratios use the faster of the two. Its flow is not ours (it has a global affine
and a permutation convolution per block, ≈ 27 % more multiply-adds), so
the norms are not compared, only the time.

Memory: the analysis for ``--mem-images`` images (norms only) per method and
patch chunk, each in a fresh subprocess, compiled ahead of time first: growth
of the peak RSS during the run (Linux: VmHWM reset through
/proc/self/clear_refs, else ``resource.getrusage``) and the working set XLA
reserves for one compiled call (``compiled.memory_analysis()``: temporaries +
arguments + outputs).
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

from benchmarks import peer_torch
from benchmarks.bench_engine import xla_flops
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


def ghost_flops(model, params, x) -> float | None:
  """FLOPs of the default "ghost" call for the 196 norms of the image(s) ``x`` (XLA's cost
  analysis of the compiled program: one chunk of all patches, no loop, so nothing is
  counted once for many iterations; includes the model's own forward for the check)."""
  n = H * W
  specs = gradients.flow_spec(model, params)
  ab = np.stack(np.divmod(np.arange(n), W), axis=-1).astype(np.int32)[None]
  w = np.ones((len(x), 1, n), np.float32)
  return xla_flops(gradients._windowed_chunk.lower(
      model, specs, "ghost", "auto", False, params, jnp.asarray(x), jnp.asarray(ab),
      jnp.asarray(w)))


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


METHODS = {"ghost": ("ghost", None), "window": ("window", None), "jacrev/28": ("jacrev", 28),
           "vmap_grad/28": ("vmap_grad", 28), "jacrev": ("jacrev", 196), "vmap_grad": ("vmap_grad", 196),
           "loop": ("loop", 1)}
DEFAULT_METHODS = ("ghost", "window", "jacrev/28", "vmap_grad/28", "loop")


def timings(num_steps: int = 4, repeats: int = 3, methods: Sequence[str] = DEFAULT_METHODS) -> dict:
  """Seconds per method for the 196 norms of one image, ratios to the loop and to the backward passes."""
  model, params, x = setup(num_steps, 1)
  n = H * W
  per_patch = lambda method, chunk: (lambda: gradients.per_patch_param_grads(
      model, params, x, method=method, patch_chunk=chunk).norm_BxN)
  grad_mean = jax.jit(jax.grad(lambda p, xb: jnp.mean(flows.flat_nll(model, p, xb))))
  x_batch = jnp.asarray(np.repeat(x, n, axis=0))
  methods = list(dict.fromkeys(list(methods) + ["loop"]))
  runs = {name: per_patch(*METHODS[name]) for name in methods}
  runs["backward 1 image"] = lambda: grad_mean(params, jnp.asarray(x))
  runs[f"backward {n} images"] = lambda: grad_mean(params, x_batch)
  ref = np.asarray(runs["loop"]())
  agree = {k: float(np.max(np.abs(np.asarray(runs[k]()) - ref) / ref)) for k in methods if k != "loop"}
  best = _best_seconds(runs, repeats)
  unit = best[f"backward {n} images"]
  flops = {"ghost": ghost_flops(model, params, x),
           f"backward {n} images": xla_flops(grad_mean.lower(params, x_batch))}
  return {"seconds": best, "flops": flops,
          "gflops_per_s": {k: f / best[k] / 1e9 for k, f in flops.items() if f and k in best},
          "over_backward_196": {k: v / unit for k, v in best.items()},
          "over_loop": {k: v / best["loop"] for k, v in best.items()},
          "max_rel_diff_vs_loop": agree, "default_method": gradients.default_method(),
          "n_params": int(sum(l.size for l in jax.tree.leaves(params))), "num_steps": num_steps}


def peer(num_steps: int, repeats: int = 3, threads: Sequence[int | None] = (None, 1),
         device: str = "cpu") -> dict | None:
  """The PyTorch peer's autograd loop over the 196 patches (best of ``repeats``) per torch thread
  count (on "cpu"; one run on another torch device); None when torch or FrEIA is missing."""
  if not peer_torch.peer_available():
    return None
  rows = {}
  for th in dict.fromkeys(peer_torch._threads(t) for t in (threads if device == "cpu" else (None,))):
    r = peer_torch.peer_per_patch_norms(num_steps, repeats=repeats, threads=th, device=device)
    rows[th] = {"best_s": min(r["seconds_all"]), "median_s": r["seconds"], "n_params": r["n_params"],
                "torch": r["torch"], "device": r["device"]}
  fastest = min(rows, key=lambda t: rows[t]["best_s"])
  flops = peer_torch.peer_per_patch_flops(num_steps)
  return {"threads": rows, "fastest_threads": fastest, "best_s": rows[fastest]["best_s"], "device": device,
          "flops": flops, "gflops_per_s": flops / rows[fastest]["best_s"] / 1e9}


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


def _child_memory(method: str, patch_chunk: int, n_images: int, num_steps: int) -> dict:
  """Runs in a fresh process: the norms-only analysis of ``n_images`` images."""
  model, params, x = setup(num_steps, n_images)
  n = H * W
  chunk = min(patch_chunk, n)
  if method == "ghost":
    specs = gradients.flow_spec(model, params)
    ab = np.stack(np.divmod(np.arange(n + (-n % chunk)) % n, W), -1).astype(np.int32).reshape(-1, chunk, 2)
    compiled = gradients._windowed_chunk.lower(model, specs, "ghost", "auto", False, params,
                                               jnp.asarray(x[:1]), jnp.asarray(ab),
                                               jnp.ones((1,) + ab.shape[:2], x.dtype)).compile()
    grad_bytes = 0   # ghost forms no per-patch gradients
  else:
    idx = jnp.arange(chunk, dtype=jnp.int32)
    w = jnp.ones((1, len(idx)), x.dtype)
    compiled = gradients._chunk_grads.lower(model, params, jnp.asarray(x[:1]), idx, w, method, False).compile()
    grad_bytes = 4 * chunk * int(sum(l.size for l in jax.tree.leaves(params)))
  ma = compiled.memory_analysis()
  xla = None if ma is None else int(ma.temp_size_in_bytes + ma.argument_size_in_bytes
                                    + ma.output_size_in_bytes)
  # The ahead-of-time compilation above fills jit's cache (no recompilation follows), so
  # the peak measured from here on is the analysis itself, not the compiler's.
  reset = _reset_peak()
  before = _rss_mb("VmRSS")
  t = time.perf_counter()
  gradients.per_patch_param_grads(model, params, x, method=method, patch_chunk=patch_chunk)
  seconds = time.perf_counter() - t
  peak = _rss_mb("VmHWM") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  return {"method": method, "patch_chunk": patch_chunk, "n_images": n_images, "rss_before_mb": before,
          "peak_rss_mb": peak, "peak_growth_mb": None if before is None or peak is None else peak - before,
          "peak_is_since_compile": reset, "xla_chunk_bytes": xla, "seconds": seconds,
          "grad_bytes_per_chunk": grad_bytes}


def memory(chunks: Sequence[int] = (7, 28, 98, 196), n_images: int = 32, num_steps: int = 4,
           methods: Sequence[str] = ("jacrev", "ghost")) -> list[dict]:
  rows = []
  for method in methods:
    for c in chunks:
      proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_gradients", "--child-memory",
                             f"--mem-method={method}", f"--patch-chunk={c}", f"--mem-images={n_images}",
                             f"--steps={num_steps}"], capture_output=True, text=True, check=True)
      rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
  return rows


def _print_timings(t: dict, pr: dict | None, device: str) -> None:
  print(f"\nPer-patch parameter-gradient norms, 196 patches of one 14×14×{C} image, "
        f"{t['num_steps']}-step flow ({t['n_params']} parameters), {device}; default method: {t['default_method']}")
  if pr is None:
    peer_note = "peer not installed (pip install torch==2.14.1 FrEIA)"
  else:
    ths = ", ".join(f"{th} thread{'s' if th > 1 else ''}: {1000 * r['best_s']:.0f} ms"
                    for th, r in pr["threads"].items()) if pr["device"] == "cpu" else pr["device"]
    peer_note = (f"peer (PyTorch {next(iter(pr['threads'].values()))['torch']}, FrEIA FastFlow, autograd loop, "
                 f"{'CPU; ' if pr['device'] == 'cpu' else ''}{ths}): {1000 * pr['best_s']:.0f} ms")
  print(peer_note)
  print(f"{'':>18} {'ms':>9} {'/ backward(196 img)':>20} {'/ loop':>8} {'× faster than peer':>19} "
        f"{'max rel diff':>13}")
  for k, s in t["seconds"].items():
    diff = t["max_rel_diff_vs_loop"].get(k)
    vs_peer = "" if pr is None else f"{pr['best_s'] / s:.1f}×"
    print(f"{k:>18} {1000 * s:>9.1f} {t['over_backward_196'][k]:>20.3f} {t['over_loop'][k]:>8.3f} "
          f"{vs_peer:>19} {'' if diff is None else f'{diff:.1e}':>13}")
  for line in flop_lines(t):
    print(line)


def flop_lines(t: dict) -> list[str]:
  """What bounds the ratio: FLOPs of ghost and of the peer's loop, and the rate each achieved."""
  f, rate, pr = t.get("flops") or {}, t.get("gflops_per_s") or {}, t.get("peer") or {}
  if not f.get("ghost"):
    return []
  out = [f"FLOPs: ghost {f['ghost'] / 1e9:.2f} GFLOP at {rate['ghost']:.0f} GFLOP/s"]
  if pr.get("flops"):
    ratio = pr["flops"] / f["ghost"]
    out[0] += (f"; peer loop {pr['flops'] / 1e9:.2f} GFLOP at {pr['gflops_per_s']:.0f} GFLOP/s; "
               f"the peer does {ratio:.1f}× ghost's FLOPs, so at equal GFLOP/s ghost is {ratio:.1f}× "
               "faster (the rest of the measured ratio is rate)")
  return out


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", default="4,8", help="comma list of coupling-step counts")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"of {list(METHODS)}")
  parser.add_argument("--no-peer", action="store_true", help="skip the PyTorch peer")
  parser.add_argument("--peer-repeats", type=int, default=2)
  parser.add_argument("--peer-threads", default="0,1", help="torch thread counts to try (0: all cores)")
  parser.add_argument("--peer-device", default="cpu", help="torch device of the peer: cpu or cuda")
  parser.add_argument("--mem-images", type=int, default=32)
  parser.add_argument("--mem-chunks", default="7,28,98,196")
  parser.add_argument("--mem-methods", default="jacrev,ghost")
  parser.add_argument("--no-memory", action="store_true")
  parser.add_argument("--child-memory", action="store_true", help=argparse.SUPPRESS)
  parser.add_argument("--mem-method", default="jacrev", help=argparse.SUPPRESS)
  parser.add_argument("--patch-chunk", type=int, default=28, help=argparse.SUPPRESS)
  parser.add_argument("--out", default=None, help="also write the results as JSON here")
  args = parser.parse_args(argv)
  steps = [int(s) for s in args.steps.split(",")]
  if args.child_memory:
    res = _child_memory(args.mem_method, args.patch_chunk, args.mem_images, steps[0])
    print(json.dumps(res))
    return res

  device = str(jax.devices()[0])
  results: dict = {"backend": jax.default_backend(), "device": device, "by_steps": {}}
  if not args.no_peer and peer_torch.peer_available():
    # the peer's per-patch NLL: its per-location log-dets must sum to FrEIA's per-image one
    results["peer_logdet_split_error"] = err = peer_torch.patch_logdet_error()
    if not err < 1e-4:
      raise RuntimeError(f"the peer's per-patch logdet does not sum to FrEIA's (relative error {err:.2g})")
  for k in steps:
    t = timings(k, args.repeats, args.methods.split(","))
    pr = None if args.no_peer else peer(k, args.peer_repeats,
                                        [int(x) or None for x in args.peer_threads.split(",")], args.peer_device)
    if pr is not None:
      t["peer"] = pr
      t["speedup_vs_peer"] = {m: pr["best_s"] / s for m, s in t["seconds"].items()}
    results["by_steps"][k] = t
    _print_timings(t, pr, device)
  if not peer_torch.peer_available() and not args.no_peer:
    results["peer"] = "peer not installed"
  results["timings"] = results["by_steps"][steps[0]]   # the first step count, in the earlier format
  if not args.no_memory:
    chunks = [int(c) for c in args.mem_chunks.split(",")]
    results["memory"] = mem = memory(chunks, args.mem_images, steps[0], args.mem_methods.split(","))
    print(f"\nNorms of {args.mem_images} images × 196 patches, {steps[0]}-step flow, per method and patch chunk, "
          "fresh process each:")
    print(f"{'method':>7} {'chunk':>6} {'RSS before MB':>14} {'peak growth MB':>15} {'XLA per call MB':>16} "
          f"{'grads per call MB':>18} {'s':>7}")
    for r in mem:
      xla = "n/a" if r["xla_chunk_bytes"] is None else f"{r['xla_chunk_bytes'] / 2**20:.1f}"
      growth = "n/a" if r["peak_growth_mb"] is None else f"{r['peak_growth_mb']:.1f}"
      print(f"{r['method']:>7} {r['patch_chunk']:>6} {r['rss_before_mb'] or float('nan'):>14.0f} {growth:>15} "
            f"{xla:>16} {r['grad_bytes_per_chunk'] / 2**20:>18.1f} {r['seconds']:>7.1f}")
  if args.out:
    tj_io.atomic_write_json(args.out, results)
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
