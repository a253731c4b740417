"""Study A end to end: features → flows (variants × seeds) → maps → metrics → report.

Data flows one way and every stage leaves its files in the workdir::

  <workdir>/manifest.json, config.json   the run record (``tailjax.runrecord``)
  <workdir>/<category>/checkpoints/<s>   every (variant, seed) row, stacked (``tailjax.engine``)
  <workdir>/<category>/rows.json         the rows and a hash of the training features
  <workdir>/units/<category>/eval/<s>.json   every row's metrics at step s
  <workdir>/<category>/metrics.json      PaDiM + every row's metrics
  <workdir>/<category>/examples.png      anomaly-map overlays
  <workdir>/metrics.json                 all categories, summary statistics
  <workdir>/report.md                    the comparison table, differences with CIs

Rows: ``len(variants) × num_seeds``, all of a category trained as one grid on
the engine; variant v with seed s starts from the same weights and sees the
same batches as every other variant with seed s, so "tail − mean" differences
are paired by seed.

Multi-scale FastFlow (``backbone.layers``, e.g. ``(4, 8, 16)``): every row is one
flow per scale trained on the sum of the scales' tail-aware losses
(``train.make_flow_loss``); maps are the per-scale scores upsampled and averaged
(``evaluation.evaluate_scores``). PaDiM, the validation-NLL statistics (``val``)
and the analyses use the reference scale ``backbone.layer`` (``load_trained``
returns that scale's flow and parameters).
"""

from __future__ import annotations

import concurrent.futures
import copy
import hashlib
import os
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from tailjax import anomaly, distributed, engine, evaluation, io, reporting, runrecord
from tailjax import train as train_lib
from tailjax.analysis import causal
from tailjax.data import pipeline
from tailjax.evaluation import METRIC_KEYS, METRIC_NAMES
from tailjax.stats import mean_ci
from tailjax.studies.study_a_run import KIND, reference_scale, variant_rows

# Every field study A reads (``runrecord.check_fields``): anything else is an error.
# data.* and backbone.* fields depend on the data kind and backbone (``pipeline.input_fields``).
FIELDS = (
    "seed", "num_seeds",
    "flow.num_steps", "flow.kernel_mode", "flow.hidden_ratio", "flow.clamp",
    "flow.global_affine", "flow.layer_norm",
    "variants.*.tail_weight", "variants.*.top_k_ratio", "variants.*.learning_rate",
    "variants.*.tail_nll", "optim.*",
    "train.num_steps", "train.batch_size", "train.segment_steps", "train.rows",
    "train.conv_impl", "train.batch_devices",
    "eval.score", "eval.size", "eval.smoothing_sigma", "eval.image_score", "eval.image_topk",
    "eval.fpr_limit", "eval.budgets", "eval.boundary_px", "eval.fixed_tpr", "eval.plateau_tol",
    "padim.eps", "padim.n_channels",
    "analysis.enabled", "analysis.num_images", "analysis.num_param_images", "analysis.sweeps",
    "report.baseline", "report.treatment", "report.n_examples",
)


# ----------------------------------------------------------------------------
# Rows and evaluation
# ----------------------------------------------------------------------------


def _eval_cfg(cfg) -> dict:
  return dict(cfg.eval)


def _row_params(params_R, i: int):
  return jax.tree.map(lambda a: a[i], params_R)


