"""Runs every benchmark once, at modest sizes, and writes ``benchmarks/results.md`` (atomically).

  python -m benchmarks.run_all                          # ~6 min on a 2-core CPU (peer included)
  python -m benchmarks.run_all --only=sweep,train_step --out=/tmp/results.md

Each benchmark module's ``main(argv)`` runs in this process with the arguments
in ``BENCHMARKS`` (chosen to keep the whole run near 10 minutes on a small CPU;
run a module alone with its defaults or bigger sizes for more precise figures).
``bench_gradients`` is included when the module exists. A benchmark that fails
is reported as failed in the results (with the error), and the others still run.
The markdown states the machine, the sizes, every figure, and the project's speed
targets next to what was measured.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import os
import platform
import sys
import time
import traceback
from typing import Sequence

import jax
import numpy as np

from benchmarks import bench_gradients
from tailjax import io as tj_io

# name → (module, argv for its main). Sizes stated in each section of results.md.
BENCHMARKS: dict[str, tuple[str, list[str]]] = {
    "features": ("benchmarks.bench_features", ["--batch-sizes=1,8", "--images=16", "--repeats=2"]),
    "gradients": ("benchmarks.bench_gradients", ["--repeats=2", "--mem-chunks=28,196",
                                                 "--mem-images=8"]),
    "train_step": ("benchmarks.bench_train_step", ["--batch-sizes=8,32", "--steps=2",
                                                   "--repeats=2"]),
    "sweep": ("benchmarks.bench_sweep", ["--rows=8", "--steps=8", "--batch-size=8"]),
    "engine": ("benchmarks.bench_engine", ["--steps=20", "--repeats=3"]),
    "step_parts": ("benchmarks.bench_step_parts", ["--steps=10", "--repeats=3"]),
    "grid": ("benchmarks.bench_grid", ["--steps=200"]),
    "precision": ("benchmarks.bench_precision", ["--workdir=runs/demo"]),
}
# Benchmarks that read a finished run: skipped (saying so) when it is not there.
NEEDS = {"precision": "runs/demo/manifest.json"}
GRID_TARGET = 1.3
ENGINE_TARGET, ENGINE_GOAL = 1.0, 1.3
SWEEP_TARGET = 3.0


def _module_exists(name: str) -> bool:
  try:
    return importlib.util.find_spec(name) is not None
  except ModuleNotFoundError:
    return False


def run(names: Sequence[str]) -> dict:
  out = {}
  for name in names:
    module, argv = BENCHMARKS[name]
    if not _module_exists(module):
      out[name] = {"skipped": f"{module} not found"}
      continue
    if name in NEEDS and not os.path.exists(NEEDS[name]):
      out[name] = {"skipped": f"needs {NEEDS[name]} (run `make demo` first)"}
      continue
    print(f"\n=== {name}: python -m {module} {' '.join(argv)}", flush=True)
    t = time.perf_counter()
    try:
      res = importlib.import_module(module).main(argv)
      out[name] = {"result": res, "argv": argv, "seconds": time.perf_counter() - t}
    except Exception as e:  # one failing benchmark must not hide the others
      out[name] = {"error": f"{type(e).__name__}: {e}", "argv": argv,
                   "traceback": traceback.format_exc()[-2000:], "seconds": time.perf_counter() - t}
      print(out[name]["traceback"], file=sys.stderr)
  return out


# ----------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------


def _num(x) -> str:
  if x is None:
    return "–"
  if isinstance(x, (bool, np.bool_)):
    return str(bool(x))
  if isinstance(x, (int, np.integer)):
    return str(int(x))
  if isinstance(x, (float, np.floating)):
    x = float(x)
    if not np.isfinite(x):
      return str(x)
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:,.0f}"
  return str(x)


def _jsonable(x):
  """numpy scalars/arrays in the raw results → plain JSON values."""
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def _table(header: Sequence[str], rows: Sequence[Sequence]) -> list[str]:
  return (["| " + " | ".join(str(h) for h in header) + " |", "|" + "---|" * len(header)]
          + ["| " + " | ".join(_num(c) for c in r) + " |" for r in rows])


def _generic(res) -> list[str]:
  """Tables for an unknown result: lists of flat dicts and dicts of same-keyed dicts."""
  lines = []
  if not isinstance(res, dict):
    return [f"`{res!r}`"]
  scalars = {k: v for k, v in res.items() if not isinstance(v, (dict, list))}
  if scalars:
    lines += [", ".join(f"{k}: {_num(v)}" for k, v in scalars.items()), ""]
  for k, v in res.items():
    if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
      cols = list(dict.fromkeys(c for r in v for c in r))
      lines += [f"**{k}**", ""] + _table(cols, [[r.get(c) for c in cols] for r in v]) + [""]
    elif isinstance(v, dict):
      inner = {a: b for a, b in v.items() if isinstance(b, dict)}
      flat = {a: b for a, b in v.items() if not isinstance(b, (dict, list))}
      if inner:
        row_keys = list(dict.fromkeys(r for d in inner.values() for r in d))
        lines += [f"**{k}**", ""] + _table(
            ["", *inner], [[r, *(inner[c].get(r) for c in inner)] for r in row_keys]) + [""]
      if flat:
        lines += [f"**{k}**, other fields: " + ", ".join(f"{a}: {_num(b)}" for a, b in flat.items()), ""]
  return lines


def _sweep_md(res: dict) -> tuple[list[str], list[list]]:
  lines = [f"{res['rows']} rows (λ = 0 … 1, r = 0.02, one seed), batch {res['batch_size']}, "
           "4-step flow, Adam, the same number of steps for every variant of a setting. "
           "Baseline = 8 sequential runs, each a host loop of the jitted `train_step` with "
           "lax.conv (a host loop, without checkpoint I/O). 'run s' excludes compilation "
           "(listed apart); 'incl. compile' adds it, 8 compilations for the baseline "
           "(`train_flow_on_features` compiles its step in every call), one for the others. "
           "max |Δ loss| = largest difference of a row's final loss from the "
           "baseline's (float rounding; with λ > 0 a rounding-level change can swap a patch "
           "in or out of the top-k set).", ""]
  targets = []
  for setting, entry in res["settings"].items():
    r = entry["variants"]
    shape = "×".join(map(str, entry["shape"]))
    lines += [f"**{setting}** ({shape} maps, {entry['steps']} steps per row)", ""] + _table(
        ["variant", "run s", "compile s", "speed-up vs baseline", "incl. compile",
         "max abs Δ loss"],
        [[k, v["seconds"], v["compile_s"], f"{v['speedup']:.2f}×",
          f"{v['speedup_with_compile']:.2f}×", f"{v['max_abs_loss_diff']:.1e}"]
         for k, v in r.items()]) + [""]
    one_program = {k: v for k, v in r.items() if k.startswith(("vmap", "map"))}
    best = max(one_program, key=lambda k: one_program[k]["speedup"])
    vm = r["vmap, matmul conv"]
    seq = r.get("sequential scan, matmul conv")
    own = f"; vmap vs the same program run row by row {seq['seconds'] / vm['seconds']:.2f}×" if seq else ""
    targets.append([
        f"sweep of {res['rows']} λ as one program vs {res['rows']} sequential runs: {setting}",
        f"≥ {SWEEP_TARGET:g}× (CPU)",
        f"vmap {r['vmap, lax.conv']['speedup']:.2f}× (lax.conv), {vm['speedup']:.2f}× (matmul); "
        f"best one-program '{best}' {one_program[best]['speedup']:.2f}× "
        f"({one_program[best]['speedup_with_compile']:.2f}× incl. compile){own}",
        "yes" if one_program[best]["speedup"] >= SWEEP_TARGET else "**no**"])
  if "data_in_program" in res:
    d = res["data_in_program"]
    lines += [f"Data in the program ({d['feats_mb']:.1f} MB of features, vmapped PatchFlow "
              "sweep, lower + compile):", ""] + _table(
        ["data passed as", "seconds", "HLO text MB"],
        [[k, d[k]["seconds"], d[k]["hlo_mb"]] for k in ("argument", "closed-over constant")]) + [""]
  return lines, targets


def _train_step_md(res: dict) -> list[str]:
  return [f"One train step on 14×14×112 maps, {res['flow_steps']}-step flow, λ = 0.7, r = 0.02, "
          "Adam: called step by step from Python ('step', as `train.fit`) or inside one "
          "`lax.scan` ('scan', as the engine's programs); convolutions as XLA convolutions or as "
          "matmuls. Patches/s (ms per step); best of 2 blocks of 2 steps.", ""] + _table(
      ["flow", "batch", "step, lax.conv", "step, matmul", "scan, lax.conv", "scan, matmul"],
      [[r["flow"], r["batch_size"], *(
          f"{r[f'{k}_patches_per_s']:,.0f} ({r[f'{k}_ms']:.0f} ms)"
          for k in ("step_xla", "step_matmul", "scan_xla", "scan_matmul"))]
       for r in res["throughput"]]) + [""]


def _features_md(res: dict) -> list[str]:
  return [f"EfficientNet-Lite0, 224×224 uint8 → stride-16 map (and → logits), {res['n_images']} "
          "images per timed run, best of 2.", ""] + _table(
      ["batch", "stride-16 images/s", "full network images/s", "ratio"],
      [[r["batch_size"], r["stride16_images_per_s"], r["logits_images_per_s"],
        r["stride16_over_logits"]] for r in res["throughput"]]) + [""]


def _gradients_targets(res: dict) -> list[list]:
  """The issue's target for per-patch parameter-gradient norms of 196 patches: ≥ 5× the
  PyTorch peer's autograd loop, at every coupling-step count measured."""
  out = []
  for steps, t in (res.get("by_steps") or {}).items():
    secs = t.get("seconds", {})
    if not secs:
      continue
    secs = {k: v for k, v in secs.items() if not k.startswith("backward")}   # cost units, not methods
    best = min(secs, key=secs.get)
    vs = t.get("speedup_vs_peer")
    if vs:
      x = vs[best]
      f_ours, f_peer = (t.get("flops") or {}).get(best), t["peer"].get("flops")
      flop_note = f"; FLOP ratio {f_peer / f_ours:.1f}×" if f_ours and f_peer else ""
      out.append([f"per-patch gradient norms vs the PyTorch autograd loop, {steps} coupling steps",
                  "≥ 5×", f"best {best}: {x:.1f}× ({1000 * secs[best]:.0f} ms vs "
                  f"{1000 * t['peer']['best_s']:.0f} ms{flop_note})", "yes" if x >= 5 else "**no**"])
    else:
      out.append([f"per-patch gradient norms, {steps} coupling steps", "≥ 5× the peer",
                  f"best {best}: {1000 * secs[best]:.0f} ms (peer not installed)", "–"])
  return out


