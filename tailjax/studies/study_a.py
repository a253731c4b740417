"""Study A end to end: features → flows (variants × seeds) → maps → metrics → report.

Data flows one way and every stage leaves its files in the workdir::

  <workdir>/manifest.json, config.json   the run record (``tailjax.runrecord``)
  <workdir>/<category>/checkpoints/<s>   every (variant, seed) row, stacked (``tailjax.engine``)
  <workdir>/<category>/rows.json         the rows and a hash of the training features
  <workdir>/units/<category>/eval/<s>.json   every row's metrics at step s (at the last
                                         step also on every rung of the ladder)
  <workdir>/<category>/metrics.json      PaDiM + every row's metrics
  <workdir>/<category>/examples.png      anomaly-map overlays
  <workdir>/metrics.json                 all categories, summary statistics
  <workdir>/analysis/                    the mechanism analyses (``mechanisms``)
  <workdir>/report.md, conclusions.json, budget_curve.png
                                         the report (``study_a_report.write_report``)

Rows: ``len(variants) × num_seeds``, all of a category trained as one grid on
the engine; variant v with seed s starts from the same weights and sees the
same batches as every other variant with seed s, so "tail − mean" differences
are paired by seed. Every row is evaluated by ``evaluation.evaluate_rows`` at
each step of the budget ladder (``eval_steps``).

The mechanism analyses (``mechanisms.enabled``) take the trained rows from memory
(the engine's program and parameters); ``tailjax analyze`` reloads them from the
checkpoints of a finished run (``study_a_record.load_trained``), with the same result.

Multi-scale FastFlow (``backbone.layers``, e.g. ``(4, 8, 16)``): every row is one
flow per scale trained on the sum of the scales' tail-aware losses
(``train.make_flow_loss``); maps are the per-scale scores upsampled and averaged
(``evaluation.evaluate_scores``). PaDiM, the validation-NLL statistics (``val``)
and the analyses use the reference scale ``backbone.layer`` (the analyses get that
scale's flow and parameters).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from tailjax import anomaly, distributed, engine, evaluation, io, runrecord
from tailjax import train as train_lib
from tailjax.data import pipeline
from tailjax.studies import (mechanisms, study_a_conclusions, study_a_ladder, study_a_record,
                             study_a_report)
from tailjax.studies.study_a_record import KIND

# Every field study A reads (``runrecord.check_fields``): anything else is an error.
# data.* and backbone.* fields depend on the data kind and backbone (``pipeline.input_fields``).
FIELDS = (
    "seed", "num_seeds",
    "flow.num_steps", "flow.kernel_mode", "flow.hidden_ratio", "flow.clamp",
    "flow.global_affine", "flow.layer_norm", "flow.subnet_init",
    "variants.*.tail_weight", "variants.*.top_k_ratio", "variants.*.learning_rate",
    "variants.*.tail_nll", "optim.*",
    "train.num_steps", "train.batch_size", "train.segment_steps", "train.row_mode",
    "train.conv_impl", "train.batch_devices", "train.profile_steps", "train.precision",
    "train.processes",
    "eval.score", "eval.size", "eval.smoothing_sigma", "eval.image_score", "eval.image_topk",
    "eval.fpr_limit", "eval.budgets", "eval.boundary_px", "eval.fixed_tpr", "eval.plateau_tol",
    "eval.n_boot",
    "padim.eps", "padim.n_channels",
    "mechanisms.enabled", "mechanisms.num_images", "mechanisms.num_param_images",
    "mechanisms.sweeps",
    "report.baseline", "report.treatment", "report.n_examples", "report.equivalence_margin_pp",
    "report.slope_margin", "report.compare_runs",
)


# ----------------------------------------------------------------------------
# One category: train, evaluate, reference, figures
# ----------------------------------------------------------------------------


def eval_steps(cfg) -> tuple[int, ...]:
  """The budget ladder (``eval.budgets``, always ending at ``train.num_steps``)."""
  total = int(cfg.train.num_steps)
  steps = sorted({int(s) for s in cfg.eval.budgets} | {total})
  bad = [s for s in steps if not 0 <= s <= total]
  if bad:
    raise ValueError(f"config.eval.budgets: {bad} outside [0, train.num_steps={total}]")
  return tuple(steps)


@dataclasses.dataclass
class CategoryRun:
  """One trained and evaluated category: its results (``<cat>/metrics.json``; None on
  every process but 0), its rows and the engine's result (program, parameters)."""
  result: dict | None
  rows: engine.Rows
  trained: engine.RowsResult