def evaluate_rows(cfg, program: train_lib.FlowProgram, params_R, data: pipeline.CategoryData
                  ) -> list[dict]:
  """Every row's evaluation record (one compiled scorer for all rows):

  * ``metrics``: image/pixel AUROC, pixel AP, AUPRO, F1-max on the test split;
  * ``val``: percentiles / mean / tail gap of patch NLL on the held-out *normal*
    images (model selection and L2; absent when ``data.val_fraction`` is 0);
  * ``boundary``: pixel AP and FPR@TPR on the defect border band vs interior (L3).
  """
  n = jax.tree.leaves(params_R)[0].shape[0]
  e = cfg.eval
  scored = []
  for i in range(n):           # device work, row by row (one compiled scorer)
    p = _row_params(params_R, i)
    scores = evaluation.patch_scores(program.model, p, data.flow_feats("test"), e.score,
                                     conv_impl=program.conv_impl)
    val_nll = None
    if len(data.val_feats):
      val_nll = evaluation.patch_scores(program.model, p, data.flow_feats("val"), "nll",
                                        conv_impl=program.conv_impl)
      if data.multiscale:   # the reference scale's NLL, as the analyses see it
        val_nll = val_nll[reference_scale(cfg, data)]
    scored.append((scores, val_nll))
  # The host metrics are a deterministic function of (scores, val_nll): rows whose scores
  # are bit-identical get one computation. At step 0 that is every row (the flow starts as
  # the identity map whatever the seed, ``flows``), so the ladder's first point costs one
  # evaluation per category instead of one per row.
  first_of: dict[bytes, int] = {}
  source_R = [first_of.setdefault(_digest(item), i) for i, item in enumerate(scored)]
  unique = sorted(set(source_R))

  def host_metrics(item):
    scores, val_nll = item
    m, maps = evaluation.evaluate_scores(_eval_cfg(cfg), scores, data.test_masks,
                                         data.test_labels)
    rec = {"metrics": m,
           "boundary": causal.boundary_metrics(maps, data.test_masks, int(e.boundary_px),
                                               float(e.fixed_tpr))}
    if val_nll is not None:
      rec["val"] = causal.normal_tail(val_nll)
    return rec

  # The host metrics (sorts of every test pixel) dominate an evaluation; NumPy releases
  # the GIL in them, so rows run in parallel threads, one per core.
  with concurrent.futures.ThreadPoolExecutor(
      max_workers=max(1, min(len(unique), os.cpu_count() or 1))) as ex:
    recs = dict(zip(unique, ex.map(host_metrics, [scored[j] for j in unique])))
  return [copy.deepcopy(recs[j]) for j in source_R]


def _digest(tree) -> bytes:
  """SHA-256 of a tree's array leaves (shapes, dtypes and bytes, in tree order)."""
  h = hashlib.sha256()
  for leaf in jax.tree.leaves(tree):
    a = np.asarray(leaf)
    h.update(f"{a.shape}{a.dtype}".encode())
    h.update(np.ascontiguousarray(a).tobytes())
  return h.digest()


def eval_steps(cfg) -> tuple[int, ...]:
  """The budget ladder (``eval.budgets``, always ending at ``train.num_steps``)."""
  total = int(cfg.train.num_steps)
  steps = sorted({int(s) for s in cfg.eval.budgets} | {total})
  bad = [s for s in steps if not 0 <= s <= total]
  if bad:
    raise ValueError(f"config.eval.budgets: {bad} outside [0, train.num_steps={total}]")
  return tuple(steps)


def run_category(cfg, run: runrecord.Run, data: pipeline.CategoryData,
                 progress: bool = True) -> dict | None:
  """Trains every row on one category (resuming) and evaluates it; writes ``<cat>/metrics.json``.

  With several processes all of them train (``engine.run_rows``); process 0 alone
  evaluates, fits PaDiM and writes, and only it returns the results (the others: None).
  """
  t0 = time.time()
  rows = variant_rows(cfg)
  flow_train = data.flow_feats("train")
  program = train_lib.make_flow_program(cfg, train_lib.feats_shape_of(flow_train))  # the engine's
  evaluate = lambda step, params_R: evaluate_rows(cfg, program, params_R, data)
  res = engine.run_rows(cfg, run, data.name, flow_train, rows, eval_steps=eval_steps(cfg),
                        evaluate=evaluate, progress=progress, desc=data.name)
  _add_seconds(run, training=res.seconds.get("train", 0.0),
               evaluation=res.seconds.get("eval", 0.0))
  t_ref = time.time()
  out = distributed.lead_first(f"{data.name}/results",
                               lambda: _category_results(cfg, run, data, rows, res, t0))
  _add_seconds(run, reference_and_figures=time.time() - t_ref)
  return out


def _add_seconds(run: runrecord.Run, **phases: float) -> None:
  """Adds wall seconds per phase to this invocation's ``phase_seconds`` in the manifest
  (features, training, evaluation, reference_and_figures, analyses, report)."""
  rec = run.manifest["invocations"][-1].setdefault("phase_seconds", {})
  for k, v in phases.items():
    rec[k] = round(rec.get(k, 0.0) + float(v), 3)