def _gradients_md(res: dict) -> list[str]:
  """Per method and coupling-step count: time for the 196 norms of one image, in units of an
  ordinary backward over 196 images, and the peer's loop over ours; then the memory table."""
  by = res.get("by_steps") or {}
  steps = list(by)
  methods = list(dict.fromkeys(m for t in by.values() for m in t.get("seconds", {})))
  lines = ["The 196 per-patch norms ‖∂NLL_i/∂θ‖ of one 14×14×112 image (FastFlow, 3×3/1×1, "
           "hidden ratio 1.0, image LayerNorm), best of the repeats; 'backward …' rows are "
           "ordinary backward passes, the cost units. Peer: FrEIA/anomalib FastFlow, one forward "
           "then `autograd.grad(NLL_i, retain_graph=True)` per patch, the faster of all threads "
           "and 1 thread.", ""]
  header = ["method"] + [f"{s} steps: ms" for s in steps] + [f"{s} steps: × backward(196)" for s in steps] \
      + [f"{s} steps: peer / ours" for s in steps]
  rows = []
  for m in methods:
    row = [m]
    row += [_num(1000 * by[s]["seconds"][m]) if m in by[s].get("seconds", {}) else "–" for s in steps]
    row += [_num(by[s].get("over_backward_196", {}).get(m)) for s in steps]
    row += [f"{by[s]['speedup_vs_peer'][m]:.2f}×" if m in (by[s].get("speedup_vs_peer") or {}) else "–"
            for s in steps]
    rows.append(row)
  peer = ["PyTorch peer loop"] + [_num(1000 * by[s]["peer"]["best_s"]) if (by[s].get("peer") or {}).get("best_s")
                                   else "–" for s in steps] + ["–"] * (2 * len(steps))
  lines += _table(header, rows + [peer]) + [""]
  flops = [f"{s} coupling steps. {line}" for s in steps for line in bench_gradients.flop_lines(by[s])]
  lines += flops + ([""] if flops else [])
  if res.get("memory"):                                 # the generic list-of-dicts table
    lines += ["Memory of the analysis (norms only), each in a fresh process:", ""]
    lines += _generic({"memory": res["memory"]})
  return lines


