"""Where one train step of study A's path spends its time and FLOPs, part by part.

  python -m benchmarks.bench_step_parts                         # float32 and bfloat16, ~1 min
  python -m benchmarks.bench_step_parts --precision=float32 --out=parts.json

The step: ``benchmarks.bench_engine``'s configuration (study A's demo flow: 4 coupling
steps alternating 3×3 / 1×1 subnets on 14×14×112 features, image LayerNorm, batch 16,
the tail-aware loss λ = 0.7, r = 0.02, Adam), convolutions lowered as on this backend
(``train.conv_impl="auto"``), one row. "step" is the engine's compiled segment program
(ms per step, best of ``--repeats`` segments of ``--steps`` steps).

Two views. **The compiled step's own ops** (``op_profile``): a ``jax.profiler`` trace of
one segment of the engine's program, each traced op mapped through the compiled HLO's
``op_name`` metadata to its region (coupling i forward / backward, permutations, loss,
top-k, optimiser) and by its name to its kind (matmul, gather/scatter, pad/slice/
concatenate, copy/transpose, sort, elementwise/reduce), in milliseconds per step:
what the step really runs, fusions included. **Parts alone** (``step_parts``): each
part compiled alone as its own jitted function of the step's real shapes and
parameters, with XLA's ``compiled.cost_analysis()`` FLOPs and its time, the best of
``--repeats`` timed loops of ``--iters`` calls, so that each part has a rate (GFLOP/s).
The parts lose the step's fusions across their borders and add a dispatch each: their
sum is not the step, and the table shows the difference ("rest": sampling, loss
metrics, fusion/dispatch).

Parts (backward = the part's forward-and-backward (``jax.vjp``) minus its forward):
  LayerNorm            the parameter-free image LayerNorm (no gradient: input data)
  permutations         the K + 1 channel gathers, forward and backward
  coupling i fwd/bwd   coupling step i (its subnet's two convolutions, the clamp, the
                       affine coupling and log-det), forward / backward
  of which im2col      the 3×3 patch building (pad + 9 shifted slices, concatenated) of
                       the two convolutions of a 3×3 step, forward and backward; a
                       sub-part of "coupling i", not added to the sum
  NLL + loss           per-patch NLL and the tail-aware loss, forward and backward together
  of which top-k       the rank mask of the tail (a sort per image), forward only
  Adam                 the optimiser update and the gradient norm (a metric)

Candidate lowerings of the 3×3 subnet convolutions (``conv_lowerings``), forward and
backward of each of the two shapes a 3×3 step runs (56 → 56 and 56 → 112 channels at
batch 16, 14×14), each jitted alone and timed interleaved with the others:
  im2col (tailjax)     pad, 9 shifted slices concatenated, one matmul (``train.conv_as_matmul``)
  output shift         one matmul x · [C, 9·O] then the 9 shifted output slices summed
                       (no 9× copy of the input; 9× the output instead)
  per-tap sum          9 matmuls of the shifted input slices, summed (no concatenation)
  XLA conv             ``lax.conv_general_dilated`` (``train.conv_impl="xla"``)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import bench_engine
from tailjax import flows, io as tj_io, losses, profiling, train

HP = bench_engine.HP


def _cost_flops(jitted, *args) -> float:
  try:
    cost = jitted.lower(*args).compile().cost_analysis()
  except Exception:  # best effort on some backends
    return float("nan")
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0))   # none counted: data movement only


def _time_ms(jitted, *args, iters: int, repeats: int) -> float:
  jax.block_until_ready(jitted(*args))   # compile and warm
  best = float("inf")
  for _ in range(repeats):
    t = time.perf_counter()
    for _ in range(iters):
      out = jitted(*args)
    jax.block_until_ready(out)
    best = min(best, (time.perf_counter() - t) / iters)
  return 1000 * best


def _part(name: str, fn: Callable, *args, iters: int, repeats: int, sub: bool = False) -> dict:
  jitted = jax.jit(fn)
  return {"part": name, "ms": _time_ms(jitted, *args, iters=iters, repeats=repeats),
          "flops": _cost_flops(jitted, *args), "sub": sub}


def _minus(name: str, both: dict, fwd: dict) -> dict:
  return {"part": name, "ms": max(both["ms"] - fwd["ms"], 0.0),
          "flops": both["flops"] - fwd["flops"], "sub": both["sub"]}


def _im2col(x_BxHxWxC, k: int = 3):
  h, w = x_BxHxWxC.shape[1:3]
  p = (k - 1) // 2
  xp = jnp.pad(x_BxHxWxC, ((0, 0), (p, p), (p, p), (0, 0)))
  return jnp.concatenate([xp[:, i:i + h, j:j + w, :] for i in range(k) for j in range(k)], axis=-1)


def engine_step(cfg, feats, steps: int, repeats: int) -> dict:
  """ms per step of the engine's segment program, and XLA's flops of one step."""
  t = bench_engine.time_segment(cfg, feats, steps, repeats)
  return {"ms": 1000 * t["s"], "flops": t["flops"], "program": t["program"]}


def step_parts(precision: str, flow_steps: int = 4, batch_size: int = 16, steps: int = 10,
               repeats: int = 3, iters: int = 10) -> dict:
  cfg = bench_engine.config(flow_steps, batch_size, steps)
  cfg.train.precision = precision
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(64, 14, 14, 112)).astype(np.float32)
  whole = engine_step(cfg, feats, steps, repeats)
  program = whole.pop("program")
  model, conv_impl = program.model, program.conv_impl
  key = train.row_keys([0])[0]
  state = jax.jit(program.init)(HP, key)
  # Trained-like parameters: a fresh flow's zero last convolutions make it the identity.
  params = jax.tree.map(lambda p: p + 0.01 * jnp.asarray(rng.normal(size=p.shape), p.dtype),
                        state.params)
  x = jnp.asarray(feats[:batch_size])
  kw = dict(iters=iters, repeats=repeats)
  parts = []

  parts.append(_part("LayerNorm", lambda x: flows.normalize_features(x, model.layer_norm), x, **kw))
  xn = flows.normalize_features(x, model.layer_norm)

  bound = model.bind(params)
  couplings = bound.steps
  perms = [np.asarray(s.permutation) for s in couplings]

  def permute_all(x):   # the K + 1 gathers of FastFlow2d.forward, without the couplings
    y = flows.permute_channels(x, perms[0])
    for i in range(len(perms)):
      inv = np.argsort(perms[i])
      y = flows.permute_channels(y, inv[perms[i + 1]] if i + 1 < len(perms) else inv)
    return y

  g_x = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  fwd = _part("permutations fwd", permute_all, xn, **kw)
  both = _part("permutations", lambda x, g: jax.vjp(permute_all, x)[1](g), xn, g_x, **kw)
  parts += [fwd, _minus("permutations bwd", both, fwd)]

  h = flows.permute_channels(xn, perms[0])
  for i, step in enumerate(couplings):
    module = step.clone(parent=None)
    p_i = {"params": params["params"][f"step_{i}"]}

    def coupling(p, x, module=module):
      with train.lowering(conv_impl):
        return module.apply(p, x, method="coupling")

    def coupling_vjp(p, x, gy, gld, coupling=coupling):
      _, vjp = jax.vjp(coupling, p, x)
      return vjp((gy, gld))

    gld = jnp.asarray(rng.normal(size=h.shape[:-1]), jnp.float32)
    name = f"coupling {i} ({step.kernel_size}×{step.kernel_size})"
    fwd = _part(f"{name} fwd", coupling, p_i, h, **kw)
    both = _part(name, coupling_vjp, p_i, h, g_x, gld, **kw)
    parts += [fwd, _minus(f"{name} bwd", both, fwd)]
    if step.kernel_size > 1:   # the patch building of its two convolutions
      c1 = step.channels - step.channels // 2
      dtype = jnp.float32   # the patch building is float32 in both precisions (train.mixed_matmul)
      a_in = h[..., :c1].astype(dtype)
      a_hid = jnp.asarray(rng.normal(size=(*h.shape[:-1], max(1, round(c1 * step.hidden_ratio)))),
                          dtype)

      def both_im2col(a, b):
        return _im2col(a), _im2col(b)

      g_a = jnp.asarray(rng.normal(size=(*a_in.shape[:-1], 9 * a_in.shape[-1])), dtype)
      g_b = jnp.asarray(rng.normal(size=(*a_hid.shape[:-1], 9 * a_hid.shape[-1])), dtype)

      def both_im2col_vjp(a, b, g_a, g_b):
        return jax.vjp(both_im2col, a, b)[1]((g_a, g_b))

      f_i = _part(f"  of which im2col fwd (coupling {i})", both_im2col, a_in, a_hid, sub=True, **kw)
      b_i = _part("", both_im2col_vjp, a_in, a_hid, g_a, g_b, sub=True, **kw)
      # Its transpose needs no primal output, so XLA drops the forward from b_i: b_i is
      # the backward alone.
      parts += [f_i, {**b_i, "part": f"  of which im2col bwd (coupling {i})"}]
    h, _ = jax.jit(coupling)(p_i, h)
    inv = np.argsort(perms[i])
    h = flows.permute_channels(h, inv[perms[i + 1]] if i + 1 < len(perms) else inv)

  z, logdet = jax.jit(program.apply)(params, x)
  hp = {k: jnp.float32(v) for k, v in HP.items() if k != "learning_rate"}

  def loss(z, ld):
    b = z.shape[0]
    nll_BxN = losses.patch_nll(z, ld).reshape(b, -1)
    return losses.tail_aware_loss_nll(nll_BxN, ld.reshape(b, -1), hp["tail_weight"],
                                      hp["top_k_ratio"], 1.0, 0.0)

  # One part: the gradient needs the sort's mask but not the loss value, so "both − fwd"
  # would not be the backward here.
  parts.append(_part("NLL + loss fwd+bwd", lambda z, ld: jax.value_and_grad(
      loss, argnums=(0, 1))(z, ld), z, logdet, **kw))
  nll_BxN = losses.patch_nll(z, logdet).reshape(batch_size, -1)
  parts.append(_part("  of which top-k selection", lambda s: losses.top_k_indicator(
      s, hp["top_k_ratio"]), nll_BxN, sub=True, **kw))

  grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
  st = state.replace(params=params)
  parts.append(_part("Adam + grad norm", lambda s, g: (s.apply_gradients(grads=g),
                                                       optax.tree.norm(g)), st, grads, **kw))

  top = [p for p in parts if not p["sub"]]
  rest_ms = whole["ms"] - sum(p["ms"] for p in top)
  rest_flops = (whole["flops"] or float("nan")) - sum(p["flops"] for p in top)
  parts.append({"part": "rest (sampling, metrics, fusion/dispatch)", "ms": rest_ms,
                "flops": rest_flops, "sub": False})
  for p in parts:
    p["pct_of_step"] = 100 * p["ms"] / whole["ms"]
    p["gflop"] = p["flops"] / 1e9
    p["gflops_per_s"] = p["flops"] / p["ms"] / 1e6 if p["ms"] > 0 else float("nan")
  return {"precision": precision, "conv_impl": conv_impl, "flow_steps": flow_steps,
          "batch_size": batch_size, "step_ms": whole["ms"],
          "step_gflop": (whole["flops"] or 0) / 1e9,
          "step_gflops_per_s": (whole["flops"] or 0) / whole["ms"] / 1e6,
          "parts": [{k: v for k, v in p.items() if k != "flops"} for p in parts]}


def _shift_conv(x_BxHxWxC, k_3x3xCxO):
  b, h, w, c = x_BxHxWxC.shape
  o = k_3x3xCxO.shape[-1]
  y = (x_BxHxWxC.reshape(-1, c) @ k_3x3xCxO.transpose(2, 0, 1, 3).reshape(c, 9 * o))
  yp = jnp.pad(y.reshape(b, h, w, 9, o), ((0, 0), (1, 1), (1, 1), (0, 0), (0, 0)))
  return sum(yp[:, i:i + h, j:j + w, 3 * i + j, :] for i in range(3) for j in range(3))


def _tap_conv(x_BxHxWxC, k_3x3xCxO):
  h, w = x_BxHxWxC.shape[1:3]
  xp = jnp.pad(x_BxHxWxC, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return sum(xp[:, i:i + h, j:j + w, :] @ k_3x3xCxO[i, j] for i in range(3) for j in range(3))


def conv_lowerings(batch_size: int = 16, repeats: int = 5, iters: int = 10) -> list[dict]:
  """ms of forward + backward of the candidate 3×3 lowerings (module doc), per shape."""
  import flax.linen as nn
  rng = np.random.default_rng(0)
  rows = []
  for c_in, c_out in ((56, 56), (56, 112)):
    x = jnp.asarray(rng.normal(size=(batch_size, 14, 14, c_in)), jnp.float32)
    conv = nn.Conv(c_out, (3, 3), padding="SAME", use_bias=False)
    params = conv.init(jax.random.key(0), x)
    k = params["params"]["kernel"]

    def engine_conv(x, k, impl):
      with train.lowering(impl):
        return conv.apply({"params": {"kernel": k}}, x)

    candidates = {"im2col (tailjax)": lambda x, k: engine_conv(x, k, "matmul"),
                  "output shift": _shift_conv, "per-tap sum": _tap_conv,
                  "XLA conv": lambda x, k: engine_conv(x, k, "xla")}
    fns = {n: jax.jit(jax.value_and_grad(lambda x, k, f=f: jnp.sum(jnp.tanh(f(x, k))),
                                         argnums=(0, 1))) for n, f in candidates.items()}
    best = {n: float("inf") for n in fns}
    for f in fns.values():
      jax.block_until_ready(f(x, k))
    for _ in range(repeats):            # interleaved: a busy machine slows them alike
      for n, f in fns.items():
        t = time.perf_counter()
        for _ in range(iters):
          out = f(x, k)
        jax.block_until_ready(out)
        best[n] = min(best[n], 1000 * (time.perf_counter() - t) / iters)
    base = best["im2col (tailjax)"]
    rows += [{"shape": f"{c_in}→{c_out}", "lowering": n, "ms": v, "vs_im2col": base / v}
             for n, v in best.items()]
  return rows


def op_profile(precision: str, flow_steps: int = 4, batch_size: int = 16, steps: int = 10,
               feats_shape: tuple[int, int, int, int] = (64, 14, 14, 112)) -> dict:
  """The engine's compiled segment program for one row, its ops read from a
  ``jax.profiler`` trace of ``steps`` steps (``tailjax.profiling``: region of the step ×
  kind of op, ms per step), with the step's time untraced and traced (tracing slows it:
  read the shares)."""
  cfg = bench_engine.config(flow_steps, batch_size, steps)
  cfg.train.precision = precision
  feats = np.random.default_rng(0).normal(size=feats_shape).astype(np.float32)
  row = bench_engine.one_row(cfg, feats, steps)
  segment, state, kd, f = row["segment"], row["state"], row["kd"], row["f"]
  n = jnp.int32(steps)
  compiled = segment.lower(state, kd, f, n).compile()   # its HLO names the traced ops
  hlo, segment = compiled.as_text(), compiled
  state, m = segment(state, kd, f, n)   # warm
  jax.block_until_ready(m)
  t = time.perf_counter()
  state, m = segment(state, kd, f, n)
  jax.block_until_ready(m)
  step_ms = 1000 * (time.perf_counter() - t) / steps
  with tempfile.TemporaryDirectory() as folder:
    with profiling.trace(folder):
      t = time.perf_counter()
      state, m = segment(state, kd, f, n)
      jax.block_until_ready(m)
      traced_ms = 1000 * (time.perf_counter() - t) / steps
    summary = profiling.op_summary(profiling.trace_events(folder), hlo, steps)
  return {"precision": precision, "step_ms": step_ms, "traced_step_ms": traced_ms, **summary}


def table(res: dict) -> str:
  lines = [f"{res['precision']}: step {res['step_ms']:.1f} ms, {res['step_gflop']:.2f} GFLOP, "
           f"{res['step_gflops_per_s']:.1f} GFLOP/s ({res['conv_impl']} convs, "
           f"{res['flow_steps']} coupling steps, batch {res['batch_size']})",
           f"{'part':<40} {'ms':>7} {'% step':>7} {'GFLOP':>7} {'GFLOP/s':>8}"]
  for p in res["parts"]:
    lines.append(f"{p['part']:<40} {p['ms']:>7.2f} {p['pct_of_step']:>6.1f}% {p['gflop']:>7.3f} "
                 f"{p['gflops_per_s']:>8.1f}")
  if res["parts"][-1]["ms"] < 0:
    lines.append("(rest < 0: the parts compiled alone take longer than the fused step, whose "
                 "fusions and single dispatch they lose; compare parts with each other, not "
                 "with the step)")
  return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--precision", default="float32,bfloat16")
  parser.add_argument("--flow-steps", type=int, default=4)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--steps", type=int, default=10, help="steps per timed segment")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--iters", type=int, default=10, help="calls per timed loop of a part")
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  # Flat lists of flat rows: run_all's generic markdown renders each as one table.
  out = {"backend": jax.default_backend(), "device": str(jax.devices()[0]),
         "load_average_1min": os.getloadavg()[0], "steps": [], "parts": []}
  for precision in args.precision.split(","):
    res = step_parts(precision, args.flow_steps, args.batch_size, args.steps, args.repeats,
                     args.iters)
    print(table(res), flush=True)
    out["steps"].append({k: v for k, v in res.items() if k != "parts"})
    out["parts"] += [{"precision": precision, **{k: v for k, v in p.items() if k != "sub"}}
                     for p in res["parts"]]
    ops = op_profile(precision, args.flow_steps, args.batch_size, args.steps)
    print("\n".join(profiling.summary_lines(
        ops, f"{precision}: the compiled step's ops, ms per step (step {ops['step_ms']:.1f} ms, "
             f"{ops['traced_step_ms']:.1f} ms traced)")), flush=True)
    out.setdefault("ops", []).extend({"precision": precision, **r} for r in ops["rows"])
    out.setdefault("ops_by_kind_pct", []).append({"precision": precision, "step_ms": ops["step_ms"],
                                                  "traced_step_ms": ops["traced_step_ms"],
                                                  "ops_ms": ops["ops_ms"], "ops_overlap": ops["ops_overlap"],
                                                  **ops["by_kind_pct"]})
  if len(out["steps"]) > 1:
    base = out["steps"][0]["step_ms"]
    out["step_speedup"] = {r["precision"]: base / r["step_ms"] for r in out["steps"]}
    print("step speed-up vs " + out["steps"][0]["precision"] + ": "
          + ", ".join(f"{k} {v:.2f}×" for k, v in out["step_speedup"].items()))
  out["conv_lowerings"] = conv_lowerings(args.batch_size, args.repeats)
  print("3×3 convolution lowerings, forward + backward (ms; speed vs im2col):")
  for r in out["conv_lowerings"]:
    print(f"  {r['shape']:<8} {r['lowering']:<18} {r['ms']:>7.2f} {r['vs_im2col']:>6.2f}×")
  if args.out:
    tj_io.atomic_write_json(args.out, out)
  return out


if __name__ == "__main__":
  main(sys.argv[1:])