def _category_results(cfg, run: runrecord.Run, data: pipeline.CategoryData, rows: engine.Rows,
                      res: engine.RowsResult, t0: float) -> dict:
  """PaDiM, every row's records at every budget, ``metrics.json`` and the examples figure."""
  out_dir = run.path(data.name)
  result: dict[str, Any] = {"category": data.name, "n_train": len(data.train_feats),
                            "n_test": len(data.test_feats),
                            "n_defective": int(np.sum(data.test_labels)),
                            "grid": list(data.train_feats.shape[1:3])}
  padim = anomaly.padim_fit(data.train_feats, eps=cfg.padim.eps, n_channels=cfg.padim.n_channels)
  padim_scores = np.asarray(anomaly.padim_score(padim, data.test_feats))
  result["padim"], padim_maps = evaluation.evaluate_scores(_eval_cfg(cfg), padim_scores,
                                                           data.test_masks, data.test_labels)
  total = int(cfg.train.num_steps)
  result["rows"] = [{**rows.row(i), "metrics": res.evals[total][i]["metrics"]}
                    for i in range(rows.num_rows)]
  # Every row's record at every budget: {step: [record per row]} (JSON keys are strings).
  result["budgets"] = {str(s): res.evals[s] for s in sorted(res.evals)}
  result["n_val"] = int(len(data.val_feats))
  result["seconds"] = time.time() - t0
  io.atomic_write_json(out_dir / "metrics.json", result)
  if cfg.report.n_examples > 0:
    from tailjax import figures
    names = [r["variant"] for r in result["rows"]]
    first = {n: names.index(n) for n in dict.fromkeys(names)}
    maps = {}
    for n, i in first.items():
      scores = evaluation.patch_scores(res.program.model, _row_params(res.params_R, i),
                                       data.flow_feats("test"), cfg.eval.score,
                                       conv_impl=res.program.conv_impl)
      maps[f"{n} (seed {rows.seeds_R[i]})"] = evaluation.evaluate_scores(
          _eval_cfg(cfg), scores, data.test_masks, data.test_labels)[1]
    figures.anomaly_examples(out_dir / "examples.png", data.test_images, data.test_masks,
                             data.test_types, {**maps, "PaDiM": padim_maps},
                             n_examples=cfg.report.n_examples, title=data.name)
  return result


# ----------------------------------------------------------------------------
# Statistics and report
# ----------------------------------------------------------------------------


def summarize(results: dict[str, dict], baseline: str, treatment: str) -> dict:
  """Per category and over categories: mean ± std per variant, paired treatment − baseline CI."""
  cats = list(results)
  variants = list(dict.fromkeys(r["variant"] for r in results[cats[0]]["rows"]))
  per_seed: dict[str, dict[str, dict[int, dict]]] = {}
  for c in cats:
    for r in results[c]["rows"]:
      per_seed.setdefault(r["variant"], {}).setdefault(c, {})[r["seed"]] = r["metrics"]
  out: dict[str, Any] = {"variants": variants, "categories": {}, "mean": {}}
  seeds = sorted(per_seed[variants[0]][cats[0]])
  for scope in cats + ["mean"]:
    table = {}
    for v in variants:
      table[v] = {}
      for k in METRIC_KEYS:
        vals = ([per_seed[v][scope][s][k] for s in seeds] if scope != "mean" else
                [np.mean([per_seed[v][c][s][k] for c in cats]) for s in seeds])
        table[v][k] = mean_ci(vals) | {"values": [float(x) for x in vals]}
    if baseline in table and treatment in table:
      diffs = {k: np.subtract(table[treatment][k]["values"], table[baseline][k]["values"])
               for k in METRIC_KEYS}
      table["difference"] = {k: mean_ci(d) | {"values": d.tolist()} for k, d in diffs.items()}
    table["padim"] = ({k: float(results[scope]["padim"][k]) for k in METRIC_KEYS} if scope != "mean"
                      else {k: float(np.mean([results[c]["padim"][k] for c in cats]))
                            for k in METRIC_KEYS})
    if scope == "mean":
      out["mean"] = table
    else:
      out["categories"][scope] = table
  out["seeds"] = seeds
  return out


def verdict(diff: dict) -> str:
  """Plain words for a paired difference (percentage points) and its 95 % CI."""
  return reporting.difference_verdict(diff, "tail-aware better", "tail-aware worse")


def _pct(x: float) -> str:
  return f"{100 * x:.2f}"