def _engine_md(res: dict) -> tuple[list[str], list[list]]:
  """The train step on study A's path vs the PyTorch peer and the hardware's peak."""
  peak = res.get("peak_gflops")
  lines = [f"The engine's compiled segment program (what study A, the sweeps and the toy run "
           f"train with; {res['rows'][0]['ours']['conv_impl']} convolutions, rows by "
           f"{res['rows'][0]['ours']['row_mode']}), 14×14×112, batch 16, λ = 0.7, r = 0.02, Adam; "
           f"FLOPs from XLA's cost analysis of one step; peak "
           f"{_num(peak) if peak else 'unknown'} GFLOP/s (cores × 2 FMA × SIMD lanes × 2 × clock). "
           "The peer: anomalib's FastFlow from FrEIA's AllInOneBlock at the same shape, same "
           "process.", ""]
  rows, targets = [], []
  for r in res["rows"]:
    o, p = r["ours"], r.get("peer") or {}
    rows.append([o["flow_steps"], f"{o['ms']:.1f}", _num((o["flops"] or 0) / 1e9),
                 _num(o["gflops_per_s"]), f"{100 * r['fraction_of_peak']:.1f} %"
                 if "fraction_of_peak" in r else "–",
                 f"{p['ms']:.1f}" if "ms" in p else p.get("skipped", "–"),
                 _num(p["flops"] / 1e9) if p.get("flops") else "–",
                 _num(r.get("peer_gflops_per_s")),
                 f"{r['speedup_vs_peer']:.2f}×" if "speedup_vs_peer" in r else "–"])
    if "speedup_vs_peer" in r:
      x = r["speedup_vs_peer"]
      targets.append([f"train step on study A's path vs the PyTorch peer, {o['flow_steps']} coupling "
                      "steps", f"≥ {ENGINE_TARGET:g}× (goal {ENGINE_GOAL:g}×)",
                      f"{x:.2f}× ({o['ms']:.1f} vs {p['ms']:.1f} ms; "
                      + (f"{100 * r['fraction_of_peak']:.0f} % of peak" if "fraction_of_peak" in r
                         else "peak unknown")
                      + (f"; FLOP ratio {p['flops'] / o['flops']:.2f}×" if p.get("flops")
                         and o.get("flops") else "") + ")",
                      "yes" if x >= ENGINE_TARGET else "**no**"])
  lines += _table(["coupling steps", "ours ms", "GFLOP/step", "ours GFLOP/s", "of peak", "peer ms",
                   "peer GFLOP/step", "peer GFLOP/s", "peer / ours"], rows) + [""]
  lines += ["GFLOP/step: ours by XLA's cost analysis (everything), the peer's by torch's "
            "`FlopCounterMode` (matmuls and convolutions, nearly all of it). peer / ours in time "
            "= (peer FLOPs / our FLOPs) × (our GFLOP/s / peer GFLOP/s): the first factor is the "
            "work the peer's block does beyond ours (its permutation convolution and global "
            "affine), the second how fast each framework runs the convolutions.", ""]
  return lines, targets


