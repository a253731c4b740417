"""The main job on this device, timed by phase and checked against a CPU run of it.

  python -m benchmarks.bench_study --config=configs/fastflow_textures.py --reference=runs/demo
  python -m benchmarks.bench_study --config=configs/fastflow_study.py --reference=runs/study
  python -m benchmarks.bench_study --config=configs/fastflow_textures.py:smoke \
      --reference=/tmp/smoke --workdir=/tmp/smoke-bench            # a CPU check of this script

Runs ``tailjax train`` exactly as ``make demo`` / ``make study`` do, in a fresh workdir
(``runs/bench-<device>-<config>``), with every row of a category vmapped into one program
(``train.row_mode=vmap``; categories run one after another, their features differ). Then
writes ``benchmarks/results-study-<device>-<config>.md`` (and ``.json``):

* wall time per phase (features, training, evaluation, PaDiM and figures, analyses,
  report) from the run's manifest (``phase_seconds``), beside the reference run's;
* ms per training step (one step trains every row of a category) and the achieved
  FLOP/s: XLA's flop count of one row's train step (``bench_engine.step_flops``) ×
  rows × steps / training seconds, against the device's peak (``--peak-tflops``, or
  the table below for known devices, or the CPU estimate of ``bench_engine``);
* the evaluation records compared with the reference's: every number's largest
  difference, and whether the conclusions' verdicts are the same.

On a GPU, run it with ``JAX_DEFAULT_MATMUL_PRECISION=highest`` (``benchmarks/device.sh``
does) so matrix products are float32 as on the CPU, not TF32; the records then differ
by float rounding compounded over training, which the table states (tolerance
``--atol``, default 1e-3 on metrics in [0, 1]).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

# Dense float32 (FMA, no tensor cores) peaks by the vendors' datasheets, TFLOP/s.
PEAK_FP32_TFLOPS = {"NVIDIA H100 80GB HBM3": 66.9, "NVIDIA H200": 66.9, "NVIDIA A100-SXM4-80GB": 19.5,
                    "NVIDIA A100-SXM4-40GB": 19.5}
PHASES = ("features", "training", "evaluation", "reference_and_figures", "analyses", "report")


def _slug(text: str) -> str:
  return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_name() -> str:
  d = jax.devices()[0]
  return getattr(d, "device_kind", d.platform)


def peak_flops(override_tflops: float | None) -> float | None:
  if override_tflops:
    return override_tflops * 1e12
  if jax.default_backend() == "cpu":
    from benchmarks import bench_engine
    g = bench_engine.cpu_peak_gflops()
    return g * 1e9 if g else None
  return PEAK_FP32_TFLOPS.get(device_name(), 0) * 1e12 or None


def flat_numbers(tree: Any) -> dict[str, float]:
  """Every number of a JSON tree."""
  from tailjax import io as tj_io
  return {k: float(v) for k, v in tj_io.flat_leaves(
      tree, lambda x: isinstance(x, (int, float)) and not isinstance(x, bool)).items()}


def flat_labels(tree: Any) -> dict[str, Any]:
  """Every string and boolean of a JSON tree (the verdicts, selected steps' labels)."""
  from tailjax import io as tj_io
  return tj_io.flat_leaves(tree, lambda x: isinstance(x, (str, bool)))


def compare_runs(run: Path, reference: Path) -> dict:
  """Largest absolute difference over every number of every evaluation unit both runs
  hold, the number of units compared, and the conclusions' labels that differ."""
  units = sorted(p.relative_to(run) for p in (run / "units").rglob("*.json"))
  worst, where, compared, missing = 0.0, None, 0, []
  for rel in units:
    ref = reference / rel
    if not ref.is_file():
      missing.append(str(rel))
      continue
    a = flat_numbers(json.loads((run / rel).read_text()))
    b = flat_numbers(json.loads(ref.read_text()))
    if a.keys() != b.keys():
      missing.append(f"{rel} (fields differ)")
      continue
    compared += 1
    for k in a:
      d = abs(a[k] - b[k])
      if not np.isfinite(d) or d > worst:
        worst, where = (float("inf") if not np.isfinite(d) else d), f"{rel}:{k}"
  labels = {}
  if (run / "conclusions.json").is_file() and (reference / "conclusions.json").is_file():
    la = flat_labels(json.loads((run / "conclusions.json").read_text()))
    lb = flat_labels(json.loads((reference / "conclusions.json").read_text()))
    labels = {k: (la.get(k), lb.get(k)) for k in sorted(set(la) | set(lb)) if la.get(k) != lb.get(k)}
  return {"units_compared": compared, "units_missing": missing, "max_abs_diff": worst,
          "max_abs_diff_at": where, "labels_differ": labels}


def training_flops(workdir: Path) -> tuple[float | None, int, int]:
  """(XLA flops of all rows' training, steps, categories) of a finished study workdir."""
  import ml_collections
  from benchmarks import bench_engine
  cfg = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  cats = sorted(p.parent.name for p in workdir.glob("*/rows.json"))
  total, steps = 0.0, int(cfg.train.num_steps)
  for c in cats:
    rec = json.loads((workdir / c / "rows.json").read_text())
    shape = rec["feats_shape"]
    if shape and isinstance(shape[0], list):      # multi-scale: not counted
      return None, steps, len(cats)
    per_step = bench_engine.step_flops(cfg, jax.numpy.zeros(shape, jax.numpy.float32))
    if per_step is None:
      return None, steps, len(cats)
    total += per_step * len(rec["rows"]) * steps
  return total, steps, len(cats)


def phase_seconds(workdir: Path) -> dict[str, float] | None:
  try:
    inv = json.loads((workdir / "manifest.json").read_text())["invocations"][-1]
  except (OSError, KeyError, IndexError, json.JSONDecodeError):
    return None
  return inv.get("phase_seconds")


def markdown(res: dict) -> list[str]:
  from tailjax import reporting
  ref = res["reference_phases"] or {}
  ours = res["phases"] or {}
  body = [[p, f"{ours.get(p, float('nan')):.1f}", f"{ref[p]:.1f}" if p in ref else "—",
           f"{ref[p] / ours[p]:.1f}×" if p in ref and ours.get(p) else "—"] for p in PHASES]
  total = sum(ours.values())
  body.append(["**total**", f"{total:.1f}", f"{sum(ref.values()):.1f}" if ref else "—",
               f"{sum(ref.values()) / total:.1f}×" if ref and total else "—"])
  c = res["compare"]
  lines = [f"# The main job on {res['device']} ({res['backend']})", "",
           f"`tailjax train --config={res['config']} --config.train.row_mode=vmap` in "
           f"`{res['workdir']}`, JAX {res['jax']}, {res['device_count']} device(s), matmul "
           f"precision {res['matmul_precision']}; reference `{res['reference']}`.", "",
           f"Wall seconds per phase (the reference's from its manifest; compilation included); "
           f"the command took {res['wall_s']:.1f} s with start-up:", ""]
  lines += reporting.table(["phase", "this device", "reference", "speed-up"], body)
  fl = res["train_flops"]
  rate = fl / ours["training"] if fl and ours.get("training") else None
  lines += ["", f"- Training: {res['categories']} categories × {res['steps']} steps, "
                f"{res['ms_per_step']:.2f} ms per step (all rows of a category)"
                + (f", {fl / 1e12:.2f} TFLOP by XLA's count, {rate / 1e12:.3f} TFLOP/s" if rate else "")
                + (f" = {100 * rate / res['peak_flops']:.1f} % of the {res['peak_flops'] / 1e12:.1f} "
                   "TFLOP/s float32 peak" if rate and res["peak_flops"] else "") + ".",
            f"- Evaluation records: {c['units_compared']} units compared"
            + (f" ({len(c['units_missing'])} missing in the reference)" if c["units_missing"] else "")
            + f"; largest difference {c['max_abs_diff']:.3g} at `{c['max_abs_diff_at']}` "
              f"(tolerance {res['atol']:g}: {'within' if c['max_abs_diff'] <= res['atol'] else 'NOT within'})"
            + f"; conclusions' verdicts {'the same' if not c['labels_differ'] else 'DIFFER: ' + json.dumps(c['labels_differ'])[:400]}."]
  return lines


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/fastflow_textures.py")
  parser.add_argument("--reference", required=True, help="the CPU run's workdir")
  parser.add_argument("--workdir", default=None)
  parser.add_argument("--peak-tflops", type=float, default=None)
  parser.add_argument("--atol", type=float, default=1e-3)
  parser.add_argument("--out", default=None)
  parser.add_argument("--overwrite", action="store_true",
                      help="delete --workdir first if it exists (the timing needs a fresh run)")
  parser.add_argument("overrides", nargs="*", help="extra --config.a.b=v flags")
  args = parser.parse_args(argv)
  from tailjax import cli
  from tailjax import io as tj_io
  tag = _slug(f"{jax.default_backend()}-{device_name()}-{Path(args.config).stem}-"
              f"{args.config.partition(':')[2]}")
  workdir = Path(args.workdir or f"runs/bench-{tag}")
  if workdir.exists():
    if not args.overwrite:
      raise SystemExit(f"{workdir} exists: a timed run starts from nothing (--overwrite deletes it)")
    import shutil
    shutil.rmtree(workdir)
  t0 = time.perf_counter()
  rc = cli.main(["train", f"--config={args.config}", f"--workdir={workdir}",
                 "--config.train.row_mode=vmap", *args.overrides])
  wall = time.perf_counter() - t0
  if rc != 0:
    raise SystemExit(f"tailjax train exited {rc}")
  flops, steps, cats = training_flops(workdir)
  phases = phase_seconds(workdir) or {}
  res = {"device": device_name(), "backend": jax.default_backend(), "jax": jax.__version__,
         "device_count": jax.device_count(), "config": args.config, "workdir": str(workdir),
         "reference": args.reference, "wall_s": wall, "phases": phases,
         "reference_phases": phase_seconds(Path(args.reference)),
         "matmul_precision": str(jax.config.jax_default_matmul_precision or "default"),
         "train_flops": flops, "steps": steps, "categories": cats,
         "ms_per_step": 1e3 * phases.get("training", float("nan")) / max(steps * cats, 1),
         "peak_flops": peak_flops(args.peak_tflops), "atol": args.atol,
         "compare": compare_runs(workdir, Path(args.reference))}
  lines = markdown(res)
  out = Path(args.out or f"benchmarks/results-study-{tag}.md")
  tj_io.atomic_write_text(out, "\n".join(lines) + "\n")
  tj_io.atomic_write_json(out.with_suffix(".json"), res)
  print("\n".join(lines))
  print(f"wrote {out}")
  return res


if __name__ == "__main__":
  main(sys.argv[1:])
