"""What bfloat16 convolutions cost in accuracy on trained flows (``train.precision``).

  python -m benchmarks.bench_precision --workdir=runs/demo        # a finished float32 study A run
  python -m benchmarks.bench_precision --workdir=runs/demo --compare=runs/demo_bf16

For every category and row of a finished float32 run, the trained parameters score the
category's test features twice: with the flow as trained (float32) and with the same
parameters and bfloat16 subnet convolutions (``precision="bfloat16"``: float32
parameters, log-determinants and NLL; ``tailjax.flows``). Reported per category, over
its rows and every test patch: the median and largest |Δ NLL| and |Δ log-det| (nats),
|Δ NLL| relative to the spread of the float32 NLL (its interquartile range across
patches) and to the patch's own |NLL| (at least 1), and the Spearman rank correlation of the two per-patch NLLs (what the scores,
the top-k selection and AP depend on). The speed side is in ``bench_step_parts``.

``--compare=<workdir>``: the same study trained in bfloat16 (``train.precision=bfloat16``,
everything else equal), its answers beside the float32 run's: per category and metric
(pixel AP, image AUROC) each run's Δ = tail-aware − mean-only with its interval and
verdict sign, the difference of the two Δ and the float32 run's seed spread (the
standard deviation of its per-seed Δ). Rule, fixed before the runs: bfloat16 leaves a
category's answer unchanged when the verdict signs agree and the two Δ differ by less
than that seed spread; else the table says which category moved.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Sequence

import jax
import numpy as np
from scipy import stats


def category_errors(tc) -> dict:
  """|Δ NLL|, |Δ log-det| and rank agreement of bfloat16 vs float32 scoring, one category."""
  feats = np.asarray(tc.data.flow_feats("test"))
  models = {p: dataclasses.replace(tc.model, precision=p) for p in ("float32", "bfloat16")}
  if tc.model.precision != "float32":
    raise ValueError(f"train.precision is {tc.model.precision!r}: bench_precision needs a run "
                     "trained in float32")
  programs = {p: dataclasses.replace(tc.program, model=m) for p, m in models.items()}
  fns = {p: jax.jit(lambda params, x, prog=prog: _nll_logdet(prog, params, x))
         for p, prog in programs.items()}
  d_nll, d_ld, rel, own, rho = [], [], [], [], []
  for i in range(len(tc.rows)):
    params = jax.tree.map(lambda a: a[i], tc.params_R)
    out = {p: [np.asarray(a) for a in f(params, feats)] for p, f in fns.items()}
    (n32, l32), (n16, l16) = out["float32"], out["bfloat16"]
    d_nll.append(np.abs(n16 - n32).ravel())
    d_ld.append(np.abs(l16 - l32).ravel())
    q75, q25 = np.percentile(n32, [75, 25])
    rel.append(np.abs(n16 - n32).ravel() / (q75 - q25))
    own.append((np.abs(n16 - n32) / np.maximum(np.abs(n32), 1.0)).ravel())
    rho.append(stats.spearmanr(n32.ravel(), n16.ravel()).statistic)
  d_nll, d_ld, rel, own = map(np.concatenate, (d_nll, d_ld, rel, own))
  return {"rows": len(tc.rows), "patches": int(feats.shape[0] * feats.shape[1] * feats.shape[2]),
          "nll_abs_median": float(np.median(d_nll)), "nll_abs_max": float(d_nll.max()),
          "nll_rel_iqr_median": float(np.median(rel)), "nll_rel_iqr_max": float(rel.max()),
          "nll_rel_own_max": float(own.max()),
          "logdet_abs_median": float(np.median(d_ld)), "logdet_abs_max": float(d_ld.max()),
          "spearman_min": float(min(rho))}


def _nll_logdet(program, params, x):
  from tailjax import losses
  z, logdet = program.apply(params, x)     # the program's own convolution lowering
  return losses.patch_nll(z, logdet), logdet


def _run_facts(workdir: str) -> tuple[str, dict]:
  import json
  from pathlib import Path
  cfg = json.loads((Path(workdir) / "config.json").read_text())
  return (cfg.get("train", {}).get("precision", "float32"),
          json.loads((Path(workdir) / "conclusions.json").read_text()))


def compare_answers(f32_dir: str, bf16_dir: str) -> dict:
  """Per category and metric: each run's Δ, interval and verdict sign, their difference,
  the float32 seed spread and whether the answer is unchanged (module doc)."""
  (p32, c32), (p16, c16) = _run_facts(f32_dir), _run_facts(bf16_dir)
  if (p32, p16) != ("float32", "bfloat16"):
    raise ValueError(f"--workdir={f32_dir} must be a float32 run and --compare={bf16_dir} a "
                     f"bfloat16 one (train.precision: {p32}, {p16})")
  rows = []
  for metric in ("pixel_ap", "image_auroc"):
    a, b = c32["verdicts"][metric]["categories"], c16["verdicts"][metric]["categories"]
    for cat in [c for c in a if c in b]:
      x, y = a[cat], b[cat]
      spread = float(np.std(x["values"], ddof=1))
      diff = y["mean"] - x["mean"]
      rows.append({"metric": metric, "category": cat,
                   "float32": [x["mean"], x["lo"], x["hi"]], "bfloat16": [y["mean"], y["lo"], y["hi"]],
                   "sign_float32": x["sign"], "sign_bfloat16": y["sign"], "difference": diff,
                   "seed_spread": spread,
                   "unchanged": bool(x["sign"] == y["sign"] and abs(diff) < spread)})
    for name, c in (("float32", c32), ("bfloat16", c16)):
      d = c["pooled_diff"][metric]
      d = d.get("with_test", d)
      rows_pooled = [d["mean"], d["lo"], d["hi"]]
      rows.append({"metric": metric, "category": f"pooled ({name})", name: rows_pooled})
  return {"float32": f32_dir, "bfloat16": bf16_dir, "rows": rows,
          "all_unchanged": all(r["unchanged"] for r in rows if "unchanged" in r)}


def main(argv: Sequence[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", default="runs/demo")
  parser.add_argument("--category", default="")
  parser.add_argument("--compare", default="", help="the same study trained in bfloat16")
  args = parser.parse_args(argv)
  from tailjax.studies import study_a_record
  trained = study_a_record.load_trained(args.workdir, args.category or None)
  res = {"workdir": args.workdir, "categories": {n: category_errors(tc) for n, tc in trained.items()}}
  print(f"bfloat16 vs float32 scoring of {args.workdir}'s trained float32 flows (test patches)")
  print(f"{'category':<10} {'|ΔNLL| med':>10} {'max':>8} {'/IQR med':>9} {'max':>7} "
        f"{'/|NLL| max':>10} {'|Δlogdet| med':>13} {'max':>8} {'min ρ':>7}")
  for n, r in res["categories"].items():
    print(f"{n:<10} {r['nll_abs_median']:>10.4f} {r['nll_abs_max']:>8.3f} "
          f"{r['nll_rel_iqr_median']:>9.4f} {r['nll_rel_iqr_max']:>7.3f} {r['nll_rel_own_max']:>10.4f} "
          f"{r['logdet_abs_median']:>13.4f} {r['logdet_abs_max']:>8.3f} {r['spearman_min']:>7.4f}")
  if args.compare:
    res["compare"] = compare_answers(args.workdir, args.compare)
    pp = lambda v: f"{100 * v[0]:+.2f} [{100 * v[1]:+.2f}, {100 * v[2]:+.2f}]" if v else ""
    print(f"\nΔ tail-aware − mean-only (pp): {args.workdir} (float32) vs {args.compare} (bfloat16)")
    for r in res["compare"]["rows"]:
      tail = (f" diff {100 * r['difference']:+.2f}, seed spread {100 * r['seed_spread']:.2f}, "
              f"{'unchanged' if r['unchanged'] else 'MOVED'}" if "unchanged" in r else "")
      print(f"{r['metric']:<12} {r['category']:<20} {pp(r.get('float32')):>26} "
            f"{pp(r.get('bfloat16')):>26}{tail}")
  return res


if __name__ == "__main__":
  main(sys.argv[1:])