def _grid_md(res: dict) -> tuple[list[str], list[list]]:
  """The demo's grid trained by tailjax and the peer, one process and several."""
  n = res["ours_n"]["processes"]
  lines = [f"Study A's demo rows for one category ({res['rows']} rows: mean-only and tail-aware × "
           f"3 seeds) × {res['steps']} steps on 96 random 14×14×112 maps, batch 16, Adam with "
           f"clipping, {res['precision']}, {res['cores']} cores. Wall seconds from starting the "
           "processes to the last row done (ours: interpreter start-up, compilation and a "
           "checkpoint every 100 steps included; 'training s' is the training call alone). The "
           "peer: anomalib's FastFlow block in torch, a plain loop, rows one after another in "
           "each process.", ""]
  rows = []
  for key, label in (("ours_1", "ours, 1 process"), ("ours_n", f"ours, {n} local processes "
                                                                "(train.processes=auto)"),
                     ("ours_n_own", f"ours, {n} processes × 1-thread pool (the numbers of a "
                                    "1-core run, not the default's)"),
                     ("peer_1", "peer, 1 process, all threads"),
                     ("peer_n", f"peer, {n} processes × 1 thread")):
    if key in res:
      r = res[key]
      rows.append([label, f"{r['wall_s']:.1f}", f"{r['train_s']:.1f}",
                   f"{r['row_steps_per_s']:.2f}"])
  lines += _table(["", "wall s", "training s", "row-steps/s"], rows) + [""]
  targets = [[f"grid of {res['rows']} rows × {res['steps']} steps: local processes vs one process",
              "reported", f"{res['processes_speedup']:.2f}× ({n} processes)", "–"]]
  if "ours_n_own" in res:
    lines += [f"{n} processes with 1-thread pools / 1 process: "
              f"{res['ours_n_own']['row_steps_per_s'] / res['ours_1']['row_steps_per_s']:.2f}× "
              "(not offered: other numbers).", ""]
  if "speedup_vs_peer" in res:
    x = res["speedup_vs_peer"]
    lines += [f"ours (best, the default's numbers) / peer (best): **{x:.2f}×**, torch {res['peer_1']['torch']}.", ""]
    targets.append([f"grid throughput vs the PyTorch peer's best (torch {res['peer_1']['torch']})",
                    f"≥ {GRID_TARGET:g}×", f"{x:.2f}×", "yes" if x >= GRID_TARGET else "**no**"])
  return lines, targets