def write_report(cfg, workdir: Path, results: dict[str, dict], summary: dict, seconds: float,
                 analysis: dict | None = None) -> str:
  """``report.md``: the answer first (budget-robust, category-aware), then the final-step
  table, the budget curve, model selection, the causal chain and the examples."""
  from tailjax.studies import study_a_report as rep
  base, treat = cfg.report.baseline, cfg.report.treatment
  con = rep.conclusions(cfg, results, analysis)
  rep.budget_figure(workdir / "budget_curve.png", cfg, results, con)
  h, w = next(iter(results.values()))["grid"]
  n_val = next(iter(results.values())).get("n_val", 0)
  lines = [f"# Study A: tail-aware vs mean-only flow training ({cfg.data.kind})", ""]
  lines += ["## Answer", ""] + reporting.bullets(rep.answer_lines(cfg, results, con)) + [""]
  lines += rep.regime_section(cfg, con)
  lines += rep.nll_section(cfg, con)
  lines += ["![budget curve](budget_curve.png)", ""]
  extended = runrecord.read_manifest(workdir).get("extended", [])
  history = "".join(f" It was trained to {e.get('from_train.num_steps')} steps first, then "
                    f"extended to {e.get('to_train.num_steps')} (`--extend` on {e['at']}; "
                    "states and evaluations up to the old step count are reused, see "
                    "`manifest.json`)." for e in extended)
  lines += ["## Setup", "",
            f"Generated by `tailjax train` in {seconds / 60:.1f} min (this invocation).{history} "
            f"Features: {pipeline.describe_features(cfg)} ({h}×{w} patches), flow: "
            f"{cfg.flow.num_steps} coupling steps, kernels {cfg.flow.kernel_mode}, LayerNorm "
            f"{cfg.flow.layer_norm}; {cfg.train.num_steps} steps of batch {cfg.train.batch_size}, "
            f"{cfg.optim.name} lr {cfg.optim.learning_rate}; seeds {summary['seeds']}; "
            f"{n_val} normal training images per category held out for validation (never "
            "trained on; the test set is not used to select anything). Variants: "
            + ", ".join(f"**{n}** (λ = {vv.tail_weight}, r = {vv.top_k_ratio}"
                        + (f", tail ranked by the {vv.tail_nll} NLL"
                           if vv.get("tail_nll", "exact") != "exact" else "") + ")"
                        for n, vv in cfg.variants.items())
            + f". Every row is evaluated at steps {list(rep.budgets(results))}. Anomaly score: "
            f"per-patch {cfg.eval.score}, bilinear upsampling to {cfg.eval.size} px, Gaussian "
            f"σ = {cfg.eval.smoothing_sigma} px, image score = {cfg.eval.image_score} of the map. "
            "PaDiM (no training) is the reference row.", "",
            "Rules (fixed before the run):", ""] + rep.rules_bullets() + [""]
  lines += [f"## Results at the last step ({cfg.train.num_steps})", "",
            "All numbers in %, mean ± std over seeds. The difference row is "
            f"{treat} − {base} per seed (same initial weights and batches), with its 95 % "
            "t-interval over seeds.", ""]
  body = []
  scopes = list(summary["categories"].items()) + [("**mean**", summary["mean"])]
  for name, table in scopes:
    for var in summary["variants"]:
      body.append([name, var] + [reporting.mean_std(table[var][k]["values"]) for k in METRIC_KEYS])
    if "difference" in table:
      body.append([name, f"{treat} − {base}"] + [
          reporting.interval(table["difference"][k], scale=100, digits=2, signed=True)
          for k in METRIC_KEYS])
    body.append([name, "PaDiM"] + [_pct(table["padim"][k]) for k in METRIC_KEYS])
  lines += reporting.table(["category", "method"] + [METRIC_NAMES[k] for k in METRIC_KEYS], body)
  lines += ["", "## Budget curve", "",
            "Every row evaluated at each budget of the same run (no retraining); the difference is "
            "tail − mean per seed, pooled = mean over categories per seed.", ""]
  lines += rep.budget_table(cfg, results, con)
  lines += ["## Model selection without the test set", "",
            "Steps chosen per row (seed order) from the validation NLL alone; the metrics are "
            "the paired differences (pp, 95 % CI) at those steps.", ""]
  lines += rep.selection_table(cfg, results, con)
  lines += ["## The causal chain", "",
            "The study's story: concentration (L1) → better learning of the normal distribution's "
            "boundary (L2) → more precise scoring at defect boundaries (L3) → higher pixel AP (L4). "
            "Each link at the primary evaluation point.", ""]
  lines += rep.causal_table(cfg, con)
  lines += ["## Anomaly-map examples", ""]
  for c in results:
    if (workdir / c / "examples.png").exists():
      lines += [f"![{c}]({c}/examples.png)", ""]
  io.atomic_write_json(workdir / "conclusions.json", con)
  return reporting.write_markdown(workdir / "report.md", lines)


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------