def run_category(cfg, run: runrecord.Run, data: pipeline.CategoryData,
                 progress: bool = True) -> CategoryRun:
  """Trains every row on one category (resuming) and evaluates it; writes ``<cat>/metrics.json``.

  With several processes all of them train (``engine.run_rows``); process 0 alone
  evaluates, fits PaDiM and writes, and only it gets the results (the others: None).
  """
  t0 = time.time()
  rows = engine.Rows.from_variants(cfg)
  flow_train = data.flow_feats("train")
  steps = eval_steps(cfg)
  # The difficulty ladder's rungs are scored once, at the last budget (the reading at
  # convergence): evaluation, not training, grows with the ladder.
  evaluate = lambda step, params_R, program: evaluation.evaluate_rows(
      cfg, program, params_R, data, rungs=step == steps[-1])
  res = engine.run_rows(cfg, run, data.name, flow_train, rows, eval_steps=steps,
                        evaluate=evaluate, progress=progress, desc=data.name)
  _add_seconds(run, training=res.seconds.get("train", 0.0),
               evaluation=res.seconds.get("eval", 0.0))
  t_ref = time.time()
  out = distributed.lead_first(f"{data.name}/results",
                               lambda: _category_results(cfg, run, data, rows, res, t0))
  _add_seconds(run, reference_and_figures=time.time() - t_ref)
  return CategoryRun(out, rows, res)


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
  result["padim"], padim_maps = evaluation.evaluate_scores(dict(cfg.eval), padim_scores,
                                                           data.test_masks, data.test_labels)
  total = int(cfg.train.num_steps)
  result["rows"] = [{**rows.row(i), "metrics": res.evals[total][i]["metrics"]}
                    for i in range(rows.num_rows)]
  # Every row's record at every budget: {step: [record per row]} (JSON keys are strings).
  result["budgets"] = {str(s): res.evals[s] for s in sorted(res.evals)}
  result["n_val"] = int(len(data.val_feats))
  if data.rungs:   # the ladder's facts; every row's rung records are in its last budget's record
    result["ladder"] = [r.facts() for r in data.rungs]
    result["padim_rungs"] = [_padim_rung(cfg, padim, r) for r in data.rungs]
  result["seconds"] = time.time() - t0
  io.atomic_write_json(out_dir / "metrics.json", result)
  if cfg.report.n_examples > 0:
    _examples_figure(cfg, out_dir / "examples.png", data, rows, res, padim_maps)
  return result


def _padim_rung(cfg, padim, rung) -> dict:
  """PaDiM's metrics on one rung's test split (the no-training reference per rung)."""
  m, _ = evaluation.evaluate_scores(dict(cfg.eval),
                                    np.asarray(anomaly.padim_score(padim, rung.test_feats)),
                                    rung.test_masks, rung.test_labels)
  return m


def _examples_figure(cfg, path: Path, data: pipeline.CategoryData, rows: engine.Rows,
                     res: engine.RowsResult, padim_maps: np.ndarray) -> None:
  """Anomaly-map overlays of the first seed of every variant and of PaDiM."""
  from tailjax import figures
  names = [rows.row(i)["variant"] for i in range(rows.num_rows)]
  first = {n: names.index(n) for n in dict.fromkeys(names)}
  maps = {}
  for n, i in first.items():
    scores = evaluation.patch_scores(res.program.model, evaluation.row_params(res.params_R, i),
                                     data.flow_feats("test"), cfg.eval.score,
                                     conv_impl=res.program.conv_impl)
    maps[f"{n} (seed {rows.seeds_R[i]})"] = evaluation.evaluate_scores(
        dict(cfg.eval), scores, data.test_masks, data.test_labels)[1]
  figures.anomaly_examples(path, data.test_images, data.test_masks, data.test_types,
                           {**maps, "PaDiM": padim_maps}, n_examples=cfg.report.n_examples,
                           title=data.name)


def _trained_category(cfg, dataset: pipeline.Dataset, data: pipeline.CategoryData,
                      cat: CategoryRun) -> study_a_record.TrainedCategory:
  """The category's trained rows as the analyses take them, from memory: what
  ``study_a_record.load_trained`` rebuilds from the checkpoints of a finished run (for a
  multi-scale run, the reference scale's flow is the sub-module ``scale_<s>``)."""
  res = cat.trained
  if not data.multiscale:
    return study_a_record.TrainedCategory(cfg, data, res.program.model, res.program,
                                       res.params_R, cat.rows.to_json(), dataset)
  s = study_a_record.reference_scale(cfg, data)
  ref_program = train_lib.make_flow_program(cfg, data.train_feats.shape,
                                            conv_impl=res.program.conv_impl)
  return study_a_record.TrainedCategory(cfg, data, ref_program.model, ref_program,
                                     {"params": res.params_R["params"][f"scale_{s}"]},
                                     cat.rows.to_json(), dataset, full_program=res.program,
                                     full_params_R=res.params_R)