def _precision_md(res: dict) -> tuple[list[str], list[list]]:
  """bfloat16 vs float32 scoring of a finished float32 run's trained flows."""
  lines = [f"The trained float32 flows of `{res['workdir']}` score each category's test features "
           "with float32 and with bfloat16 subnet convolutions (same parameters; log-dets and NLL "
           "kept in float32). Over every row and test patch: the absolute change of the NLL and "
           "of the log-det in nats, the NLL's change relative to the float32 NLL's "
           "interquartile range and to the patch's own NLL, and the smallest Spearman correlation of the two per-patch NLLs over the rows.",
           ""]
  cats = res["categories"]
  lines += _table(["category", "rows", "NLL change, median", "NLL change, max", "/ IQR, median",
                   "/ IQR, max", "/ own NLL, max", "log-det change, median",
                   "log-det change, max", "min Spearman"],
                  [[n, r["rows"], f"{r['nll_abs_median']:.4f}", f"{r['nll_abs_max']:.3f}",
                    f"{r['nll_rel_iqr_median']:.4f}", f"{r['nll_rel_iqr_max']:.3f}",
                    f"{r['nll_rel_own_max']:.4f}", f"{r['logdet_abs_median']:.4f}",
                    f"{r['logdet_abs_max']:.3f}", f"{r['spearman_min']:.5f}"]
                   for n, r in cats.items()]) + [""]
  worst = max(r["nll_rel_own_max"] for r in cats.values())
  targets = [["bfloat16 accuracy cost on trained flows", "measured (no default change)",
              f"largest NLL change {100 * worst:.2f} % of the patch's NLL; min Spearman "
              f"{min(r['spearman_min'] for r in cats.values()):.5f}", "–"]]
  return lines, targets