def train_and_evaluate(cfg, run: runrecord.Run, progress: bool = True) -> dict:
  """Every category of ``cfg`` in the open run ``run``; resumable. With several processes,
  only process 0 (``run.writer``) gets the results; the others return ``results=None``."""
  t0 = time.time()
  dataset = pipeline.open_dataset(cfg)
  results = {}
  _add_seconds(run, features=time.time() - t0)   # building the benchmark, if needed
  for name in dataset.categories:
    t_feats = time.time()
    data = pipeline.load_once(dataset, name)
    _add_seconds(run, features=time.time() - t_feats)
    results[name] = run_category(cfg, run, data, progress=progress)
    if not run.writer:
      continue
    print(f"[{name}] " + ", ".join(
        f"{v} pixel AP {100 * np.mean([r['metrics']['pixel_ap'] for r in results[name]['rows'] if r['variant'] == v]):.2f}"
        for v in cfg.variants)
        + f", PaDiM {100 * results[name]['padim']['pixel_ap']:.2f} ({results[name]['seconds']:.0f} s)")
  if not run.writer:
    return {"results": None, "summary": None, "seconds": time.time() - t0,
            "workdir": run.workdir}
  summary = summarize(results, cfg.report.baseline, cfg.report.treatment)
  seconds = time.time() - t0
  io.atomic_write_json(run.path("metrics.json"), {"categories": results, "summary": summary,
                                                  "seconds": seconds})
  return {"results": results, "summary": summary, "seconds": seconds, "workdir": run.workdir}


def validate_config(cfg) -> None:
  runrecord.check_fields(cfg, FIELDS + pipeline.input_fields(cfg))
  if int(cfg.num_seeds) < 1:
    raise ValueError(f"config.num_seeds must be ≥ 1, got {cfg.num_seeds}")
  if cfg.report.baseline not in cfg.variants or cfg.report.treatment not in cfg.variants:
    raise ValueError(f"config.report.baseline / treatment must name variants "
                     f"({', '.join(cfg.variants)}); got {cfg.report.baseline!r}, "
                     f"{cfg.report.treatment!r}")
  variant_rows(cfg)   # validates λ, r, lr


def main(cfg, workdir: str | Path, *, on_change: str = "error", progress: bool = True) -> dict:
  """The whole study for ``cfg`` in ``workdir``: train + evaluate every category, write the
  report, then (``analysis.enabled``) the mechanism analyses. Resumable; a changed
  results-relevant config is refused (``on_change``: see ``runrecord.open_run``)."""
  validate_config(cfg)
  t0 = time.time()
  with runrecord.open_run(workdir, cfg, kind=KIND, on_change=on_change, extendable=True) as run:
    out = train_and_evaluate(cfg, run, progress=progress)
    if not run.writer:   # trained with process 0, which analyses and reports
      return out
    res = None
    t_phase = time.time()
    if cfg.analysis.enabled:
      from tailjax.studies import analysis
      res = analysis.analyze_run(run.workdir, num_images=cfg.analysis.num_images,
                                 num_param_images=cfg.analysis.num_param_images,
                                 sweeps=cfg.analysis.sweeps or None, run=run)
      out["analysis"] = res
    _add_seconds(run, analyses=time.time() - t_phase)
    t_phase = time.time()
    text = write_report(cfg, run.workdir, out["results"], out["summary"], time.time() - t0, res)
    if res is not None:
      analysis.append_to_report(run.workdir, res)
      text = (run.workdir / "report.md").read_text()
    _add_seconds(run, report=time.time() - t_phase)
    run.record()   # the phase times, into manifest.json
    print(text)
  return out