# ----------------------------------------------------------------------------
# Entry points
# ----------------------------------------------------------------------------


def train_and_evaluate(cfg, run: runrecord.Run, progress: bool = True) -> dict:
  """Every category of ``cfg`` in the open run ``run``; resumable. With several processes,
  only process 0 (``run.writer``) gets the results; the others return ``results=None``.

  Returns {"results", "summary" (``study_a_conclusions.summarize``), "seconds", "workdir",
  "trained"}: ``trained`` holds every category's ``TrainedCategory`` in memory when the
  analyses will run (``mechanisms.enabled``, process 0), else {}.
  """
  t0 = time.time()
  dataset = pipeline.open_dataset(cfg)
  results, trained = {}, {}
  _add_seconds(run, features=time.time() - t0)   # building the benchmark, if needed
  for name in dataset.categories:
    t_feats = time.time()
    data = pipeline.load_once(dataset, name)
    _add_seconds(run, features=time.time() - t_feats)
    cat = run_category(cfg, run, data, progress=progress)
    results[name] = cat.result
    if not run.writer:
      continue
    if cfg.mechanisms.enabled:
      trained[name] = _trained_category(cfg, dataset, data, cat)
    print(f"[{name}] " + ", ".join(
        f"{v} pixel AP {100 * np.mean([r['metrics']['pixel_ap'] for r in results[name]['rows'] if r['variant'] == v]):.2f}"
        for v in cfg.variants)
        + f", PaDiM {100 * results[name]['padim']['pixel_ap']:.2f} ({results[name]['seconds']:.0f} s)")
  if not run.writer:
    return {"results": None, "summary": None, "seconds": time.time() - t0,
            "workdir": run.workdir, "trained": {}}
  summary = study_a_conclusions.summarize(results, cfg.report.baseline, cfg.report.treatment)
  seconds = time.time() - t0
  io.atomic_write_json(run.path("metrics.json"), {"categories": results, "summary": summary,
                                                  "seconds": seconds})
  return {"results": results, "summary": summary, "seconds": seconds, "workdir": run.workdir,
          "trained": trained}


def validate_config(cfg) -> None:
  runrecord.check_fields(cfg, FIELDS + pipeline.input_fields(cfg))
  if int(cfg.num_seeds) < 1:
    raise ValueError(f"config.num_seeds must be ≥ 1, got {cfg.num_seeds}")
  if cfg.report.baseline not in cfg.variants or cfg.report.treatment not in cfg.variants:
    raise ValueError(f"config.report.baseline / treatment must name variants "
                     f"({', '.join(cfg.variants)}); got {cfg.report.baseline!r}, "
                     f"{cfg.report.treatment!r}")
  engine.Rows.from_variants(cfg)   # validates λ, r, lr
  study_a_conclusions.equivalence_margin_pp(cfg)   # > 0: a bad margin fails before training
  study_a_ladder.slope_margin(cfg)


def main(cfg, workdir: str | Path, *, on_change: str = "error", progress: bool = True) -> dict:
  """The whole study for ``cfg`` in ``workdir``: train + evaluate every category, then
  (``mechanisms.enabled``) the mechanism analyses on the trained rows in memory, then the
  report in one pass (``study_a_report.report``), printed. Resumable; a changed
  results-relevant config is refused (``on_change``: see ``runrecord.open_run``).

  Returns {"results", "summary", "seconds", "workdir"} and, with the analyses, "analysis".
  """
  validate_config(cfg)
  with runrecord.open_run(workdir, cfg, kind=KIND, on_change=on_change, extendable=True) as run:
    out = train_and_evaluate(cfg, run, progress=progress)
    trained = out.pop("trained")
    if not run.writer:   # trained with process 0, which analyses and reports
      return out
    analysis = None
    t_phase = time.time()
    if cfg.mechanisms.enabled:
      analysis = mechanisms.analyze_run(
          run.workdir, num_images=cfg.mechanisms.num_images,
          num_param_images=cfg.mechanisms.num_param_images, sweeps=cfg.mechanisms.sweeps or None,
          run=run, trained=trained, results=out["results"])
      out["analysis"] = analysis
    _add_seconds(run, analyses=time.time() - t_phase)
    t_phase = time.time()
    lines = study_a_report.report(cfg, run.workdir, out["results"], out["summary"],
                                  out["seconds"], analysis)
    _add_seconds(run, report=time.time() - t_phase)
    run.record()   # the phase times, into manifest.json
    print("\n".join(lines))
  return out