def markdown(results: dict, total_s: float) -> str:
  now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
  lines = ["# Benchmarks", "",
           f"Generated by `python -m benchmarks.run_all` on {now} in {total_s / 60:.1f} min: "
           f"JAX {jax.__version__}, backend {jax.default_backend()}, {jax.device_count()} "
           f"device(s) ({jax.devices()[0]}), {os.cpu_count()} CPU cores, "
           f"{platform.python_implementation()} {platform.python_version()}, "
           f"{platform.machine()}. The machine may be shared: every table comes from one run "
           "with its variants side by side, so read the ratios, not the absolute times.", ""]
  targets: list[list] = []
  sections: list[str] = []
  titles = {"features": "Feature extraction", "gradients": "Per-patch gradients",
            "train_step": "Flow train-step throughput", "sweep": "Sweep: one program vs sequential runs",
            "engine": "Train step on study A's path vs the peer and the peak",
            "step_parts": "Where the train step's time goes (float32 and bfloat16)",
            "grid": "The demo's grid: tailjax vs the peer, one process and several",
            "precision": "bfloat16 on trained flows: the accuracy cost"}
  # Sections whose formatter also returns its rows of the targets table.
  with_targets = {"sweep": _sweep_md, "engine": _engine_md, "grid": _grid_md,
                  "precision": _precision_md}
  for name, entry in results.items():
    module, argv = BENCHMARKS[name]
    sections += [f"## {titles.get(name, name)}", "",
                 f"`python -m {module} {' '.join(argv)}`"
                 + (f" ({entry['seconds']:.0f} s)" if "seconds" in entry else ""), ""]
    if "skipped" in entry:
      sections += [f"Skipped: {entry['skipped']}.", ""]
      continue
    if "error" in entry:
      sections += [f"**Failed**: `{entry['error']}`", ""]
      continue
    res = entry["result"]
    try:
      if name in with_targets:
        body, t = with_targets[name](res)
        targets += t
      elif name == "train_step":
        body = _train_step_md(res)
        targets.append(["flow train-step throughput", "reported (no numeric target)",
                        "; ".join(f"{r['flow']} b{r['batch_size']}: "
                                  f"{r['step_xla_patches_per_s']:,.0f} patches/s (step, lax.conv), "
                                  f"{r['scan_matmul_patches_per_s']:,.0f} (scan, matmul)"
                                  for r in res["throughput"]), "–"])
      elif name == "features":
        body = _features_md(res)
        best = max(res["throughput"], key=lambda r: r["stride16_images_per_s"])
        targets.append(["feature extraction throughput", "reported (no numeric target)",
                        f"{best['stride16_images_per_s']:.1f} images/s (batch {best['batch_size']})",
                        "–"])
      elif name == "step_parts":
        body = ["**parts**: each part of the step compiled alone (its time and XLA's FLOPs); "
                "they lose the step's fusions, so their sum is not the step ('rest'). **ops**: "
                "the compiled step's own ops from a `jax.profiler` trace, ms per step by region "
                "(from the HLO call path) and kind (the ops run one after another: `ops_overlap` "
                "≈ 1); **ops_by_kind_pct**: each kind's share of the ops' time (tracing slows "
                "the step: `traced_step_ms`).", ""] + _generic(res)
      elif name == "gradients":
        body = _gradients_md(res)
        targets += _gradients_targets(res)
      else:
        body = _generic(res)
    except (KeyError, TypeError, ValueError) as e:   # a module changed its output format
      body = [f"(could not tabulate: {type(e).__name__}: {e})", ""] + _generic(res)
    sections += body
  lines += ["## Targets", ""] + _table(["benchmark", "target", "measured", "met"], targets) + [""]
  return "\n".join(lines + sections) + "\n"


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma list of benchmarks")
  parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results.md"))
  parser.add_argument("--from-json", default=None,
                      help="re-write the markdown from the raw results a run saved beside it (.json)")
  args = parser.parse_args(argv)
  names = [n.strip() for n in args.only.split(",") if n.strip()]
  unknown = [n for n in names if n not in BENCHMARKS]
  if unknown:
    raise SystemExit(f"--only: unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
  t = time.perf_counter()
  if args.from_json:                                   # re-format a saved run, no timing
    saved = json.loads(open(args.from_json).read())
    results, total_s = saved["results"], saved["total_s"]
  else:
    results = run(names)
    total_s = time.perf_counter() - t
    raw = os.path.splitext(args.out)[0] + ".json"
    tj_io.atomic_write_text(raw, json.dumps({"results": results, "total_s": total_s},
                                            default=_jsonable, indent=1))
  text = markdown(results, total_s)
  tj_io.atomic_write_text(args.out, text)
  print(f"\nwrote {args.out}")
  return results


if __name__ == "__main__":
  main(sys.argv[1:])
